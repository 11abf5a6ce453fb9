//! Durability with the real binary: acknowledged mail survives SIGKILL,
//! again and again, and is delivered once the node comes back.

use std::net::Ipv4Addr;
use std::time::Duration;

use skein_testkit::{DnsServer, SinkMta};
use skein_tests::mail::{wait_all_arrived, Load};
use skein_tests::{free_port, ProcessNode, TestConfig};

#[tokio::test(flavor = "multi_thread")]
async fn acknowledged_mail_survives_repeated_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let dns = DnsServer::builder()
        .mx("example.org", 10, "mx.example.org")
        .a("mx.example.org", Ipv4Addr::LOCALHOST)
        .start()
        .await
        .unwrap();
    // Nothing listens on the MX port until the end, so nothing can be
    // delivered before a kill: every acknowledged message must come from disk.
    let mx_port = free_port();
    let cfg = TestConfig::new(1, dir.path().join("data"), dns.addr(), mx_port).with_fixed_ports();
    let smtp = cfg.smtp;
    let mut node = ProcessNode::start(skein_tests::skeind!(), cfg).unwrap();

    let mut log = Vec::new();
    for round in 0..4u64 {
        node.wait_ready(Duration::from_secs(30)).await.unwrap();
        // A stream of messages, each with a token of its own, until the kill.
        let load = Load::start(vec![smtp], 4, &format!("r{round}"));
        tokio::time::sleep(Duration::from_millis(300 + 250 * round)).await;
        node.kill9();
        log.extend(load.stop().await);
        node.restart().unwrap();
    }
    let acked: Vec<String> = log
        .iter()
        .filter(|s| s.accepted)
        .map(|s| s.token.clone())
        .collect();
    println!(
        "sent {} messages over 4 kills; {} acknowledged",
        log.len(),
        acked.len()
    );
    assert!(
        acked.len() >= 8,
        "too few messages acknowledged to prove anything: {}",
        acked.len()
    );

    // The MX comes up: every acknowledged message must arrive.
    let sink = SinkMta::builder().port(mx_port).start().await.unwrap();
    node.wait_ready(Duration::from_secs(30)).await.unwrap();
    match wait_all_arrived(&sink, &acked, Duration::from_secs(90)).await {
        Ok(got) => println!(
            "all {} acknowledged messages delivered ({} deliveries)",
            acked.len(),
            got.values().sum::<usize>()
        ),
        Err(missing) => panic!(
            "{} acknowledged messages lost, e.g. {:?}; log:\n{}",
            missing.len(),
            &missing[..missing.len().min(5)],
            node.log()
        ),
    }
    let status = node.terminate().unwrap();
    assert!(status.success(), "SIGTERM exit: {status:?}");
}
