//! Delivery status notifications end to end: one bounce per failure, with
//! the RFC 3464 fields; expiry; no bounce of a bounce; NOTIFY honoured; a
//! delay warning once.

use std::net::Ipv4Addr;
use std::time::Duration;

use skein_node::Node;
use skein_smtp::{EnhancedCode, Reply};
use skein_testkit::{wait_for, DnsServer, Received, SinkMta, SinkMtaBuilder};
use skein_tests::mail::metric;
use skein_tests::{send, TestConfig};

async fn dns() -> DnsServer {
    DnsServer::builder()
        .mx("example.org", 10, "mx.example.org")
        .mx("client.test", 10, "mx.example.org")
        .a("mx.example.org", Ipv4Addr::LOCALHOST)
        .start()
        .await
        .unwrap()
}

fn refuse(prefixes: &'static [&'static str], reply: fn() -> Reply) -> SinkMtaBuilder {
    SinkMta::builder().on_rcpt(move |rcpt| {
        if prefixes.iter().any(|p| rcpt.starts_with(p)) {
            reply()
        } else {
            Reply::new(250, Some(EnhancedCode::new(2, 1, 5)), "Ok")
        }
    })
}

fn no_such_user() -> Reply {
    Reply::new(550, Some(EnhancedCode::new(5, 1, 1)), "no such user")
}

fn busy() -> Reply {
    Reply::new(451, Some(EnhancedCode::new(4, 2, 0)), "mailbox busy")
}

async fn node(
    dir: &tempfile::TempDir,
    dns: &DnsServer,
    sink: &SinkMta,
    tweak: impl Fn(&mut TestConfig),
) -> Node {
    let mut c = TestConfig::new(1, dir.path().join("data"), dns.addr(), sink.port());
    tweak(&mut c);
    Node::start(c.config()).await.unwrap()
}

fn notices(sink: &SinkMta) -> Vec<Received> {
    sink.messages()
        .into_iter()
        .filter(|m| m.mail_from.is_empty())
        .collect()
}

/// Waits until the node's counters read `want` (series, value); they move
/// just after the report that changes them commits.
async fn counters_read(node: &Node, want: &[(&str, f64)]) {
    let addr = node.metrics_addr;
    let read = || async move {
        let mut got = Vec::new();
        for (series, _) in want {
            got.push((*series, metric(addr, series).await.unwrap_or(-1.0)));
        }
        got
    };
    let settled = wait_for(Duration::from_secs(10), "the counters", || async {
        read().await == want
    })
    .await;
    if settled.is_err() {
        assert_eq!(read().await, want);
    }
}

