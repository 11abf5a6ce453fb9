//! The delivery engine against scripted receivers: TLS policies, PIPELINING,
//! connection reuse within the per-destination limit, routes to smarthosts
//! (with AUTH) and LMTP, and content the peer cannot take.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rustls_pki_types::CertificateDer;
use skein_delivery::{
    Credentials, Deliverer, DeliveryConfig, Job, RcptResult, Relay, Route, Timeouts, TlsPolicy,
};
use skein_smtp::{EnhancedCode, MailParams, Mailbox, RcptParams, Reply, ReversePath};
use skein_testkit::{DnsServer, SinkMta, SinkMtaBuilder};

const WAIT: Duration = Duration::from_secs(10);

fn reply(code: u16, e: (u8, u16, u16), text: &str) -> Reply {
    Reply::new(code, Some(EnhancedCode::new(e.0, e.1, e.2)), text)
}

/// A self-signed certificate for `name` and a server config presenting it.
fn server_tls(name: &str) -> (Arc<rustls::ServerConfig>, CertificateDer<'static>) {
    let s = skein_testkit::self_signed(name);
    (s.config, s.der)
}

async fn dns() -> DnsServer {
    DnsServer::builder()
        .mx("example.org", 10, "mx1.example.org")
        .a("mx1.example.org", Ipv4Addr::LOCALHOST)
        .start()
        .await
        .unwrap()
}

fn config(dns: &DnsServer, port: u16) -> DeliveryConfig {
    DeliveryConfig {
        port,
        nameservers: Some(vec![dns.addr()]),
        timeouts: Timeouts::uniform(Duration::from_secs(3)),
        ..DeliveryConfig::new("skein.test")
    }
}

fn job(rcpts: &[&str], body: &[u8]) -> Job {
    Job {
        id: "Q1".into(),
        domain: "example.org".into(),
        sender: ReversePath::Mailbox(Mailbox::parse("sender@origin.test").unwrap()),
        params: MailParams::default(),
        recipients: rcpts
            .iter()
            .map(|r| (Mailbox::parse(r).unwrap(), RcptParams::default()))
            .collect(),
        body: Bytes::copy_from_slice(body),
    }
}

async fn start(sink: SinkMtaBuilder) -> SinkMta {
    sink.start().await.unwrap()
}

/// The first batch of commands the sink read that held a MAIL.
fn envelope_batch(sink: &SinkMta) -> Vec<String> {
    sink.batches()
        .into_iter()
        .find(|b| b.iter().any(|c| c.starts_with("MAIL FROM")))
        .unwrap()
}

fn delivered_over_tls(r: &RcptResult) -> bool {
    matches!(r, RcptResult::Delivered { tls: true, .. })
}

#[tokio::test]
async fn starttls_is_used_when_offered_and_the_session_starts_afresh() {
    let dns = dns().await;
    let (tls, _) = server_tls("mx1.example.org");
    let sink = start(SinkMta::builder().tls(tls)).await;
    let d = Deliverer::new(config(&dns, sink.port())).unwrap();
    let r = d.deliver(&job(&["a@example.org"], b"secret\r\n")).await;
    assert!(delivered_over_tls(&r[0]), "{r:?}");
    let got = sink.wait_for(1, WAIT).await.unwrap();
    assert!(got[0].tls, "the message travelled inside TLS");
    let commands = sink.commands();
    let ehlos = commands.iter().filter(|c| c.starts_with("EHLO")).count();
    assert_eq!(ehlos, 2, "EHLO again after the handshake: {commands:?}");
    assert!(commands.contains(&"STARTTLS".to_string()));
}

