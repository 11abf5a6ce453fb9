//! Delivery against real peers: the testkit's DNS server and sink MTAs on
//! loopback. The client dials one port on every host, so several MX hosts
//! are sinks sharing one port on different 127.x addresses.

use std::net::Ipv4Addr;
use std::time::Duration;

use bytes::Bytes;
use skein_delivery::{Deliverer, DeliveryConfig, Job, RcptResult, Timeouts};
use skein_smtp::{BodyType, EnhancedCode, MailParams, Mailbox, RcptParams, Reply, ReversePath};
use skein_testkit::{DnsServer, DnsServerBuilder, SinkMta, SinkMtaBuilder};

const LO1: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
const LO2: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const WAIT: Duration = Duration::from_secs(5);

fn deliverer(dns: &DnsServer, port: u16) -> Deliverer {
    Deliverer::new(DeliveryConfig {
        helo_name: "skein.test".into(),
        port,
        nameservers: Some(vec![dns.addr()]),
        timeouts: Timeouts::uniform(Duration::from_secs(2)),
        connection_reuse: Duration::from_millis(300),
        ..DeliveryConfig::new("skein.test")
    })
    .expect("deliverer")
}

fn job(domain: &str, rcpts: &[&str], body: &[u8]) -> Job {
    Job {
        id: "Q1".into(),
        domain: domain.into(),
        sender: ReversePath::Mailbox(Mailbox::parse("sender@origin.test").unwrap()),
        params: MailParams::default(),
        recipients: rcpts
            .iter()
            .map(|r| (Mailbox::parse(r).unwrap(), RcptParams::default()))
            .collect(),
        body: Bytes::copy_from_slice(body),
    }
}

fn reply(code: u16, e: (u8, u16, u16), text: &str) -> Reply {
    Reply::new(code, Some(EnhancedCode::new(e.0, e.1, e.2)), text)
}

/// example.org: MX 10 mx1.example.org → 127.0.0.1.
async fn one_mx() -> DnsServer {
    DnsServer::builder()
        .mx("example.org", 10, "mx1.example.org")
        .a("mx1.example.org", LO1)
        .start()
        .await
        .unwrap()
}

/// A sink on 127.0.0.1 with a random port, and the deliverer dialling it.
async fn setup(sink: SinkMtaBuilder, dns: DnsServerBuilder) -> (SinkMta, DnsServer, Deliverer) {
    let sink = sink.start().await.unwrap();
    let dns = dns.start().await.unwrap();
    let d = deliverer(&dns, sink.port());
    (sink, dns, d)
}

fn example_org() -> DnsServerBuilder {
    DnsServer::builder()
        .mx("example.org", 10, "mx1.example.org")
        .a("mx1.example.org", LO1)
}

fn deferred(r: &RcptResult) -> &str {
    match r {
        RcptResult::Deferred { reply } => reply,
        other => panic!("deferred expected, got {other:?}"),
    }
}

fn failed(r: &RcptResult) -> &str {
    match r {
        RcptResult::Failed { reply } => reply,
        other => panic!("failed expected, got {other:?}"),
    }
}

#[tokio::test]
async fn delivers_the_body_byte_for_byte() {
    let (sink, _dns, d) = setup(
        SinkMta::builder().ehlo_extensions(["PIPELINING", "SIZE 1000000", "8BITMIME"]),
        example_org(),
    )
    .await;
    let mut body =
        b"Subject: test\r\n\r\n.starts with a dot\r\n..two\r\n.\r\n\xc3\xa9t\xc3\xa9\r\n".to_vec();
    body.extend(std::iter::repeat_n(b"x".repeat(70).into_iter().chain(*b"\r\n"), 2000).flatten());
    let mut j = job("example.org", &["a@example.org", "b@example.org"], &body);
    j.params.body = Some(BodyType::EightBitMime);

    let results = d.deliver(&j).await;

    for r in &results {
        let RcptResult::Delivered { reply, host, .. } = r else {
            panic!("delivered expected: {r:?}")
        };
        assert_eq!(reply, "250 2.0.0 Ok");
        assert_eq!(host, "mx1.example.org[127.0.0.1]");
    }
    let got = sink.wait_for(1, WAIT).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].data, body, "body byte for byte");
    assert_eq!(got[0].helo, "skein.test");
    assert_eq!(got[0].mail_from, "sender@origin.test");
    assert_eq!(got[0].rcpt_to, vec!["a@example.org", "b@example.org"]);
    assert_eq!(got[0].mail_params.size, Some(body.len() as u64));
    assert_eq!(got[0].mail_params.body, Some(BodyType::EightBitMime));
    // The connection waits for more mail, then is closed politely.
    assert_eq!(d.idle_connections(), 1);
    skein_testkit::wait_for(WAIT, "QUIT once the idle connection expires", || async {
        sink.commands().last().map(String::as_str) == Some("QUIT")
    })
    .await
    .unwrap();
    assert_eq!(d.idle_connections(), 0);
}

