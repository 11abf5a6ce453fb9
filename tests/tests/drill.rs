//! `skeinctl drill` against a three-node cluster of real `skeind`
//! processes: aimed at the leader and at a follower it passes and reports
//! plausible times; an unhealthy cluster is refused.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use skein_testkit::{wait_for, SinkMta};
use skein_tests::mail::example_org_dns;
use skein_tests::{
    run_ctl, status, wait_for_leader, ClusterPlan, CtlOut, ProcessNode, TestConfig, TOKEN,
};

fn timings(c: &mut TestConfig) {
    c.lease = "3s".into();
    c.commit_timeout = "3s".into();
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

async fn drill(via: SocketAddr, args: &[&str]) -> CtlOut {
    let mut all = vec![
        "--json", "drill", "--outage", "3s", "--rate", "10", "--settle", "60s",
    ];
    all.extend_from_slice(args);
    run_ctl(skein_tests::skeinctl!(), via, Some(TOKEN), None, &all).await
}

fn check_plausible(r: &Value, target: u64, was_leader: bool) {
    assert_eq!(r["target"], target, "{r:#}");
    assert_eq!(r["was_leader"], was_leader, "{r:#}");
    assert_eq!(r["outage_ms"], 3000);
    assert_eq!(r["passed"], true, "{r:#}");
    let c = &r["canaries"];
    let sent = c["sent"].as_u64().unwrap();
    let accepted = c["accepted"].as_u64().unwrap();
    assert!(accepted >= 30, "too few canaries to prove anything: {r:#}");
    assert!(accepted <= sent);
    assert_eq!(c["delivered"], accepted, "{r:#}");
    assert_eq!(c["lost"], 0, "{r:#}");
    if was_leader {
        let ms = r["new_leader_ms"].as_u64().expect("a new leader");
        assert!(ms < 3000, "a new leader after {ms} ms: {r:#}");
    } else {
        assert!(r["new_leader_ms"].is_null(), "{r:#}");
    }
    let rejoin = r["rejoin_ms"].as_u64().expect("rejoined");
    assert!(rejoin < 30_000, "{r:#}");
    // A round-robin sender moves on from the dead node at once, so the gap
    // is an election at most, never the outage.
    let gap = r["acceptance_gap_ms"].as_u64().unwrap();
    assert!(gap < 3000, "{r:#}");
    if let Some(t) = r["takeover_ms"].as_u64() {
        // Leases are 3 s in this cluster, and the claim interval 200 ms.
        assert!(t < 15_000, "{r:#}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn drills_on_the_leader_and_on_a_follower_pass_with_plausible_times() {
    let sink = SinkMta::builder().start().await.unwrap();
    let dns = example_org_dns().await;
    let plan = ClusterPlan::new(3, dns.addr(), sink.port(), timings)
        .await
        .unwrap();
    let mut nodes = start(&plan).await;
    let leader = wait_for_leader(&admins(&plan), Duration::from_secs(20))
        .await
        .unwrap();
    let via = plan.config(leader).admin_addr();

    let out = drill(via, &[]).await;
    println!("drill on the leader: {}{}", out.stdout, out.stderr);
    if out.code != 0 {
        for n in &nodes {
            eprintln!(
                "--- node {} ({}) ---\n{}",
                n.config.node_id,
                n.proc_state(),
                n.log()
            );
        }
    }
    check_plausible(&out.json(), leader, true);

    // The former leader is back; aim at a follower now, asking the leader.
    let leader = wait_for_leader(&admins(&plan), Duration::from_secs(20))
        .await
        .unwrap();
    let follower = plan.ids().into_iter().find(|&id| id != leader).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("drill.md");
    let out = drill(
        plan.config(leader).admin_addr(),
        &[
            "--target",
            &follower.to_string(),
            "--report",
            report.to_str().unwrap(),
        ],
    )
    .await;
    println!("drill on a follower: {}{}", out.stdout, out.stderr);
    check_plausible(&out.json(), follower, false);
    let md = std::fs::read_to_string(&report).unwrap();
    assert!(md.starts_with("# Skein failure drill"), "{md}");
    assert!(md.contains("| verdict | PASSED |"), "{md}");

    // Nothing the canaries did reached the real MX, and every node is up.
    assert!(sink.messages().is_empty(), "a canary left the cluster");
    for a in admins(&plan) {
        if let Err(e) = status(a).await {
            for n in &nodes {
                eprintln!(
                    "--- node {} ({}) ---\n{}",
                    n.config.node_id,
                    n.proc_state(),
                    n.log()
                );
            }
            panic!("{a} is down after the drills: {e:#}");
        }
    }
    for n in nodes.iter_mut() {
        assert!(
            n.is_running(),
            "node {} exited:\n{}",
            n.config.node_id,
            n.log()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_drill_refuses_an_unhealthy_cluster() {
    let sink = SinkMta::builder().start().await.unwrap();
    let dns = example_org_dns().await;
    let plan = ClusterPlan::new(3, dns.addr(), sink.port(), timings)
        .await
        .unwrap();
    let mut nodes = start(&plan).await;
    let leader = wait_for_leader(&admins(&plan), Duration::from_secs(20))
        .await
        .unwrap();
    let down = plan.ids().into_iter().find(|&id| id != leader).unwrap();
    nodes[(down - 1) as usize].kill9();
    let via = plan.config(leader).admin_addr();
    wait_for(
        Duration::from_secs(10),
        "the leader to see it down",
        || async {
            status(via)
                .await
                .is_ok_and(|s| s.nodes.iter().any(|n| n.id == down && !n.reachable))
        },
    )
    .await
    .unwrap();
    let out = drill(via, &[]).await;
    assert_eq!(out.code, 1, "{}{}", out.stdout, out.stderr);
    assert!(out.stderr.contains("not healthy"), "{}", out.stderr);
    assert!(
        out.stderr.contains(&format!("node {down}")),
        "{}",
        out.stderr
    );
    // And nothing was done: the other two are both still up.
    for id in plan.ids().into_iter().filter(|&id| id != down) {
        assert!(status(plan.config(id).admin_addr()).await.is_ok());
    }
}

/// A second site: voters 1–3 at site `a`, a learner at site `b`. A drill on
/// site `a` takes every voter down at once: mail is refused while it is out
/// (the learner is no majority), and the drill reports how long the cluster
/// took to lead and catch up again, with every accepted canary delivered.
#[tokio::test(flavor = "multi_thread")]
async fn a_drill_on_a_whole_site_reports_the_recovery() {
    let sink = SinkMta::builder().start().await.unwrap();
    let dns = example_org_dns().await;
    let at = |site: &str| {
        let site = site.to_string();
        move |c: &mut TestConfig| {
            timings(c);
            c.site = Some(site.clone());
        }
    };
    let mut plan = ClusterPlan::new(3, dns.addr(), sink.port(), at("a"))
        .await
        .unwrap();
    let mut nodes = start(&plan).await;
    let leader = wait_for_leader(&admins(&plan), Duration::from_secs(20))
        .await
        .unwrap();
    let c4 = plan.joining_node(4, at("b")).await.unwrap();
    let learner = ProcessNode::start(skein_tests::skeind!(), c4.clone()).unwrap();
    learner.wait_ready(Duration::from_secs(30)).await.unwrap();
    skein_tests::cluster::add_member(
        plan.config(leader).admin_addr(),
        4,
        c4.advertise.unwrap(),
        true,
    )
    .await
    .unwrap();
    let via = c4.admin_addr();
    let st = run_ctl(
        skein_tests::skeinctl!(),
        via,
        Some(TOKEN),
        None,
        &["status"],
    )
    .await;
    assert!(st.stdout.contains("SITE"), "{}", st.stdout);

    let out = drill(via, &["--site", "a"]).await;
    println!("drill on site a: {}{}", out.stdout, out.stderr);
    if out.code != 0 {
        for n in nodes.iter().chain([&learner]) {
            eprintln!(
                "--- node {} ({}) ---\n{}",
                n.config.node_id,
                n.proc_state(),
                n.log()
            );
        }
    }
    let r = out.json();
    assert_eq!(r["targets"], serde_json::json!([1, 2, 3]), "{r:#}");
    assert_eq!(r["site"], "a");
    assert_eq!(r["majority_lost"], true, "{r:#}");
    assert_eq!(r["passed"], true, "{r:#}");
    assert_eq!(r["canaries"]["lost"], 0, "{r:#}");
    assert!(r["canaries"]["accepted"].as_u64().unwrap() > 0, "{r:#}");
    // Mail stopped for the outage at least; the cluster led again and the
    // site caught up within the settle time.
    let gap = r["acceptance_gap_ms"].as_u64().unwrap();
    assert!(gap >= 3000, "acceptance went on without a majority? {r:#}");
    let led = r["new_leader_ms"].as_u64().expect("a leader again");
    assert!(led >= 3000, "a leader while every voter was down? {r:#}");
    assert!(r["rejoin_ms"].as_u64().is_some(), "{r:#}");
    for n in nodes.iter_mut() {
        assert!(n.is_running(), "node {} exited", n.config.node_id);
    }
}
