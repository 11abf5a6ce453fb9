//! The spine end to end, one node in process: SMTP in, a one-voter Raft
//! cluster on sled, MX lookup at a real DNS server, delivery to a recording
//! MTA.

use std::net::Ipv4Addr;
use std::time::Duration;

use skein_node::Node;
use skein_smtp::{EnhancedCode, Reply};
use skein_testkit::{wait_for, DnsServer, SinkMta};
use skein_tests::{send, TestConfig};

async fn node(dir: &tempfile::TempDir, dns: &DnsServer, sink: &SinkMta) -> Node {
    let cfg = TestConfig::new(1, dir.path().join("data"), dns.addr(), sink.port());
    Node::start(cfg.config()).await.unwrap()
}

async fn queue_empties(node: &Node) {
    let reader = node.cluster().reader().clone();
    wait_for(Duration::from_secs(20), "the queue to empty", || {
        let r = reader.clone();
        async move { r.read().is_empty() }
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_travels_from_smtp_through_raft_to_the_mx() {
    let dir = tempfile::tempdir().unwrap();
    let dns = skein_tests::mail::example_org_dns().await;
    let sink = SinkMta::builder().start().await.unwrap();
    let node = node(&dir, &dns, &sink).await;

    let data = b"From: a@client.test\r\nTo: b@example.org\r\nSubject: spine\r\n\r\nHello.\r\n.a line with a dot\r\n..two\r\n";
    let s = send(
        node.smtp_addrs[0],
        "a@client.test",
        &["b@example.org"],
        data,
    )
    .await
    .unwrap();
    assert!(s.accepted(), "{}", s.reply);
    let id = s.id.expect("queue id in the 250");

    let got = sink.wait_for(1, Duration::from_secs(20)).await.unwrap();
    assert_eq!(got[0].mail_from, "a@client.test");
    assert_eq!(got[0].rcpt_to, vec!["b@example.org".to_string()]);
    let body = &got[0].data;
    assert!(
        body.ends_with(data),
        "body changed in transit: {:?}",
        String::from_utf8_lossy(body)
    );
    let header = std::str::from_utf8(&body[..body.len() - data.len()]).unwrap();
    assert!(
        header.starts_with(&format!(
            "Received: from client.test ([127.0.0.1])\r\n\tby node1.skein.test (Skein) with ESMTP id {id}\r\n\tfor <b@example.org>; "
        )),
        "{header}"
    );
    assert!(
        header.ends_with("\r\n") && header.matches("\r\n").count() == 3,
        "one Received header only: {header:?}"
    );
    queue_empties(&node).await;
    assert_eq!(sink.messages().len(), 1, "delivered exactly once");
    node.shutdown(Duration::from_secs(5)).await;
}

/// Skein relaying to Skein: the receiving node offers PIPELINING and
/// CHUNKING, so the sender's delivery puts the message in its envelope's
/// write as one `BDAT LAST` chunk — read by a server written apart from
/// that client — and the message arrives byte for byte.
#[tokio::test(flavor = "multi_thread")]
async fn a_message_relayed_to_another_skein_by_bdat_arrives_intact() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let dns = skein_tests::mail::example_org_dns().await;
    let sink = SinkMta::builder().start().await.unwrap();
    let cfg_b =
        TestConfig::new(2, dir_b.path().join("data"), dns.addr(), sink.port()).with_fixed_ports();
    let b = Node::start(cfg_b.config()).await.unwrap();
    let tcp = tokio::net::TcpStream::connect(b.smtp_addrs[0])
        .await
        .unwrap();
    let replies = skein_testkit::converse(tcp, b"EHLO probe.test\r\nQUIT\r\n").await;
    assert!(
        replies[1].lines.iter().any(|l| l == "CHUNKING"),
        "{replies:?}"
    );
    let cfg_a = TestConfig::new(
        1,
        dir_a.path().join("data"),
        dns.addr(),
        b.smtp_addrs[0].port(),
    );
    let a = Node::start(cfg_a.config()).await.unwrap();

    let data = b"From: a@client.test\r\nTo: b@example.org\r\nSubject: by BDAT\r\n\r\n.\r\n.a line with a dot\r\n..two\r\nend\r\n";
    let s = send(a.smtp_addrs[0], "a@client.test", &["b@example.org"], data)
        .await
        .unwrap();
    assert!(s.accepted(), "{}", s.reply);
    let got = sink.wait_for(1, Duration::from_secs(20)).await.unwrap();
    let body = &got[0].data;
    assert!(
        body.ends_with(data),
        "body changed in transit: {:?}",
        String::from_utf8_lossy(body)
    );
    let header = String::from_utf8_lossy(&body[..body.len() - data.len()]).into_owned();
    assert!(
        header.starts_with("Received: from node1.skein.test")
            && header.contains("by node1.skein.test"),
        "node 2's Received header, then node 1's: {header}"
    );
    queue_empties(&a).await;
    queue_empties(&b).await;
    assert_eq!(sink.messages().len(), 1, "delivered exactly once");
    a.shutdown(Duration::from_secs(5)).await;
    b.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_4xx_defers_the_message_and_the_retry_delivers_it() {
    let dir = tempfile::tempdir().unwrap();
    let dns = skein_tests::mail::example_org_dns().await;
    let sink = SinkMta::builder()
        .on_data(|n| match n {
            0 => Reply::new(451, Some(EnhancedCode::new(4, 3, 0)), "try again later"),
            _ => Reply::new(250, Some(EnhancedCode::new(2, 0, 0)), "Ok"),
        })
        .start()
        .await
        .unwrap();
    let node = node(&dir, &dns, &sink).await;

    let s = send(
        node.smtp_addrs[0],
        "a@client.test",
        &["b@example.org"],
        b"Subject: retry\r\n\r\nbody\r\n",
    )
    .await
    .unwrap();
    let id = s.id.expect("accepted");

    // The first attempt is refused: the message waits with the reply kept.
    let reader = node.cluster().reader().clone();
    wait_for(
        Duration::from_secs(10),
        "the first attempt to be recorded",
        || {
            let r = reader.clone();
            async move { r.read().get(&id).is_some_and(|m| m.attempts == 1) }
        },
    )
    .await
    .unwrap();
    let deferred_at = std::time::Instant::now();
    {
        let state = reader.read();
        let m = state.get(&id).unwrap();
        assert!(
            m.last_error
                .as_deref()
                .unwrap_or("")
                .starts_with("451 4.3.0 try again later"),
            "{:?}",
            m.last_error
        );
        assert!(m.lease.is_none(), "lease handed back with the outcome");
        assert!(m.next_attempt > m.received_at);
    }
    assert!(sink.messages().is_empty());
    let (code, metrics) = skein_tests::mail::http_get(node.metrics_addr, "/metrics")
        .await
        .unwrap();
    assert_eq!(code, 200);
    assert!(
        metrics.contains(r#"skein_delivery_deferrals_total{reason="reply_4xx"} 1"#),
        "{metrics}"
    );

    // The retry schedule is one second: the second attempt delivers.
    sink.wait_for(1, Duration::from_secs(20)).await.unwrap();
    assert!(
        deferred_at.elapsed() >= Duration::from_millis(800),
        "retried too early: {:?}",
        deferred_at.elapsed()
    );
    queue_empties(&node).await;
    node.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_5xx_fails_the_recipient_and_the_message_leaves_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let dns = skein_tests::mail::example_org_dns().await;
    let sink = SinkMta::builder()
        .on_rcpt(|rcpt| {
            if rcpt.starts_with("nobody@") {
                Reply::new(550, Some(EnhancedCode::new(5, 1, 1)), "no such user")
            } else {
                Reply::new(250, Some(EnhancedCode::new(2, 1, 5)), "Ok")
            }
        })
        .start()
        .await
        .unwrap();
    let node = node(&dir, &dns, &sink).await;
    let s = send(
        node.smtp_addrs[0],
        "a@client.test",
        &["nobody@example.org", "b@example.org"],
        b"Subject: x\r\n\r\nx\r\n",
    )
    .await
    .unwrap();
    assert!(s.accepted());
    let got = sink.wait_for(1, Duration::from_secs(20)).await.unwrap();
    assert_eq!(got[0].rcpt_to, vec!["b@example.org".to_string()]);
    queue_empties(&node).await;
    node.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn mail_for_several_domains_goes_to_each_domains_mx() {
    let dir = tempfile::tempdir().unwrap();
    let dns = DnsServer::builder()
        .mx("example.org", 10, "mx.example.org")
        .a("mx.example.org", Ipv4Addr::new(127, 0, 0, 1))
        // No MX: the domain's own address is the implicit MX.
        .a("other.test", Ipv4Addr::new(127, 0, 0, 2))
        .start()
        .await
        .unwrap();
    let first = SinkMta::builder().start().await.unwrap();
    let second = SinkMta::builder()
        .ip(Ipv4Addr::new(127, 0, 0, 2).into())
        .port(first.port())
        .start()
        .await
        .unwrap();
    let node = node(&dir, &dns, &first).await;
    let s = send(
        node.smtp_addrs[0],
        "a@client.test",
        &["x@example.org", "y@other.test"],
        b"Subject: two\r\n\r\nx\r\n",
    )
    .await
    .unwrap();
    assert!(s.accepted());
    assert_eq!(
        first.wait_for(1, Duration::from_secs(20)).await.unwrap()[0].rcpt_to,
        ["x@example.org"]
    );
    assert_eq!(
        second.wait_for(1, Duration::from_secs(20)).await.unwrap()[0].rcpt_to,
        ["y@other.test"]
    );
    queue_empties(&node).await;
    node.shutdown(Duration::from_secs(5)).await;
}