#[tokio::test]
async fn most_preferred_mx_wins_and_a_refusing_primary_falls_to_the_secondary() {
    // Preference, not address order: the primary lives on 127.0.0.2.
    let primary = SinkMta::builder().ip(LO2.into()).start().await.unwrap();
    let secondary = SinkMta::builder()
        .ip(LO1.into())
        .port(primary.port())
        .start()
        .await
        .unwrap();
    let dns = DnsServer::builder()
        .mx("example.org", 20, "mx2.example.org")
        .mx("example.org", 10, "mx1.example.org")
        .a("mx1.example.org", LO2)
        .a("mx2.example.org", LO1)
        .start()
        .await
        .unwrap();
    let d = deliverer(&dns, primary.port());
    let results = d
        .deliver(&job("example.org", &["a@example.org"], b"hi\r\n"))
        .await;
    assert!(
        matches!(&results[0], RcptResult::Delivered { host, .. } if host == "mx1.example.org[127.0.0.2]"),
        "{results:?}"
    );
    assert_eq!(primary.messages().len(), 1);
    assert_eq!(secondary.connections(), 0);

    // The primary goes away: its address now refuses connections.
    let port = primary.port();
    primary.stop().await;
    let results = d
        .deliver(&job("example.org", &["a@example.org"], b"hi\r\n"))
        .await;
    assert!(
        matches!(&results[0], RcptResult::Delivered { host, .. } if host == "mx2.example.org[127.0.0.1]"),
        "{results:?}"
    );
    assert_eq!(secondary.wait_for(1, WAIT).await.unwrap().len(), 1);
    assert_eq!(secondary.port(), port);
}

#[tokio::test]
async fn transient_greeting_or_mail_reply_moves_to_the_next_host() {
    let busy = SinkMta::builder()
        .ip(LO2.into())
        .greeting(Reply::new(421, None, "too busy"))
        .start()
        .await
        .unwrap();
    let greylisting = SinkMta::builder()
        .ip(Ipv4Addr::new(127, 0, 0, 3).into())
        .port(busy.port())
        .on_mail(|_| reply(451, (4, 7, 1), "greylisted"))
        .start()
        .await
        .unwrap();
    let good = SinkMta::builder().port(busy.port()).start().await.unwrap();
    let dns = DnsServer::builder()
        .mx("example.org", 10, "busy.example.org")
        .mx("example.org", 20, "grey.example.org")
        .mx("example.org", 30, "good.example.org")
        .a("busy.example.org", LO2)
        .a("grey.example.org", Ipv4Addr::new(127, 0, 0, 3))
        .a("good.example.org", LO1)
        .start()
        .await
        .unwrap();
    let d = deliverer(&dns, busy.port());
    let results = d
        .deliver(&job("example.org", &["a@example.org"], b"hi\r\n"))
        .await;
    assert!(results[0].is_delivered(), "{results:?}");
    assert_eq!(busy.connections(), 1);
    assert_eq!(greylisting.connections(), 1);
    assert_eq!(good.wait_for(1, WAIT).await.unwrap().len(), 1);
}

