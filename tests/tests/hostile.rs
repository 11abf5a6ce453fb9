//! What a hostile sender controls beyond the parser, tried against real
//! `skeind` processes at their default settings (but for the first test's
//! Raft timings, see there): large bounces that once poisoned a node's
//! reports, envelope parameters that once smuggled lines into bounces, and
//! mail for a domain whose MX is the cluster itself.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use skein_smtp::{has_bare_line_endings, EnhancedCode, Reply};
use skein_testkit::{wait_for, DnsServer, Received, SinkMta, SinkMtaBuilder};
use skein_tests::mail::{arrived, tokened, wait_all_arrived};
use skein_tests::{
    send, send_with_params, status, wait_for_leader, ClusterPlan, ProcessNode, TestConfig,
};

/// The first test pushes 150 MB of mail through a cluster of `skeind`
/// processes. Beside the other tests' clusters on a 2-core machine (debug
/// builds) the nodes of all of them starve, and how a cluster rides out a
/// starved machine is not what these tests count: they run one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn dns_for(sink_ip: Ipv4Addr) -> skein_testkit::DnsServerBuilder {
    DnsServer::builder()
        .mx("example.org", 10, "mx.example.org")
        .mx("client.test", 10, "mx.example.org")
        .a("mx.example.org", sink_ip)
}

/// A sink that refuses `nobody@…` with a 550 whose text holds what a
/// hostile server might put there.
fn refusing_sink() -> SinkMtaBuilder {
    SinkMta::builder().on_rcpt(|rcpt| {
        if rcpt.starts_with("nobody@") {
            Reply::new(
                550,
                Some(EnhancedCode::new(5, 1, 1)),
                "no such user\u{1b}[2J\u{0}Injected: yes",
            )
        } else {
            Reply::new(250, Some(EnhancedCode::new(2, 1, 5)), "Ok")
        }
    })
}

fn notices(sink: &SinkMta) -> Vec<Received> {
    sink.messages()
        .into_iter()
        .filter(|m| m.mail_from.is_empty())
        .collect()
}

async fn start(plan: &ClusterPlan) -> Vec<ProcessNode> {
    let nodes = ProcessNode::start_all(skein_tests::skeind!(), &plan.configs)
        .await
        .unwrap();
    nodes
}

fn admins(plan: &ClusterPlan) -> Vec<SocketAddr> {
    plan.configs.iter().map(TestConfig::admin_addr).collect()
}

/// Wait until no node holds a message.
async fn queues_empty(plan: &ClusterPlan, nodes: &[ProcessNode], timeout: Duration) {
    let admins = admins(plan);
    let ok = wait_for(timeout, "every queue to empty", || {
        let admins = admins.clone();
        async move {
            for a in admins {
                match status(a).await {
                    Ok(s) if s.queue.as_ref().is_some_and(|q| q.messages == 0) => {}
                    _ => return false,
                }
            }
            true
        }
    })
    .await;
    if let Err(e) = ok {
        print_logs(nodes);
        panic!("{e}");
    }
}

/// Every node's log, for a failing test to show.
fn print_logs(nodes: &[ProcessNode]) {
    for n in nodes {
        eprintln!("--- node {} log ---\n{}", n.config.node_id, n.log());
    }
}

/// A message of about `size` bytes: short lines, as the front door wants.
fn big_message(token: &str, size: usize) -> Vec<u8> {
    let mut m = tokened(token);
    let line = [b'x'; 998];
    while m.len() < size {
        m.extend_from_slice(&line);
        m.extend_from_slice(b"\r\n");
    }
    m
}