#[tokio::test]
async fn tls_required_by_policy_and_missing_defers_without_sending() {
    let dns = dns().await;
    let sink = start(SinkMta::builder()).await;
    for policy in [TlsPolicy::Encrypt, TlsPolicy::Verify] {
        let d = Deliverer::new(DeliveryConfig {
            tls: policy,
            ..config(&dns, sink.port())
        })
        .unwrap();
        let r = d.deliver(&job(&["a@example.org"], b"x\r\n")).await;
        let RcptResult::Deferred { reply } = &r[0] else {
            panic!("deferred expected under {policy}: {r:?}")
        };
        assert!(reply.contains("does not offer STARTTLS"), "{reply}");
    }
    assert!(
        !sink.commands().iter().any(|c| c.starts_with("MAIL")),
        "no mail in plaintext: {:?}",
        sink.commands()
    );
    // `none` never even asks.
    let (tls, _) = server_tls("mx1.example.org");
    let offering = start(SinkMta::builder().tls(tls)).await;
    let d = Deliverer::new(DeliveryConfig {
        tls: TlsPolicy::None,
        ..config(&dns, offering.port())
    })
    .unwrap();
    let r = d.deliver(&job(&["a@example.org"], b"x\r\n")).await;
    assert!(
        matches!(r[0], RcptResult::Delivered { tls: false, .. }),
        "{r:?}"
    );
    assert!(!offering.commands().contains(&"STARTTLS".to_string()));
}

#[tokio::test]
async fn verify_checks_the_chain_and_the_host_name() {
    let dns = dns().await;
    let (right, right_der) = server_tls("mx1.example.org");
    let (wrong, wrong_der) = server_tls("other.example.net");
    let good = start(SinkMta::builder().tls(right)).await;
    let d = Deliverer::new(DeliveryConfig {
        tls: TlsPolicy::Verify,
        extra_roots: vec![right_der.clone()],
        ..config(&dns, good.port())
    })
    .unwrap();
    let r = d.deliver(&job(&["a@example.org"], b"x\r\n")).await;
    assert!(delivered_over_tls(&r[0]), "{r:?}");

    // A certificate for another name, even from a trusted root, is refused
    // under verify, and nothing is sent.
    let bad = start(SinkMta::builder().tls(wrong)).await;
    let d = Deliverer::new(DeliveryConfig {
        tls: TlsPolicy::Verify,
        extra_roots: vec![right_der, wrong_der],
        ..config(&dns, bad.port())
    })
    .unwrap();
    let r = d.deliver(&job(&["a@example.org"], b"x\r\n")).await;
    let RcptResult::Deferred { reply } = &r[0] else {
        panic!("deferred expected: {r:?}")
    };
    assert!(reply.contains("TLS handshake"), "{reply}");
    assert!(bad.messages().is_empty());

    // The same certificate is fine under encrypt, which does not check it.
    let d = Deliverer::new(DeliveryConfig {
        tls: TlsPolicy::Encrypt,
        ..config(&dns, bad.port())
    })
    .unwrap();
    let r = d.deliver(&job(&["a@example.org"], b"x\r\n")).await;
    assert!(delivered_over_tls(&r[0]), "{r:?}");
}

#[tokio::test]
async fn a_failed_handshake_under_may_falls_back_to_plaintext() {
    let dns = dns().await;
    let sink = start(SinkMta::builder().broken_tls()).await;
    let d = Deliverer::new(config(&dns, sink.port())).unwrap();
    let r = d.deliver(&job(&["a@example.org"], b"x\r\n")).await;
    assert!(
        matches!(r[0], RcptResult::Delivered { tls: false, .. }),
        "{r:?}"
    );
    assert_eq!(sink.connections(), 2, "one try with TLS, one without");
    // Under encrypt the same server gets nothing.
    let strict = start(SinkMta::builder().broken_tls()).await;
    let d = Deliverer::new(DeliveryConfig {
        tls: TlsPolicy::Encrypt,
        ..config(&dns, strict.port())
    })
    .unwrap();
    let r = d.deliver(&job(&["a@example.org"], b"x\r\n")).await;
    assert!(r[0].is_deferred(), "{r:?}");
    assert!(strict.messages().is_empty());
}