#[tokio::test]
async fn every_host_failing_defers_with_the_last_error() {
    let sink = SinkMta::builder()
        .refuse_connections()
        .start()
        .await
        .unwrap();
    let dns = DnsServer::builder()
        .mx("example.org", 10, "mx1.example.org")
        .mx("example.org", 20, "mx2.example.org")
        .a("mx1.example.org", LO1)
        .a("mx2.example.org", LO2)
        .start()
        .await
        .unwrap();
    let d = deliverer(&dns, sink.port());
    let results = d
        .deliver(&job(
            "example.org",
            &["a@example.org", "b@example.org"],
            b"x\r\n",
        ))
        .await;
    assert_eq!(results.len(), 2);
    for r in &results {
        assert_eq!(
            deferred(r),
            format!(
                "connect to mx2.example.org[127.0.0.2]:{}: connection refused",
                sink.port()
            )
        );
    }
}

#[tokio::test]
async fn implicit_mx_and_address_literals() {
    let (sink, _dns, d) = setup(
        SinkMta::builder(),
        DnsServer::builder().a("implicit.example", LO1),
    )
    .await;
    let results = d
        .deliver(&job("implicit.example", &["a@implicit.example"], b"1\r\n"))
        .await;
    assert!(
        matches!(&results[0], RcptResult::Delivered { host, .. } if host == "implicit.example[127.0.0.1]"),
        "{results:?}"
    );

    let results = d
        .deliver(&job("[127.0.0.1]", &["a@[127.0.0.1]"], b"2\r\n"))
        .await;
    assert!(
        matches!(&results[0], RcptResult::Delivered { host, .. } if host == "[127.0.0.1]"),
        "{results:?}"
    );
    let got = sink.wait_for(2, WAIT).await.unwrap();
    assert_eq!(got[1].rcpt_to, vec!["a@[127.0.0.1]"]);
}

#[tokio::test]
async fn dns_outcomes_null_mx_nxdomain_servfail_and_no_address() {
    let (sink, _dns, d) = setup(
        SinkMta::builder(),
        DnsServer::builder()
            .null_mx("nullmx.example")
            .a("nullmx.example", LO1)
            .servfail("broken.example")
            .empty("empty.example")
            .mx("lame.example", 10, "nowhere.lame.example"),
    )
    .await;

    let r = d
        .deliver(&job(
            "nullmx.example",
            &["a@nullmx.example", "b@nullmx.example"],
            b"x\r\n",
        ))
        .await;
    assert_eq!(r.len(), 2);
    for r in &r {
        assert_eq!(
            failed(r),
            "556 5.1.10 domain nullmx.example does not accept mail (null MX)"
        );
    }

    let r = d
        .deliver(&job("nowhere.example", &["a@nowhere.example"], b"x\r\n"))
        .await;
    assert_eq!(
        failed(&r[0]),
        "550 5.1.2 domain nowhere.example does not exist (DNS NXDOMAIN)"
    );

    let r = d
        .deliver(&job("broken.example", &["a@broken.example"], b"x\r\n"))
        .await;
    let text = deferred(&r[0]);
    assert!(
        text.starts_with("451 4.4.3 ") && text.contains("SERVFAIL"),
        "{text}"
    );

    // No MX and no address: nowhere to deliver, for good.
    let r = d
        .deliver(&job("empty.example", &["a@empty.example"], b"x\r\n"))
        .await;
    assert!(failed(&r[0]).starts_with("550 5.1.2 "), "{r:?}");

    // An MX whose host does not resolve may be a passing mistake: defer.
    let r = d
        .deliver(&job("lame.example", &["a@lame.example"], b"x\r\n"))
        .await;
    assert!(deferred(&r[0]).contains("nowhere.lame.example"), "{r:?}");

    assert_eq!(sink.connections(), 0);
}