/// Issue: ten 15 MB bounces sent to one node of three left one delivered
/// and the node's later outcomes never committed. Now every bounce goes out
/// (as headers: RET=FULL is a request, bounded by bounce_size_limit), and
/// mail the node delivers afterwards is delivered exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn large_bounces_on_one_node_all_go_out_and_later_mail_is_delivered_once() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let sink = refusing_sink().start().await.unwrap();
    let dns = dns_for(Ipv4Addr::LOCALHOST).start().await.unwrap();
    // Default settings but for the test's addresses and delivery timings,
    // and Raft timings a debug build keeps: on a slow 2-core machine its nodes,
    // decoding and checking 15 MB entries, missed the default 500 ms
    // election timeout. The lease is the default one, not the tests' 5 s:
    // with 150 MB to replicate, a delivered bounce's outcome once took
    // longer than that to commit, the lease ran out and another node sent
    // the bounce again (at least once, as designed, where this test counts
    // exactly once).
    let plan = ClusterPlan::new(3, dns.addr(), sink.port(), |c| {
        c.commit_timeout = "10s".into();
        c.raft_timings = Some(("200ms".into(), "2s".into()));
        c.lease = "30s".into();
    })
    .await
    .unwrap();
    let nodes = start(&plan).await;
    let leader = wait_for_leader(&admins(&plan), Duration::from_secs(20))
        .await
        .unwrap();
    // One follower takes every message: its proposals are forwarded.
    let target = plan.configs.iter().find(|c| c.node_id != leader).unwrap();

    const BOUNCES: usize = 10;
    const SIZE: usize = 15 << 20;
    let mut sends = Vec::new();
    for i in 0..BOUNCES {
        let body = big_message(&format!("big-{i}"), SIZE);
        let addr = target.smtp;
        sends.push(tokio::spawn(async move {
            send_with_params(
                addr,
                ("sender@client.test", "RET=FULL ENVID=big"),
                &[("nobody@example.org", "NOTIFY=FAILURE")],
                &body,
            )
            .await
        }));
    }
    for s in sends {
        let s = s.await.unwrap().unwrap();
        if !s.accepted() {
            print_logs(&nodes);
            panic!("{}", s.reply);
        }
    }
    let got = sink.wait_for(BOUNCES, Duration::from_secs(180)).await;
    let bounces = notices(&sink);
    if got.is_err() || bounces.len() < BOUNCES {
        print_logs(&nodes);
        panic!("{} of {BOUNCES} bounces delivered", bounces.len());
    }
    for b in &bounces {
        assert!(b.data.len() < 100_000, "a bounce of {} bytes", b.data.len());
        let text = String::from_utf8_lossy(&b.data);
        assert!(text.contains("Content-Type: text/rfc822-headers"), "{text}");
        assert!(text.contains("X-Token: big-"), "{text}");
        assert!(!has_bare_line_endings(&b.data));
    }

    // Later mail through the same node is delivered, and only once: its
    // outcome is committed, so nothing is sent again.
    let tokens: Vec<String> = (0..5).map(|i| format!("later-{i}")).collect();
    for t in &tokens {
        let s = send(
            target.smtp,
            "sender@client.test",
            &["b@example.org"],
            &tokened(t),
        )
        .await
        .unwrap();
        assert!(s.accepted(), "{}", s.reply);
    }
    wait_all_arrived(&sink, &tokens, Duration::from_secs(60))
        .await
        .unwrap();
    queues_empty(&plan, &nodes, Duration::from_secs(60)).await;
    let counts = arrived(&sink);
    for t in &tokens {
        assert_eq!(
            counts.get(t),
            Some(&1),
            "{t} delivered {:?} times",
            counts.get(t)
        );
    }
    let bounces = notices(&sink);
    if bounces.len() != BOUNCES {
        print_logs(&nodes);
        let about: Vec<String> = bounces
            .iter()
            .map(|b| {
                let text = String::from_utf8_lossy(&b.data);
                let token = text.lines().find(|l| l.starts_with("X-Token:"));
                token.unwrap_or("?").to_string()
            })
            .collect();
        panic!(
            "{} bounces for {BOUNCES} failures: {about:?}",
            bounces.len()
        );
    }
    for n in &nodes {
        assert!(
            !n.log().contains("outcomes not committed"),
            "node {}: {}",
            n.config.node_id,
            n.log()
        );
    }
}

