//! Node loss with real `skeind` processes: SIGKILL the leader under load,
//! SIGKILL a follower holding leases, restart every node in turn. Every
//! acknowledged message must be delivered; the tests print how long
//! acceptance and takeover took.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use skein_testkit::SinkMta;
use skein_tests::mail::{tokened, wait_all_arrived, Load, Sent};
use skein_tests::{send, status, wait_for_leader, ClusterPlan, ProcessNode, TestConfig};

fn timings(c: &mut TestConfig) {
    c.lease = "3s".into();
    c.commit_timeout = "3s".into();
}

async fn start(plan: &ClusterPlan) -> Vec<ProcessNode> {
    let nodes = ProcessNode::start_all(skein_tests::skeind!(), &plan.configs)
        .await
        .unwrap();
    wait_for_leader(&admins(plan), Duration::from_secs(20))
        .await
        .unwrap();
    nodes
}

fn admins(plan: &ClusterPlan) -> Vec<SocketAddr> {
    plan.configs.iter().map(TestConfig::admin_addr).collect()
}

fn smtp(plan: &ClusterPlan) -> Vec<SocketAddr> {
    plan.configs.iter().map(|c| c.smtp).collect()
}

fn accepted(log: &[Sent]) -> Vec<String> {
    log.iter()
        .filter(|s| s.accepted)
        .map(|s| s.token.clone())
        .collect()
}