#[tokio::test]
async fn recipients_get_their_own_rcpt_replies() {
    let (sink, _dns, d) = setup(
        SinkMta::builder().on_rcpt(|rcpt| match rcpt.split('@').next() {
            Some("later") => reply(451, (4, 2, 1), "mailbox busy"),
            Some("bad") => reply(550, (5, 1, 1), "no such user"),
            _ => reply(250, (2, 1, 5), "Ok"),
        }),
        example_org(),
    )
    .await;
    let j = job(
        "example.org",
        &[
            "ok1@example.org",
            "later@example.org",
            "bad@example.org",
            "ok2@example.org",
        ],
        b"x\r\n",
    );
    let r = d.deliver(&j).await;
    assert_eq!(r.len(), 4);
    assert!(r[0].is_delivered() && r[3].is_delivered(), "{r:?}");
    assert_eq!(
        deferred(&r[1]),
        "451 4.2.1 mailbox busy (mx1.example.org[127.0.0.1])"
    );
    assert_eq!(
        failed(&r[2]),
        "550 5.1.1 no such user (mx1.example.org[127.0.0.1])"
    );
    let got = sink.wait_for(1, WAIT).await.unwrap();
    assert_eq!(got[0].rcpt_to, vec!["ok1@example.org", "ok2@example.org"]);
}

#[tokio::test]
async fn no_accepted_recipient_means_no_data() {
    // Without PIPELINING DATA is never sent; with it, DATA in the batch is
    // refused and no body follows (see the engine tests).
    let (sink, _dns, d) = setup(
        SinkMta::builder()
            .ehlo_extensions(["8BITMIME"])
            .on_rcpt(|_| reply(550, (5, 1, 1), "no such user")),
        example_org(),
    )
    .await;
    let r = d
        .deliver(&job(
            "example.org",
            &["a@example.org", "b@example.org"],
            b"x\r\n",
        ))
        .await;
    assert!(r.iter().all(RcptResult::is_failed), "{r:?}");
    assert!(
        !sink.commands().iter().any(|c| c == "DATA"),
        "{:?}",
        sink.commands()
    );
}

#[tokio::test]
async fn final_reply_decides_for_accepted_recipients() {
    let (sink, _dns, d) = setup(
        SinkMta::builder().on_data(|n| match n {
            0 => reply(451, (4, 3, 0), "try again"),
            1 => reply(554, (5, 6, 0), "content rejected"),
            _ => reply(250, (2, 0, 0), "Ok"),
        }),
        example_org(),
    )
    .await;
    let j = job("example.org", &["a@example.org", "b@example.org"], b"x\r\n");
    let r = d.deliver(&j).await;
    for r in &r {
        assert_eq!(
            deferred(r),
            "451 4.3.0 try again (mx1.example.org[127.0.0.1])"
        );
    }
    let r = d.deliver(&j).await;
    for r in &r {
        assert_eq!(
            failed(r),
            "554 5.6.0 content rejected (mx1.example.org[127.0.0.1])"
        );
    }
    assert!(sink.messages().is_empty());
}

#[tokio::test]
async fn refused_data_command_defers_or_fails() {
    let (_sink, _dns, d) = setup(
        SinkMta::builder().on_data_command(|_| reply(451, (4, 3, 0), "not now")),
        example_org(),
    )
    .await;
    let r = d
        .deliver(&job("example.org", &["a@example.org"], b"x\r\n"))
        .await;
    assert_eq!(
        deferred(&r[0]),
        "451 4.3.0 not now (mx1.example.org[127.0.0.1])"
    );
}

#[tokio::test]
async fn a_421_mid_session_defers_everything_unfinished() {
    let (sink, _dns, d) = setup(
        SinkMta::builder().on_rcpt(|rcpt| {
            if rcpt.starts_with("second@") {
                reply(421, (4, 3, 2), "shutting down")
            } else {
                reply(250, (2, 1, 5), "Ok")
            }
        }),
        example_org(),
    )
    .await;
    let j = job(
        "example.org",
        &[
            "first@example.org",
            "second@example.org",
            "third@example.org",
        ],
        b"x\r\n",
    );
    let r = d.deliver(&j).await;
    assert_eq!(r.len(), 3);
    for r in &r {
        assert_eq!(
            deferred(r),
            "421 4.3.2 shutting down (mx1.example.org[127.0.0.1])"
        );
    }
    assert!(sink.messages().is_empty());
    let commands = sink.commands();
    assert!(
        !commands.iter().any(|c| c.contains("third@")),
        "{commands:?}"
    );
    assert!(
        !commands.iter().any(|c| c == "QUIT"),
        "no QUIT after 421: {commands:?}"
    );
}