/// Issue: `ENVID=a+0A.+0D+0AMAIL+20FROM…` put a bare LF and a forged
/// message into the bounce Skein sent, and ORCPT added lines of the
/// sender's choosing. Now such xtext is refused at once, and what a bounce
/// carries from the envelope and from remote replies is one line each.
#[tokio::test(flavor = "multi_thread")]
async fn envelope_parameters_cannot_smuggle_lines_into_bounces() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let sink = refusing_sink().start().await.unwrap();
    let dns = dns_for(Ipv4Addr::LOCALHOST).start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg =
        TestConfig::new(1, dir.path().join("data"), dns.addr(), sink.port()).with_fixed_ports();
    let smtp = cfg.smtp;
    let node = ProcessNode::start(skein_tests::skeind!(), cfg).unwrap();
    node.wait_ready(Duration::from_secs(30)).await.unwrap();

    let forged =
        "a+0A.+0D+0AMAIL+20FROM:<x@evil.test>+0D+0ARCPT+20TO:<y@example.org>+0D+0ADATA+0D+0A";
    let s = send_with_params(
        smtp,
        ("victim@client.test", &format!("ENVID={forged}")),
        &[("nobody@example.org", "")],
        b"Subject: x\r\n\r\nx\r\n",
    )
    .await
    .unwrap();
    assert_eq!(
        (s.reply.code, s.reply.enhanced),
        (501, Some(EnhancedCode::new(5, 5, 4))),
        "{}",
        s.reply
    );
    let s = send_with_params(
        smtp,
        ("victim@client.test", ""),
        &[("nobody@example.org", "ORCPT=rfc822;x+0D+0AInjected:+20yes")],
        b"Subject: x\r\n\r\nx\r\n",
    )
    .await
    .unwrap();
    assert_eq!(
        (s.reply.code, s.reply.enhanced),
        (501, Some(EnhancedCode::new(5, 5, 4))),
        "{}",
        s.reply
    );

    // Legal but unusual parameters, and a remote reply with control
    // characters: the bounce holds each on one line of its own field.
    let s = send_with_params(
        smtp,
        ("victim@client.test", "RET=FULL ENVID=a+20b+2Bc"),
        &[(
            "nobody@example.org",
            "NOTIFY=FAILURE ORCPT=rfc822;x+20y@example.org",
        )],
        b"Subject: x\r\n\r\nbody\r\n",
    )
    .await
    .unwrap();
    assert!(s.accepted(), "{}", s.reply);
    sink.wait_for(1, Duration::from_secs(30)).await.unwrap();
    let bounce = notices(&sink).pop().expect("a bounce");
    assert_eq!(sink.messages().len(), 1, "no second, forged message");
    assert!(!has_bare_line_endings(&bounce.data));
    assert!(!bounce.data.contains(&0) && !bounce.data.contains(&0x1b));
    let text = String::from_utf8_lossy(&bounce.data);
    assert!(text.contains("Original-Envelope-Id: a b+c\r\n"), "{text}");
    assert!(
        text.contains("Original-Recipient: rfc822; x y@example.org\r\n"),
        "{text}"
    );
    assert!(!text.contains("\r\nInjected: yes"), "{text}");
    assert!(text.contains("no such user [2J Injected: yes"), "{text}");
    for line in text.split("\r\n") {
        assert!(line.len() <= 998, "a line of {} octets", line.len());
    }
}

/// Issue: mail for a domain whose MX is the cluster was accepted 51 times,
/// each a replicated write. Now it fails at the first hop with 5.4.6, a
/// backup MX hands mail to the better one, and no node ever sends to
/// another node's SMTP listener.
#[tokio::test(flavor = "multi_thread")]
async fn mail_whose_mx_is_the_cluster_fails_at_once_and_a_backup_mx_forwards() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let sink = refusing_sink().start().await.unwrap();
    let port = sink.port();
    let dns = dns_for(Ipv4Addr::LOCALHOST).start().await.unwrap();
    // Every node takes SMTP on the port delivery dials, each on its own
    // address: an MX record can point at any of them.
    let plan = ClusterPlan::new(3, dns.addr(), port, |c| c.smtp.set_port(port))
        .await
        .unwrap();
    let node_ip = |id: u64| match plan.config(id).smtp.ip() {
        IpAddr::V4(v4) => v4,
        IpAddr::V6(_) => unreachable!(),
    };
    dns.add_mx("loop.example", 10, "mx.loop.example");
    dns.add_a("mx.loop.example", node_ip(3));
    dns.add_mx("backup.example", 10, "mx.example.org");
    dns.add_mx("backup.example", 20, "mx2.backup.example");
    dns.add_a("mx2.backup.example", node_ip(2));
    let nodes = start(&plan).await;
    wait_for_leader(&admins(&plan), Duration::from_secs(20))
        .await
        .unwrap();
    // Node 1 has heard where its peers take mail.
    wait_for(
        Duration::from_secs(20),
        "node 1 to learn its peers' listeners",
        || {
            let log = nodes[0].log();
            async move { log.matches("learned where a peer takes mail").count() >= 2 }
        },
    )
    .await
    .unwrap();

    let s = send(
        plan.config(1).smtp,
        "sender@client.test",
        &["x@loop.example", "y@backup.example"],
        &tokened("loop-1"),
    )
    .await
    .unwrap();
    assert!(s.accepted(), "{}", s.reply);
    wait_all_arrived(&sink, &["loop-1".to_string()], Duration::from_secs(30))
        .await
        .unwrap();
    wait_for(Duration::from_secs(30), "the loop's bounce", || {
        let n = notices(&sink).len();
        async move { n == 1 }
    })
    .await
    .unwrap();
    let bounce = notices(&sink).pop().unwrap();
    let text = String::from_utf8_lossy(&bounce.data);
    assert!(
        text.contains("mail for loop.example loops back to myself"),
        "{text}"
    );
    assert!(text.contains("Status: 5.4.6"), "{text}");
    queues_empty(&plan, &nodes, Duration::from_secs(30)).await;

    // One message accepted in the whole cluster: no hop back into it.
    let mut accepted = 0.0;
    for c in &plan.configs {
        accepted += skein_tests::mail::metric(c.metrics, "skein_messages_accepted_total")
            .await
            .unwrap();
    }
    assert_eq!(accepted, 1.0, "the cluster accepted the message once");
}