#[tokio::test]
async fn pipelining_sends_the_envelope_in_one_batch() {
    let dns = dns().await;
    let sink = start(SinkMta::builder().on_rcpt(|to| {
        if to.starts_with("nobody") {
            reply(550, (5, 1, 1), "no such user")
        } else {
            reply(250, (2, 1, 5), "ok")
        }
    }))
    .await;
    let d = Deliverer::new(config(&dns, sink.port())).unwrap();
    let r = d
        .deliver(&job(
            &["a@example.org", "nobody@example.org", "b@example.org"],
            b"x\r\n",
        ))
        .await;
    assert!(r[0].is_delivered() && r[2].is_delivered(), "{r:?}");
    assert!(r[1].is_failed(), "{r:?}");
    let batch = envelope_batch(&sink);
    assert_eq!(
        batch.len(),
        5,
        "MAIL, three RCPTs and DATA together: {batch:?}"
    );
    assert_eq!(batch[4], "DATA");

    // All recipients refused: the pipelined DATA is refused, no body goes.
    let none = start(SinkMta::builder().on_rcpt(|_| reply(550, (5, 1, 1), "no"))).await;
    let d = Deliverer::new(config(&dns, none.port())).unwrap();
    let r = d.deliver(&job(&["a@example.org"], b"x\r\n")).await;
    assert!(r[0].is_failed(), "{r:?}");
    assert!(none.messages().is_empty());
}

#[tokio::test]
async fn chunking_sends_the_message_with_the_envelope_as_is() {
    let dns = dns().await;
    let sink = start(
        SinkMta::builder()
            .chunking()
            .on_mail(|from| {
                if from.starts_with("refused") {
                    reply(550, (5, 7, 1), "sender refused")
                } else {
                    reply(250, (2, 1, 0), "ok")
                }
            })
            .on_rcpt(|to| {
                if to.starts_with("nobody") {
                    reply(550, (5, 1, 1), "no such user")
                } else {
                    reply(250, (2, 1, 5), "ok")
                }
            }),
    )
    .await;
    let d = Deliverer::new(DeliveryConfig {
        connection_reuse: Duration::from_secs(5),
        ..config(&dns, sink.port())
    })
    .unwrap();
    // Lines that DATA would have to dot-stuff, one a lone dot: a chunk
    // carries them as they are.
    let body = b"Subject: dots\r\n\r\n.leading\r\n.\r\n..two\r\nend\r\n";
    let r = d
        .deliver(&job(
            &["a@example.org", "nobody@example.org", "b@example.org"],
            body,
        ))
        .await;
    assert!(r[0].is_delivered() && r[2].is_delivered(), "{r:?}");
    assert!(r[1].is_failed(), "{r:?}");
    let got = sink.wait_for(1, WAIT).await.unwrap();
    assert_eq!(got[0].data, body.to_vec(), "the body arrives byte for byte");
    assert_eq!(got[0].rcpt_to.len(), 2);
    let batch = envelope_batch(&sink);
    assert_eq!(
        batch.len(),
        5,
        "MAIL, three RCPTs and BDAT with the message together: {batch:?}"
    );
    assert_eq!(batch[4], format!("BDAT {} LAST", body.len()));
    assert!(!sink.commands().iter().any(|c| c == "DATA"));

    // Every recipient refused: the chunk is refused, nothing is delivered,
    // and the connection carries the next message (led by RSET).
    let r = d.deliver(&job(&["nobody@example.org"], b"x\r\n")).await;
    assert!(r[0].is_failed(), "{r:?}");
    // The sender refused: likewise.
    let mut refused = job(&["a@example.org"], b"x\r\n");
    refused.sender = ReversePath::Mailbox(Mailbox::parse("refused@origin.test").unwrap());
    let r = d.deliver(&refused).await;
    assert!(r[0].is_failed(), "{r:?}");
    let r = d.deliver(&job(&["c@example.org"], b"after\r\n")).await;
    assert!(r[0].is_delivered(), "{r:?}");
    assert_eq!(sink.messages().len(), 2, "the refused ones were not taken");
    assert_eq!(sink.messages()[1].data, b"after\r\n".to_vec());
    assert_eq!(sink.connections(), 1, "one connection carried all four");
    let last = sink.batches().pop().unwrap();
    assert_eq!(last[0], "RSET", "{last:?}");
    assert_eq!(last.last().unwrap(), "BDAT 7 LAST", "{last:?}");

    // A large message goes by DATA: no body is sent before the recipients
    // are known to be taken.
    let big_body = b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\r\n"
        .repeat((1 << 20) / 66 + 1);
    let r = d.deliver(&job(&["big@example.org"], &big_body)).await;
    assert!(r[0].is_delivered(), "{r:?}");
    assert!(sink.commands().iter().any(|c| c == "DATA"));
    assert_eq!(sink.messages()[2].data, big_body);
}