/// Check every acknowledged message arrived; print duplicates.
async fn all_delivered(sink: &SinkMta, log: &[Sent], nodes: &[ProcessNode]) {
    let acked = accepted(log);
    match wait_all_arrived(sink, &acked, Duration::from_secs(60)).await {
        Ok(got) => {
            let dups: usize = got.values().map(|n| n - 1).sum();
            println!(
                "sent {}, acknowledged {}, delivered {} distinct, {} duplicate deliveries",
                log.len(),
                acked.len(),
                got.len(),
                dups
            );
        }
        Err(missing) => {
            for n in nodes {
                eprintln!("--- node {} log ---\n{}", n.config.node_id, n.log());
            }
            panic!(
                "{} acknowledged messages lost, e.g. {:?}",
                missing.len(),
                &missing[..missing.len().min(5)]
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_the_leader_under_load_loses_nothing() {
    let dns = skein_tests::mail::example_org_dns().await;
    let sink = SinkMta::builder().start().await.unwrap();
    let plan = ClusterPlan::new(3, dns.addr(), sink.port(), timings)
        .await
        .unwrap();
    let mut nodes = start(&plan).await;
    let leader = wait_for_leader(&admins(&plan), Duration::from_secs(10))
        .await
        .unwrap();

    let load = Load::start(smtp(&plan), 6, "leader-kill");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    nodes[(leader - 1) as usize].kill9();
    let killed = Instant::now();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let log = load.stop().await;

    let survivor_accepts_after = log
        .iter()
        .filter(|s| s.accepted && s.at > killed && s.node as u64 != leader - 1)
        .map(|s| s.at)
        .min()
        .expect("survivors accepted mail after the kill");
    let resumed = survivor_accepts_after - killed;
    println!("leader {leader} killed; survivors accepting again after {resumed:?}");
    assert!(
        resumed < Duration::from_secs(5),
        "acceptance took {resumed:?} to resume"
    );
    // The survivors found the leader's port closed and settled who leads
    // next, rather than waiting out their election timers.
    for (i, n) in nodes.iter().enumerate() {
        if i as u64 != leader - 1 {
            let log = n.log();
            assert!(
                log.contains("nothing serves the leader's cluster port"),
                "node {} did not notice the leader was gone:\n{log}",
                i + 1
            );
        }
    }
    all_delivered(&sink, &log, &nodes).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_a_follower_holding_leases_and_the_survivors_deliver() {
    let dns = skein_tests::mail::example_org_dns().await;
    // At first the MX answers its greeting and then says nothing, so the
    // follower's attempts hang while it holds (and renews) their leases.
    let hanging = SinkMta::builder()
        .hang_after_greeting()
        .start()
        .await
        .unwrap();
    let port = hanging.port();
    let plan = ClusterPlan::new(3, dns.addr(), port, |c| {
        timings(c);
        c.claim_interval = "200ms".into();
    })
    .await
    .unwrap();
    let mut nodes = start(&plan).await;
    let leader = wait_for_leader(&admins(&plan), Duration::from_secs(10))
        .await
        .unwrap();
    let victim = plan.ids().into_iter().find(|&id| id != leader).unwrap();
    let vc = plan.config(victim).clone();

    let tokens: Vec<String> = (0..5).map(|i| format!("held-{i}")).collect();
    let mut ids = Vec::new();
    for t in &tokens {
        let s = send(vc.smtp, "a@client.test", &["b@example.org"], &tokened(t))
            .await
            .unwrap();
        assert!(s.accepted(), "{}", s.reply);
        ids.push(s.id.unwrap().to_string());
    }
    skein_testkit::wait_for(
        Duration::from_secs(10),
        "the follower's attempts to reach the MX",
        || {
            let h = &hanging;
            async move { h.connections() >= 1 }
        },
    )
    .await
    .unwrap();
    let st = status(vc.admin_addr()).await.unwrap();
    assert_eq!(st.queue.unwrap().leased, 5, "the follower holds the leases");

    nodes[(victim - 1) as usize].kill9();
    let killed = Instant::now();
    hanging.stop().await;
    let sink = SinkMta::builder().port(port).start().await.unwrap();
    let got = wait_all_arrived(&sink, &tokens, Duration::from_secs(30))
        .await
        .expect("survivors deliver");
    let takeover = killed.elapsed();
    println!("follower {victim} killed holding 5 leases (lease 3s, claim interval 200ms); delivered by the survivors after {takeover:?}");
    assert!(got.values().all(|&n| n == 1));
    assert!(
        takeover < Duration::from_secs(10),
        "takeover took {takeover:?}"
    );

    // What happened shows in every survivor's history — asked, for each
    // message, of the survivor that did not deliver it where there is one
    // — and in the takers' counters.
    let survivors: Vec<u64> = plan.ids().into_iter().filter(|&id| id != victim).collect();
    for id in &ids {
        let mut traces = Vec::new();
        for &n in &survivors {
            let t = skein_tests::run_ctl(
                skein_tests::skeinctl!(),
                plan.config(n).admin_addr(),
                Some(skein_tests::TOKEN),
                None,
                &["--json", "trace", id],
            )
            .await
            .json();
            traces.push((n, t));
        }
        let events = |t: &serde_json::Value| -> Vec<(String, Option<u64>)> {
            t["events"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| (e["event"].as_str().unwrap().to_string(), e["node"].as_u64()))
                .collect()
        };
        let (_, first) = &traces[0];
        let deliverer = events(first)
            .iter()
            .find(|(e, _)| e == "delivered")
            .and_then(|(_, n)| *n)
            .unwrap_or_else(|| panic!("{id} not delivered: {first:#}"));
        let (asked, t) = traces
            .iter()
            .find(|(n, _)| *n != deliverer)
            .unwrap_or(&traces[0]);
        let ev = events(t);
        assert_eq!(
            ev[0],
            ("accepted".to_string(), Some(victim)),
            "node {asked}: {t:#}"
        );
        assert!(
            ev.contains(&("taken_over".to_string(), Some(deliverer))),
            "node {asked}: {t:#}"
        );
        assert!(
            ev.contains(&("delivered".to_string(), Some(deliverer))),
            "node {asked}: {t:#}"
        );
        let taken = t["events"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["event"] == "taken_over")
            .unwrap();
        assert_eq!(taken["taken_from"], victim, "{t:#}");
    }
    let mut counted = 0.0;
    for &n in &survivors {
        let (_, text) = skein_tests::mail::http_get(plan.config(n).metrics, "/metrics")
            .await
            .unwrap();
        counted += text
            .lines()
            .find_map(|l| l.strip_prefix("skein_takeovers_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
    }
    assert_eq!(counted, 5.0, "every message taken over counted once");
}

#[tokio::test(flavor = "multi_thread")]
async fn restarting_every_node_in_turn_under_load_loses_nothing() {
    let dns = skein_tests::mail::example_org_dns().await;
    let sink = SinkMta::builder().start().await.unwrap();
    let plan = ClusterPlan::new(3, dns.addr(), sink.port(), timings)
        .await
        .unwrap();
    let mut nodes = start(&plan).await;
    let load = Load::start(smtp(&plan), 6, "rolling");
    tokio::time::sleep(Duration::from_millis(800)).await;
    for node in nodes.iter_mut() {
        let status_code = node.terminate().unwrap();
        assert!(
            status_code.success(),
            "node {} exit {status_code:?}",
            node.config.node_id
        );
        node.restart().unwrap();
        node.wait_ready(Duration::from_secs(30)).await.unwrap();
        wait_for_leader(&admins(&plan), Duration::from_secs(20))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let log = load.stop().await;
    let refused = log.iter().filter(|s| !s.accepted).count();
    println!(
        "rolling restart: {refused} of {} attempts not accepted (clients retry those)",
        log.len()
    );
    all_delivered(&sink, &log, &nodes).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_hands_leases_back_so_peers_deliver_at_once() {
    let dns = skein_tests::mail::example_org_dns().await;
    let hanging = SinkMta::builder()
        .hang_after_greeting()
        .start()
        .await
        .unwrap();
    let port = hanging.port();
    // A long lease: if the stopping node did not hand its leases back, its
    // mail would wait 30 seconds for them to expire.
    let plan = ClusterPlan::new(3, dns.addr(), port, |c| {
        c.lease = "30s".into();
        c.claim_interval = "200ms".into();
    })
    .await
    .unwrap();
    let mut nodes = start(&plan).await;
    let leader = wait_for_leader(&admins(&plan), Duration::from_secs(10))
        .await
        .unwrap();
    let victim = plan.ids().into_iter().find(|&id| id != leader).unwrap();
    let vc = plan.config(victim).clone();
    let tokens: Vec<String> = (0..5).map(|i| format!("handback-{i}")).collect();
    for t in &tokens {
        let s = send(vc.smtp, "a@client.test", &["b@example.org"], &tokened(t))
            .await
            .unwrap();
        assert!(s.accepted(), "{}", s.reply);
    }
    skein_testkit::wait_for(Duration::from_secs(10), "attempts under way", || {
        let h = &hanging;
        async move { h.connections() >= 1 }
    })
    .await
    .unwrap();

    let stopping = Instant::now();
    let code = nodes[(victim - 1) as usize].terminate().unwrap();
    assert!(code.success(), "exit {code:?}");
    println!(
        "node {victim} stopped gracefully in {:?}",
        stopping.elapsed()
    );
    hanging.stop().await;
    let sink = SinkMta::builder().port(port).start().await.unwrap();
    wait_all_arrived(&sink, &tokens, Duration::from_secs(20))
        .await
        .expect("peers deliver");
    let taken = stopping.elapsed();
    println!("its 5 leased messages delivered by peers {taken:?} after SIGTERM (lease 30s)");
    assert!(
        taken < Duration::from_secs(15),
        "peers waited {taken:?}: leases were not handed back"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rolling_restart_by_drain_refuses_and_loses_nothing() {
    let dns = skein_tests::mail::example_org_dns().await;
    let sink = SinkMta::builder().start().await.unwrap();
    let plan = ClusterPlan::new(3, dns.addr(), sink.port(), timings)
        .await
        .unwrap();
    let mut nodes = start(&plan).await;
    let load = Load::start_failover(smtp(&plan), 6, "rolling-drain");
    tokio::time::sleep(Duration::from_millis(800)).await;
    for node in nodes.iter_mut() {
        let admin = node.config.admin_addr();
        skein_tests::drain(admin).await.unwrap();
        let code = node.terminate().unwrap();
        assert!(code.success(), "node {} exit {code:?}", node.config.node_id);
        node.restart().unwrap();
        node.wait_ready(Duration::from_secs(30)).await.unwrap();
        wait_for_leader(&admins(&plan), Duration::from_secs(20))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let log = load.stop().await;
    let refused = log.iter().filter(|s| !s.accepted).count();
    let slowest = log.iter().map(|s| s.took).max().unwrap();
    println!(
        "rolling restart by drain: {} messages, {refused} refused, slowest acceptance {slowest:?}",
        log.len()
    );
    assert_eq!(
        refused, 0,
        "a message was refused during the rolling restart"
    );
    all_delivered(&sink, &log, &nodes).await;
}