#[tokio::test]
async fn silence_after_the_body_defers_at_the_stage_timeout() {
    let sink = SinkMta::builder().hang_after_data().start().await.unwrap();
    let dns = one_mx().await;
    let mut cfg = DeliveryConfig::new("skein.test");
    cfg.port = sink.port();
    cfg.nameservers = Some(vec![dns.addr()]);
    cfg.timeouts = Timeouts::uniform(Duration::from_secs(2));
    cfg.timeouts.data_term = Duration::from_millis(300);
    let d = Deliverer::new(cfg).unwrap();
    let r = d
        .deliver(&job("example.org", &["a@example.org"], b"x\r\n"))
        .await;
    assert_eq!(
        deferred(&r[0]),
        "mx1.example.org[127.0.0.1]: timed out after 300ms at end of data"
    );
}

#[tokio::test]
async fn silent_greeting_times_out_and_defers() {
    let sink = SinkMta::builder()
        .hang_before_greeting()
        .start()
        .await
        .unwrap();
    let dns = one_mx().await;
    let mut cfg = DeliveryConfig::new("skein.test");
    cfg.port = sink.port();
    cfg.nameservers = Some(vec![dns.addr()]);
    cfg.timeouts.greeting = Duration::from_millis(200);
    let d = Deliverer::new(cfg).unwrap();
    let r = d
        .deliver(&job("example.org", &["a@example.org"], b"x\r\n"))
        .await;
    assert_eq!(
        deferred(&r[0]),
        "mx1.example.org[127.0.0.1]: timed out after 200ms at greeting"
    );
    assert_eq!(sink.connections(), 1);
}

#[tokio::test]
async fn mail_refused_permanently_fails_everyone() {
    let (sink, _dns, d) = setup(
        SinkMta::builder()
            .ehlo_extensions(["8BITMIME"])
            .on_mail(|_| reply(550, (5, 7, 1), "sender blocked")),
        example_org(),
    )
    .await;
    let r = d
        .deliver(&job(
            "example.org",
            &["a@example.org", "b@example.org"],
            b"x\r\n",
        ))
        .await;
    assert_eq!(r.len(), 2);
    for r in &r {
        assert_eq!(
            failed(r),
            "550 5.7.1 sender blocked (mx1.example.org[127.0.0.1])"
        );
    }
    assert!(!sink.commands().iter().any(|c| c.starts_with("RCPT")));
}

#[tokio::test]
async fn body_larger_than_the_peer_size_fails_before_mail() {
    let (sink, _dns, d) = setup(
        SinkMta::builder().ehlo_extensions(["SIZE 100"]),
        example_org(),
    )
    .await;
    let r = d
        .deliver(&job("example.org", &["a@example.org"], &[b'x'; 200]))
        .await;
    let text = failed(&r[0]);
    assert!(
        text.starts_with("552 5.3.4 ") && text.contains("100"),
        "{text}"
    );
    assert!(!sink.commands().iter().any(|c| c.starts_with("MAIL")));
}

#[tokio::test]
async fn ehlo_refused_falls_back_to_helo_without_extensions() {
    let (sink, _dns, d) = setup(
        SinkMta::builder().ehlo_reply(reply(502, (5, 5, 1), "no ESMTP here")),
        example_org(),
    )
    .await;
    let mut j = job("example.org", &["a@example.org"], b"x\r\n");
    j.params.body = Some(BodyType::SevenBit);
    let r = d.deliver(&j).await;
    assert!(r[0].is_delivered(), "{r:?}");
    let got = sink.wait_for(1, WAIT).await.unwrap();
    assert_eq!(got[0].helo, "skein.test");
    assert_eq!(
        got[0].mail_params,
        MailParams::default(),
        "no SIZE or BODY without EHLO"
    );
    assert!(sink.commands().iter().any(|c| c == "HELO skein.test"));
}

#[tokio::test]
async fn no_recipients_no_work_and_the_deliverer_clones() {
    let dns = one_mx().await;
    let d = deliverer(&dns, 9).clone();
    assert!(d
        .deliver(&job("example.org", &[], b"x\r\n"))
        .await
        .is_empty());
    assert_eq!(dns.queries(), 0);

    let mut cfg = DeliveryConfig::new("skein.test");
    cfg.nameservers = Some(Vec::new());
    assert!(matches!(
        Deliverer::new(cfg),
        Err(skein_delivery::DeliveryError::NoNameservers)
    ));
}