#[tokio::test]
async fn many_messages_share_connections_within_the_concurrency_limit() {
    let dns = dns().await;
    let sink = start(SinkMta::builder()).await;
    let d = Deliverer::new(DeliveryConfig {
        concurrency_per_destination: 3,
        connection_reuse: Duration::from_secs(5),
        ..config(&dns, sink.port())
    })
    .unwrap();
    let jobs: Vec<Job> = (0..40)
        .map(|i| job(&[&format!("user{i}@example.org")], b"x\r\n"))
        .collect();
    let results = futures::future::join_all(jobs.iter().map(|j| d.deliver(j))).await;
    assert!(results.iter().flatten().all(RcptResult::is_delivered));
    assert_eq!(sink.messages().len(), 40);
    assert!(
        sink.max_concurrent_connections() <= 3,
        "at most 3 connections at once, saw {}",
        sink.max_concurrent_connections()
    );
    assert!(
        sink.connections() <= 3,
        "40 messages over {} connections",
        sink.connections()
    );
    let rsets = sink.commands().iter().filter(|c| *c == "RSET").count();
    assert!(
        rsets >= 37,
        "a reused connection is probed with RSET ({rsets})"
    );
    // With PIPELINING the probe leads the envelope: no round trip of its own.
    let led = sink
        .batches()
        .iter()
        .filter(|b| b.len() >= 2 && b[0] == "RSET" && b[1].starts_with("MAIL FROM"))
        .count();
    assert_eq!(led, rsets, "every RSET is pipelined with the envelope");
    // A later message reuses an idle connection without a new greeting.
    let before = sink.connections();
    let r = d.deliver(&job(&["late@example.org"], b"x\r\n")).await;
    assert!(r[0].is_delivered());
    assert_eq!(sink.connections(), before);
}

#[tokio::test]
async fn a_dead_idle_connection_is_replaced() {
    let dns = dns().await;
    let sink = start(SinkMta::builder()).await;
    let d = Deliverer::new(config(&dns, sink.port())).unwrap();
    assert!(d.deliver(&job(&["a@example.org"], b"x\r\n")).await[0].is_delivered());
    assert_eq!(d.idle_connections(), 1);
    // The receiver restarts: the idle connection is dead.
    let port = sink.port();
    sink.stop().await;
    let sink = start(SinkMta::builder().port(port)).await;
    let r = d.deliver(&job(&["b@example.org"], b"x\r\n")).await;
    assert!(r[0].is_delivered(), "{r:?}");
    assert_eq!(sink.messages().len(), 1);
}

#[tokio::test]
async fn a_smarthost_route_with_auth_over_tls() {
    let dns = dns().await;
    let (tls, _) = server_tls("relay.internal");
    let relay = start(SinkMta::builder().tls(tls).auth("skein", "s3cret")).await;
    let route = |password: &str| Route {
        domain: "*".into(),
        relay: Relay::Smtp {
            host: "127.0.0.1".into(),
            port: relay.port(),
        },
        tls: TlsPolicy::Encrypt,
        auth: Some(Credentials {
            user: "skein".into(),
            password: password.into(),
        }),
    };
    // Port 9 on the MX: the route must win over the MX lookup.
    let d = Deliverer::new(DeliveryConfig {
        routes: vec![route("s3cret")],
        ..config(&dns, 9)
    })
    .unwrap();
    let r = d.deliver(&job(&["a@example.org"], b"x\r\n")).await;
    assert!(delivered_over_tls(&r[0]), "{r:?}");
    let got = relay.wait_for(1, WAIT).await.unwrap();
    assert_eq!(got[0].auth.as_deref(), Some("skein"));
    assert!(got[0].tls);

    // A wrong password defers (a configuration problem, never a bounce).
    let d = Deliverer::new(DeliveryConfig {
        routes: vec![route("wrong")],
        ..config(&dns, 9)
    })
    .unwrap();
    let r = d.deliver(&job(&["b@example.org"], b"x\r\n")).await;
    let RcptResult::Deferred { reply } = &r[0] else {
        panic!("deferred expected: {r:?}")
    };
    assert!(reply.contains("535"), "{reply}");
    assert_eq!(relay.messages().len(), 1);
}

