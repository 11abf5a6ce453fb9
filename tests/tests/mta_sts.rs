//! MTA-STS across the cluster: the node that first delivers to a domain
//! fetches its policy and proposes it; every node then holds the same
//! policy and obeys it, and nobody fetches it again within its max_age.
//! The policy is published in a DNS server and served over HTTPS; the
//! receiver's certificate verifies, as `enforce` requires. With
//! `delivery.tls_reports` on, the nodes report those sessions (TLS-RPT) to
//! the domain's `rua` mailbox.

use std::sync::Arc;
use std::time::Duration;

use skein_node::Node;
use skein_queue::StsMode;
use skein_testkit::{wait_for, DnsServer, SinkMta, StaticHttps};
use skein_tests::mail::{tokened, wait_all_arrived};
use skein_tests::{send, ClusterPlan};

/// A self-signed certificate for `name`: a server config presenting it, and
/// its PEM for the nodes to trust.
fn server_tls(name: &str) -> (Arc<rustls::ServerConfig>, String) {
    let s = skein_testkit::self_signed(name);
    (s.config, s.pem)
}

/// Every TLS report at the sink: its envelope sender and its JSON.
fn reports(sink: &SinkMta) -> Vec<(String, serde_json::Value)> {
    use base64::Engine;
    use std::io::Read;
    sink.messages()
        .iter()
        .filter(|m| m.rcpt_to == ["tlsrpt@example.org"])
        .map(|m| {
            let text = String::from_utf8_lossy(&m.data).to_string();
            assert!(
                text.contains("Content-Type: multipart/report; report-type=\"tlsrpt\""),
                "{text}"
            );
            let part = text
                .split("Content-Type: application/tlsrpt+gzip\r\n")
                .nth(1)
                .expect("the report part");
            let b64: String = part
                .split("\r\n\r\n")
                .nth(1)
                .unwrap()
                .lines()
                .take_while(|l| !l.starts_with("--"))
                .collect();
            let gz = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap();
            let mut json = String::new();
            flate2::read::GzDecoder::new(&gz[..])
                .read_to_string(&mut json)
                .unwrap();
            (m.mail_from.clone(), serde_json::from_str(&json).unwrap())
        })
        .collect()
}

fn holds_policy(node: &Node) -> bool {
    node.cluster()
        .reader()
        .read()
        .sts_policy("example.org")
        .is_some_and(|p| p.mode == StsMode::Enforce && p.mx == ["mx.example.org"])
}

#[tokio::test(flavor = "multi_thread")]
async fn one_node_fetches_the_policy_and_every_node_obeys_it() {
    let (policy_tls, policy_pem) = server_tls("mta-sts.example.org");
    let policy = StaticHttps::start(
        policy_tls,
        "200 OK",
        "text/plain",
        "version: STSv1\r\nmode: enforce\r\nmx: mx.example.org\r\nmax_age: 86400\r\n",
    )
    .await
    .unwrap();
    let (mx_tls, mx_pem) = server_tls("mx.example.org");
    let sink = SinkMta::builder().tls(mx_tls).start().await.unwrap();
    let dns = DnsServer::builder()
        .mx("example.org", 10, "mx.example.org")
        .a("mx.example.org", std::net::Ipv4Addr::LOCALHOST)
        .a("mta-sts.example.org", std::net::Ipv4Addr::LOCALHOST)
        .txt("_mta-sts.example.org", "v=STSv1; id=20261130;")
        .txt(
            "_smtp._tls.example.org",
            "v=TLSRPTv1; rua=mailto:tlsrpt@example.org",
        )
        .start()
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("trusted.pem");
    std::fs::write(&ca, format!("{policy_pem}{mx_pem}")).unwrap();
    let extra = format!(
        "tls_ca_file = {:?}\nmta_sts_port = {}\ntls_reports = true\ntls_report_interval = \"1s\"\n",
        ca.display().to_string(),
        policy.port()
    );
    let plan = ClusterPlan::new(3, dns.addr(), sink.port(), |c| {
        c.delivery_extra = extra.clone();
    })
    .await
    .unwrap();
    let nodes = plan.start_all().await;

    let s = send(
        nodes[0].smtp_addrs[0],
        "a@client.test",
        &["b@example.org"],
        &tokened("sts-first"),
    )
    .await
    .unwrap();
    assert!(s.accepted(), "{}", s.reply);
    wait_all_arrived(&sink, &["sts-first".into()], Duration::from_secs(20))
        .await
        .unwrap();
    wait_for(
        Duration::from_secs(10),
        "every node to hold the policy",
        || {
            let all = nodes.iter().all(holds_policy);
            async move { all }
        },
    )
    .await
    .unwrap();
    assert_eq!(policy.served(), 1);

    // Mail accepted by the other nodes goes out under the same policy,
    // over verified TLS, without another fetch.
    let tokens = ["sts-second".to_string(), "sts-third".to_string()];
    for (node, t) in nodes[1..].iter().zip(&tokens) {
        let s = send(
            node.smtp_addrs[0],
            "a@client.test",
            &["b@example.org"],
            &tokened(t),
        )
        .await
        .unwrap();
        assert!(s.accepted(), "{}", s.reply);
    }
    wait_all_arrived(&sink, &tokens, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(policy.served(), 1, "fetched once for the whole cluster");
    assert!(sink.messages().iter().all(|m| m.tls), "all over TLS");

    // The nodes' TLS reports: gzipped JSON in a multipart/report, from the
    // null sender, about the sessions above.
    wait_for(Duration::from_secs(20), "a TLS report", || {
        let got = !reports(&sink).is_empty();
        async move { got }
    })
    .await
    .unwrap();
    for (from, report) in reports(&sink) {
        assert_eq!(from, "", "reports come from the null sender");
        let policy = &report["policies"][0];
        assert_eq!(policy["policy"]["policy-type"], "sts");
        assert_eq!(policy["policy"]["policy-domain"], "example.org");
        assert_eq!(policy["policy"]["mx-host"][0], "mx.example.org");
        assert!(policy["policy"]["policy-string"]
            .as_array()
            .unwrap()
            .contains(&"mode: enforce".into()));
        assert!(
            policy["summary"]["total-successful-session-count"]
                .as_u64()
                .unwrap()
                >= 1
        );
        assert_eq!(policy["summary"]["total-failure-session-count"], 0);
        assert!(report["organization-name"]
            .as_str()
            .unwrap()
            .ends_with(".skein.test"));
    }
    for n in nodes {
        n.shutdown(Duration::from_secs(5)).await;
    }
}
