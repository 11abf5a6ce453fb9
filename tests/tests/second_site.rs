//! A second site: non-voting replicas (learners) and the way back when a
//! majority of the voters is gone for good (`cluster recover --force`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use skein_node::Node;
use skein_smtp::{EnhancedCode, Reply};
use skein_testkit::{wait_for, SinkMta};
use skein_tests::cluster::{add_member, recover, set_voter};
use skein_tests::mail::{metric, tokened, wait_all_arrived};
use skein_tests::{
    add_node, list_queue, run_ctl, send, status, wait_for_leader, ClusterPlan, ProcessNode,
    TestConfig, TOKEN,
};

/// A sink that defers everything until opened.
fn gated_sink(open: Arc<AtomicBool>) -> skein_testkit::SinkMtaBuilder {
    SinkMta::builder().on_rcpt(move |_| {
        if open.load(Ordering::SeqCst) {
            Reply::new(250, Some(EnhancedCode::new(2, 1, 5)), "ok")
        } else {
            Reply::new(451, Some(EnhancedCode::new(4, 3, 0)), "try later")
        }
    })
}

fn quick_retries(c: &mut TestConfig) {
    c.retry_schedule = vec!["1s".into()];
    c.lease = "3s".into();
    c.commit_timeout = "3s".into();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_learner_replicates_takes_mail_leaves_delivery_to_voters_and_never_counts() {
    let dns = skein_tests::mail::example_org_dns().await;
    let sink = SinkMta::builder().start().await.unwrap();
    let mut plan = ClusterPlan::new(3, dns.addr(), sink.port(), quick_retries)
        .await
        .unwrap();
    let mut nodes = plan.start_all().await;
    let c4 = plan.joining_node(4, quick_retries).await.unwrap();
    let node4 = Node::start(c4.config()).await.unwrap();
    let leader = wait_for_leader(&plan.admins()[..3], Duration::from_secs(10))
        .await
        .unwrap();
    let m = add_member(
        plan.config(leader).admin_addr(),
        4,
        c4.advertise.unwrap(),
        true,
    )
    .await
    .unwrap();
    assert_eq!((m.voters, m.learners), (vec![1, 2, 3], vec![4]));
    let s = status(c4.admin_addr()).await.unwrap();
    let me = s.nodes.iter().find(|n| n.id == 4).unwrap();
    assert!(!me.voter, "{me:?}");
    assert_eq!(me.role, "learner");

    // Mail sent to the learner is accepted (forwarded to the leader) and
    // delivered by a voter, not by the learner.
    let mut tokens = Vec::new();
    for i in 0..5 {
        let t = format!("via-learner-{i}");
        let s = send(
            node4.smtp_addrs[0],
            "a@client.test",
            &["b@example.org"],
            &tokened(&t),
        )
        .await
        .unwrap();
        assert!(s.accepted(), "{}", s.reply);
        tokens.push(t);
    }
    let got = wait_all_arrived(&sink, &tokens, Duration::from_secs(30))
        .await
        .unwrap();
    assert!(
        got.values().all(|n| *n == 1),
        "delivered once each: {got:?}"
    );
    let delivered_by_learner = metric(
        c4.metrics,
        "skein_delivery_attempts_total{result=\"delivered\"}",
    )
    .await
    .unwrap();
    assert_eq!(delivered_by_learner, 0.0, "the learner delivered mail");

    // The learner holds the log like any member.
    let leader_index = status(plan.config(leader).admin_addr())
        .await
        .unwrap()
        .nodes
        .iter()
        .find(|n| n.id == leader)
        .unwrap()
        .applied_index;
    let r4 = node4.cluster().clone();
    wait_for(Duration::from_secs(10), "the learner to catch up", || {
        let r4 = r4.clone();
        async move { r4.node_info().applied_index >= leader_index }
    })
    .await
    .unwrap();

    // It never counts toward a commit. Stop one voter: the two left make a
    // majority of three with or without the learner.
    let follower = plan
        .ids()
        .into_iter()
        .find(|id| *id != leader && *id != 4)
        .unwrap();
    let keep = [leader, follower];
    let mut stopped = Vec::new();
    for id in [1u64, 2, 3] {
        if !keep.contains(&id) {
            stopped.push(nodes.remove(nodes.iter().position(|n| n.cluster().id() == id).unwrap()));
        }
    }
    for n in stopped {
        n.shutdown(Duration::from_secs(1)).await;
    }
    let s = send(
        node4.smtp_addrs[0],
        "a@client.test",
        &["b@example.org"],
        &tokened("two-voters-left"),
    )
    .await
    .unwrap();
    assert!(s.accepted(), "{}", s.reply);

    // Promote the learner, then demote it again.
    let via = plan.config(leader).admin_addr();
    let m = set_voter(via, 4, true).await.unwrap();
    assert_eq!(m.voters, vec![1, 2, 3, 4]);
    assert!(m.learners.is_empty());
    let m = set_voter(via, 4, false).await.unwrap();
    assert_eq!((m.voters, m.learners), (vec![1, 2, 3], vec![4]));
    // Promoting a voter, demoting a learner: refused.
    assert!(set_voter(via, leader, true).await.is_err());
    assert!(set_voter(via, 4, false).await.is_err());

    // Now stop the other follower too: one voter and a learner cannot
    // commit, so mail is refused with 451 rather than acknowledged.
    let i = nodes
        .iter()
        .position(|n| n.cluster().id() == follower)
        .unwrap();
    nodes.remove(i).shutdown(Duration::from_secs(1)).await;
    let s = send(
        node4.smtp_addrs[0],
        "a@client.test",
        &["b@example.org"],
        &tokened("no-majority"),
    )
    .await
    .unwrap();
    assert_eq!(s.reply.code, 451, "{}", s.reply);
    for n in nodes {
        n.shutdown(Duration::from_secs(1)).await;
    }
    node4.shutdown(Duration::from_secs(1)).await;
}

async fn start_processes(configs: &[TestConfig]) -> Vec<ProcessNode> {
    ProcessNode::start_all(skein_tests::skeind!(), configs)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn when_every_voter_is_lost_the_learner_recovers_with_all_it_held() {
    let dns = skein_tests::mail::example_org_dns().await;
    let open = Arc::new(AtomicBool::new(false));
    let sink = gated_sink(open.clone()).start().await.unwrap();
    let mut plan = ClusterPlan::new(3, dns.addr(), sink.port(), quick_retries)
        .await
        .unwrap();
    let mut voters = start_processes(&plan.configs).await;
    let admins: Vec<SocketAddr> = plan.admins();
    let leader = wait_for_leader(&admins, Duration::from_secs(20))
        .await
        .unwrap();
    let c4 = plan.joining_node(4, quick_retries).await.unwrap();
    let mut learner = start_processes(std::slice::from_ref(&c4)).await.remove(0);
    add_member(
        plan.config(leader).admin_addr(),
        4,
        c4.advertise.unwrap(),
        true,
    )
    .await
    .unwrap();

    // Mail accepted on every node, voters and learner; the MX defers it
    // all, so it stays queued.
    let mut tokens = Vec::new();
    let smtp: Vec<SocketAddr> = plan.configs.iter().map(|c| c.smtp).collect();
    for i in 0..24 {
        let t = format!("site-{i}");
        let s = send(
            smtp[i % smtp.len()],
            "a@client.test",
            &["b@example.org"],
            &tokened(&t),
        )
        .await
        .unwrap();
        assert!(s.accepted(), "{}", s.reply);
        tokens.push(t);
    }
    // The learner's disk holds every acknowledged message.
    let a4 = c4.admin_addr();
    wait_for(
        Duration::from_secs(10),
        "the learner to hold all 24",
        || async { list_queue(a4, "all").await.map(|q| q.len()).unwrap_or(0) == 24 },
    )
    .await
    .unwrap();

    // A healthy cluster has nothing to recover.
    let e = recover(a4, true).await.unwrap_err();
    assert!(e.to_string().contains("working majority"), "{e}");

    // The first site burns down.
    for v in &mut voters {
        v.kill9();
    }
    let killed = std::time::Instant::now();
    // Without --force: a report of what would be lost, and a refusal.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let report = loop {
        match recover(a4, false).await {
            Ok(r) => break r,
            Err(e) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the learner still sees a majority: {e}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    println!("recover without --force: {}", report.summary);
    assert!(!report.recovering);
    assert_eq!(report.unreachable, vec![1, 2, 3], "{report:?}");
    let out = run_ctl(
        skein_tests::skeinctl!(),
        a4,
        Some(TOKEN),
        None,
        &["cluster", "recover"],
    )
    .await;
    assert_ne!(out.code, 0, "recover without --force must refuse");
    assert!(out.stdout.contains("did not answer"), "{}", out.stdout);

    // With --force the learner restarts as the single voter and leads.
    let out = run_ctl(
        skein_tests::skeinctl!(),
        a4,
        Some(TOKEN),
        None,
        &["cluster", "recover", "--force"],
    )
    .await;
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    if let Err(e) = wait_for(Duration::from_secs(30), "node 4 to lead", || async {
        status(a4).await.is_ok_and(|s| s.leader == 4)
    })
    .await
    {
        eprintln!("--- node 4 log ---\n{}", learner.log());
        panic!("{e}");
    }

    println!(
        "node 4 leads {:?} after the voters were killed",
        killed.elapsed()
    );
    // Every acknowledged message is delivered from the learner's copy.
    open.store(true, Ordering::SeqCst);
    wait_all_arrived(&sink, &tokens, Duration::from_secs(60))
        .await
        .expect("every acknowledged message delivered after recovery");
    // New mail is accepted.
    let s = send(
        c4.smtp,
        "a@client.test",
        &["b@example.org"],
        &tokened("after-recovery"),
    )
    .await
    .unwrap();
    assert!(s.accepted(), "{}", s.reply);

    // Two new nodes join and catch up.
    let mut added = Vec::new();
    for id in [5, 6] {
        let c = plan.joining_node(id, quick_retries).await.unwrap();
        added.push(start_processes(std::slice::from_ref(&c)).await.remove(0));
        let voters = add_node(a4, id, c.advertise.unwrap()).await.unwrap();
        assert!(voters.contains(&id), "{voters:?}");
    }
    assert_eq!(
        status(a4)
            .await
            .unwrap()
            .nodes
            .iter()
            .filter(|n| n.voter && n.reachable)
            .count(),
        3
    );
    let s = send(
        plan.config(5).smtp,
        "a@client.test",
        &["b@example.org"],
        &tokened("via-new-node"),
    )
    .await
    .unwrap();
    assert!(s.accepted(), "{}", s.reply);
    wait_all_arrived(
        &sink,
        &["after-recovery".into(), "via-new-node".into()],
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    // And a healthy cluster refuses to recover again.
    let e = recover(plan.config(5).admin_addr(), false)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("working majority"), "{e}");
    let _ = learner.terminate();
    for mut n in added {
        let _ = n.terminate();
    }
}