async fn queue_empties(node: &Node) {
    let r = node.cluster().reader().clone();
    wait_for(Duration::from_secs(30), "the queue to empty", || {
        let r = r.clone();
        async move { r.read().is_empty() }
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_permanent_failure_sends_exactly_one_bounce_with_the_dsn_fields() {
    let dir = tempfile::tempdir().unwrap();
    let dns = dns().await;
    let sink = refuse(&["nobody@"], no_such_user).start().await.unwrap();
    let node = node(&dir, &dns, &sink, |_| {}).await;
    let data = b"Subject: hello\r\nMessage-ID: <orig-1@client.test>\r\n\r\nbody\r\n";
    let s = send(
        node.smtp_addrs[0],
        "a@client.test",
        &["nobody@example.org", "b@example.org"],
        data,
    )
    .await
    .unwrap();
    assert!(s.accepted());
    wait_for(Duration::from_secs(20), "a bounce", || async {
        notices(&sink).len() == 1
    })
    .await
    .unwrap();
    queue_empties(&node).await;
    let bounces = notices(&sink);
    assert_eq!(bounces.len(), 1, "exactly one bounce");
    let b = &bounces[0];
    assert_eq!(b.rcpt_to, vec!["a@client.test".to_string()]);
    let text = String::from_utf8_lossy(&b.data);
    for want in [
        "Content-Type: multipart/report; report-type=delivery-status;",
        "Final-Recipient: rfc822; nobody@example.org",
        "Action: failed",
        "Status: 5.1.1",
        "Diagnostic-Code: smtp; 550 5.1.1 no such user",
        "Message-ID: <orig-1@client.test>",
    ] {
        assert!(text.contains(want), "missing {want:?}:\n{text}");
    }
    assert!(
        !text.contains("Final-Recipient: rfc822; b@example.org"),
        "the delivered recipient is not in the bounce"
    );
    // The good recipient got the message itself.
    assert!(sink
        .messages()
        .iter()
        .any(|m| m.rcpt_to == vec!["b@example.org".to_string()]));
    // Each counter says what its name says: the message failed (one
    // recipient did), the bounce was delivered, one failure notice.
    counters_read(
        &node,
        &[
            ("skein_messages_delivered_total", 1.0),
            ("skein_messages_failed_total", 1.0),
            ("skein_messages_bounced_total", 1.0),
            ("skein_notices_total{kind=\"failure\"}", 1.0),
            ("skein_notices_total{kind=\"delay\"}", 0.0),
        ],
    )
    .await;
    node.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn expiry_bounces_once_and_a_bounce_is_never_bounced() {
    let dir = tempfile::tempdir().unwrap();
    let dns = dns().await;
    // example.org always defers; the sender's own domain refuses everything,
    // so the bounce itself fails.
    let sink = SinkMta::builder()
        .on_rcpt(|rcpt| {
            if rcpt.ends_with("@client.test") {
                no_such_user()
            } else {
                busy()
            }
        })
        .start()
        .await
        .unwrap();
    let node = node(&dir, &dns, &sink, |c| {
        c.retry_schedule = vec!["300ms".into()];
        c.delivery_extra = "max_queue_time = \"3s\"".into();
    })
    .await;
    let s = send(
        node.smtp_addrs[0],
        "a@client.test",
        &["b@example.org"],
        b"Subject: will expire\r\n\r\nx\r\n",
    )
    .await
    .unwrap();
    assert!(s.accepted());
    queue_empties(&node).await;
    // The bounce was attempted (and refused); nothing else was queued after it.
    let tried: Vec<String> = sink
        .commands()
        .into_iter()
        .filter(|c| c.starts_with("RCPT TO:<a@client.test>"))
        .collect();
    assert_eq!(tried.len(), 1, "one bounce, tried once: {tried:?}");
    assert!(
        sink.commands().iter().all(|c| !c.contains("MAILER-DAEMON")),
        "no bounce of the bounce"
    );
    node.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_expiry_bounce_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let dns = dns().await;
    let sink = refuse(&["b@"], busy).start().await.unwrap();
    let node = node(&dir, &dns, &sink, |c| {
        c.retry_schedule = vec!["300ms".into()];
        c.delivery_extra = "max_queue_time = \"2s\"".into();
    })
    .await;
    send(
        node.smtp_addrs[0],
        "a@client.test",
        &["b@example.org"],
        b"Subject: x\r\n\r\nx\r\n",
    )
    .await
    .unwrap();
    wait_for(Duration::from_secs(20), "the expiry bounce", || async {
        notices(&sink).len() == 1
    })
    .await
    .unwrap();
    queue_empties(&node).await;
    let text = String::from_utf8_lossy(&notices(&sink)[0].data).into_owned();
    assert!(
        text.contains("Action: failed") && text.contains("expired"),
        "{text}"
    );
    // Well after expiry there is still exactly one.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(notices(&sink).len(), 1);
    node.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn notify_never_means_no_bounce_and_delays_are_warned_once() {
    let dir = tempfile::tempdir().unwrap();
    let dns = dns().await;
    let sink = SinkMta::builder()
        .on_rcpt(|rcpt| {
            if rcpt.starts_with("nobody@") {
                no_such_user()
            } else if rcpt.starts_with("slow@") {
                busy()
            } else {
                Reply::new(250, Some(EnhancedCode::new(2, 1, 5)), "Ok")
            }
        })
        .start()
        .await
        .unwrap();
    let node = node(&dir, &dns, &sink, |c| {
        c.retry_schedule = vec!["300ms".into()];
        c.delivery_extra = "delay_warning = \"1s\"".into();
    })
    .await;
    // NOTIFY=NEVER: the failure is silent.
    let script = "EHLO client.test\r\nMAIL FROM:<a@client.test>\r\nRCPT TO:<nobody@example.org> NOTIFY=NEVER\r\nDATA\r\nSubject: quiet\r\n\r\nx\r\n.\r\nQUIT\r\n";
    let replies = skein_testkit::converse(
        tokio::net::TcpStream::connect(node.smtp_addrs[0])
            .await
            .unwrap(),
        script.as_bytes(),
    )
    .await;
    assert_eq!(replies[5].code, 250);
    // A slow recipient: one delay warning, not one per retry.
    let s = send(
        node.smtp_addrs[0],
        "a@client.test",
        &["slow@example.org"],
        b"Subject: slow\r\n\r\nx\r\n",
    )
    .await
    .unwrap();
    assert!(s.accepted());
    wait_for(Duration::from_secs(20), "a delay warning", || async {
        !notices(&sink).is_empty()
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let n = notices(&sink);
    assert_eq!(n.len(), 1, "one notice only: {}", n.len());
    let text = String::from_utf8_lossy(&n[0].data);
    assert!(
        text.contains("Action: delayed")
            && text.contains("Final-Recipient: rfc822; slow@example.org"),
        "{text}"
    );
    assert!(text.contains("Will-Retry-Until: "));
    // A delay warning is a notice, not a bounce; the silent failure still
    // counts as a failed message; the warning itself was delivered.
    counters_read(
        &node,
        &[
            ("skein_messages_bounced_total", 0.0),
            ("skein_notices_total{kind=\"delay\"}", 1.0),
            ("skein_messages_failed_total", 1.0),
            ("skein_messages_delivered_total", 1.0),
        ],
    )
    .await;
    node.shutdown(Duration::from_secs(2)).await;
}

/// RFC 3461 §4.3: NOTIFY=SUCCESS through a peer without DSN gets a
/// "relayed" notice from Skein; through a peer with DSN the parameter is
/// passed on and the peer reports.
async fn success_notices(extensions: &[&str]) -> (Vec<Received>, SinkMta) {
    let dir = tempfile::tempdir().unwrap();
    let dns = dns().await;
    let sink = SinkMta::builder()
        .ehlo_extensions(extensions.iter().copied())
        .start()
        .await
        .unwrap();
    let node = node(&dir, &dns, &sink, |_| {}).await;
    let script = "EHLO client.test\r\nMAIL FROM:<a@client.test> ENVID=env42\r\nRCPT TO:<happy@example.org> NOTIFY=SUCCESS,FAILURE\r\nDATA\r\nSubject: tell me\r\n\r\nx\r\n.\r\nQUIT\r\n";
    let replies = skein_testkit::converse(
        tokio::net::TcpStream::connect(node.smtp_addrs[0])
            .await
            .unwrap(),
        script.as_bytes(),
    )
    .await;
    assert_eq!(replies[5].code, 250, "{replies:?}");
    sink.wait_for(1, Duration::from_secs(20)).await.unwrap();
    queue_empties(&node).await;
    node.shutdown(Duration::from_secs(2)).await;
    (notices(&sink), sink)
}

#[tokio::test(flavor = "multi_thread")]
async fn notify_success_to_a_peer_without_dsn_gets_a_relayed_notice() {
    let (n, _sink) = success_notices(&["PIPELINING", "8BITMIME"]).await;
    assert_eq!(n.len(), 1, "exactly one success notice");
    let text = String::from_utf8_lossy(&n[0].data);
    assert!(text.contains("Action: relayed"), "{text}");
    assert!(text.contains("Original-Envelope-Id: env42"), "{text}");
    assert!(
        text.contains("Final-Recipient: rfc822; happy@example.org"),
        "{text}"
    );
    assert_eq!(n[0].rcpt_to, vec!["a@client.test"]);

    let (n, sink) = success_notices(&["PIPELINING", "8BITMIME", "DSN"]).await;
    assert!(n.is_empty(), "the DSN-capable peer reports, not Skein");
    assert!(
        sink.commands()
            .iter()
            .any(|c| c.starts_with("RCPT TO:<happy@example.org>")
                && c.contains("NOTIFY=SUCCESS,FAILURE")),
        "{:?}",
        sink.commands()
    );
}