#[tokio::test]
async fn system_resolver_configuration_loads() {
    // Only where the machine has one; the point is that `None` is wired
    // to the system configuration, not that every machine has DNS.
    if std::path::Path::new("/etc/resolv.conf").exists() {
        let d = Deliverer::new(DeliveryConfig::new("skein.test"));
        assert!(d.is_ok(), "{d:?}");
    }
}

/// RFC 5321 §5.1 as Postfix does it: MX hosts at this cluster's own
/// listeners cut the list at their preference; with nothing better left the
/// mail fails at once with 5.4.6, not after 50 hops.
#[tokio::test]
async fn mx_hosts_that_are_this_cluster_cut_the_list_or_fail_the_loop() {
    let better = SinkMta::builder().ip(LO2.into()).start().await.unwrap();
    let port = better.port();
    // "us": a sink standing in for this cluster's own listener on 127.0.0.1.
    let us = SinkMta::builder()
        .ip(LO1.into())
        .port(port)
        .start()
        .await
        .unwrap();
    let lo3 = Ipv4Addr::new(127, 0, 0, 3);
    let dns = DnsServer::builder()
        // backup.example: we are the secondary; the primary is elsewhere.
        .mx("backup.example", 10, "primary.example.org")
        .mx("backup.example", 20, "us.example.org")
        .mx("backup.example", 30, "worse.example.org")
        // ours.example: we are the best MX; a host of equal preference is
        // as good as us and gets nothing either.
        .mx("ours.example", 10, "us.example.org")
        .mx("ours.example", 10, "peer.example.org")
        .mx("ours.example", 20, "primary.example.org")
        .a("primary.example.org", LO2)
        .a("us.example.org", LO1)
        .a("peer.example.org", lo3)
        .a("worse.example.org", lo3)
        // implicit.example: no MX, its address record is ours.
        .a("implicit.example", LO1)
        .start()
        .await
        .unwrap();
    let own = skein_delivery::OwnAddrs::new();
    own.replace([std::net::SocketAddr::new(LO1.into(), port)]);
    let d = Deliverer::new(DeliveryConfig {
        port,
        nameservers: Some(vec![dns.addr()]),
        timeouts: Timeouts::uniform(Duration::from_secs(2)),
        own: own.clone(),
        ..DeliveryConfig::new("skein.test")
    })
    .unwrap();

    // A backup MX hands mail to the better one.
    let r = d
        .deliver(&job("backup.example", &["a@backup.example"], b"x\r\n"))
        .await;
    assert!(r[0].is_delivered(), "{r:?}");
    assert_eq!(better.wait_for(1, WAIT).await.unwrap().len(), 1);

    // The best MX is us: fail at once, connect to nobody.
    for domain in ["ours.example", "implicit.example"] {
        let r = d
            .deliver(&job(domain, &[&format!("a@{domain}")], b"x\r\n"))
            .await;
        let RcptResult::Failed { reply } = &r[0] else {
            panic!("{domain}: failed expected: {r:?}")
        };
        assert_eq!(
            reply,
            &format!("554 5.4.6 mail for {domain} loops back to myself")
        );
    }
    let r = d
        .deliver(&job("[127.0.0.1]", &["a@[127.0.0.1]"], b"x\r\n"))
        .await;
    assert!(r[0].is_failed(), "an address literal that is us: {r:?}");

    // The better MX is down: defer with its error; never us, never worse.
    better.stop().await;
    let r = d
        .deliver(&job("backup.example", &["a@backup.example"], b"x\r\n"))
        .await;
    let reply = deferred(&r[0]);
    assert!(reply.contains("primary.example.org[127.0.0.2]"), "{reply}");
    assert_eq!(us.connections(), 0, "mail never goes back to the cluster");

    // Once this cluster no longer serves there, the same MX is just a host.
    own.replace([]);
    let r = d
        .deliver(&job("ours.example", &["a@ours.example"], b"x\r\n"))
        .await;
    assert!(r[0].is_delivered() || r[0].is_deferred(), "{r:?}");
}
