//! DKIM signing across the cluster, with real `skeind` processes: a trusted
//! client's message is relayed through a follower, signed there once per
//! key (RSA and Ed25519) before the commit, and delivered by another node
//! after the follower is SIGKILLed holding its lease. Both signatures
//! verify against the keys published in a DNS server, and the takeover
//! added none.

use std::time::Duration;

use base64::Engine;
use mail_auth::hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts,
};
use mail_auth::{AuthenticatedMessage, DkimResult, MessageAuthenticator};
use skein_testkit::{DnsServer, SinkMta};
use skein_tests::mail::wait_all_arrived;
use skein_tests::{send, wait_for_leader, ClusterPlan, ProcessNode, TestConfig};

/// A 2048-bit RSA key for tests only (PKCS#8 PEM, from `openssl genpkey`).
const RSA_KEY: &str = include_str!("../fixtures/dkim-rsa2048.pem");

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn write_private(path: &std::path::Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_signed_on_a_follower_and_delivered_after_a_takeover_verifies() {
    let keys = tempfile::tempdir().unwrap();
    let rsa_file = keys.path().join("rsa.pem");
    write_private(&rsa_file, RSA_KEY);
    let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let ed_file = keys.path().join("ed25519.pem");
    write_private(&ed_file, &ed.serialize_pem());
    // The SubjectPublicKeyInfo, base64: the PEM without its armour.
    let rsa_public: String = rcgen::KeyPair::from_pem(RSA_KEY)
        .unwrap()
        .public_key_pem()
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();

    let dns = DnsServer::builder()
        .mx("example.org", 10, "mx.example.org")
        .a("mx.example.org", std::net::Ipv4Addr::LOCALHOST)
        .txt(
            "rsa2026._domainkey.example.com",
            &format!("v=DKIM1; k=rsa; p={rsa_public}"),
        )
        .txt(
            "ed2026._domainkey.example.com",
            &format!("v=DKIM1; k=ed25519; p={}", b64(ed.public_key_raw())),
        )
        .start()
        .await
        .unwrap();

    // The MX first greets and then says nothing: the follower's attempt
    // hangs while it holds the lease, until it is killed.
    let hanging = SinkMta::builder()
        .hang_after_greeting()
        .start()
        .await
        .unwrap();
    let port = hanging.port();
    let tables = format!(
        "[[dkim]]\ndomain = \"example.com\"\nselector = \"rsa2026\"\nkey_file = {:?}\n\n\
         [[dkim]]\ndomain = \"example.com\"\nselector = \"ed2026\"\nkey_file = {:?}\n",
        rsa_file.display().to_string(),
        ed_file.display().to_string()
    );
    let plan = ClusterPlan::new(3, dns.addr(), port, |c| {
        c.lease = "3s".into();
        c.commit_timeout = "3s".into();
        c.tail = tables.clone();
    })
    .await
    .unwrap();
    let mut nodes = ProcessNode::start_all(skein_tests::skeind!(), &plan.configs)
        .await
        .unwrap();
    let admins: Vec<_> = plan.configs.iter().map(TestConfig::admin_addr).collect();
    let leader = wait_for_leader(&admins, Duration::from_secs(20))
        .await
        .unwrap();
    let follower = plan.ids().into_iter().find(|&id| id != leader).unwrap();

    // From 127.0.0.1, in the default relay networks: a trusted client.
    let token = "dkim-signed";
    let message = format!(
        "From: Ann <ann@Example.com>\r\nTo: <b@example.org>\r\nSubject: {token}\r\n\
         Date: Mon, 30 Nov 2026 06:00:00 +0000\r\nMessage-ID: <{token}@example.com>\r\n\
         X-Token: {token}\r\n\r\nSigned once, delivered by another node.\r\n"
    );
    let s = send(
        plan.config(follower).smtp,
        "ann@example.com",
        &["b@example.org"],
        message.as_bytes(),
    )
    .await
    .unwrap();
    assert!(s.accepted(), "{}", s.reply);
    skein_testkit::wait_for(
        Duration::from_secs(10),
        "the follower's attempt to reach the MX",
        || {
            let h = &hanging;
            async move { h.connections() >= 1 }
        },
    )
    .await
    .unwrap();

    nodes[(follower - 1) as usize].kill9();
    hanging.stop().await;
    let sink = SinkMta::builder().port(port).start().await.unwrap();
    wait_all_arrived(&sink, &[token.to_string()], Duration::from_secs(30))
        .await
        .expect("a survivor delivers");
    let delivered = sink.messages().remove(0).data;
    let text = String::from_utf8_lossy(&delivered).to_string();
    let signatures = text
        .lines()
        .filter(|l| l.starts_with("DKIM-Signature:"))
        .count();
    assert_eq!(
        signatures, 2,
        "one signature per key, none added on takeover:\n{text}"
    );

    let mut ns = NameServerConfig::new(dns.addr().ip(), true, vec![]);
    for mut c in [ConnectionConfig::udp(), ConnectionConfig::tcp()] {
        c.port = dns.addr().port();
        ns.connections.push(c);
    }
    let verifier = MessageAuthenticator::new(
        ResolverConfig::from_name_servers(vec![ns]),
        ResolverOpts::default(),
    )
    .unwrap();
    let parsed = AuthenticatedMessage::parse(&delivered).expect("a parsable message");
    let results = verifier.verify_dkim(&parsed).await;
    assert_eq!(results.len(), 2, "{text}");
    for r in &results {
        assert_eq!(
            r.result(),
            &DkimResult::Pass,
            "{:?} did not verify:\n{text}",
            r.signature().map(|s| s.s.clone())
        );
    }
    for n in &mut nodes {
        n.kill9();
    }
}