#[tokio::test]
async fn an_lmtp_route_gets_a_reply_per_recipient() {
    let dns = dns().await;
    let store = start(SinkMta::builder().lmtp(|rcpt| {
        if rcpt.starts_with("full") {
            reply(452, (4, 2, 2), "mailbox full")
        } else if rcpt.starts_with("gone") {
            reply(550, (5, 1, 1), "no such mailbox")
        } else {
            reply(250, (2, 0, 0), "delivered")
        }
    }))
    .await;
    let d = Deliverer::new(DeliveryConfig {
        routes: vec![Route {
            domain: "example.org".into(),
            relay: Relay::Lmtp {
                host: "127.0.0.1".into(),
                port: store.port(),
            },
            tls: TlsPolicy::None,
            auth: None,
        }],
        ..config(&dns, 9)
    })
    .unwrap();
    let r = d
        .deliver(&job(
            &["ann@example.org", "full@example.org", "gone@example.org"],
            b"x\r\n",
        ))
        .await;
    assert!(
        matches!(r[0], RcptResult::Delivered { lmtp: true, .. }),
        "{r:?}"
    );
    assert!(r[1].is_deferred(), "{r:?}");
    assert!(r[2].is_failed(), "{r:?}");
    assert!(store.commands().iter().any(|c| c.starts_with("LHLO")));
    let got = store.wait_for(1, WAIT).await.unwrap();
    assert_eq!(got[0].rcpt_to, vec!["ann@example.org"]);
}

#[tokio::test]
async fn eight_bit_content_never_goes_to_a_seven_bit_peer() {
    let dns = dns().await;
    let sink = start(SinkMta::builder().ehlo_extensions(["PIPELINING"])).await;
    let d = Deliverer::new(config(&dns, sink.port())).unwrap();
    let r = d
        .deliver(&job(&["a@example.org"], "caf\u{e9}\r\n".as_bytes()))
        .await;
    let RcptResult::Failed { reply } = &r[0] else {
        panic!("failed expected: {r:?}")
    };
    assert!(reply.starts_with("554 5.6.3"), "{reply}");
    assert!(!sink.commands().iter().any(|c| c.starts_with("MAIL")));
    // Seven-bit mail to the same peer goes through.
    let r = d.deliver(&job(&["a@example.org"], b"plain\r\n")).await;
    assert!(r[0].is_delivered(), "{r:?}");
}

#[tokio::test]
async fn an_ipv6_only_mail_exchanger_is_reached() {
    let sink = start(SinkMta::builder().ip("::1".parse().unwrap())).await;
    let dns = DnsServer::builder()
        .mx("example.org", 10, "mx6.example.org")
        .aaaa("mx6.example.org", std::net::Ipv6Addr::LOCALHOST)
        .start()
        .await
        .unwrap();
    let d = Deliverer::new(config(&dns, sink.port())).unwrap();
    let r = d.deliver(&job(&["a@example.org"], b"x\r\n")).await;
    assert!(
        matches!(&r[0], RcptResult::Delivered { host, .. } if host == "mx6.example.org[::1]"),
        "{r:?}"
    );
}

#[tokio::test]
async fn a_hanging_receiver_times_out_and_the_retry_delivers() {
    let dns = dns().await;
    let hanging = start(SinkMta::builder().hang_after_data()).await;
    let port = hanging.port();
    let d = Deliverer::new(DeliveryConfig {
        timeouts: Timeouts::uniform(Duration::from_millis(500)),
        ..config(&dns, port)
    })
    .unwrap();
    let started = std::time::Instant::now();
    let r = d.deliver(&job(&["a@example.org"], b"x\r\n")).await;
    let RcptResult::Deferred { reply } = &r[0] else {
        panic!("deferred expected: {r:?}")
    };
    assert!(
        reply.contains("timed out") && reply.contains("end of data"),
        "{reply}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(
        d.idle_connections(),
        0,
        "a timed-out session is never reused"
    );
    // The receiver recovers; the next attempt delivers.
    hanging.stop().await;
    let sink = start(SinkMta::builder().port(port)).await;
    let r = d.deliver(&job(&["a@example.org"], b"x\r\n")).await;
    assert!(r[0].is_delivered(), "{r:?}");
    assert_eq!(sink.messages().len(), 1);
}
