//! MTA-STS across the cluster: the node that first delivers to a domain
//! fetches its policy and proposes it; every node then holds the same
//! policy and obeys it, and nobody fetches it again within its max_age.
//! The policy is published in a DNS server and served over HTTPS; the
//! receiver's certificate verifies, as `enforce` requires.

use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use skein_node::Node;
use skein_queue::StsMode;
use skein_testkit::{wait_for, DnsServer, SinkMta, StaticHttps};
use skein_tests::mail::{tokened, wait_all_arrived};
use skein_tests::{send, ClusterPlan};

/// A self-signed certificate for `name`: a server config presenting it, and
/// its PEM for the nodes to trust.
fn server_tls(name: &str) -> (Arc<rustls::ServerConfig>, String) {
    let ck = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![ck.cert.der().clone()], key)
        .unwrap();
    (Arc::new(config), ck.cert.pem())
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
        .start()
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("trusted.pem");
    std::fs::write(&ca, format!("{policy_pem}{mx_pem}")).unwrap();
    let extra = format!(
        "tls_ca_file = {:?}\nmta_sts_port = {}\n",
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
    for n in nodes {
        n.shutdown(Duration::from_secs(5)).await;
    }
}
