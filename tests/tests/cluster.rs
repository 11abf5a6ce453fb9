//! Three nodes, one queue — nodes in process on distinct addresses, with a
//! network the test can cut.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use skein_node::Node;
use skein_proto::v1::raft_client::RaftClient;
use skein_proto::v1::{ProposeRequest, RaftPayload};
use skein_smtp::EnhancedCode;
use skein_testkit::{wait_for, SinkMta};
use skein_tests::mail::{arrived, http_status, tokened, wait_all_arrived};
use skein_tests::{add_node, send, status, wait_for_leader, ClusterPlan, TestConfig};

async fn queues_empty(nodes: &[&Node]) {
    for n in nodes {
        let reader = n.cluster().reader().clone();
        wait_for(Duration::from_secs(30), "every queue to empty", || {
            let r = reader.clone();
            async move { r.read().is_empty() }
        })
        .await
        .unwrap();
    }
}

/// Wait until every given node has purged its log past `index`, so a node
/// that needs older entries can only catch up from a snapshot.
async fn log_purged_past(nodes: &[&Node], index: u64) {
    for n in nodes {
        let m = n.cluster().raft().metrics();
        wait_for(
            Duration::from_secs(20),
            "the log to be purged behind a snapshot",
            || {
                let purged = m.borrow().purged.map(|l| l.index);
                async move { purged.is_some_and(|p| p >= index) }
            },
        )
        .await
        .unwrap();
    }
}

/// Wait until a node holds a snapshot (built or installed).
async fn holds_snapshot(n: &Node, what: &str) {
    let m = n.cluster().raft().metrics();
    wait_for(Duration::from_secs(10), what, || {
        let has = m.borrow().snapshot.is_some();
        async move { has }
    })
    .await
    .unwrap();
}

async fn shutdown(nodes: Vec<Node>) {
    for n in nodes {
        n.shutdown(Duration::from_secs(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn mail_sent_to_every_node_in_turn_is_delivered_exactly_once() {
    let dns = skein_tests::mail::example_org_dns().await;
    let sink = SinkMta::builder().start().await.unwrap();
    let plan = ClusterPlan::new(3, dns.addr(), sink.port(), |_| {})
        .await
        .unwrap();
    let nodes = plan.start_all().await;

    let mut tokens = Vec::new();
    for i in 0..30 {
        let token = format!("turn-{i}");
        let node = &nodes[i % 3];
        let s = send(
            node.smtp_addrs[0],
            "a@client.test",
            &["b@example.org"],
            &tokened(&token),
        )
        .await
        .unwrap();
        assert!(s.accepted(), "node {} refused: {}", i % 3 + 1, s.reply);
        tokens.push(token);
    }
    let got = wait_all_arrived(&sink, &tokens, Duration::from_secs(30))
        .await
        .expect("all delivered");
    queues_empty(&nodes.iter().collect::<Vec<_>>()).await;
    let dups: Vec<_> = got.iter().filter(|(_, &n)| n > 1).collect();
    assert!(dups.is_empty(), "delivered more than once: {dups:?}");
    assert_eq!(got.len(), 30);
    shutdown(nodes).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_cut_off_gives_no_250_and_catches_up_after_healing() {
    let dns = skein_tests::mail::example_org_dns().await;
    let sink = SinkMta::builder().start().await.unwrap();
    let plan = ClusterPlan::new(3, dns.addr(), sink.port(), |c| {
        c.commit_timeout = "2s".into()
    })
    .await
    .unwrap();
    let nodes = plan.start_all().await;
    let ids = plan.ids();

    // Cut off node 3, whatever its role; its SMTP port stays open.
    plan.fabric.isolate(3, &ids);
    let cut = Instant::now();
    for i in 0..3 {
        let s = send(
            nodes[2].smtp_addrs[0],
            "a@client.test",
            &["b@example.org"],
            &tokened(&format!("cut-{i}")),
        )
        .await
        .unwrap();
        assert_eq!(s.reply.code, 451, "a cut-off node answered {}", s.reply);
        assert_eq!(s.reply.enhanced, Some(EnhancedCode::new(4, 3, 0)));
    }
    // Its readiness check fails, so a load balancer would take it out.
    let metrics3 = plan.config(3).metrics;
    wait_for(
        Duration::from_secs(10),
        "node 3 /readyz to fail",
        || async move { http_status(metrics3, "/readyz").await.ok() == Some(503) },
    )
    .await
    .unwrap();

    // The majority goes on (after an election if node 3 led).
    let mut majority_tokens = Vec::new();
    for (i, node) in nodes[..2].iter().enumerate() {
        let token = format!("majority-{i}");
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let s = send(
                node.smtp_addrs[0],
                "a@client.test",
                &["b@example.org"],
                &tokened(&token),
            )
            .await
            .unwrap();
            if s.accepted() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the majority did not accept: {}",
                s.reply
            );
        }
        majority_tokens.push(token);
    }
    println!("majority accepting {:?} after the cut", cut.elapsed());
    wait_all_arrived(&sink, &majority_tokens, Duration::from_secs(20))
        .await
        .unwrap();
    // While cut off, nothing sent to node 3 was committed: it never said 250.
    let before_heal = arrived(&sink);
    assert!(
        !before_heal.keys().any(|t| t.starts_with("cut-")),
        "a 451'd message was delivered during the cut: {before_heal:?}"
    );

    // Healed, node 3 catches up with the log and accepts again.
    plan.fabric.heal();
    let leader_applied = || nodes[0].cluster().raft().metrics().borrow().last_applied;
    let n3 = nodes[2].cluster().raft().metrics();
    wait_for(Duration::from_secs(20), "node 3 to catch up", || {
        let (mine, theirs) = (n3.borrow().last_applied, leader_applied());
        async move { mine >= theirs && mine.is_some() }
    })
    .await
    .unwrap();
    let s = send(
        nodes[2].smtp_addrs[0],
        "a@client.test",
        &["b@example.org"],
        &tokened("healed"),
    )
    .await
    .unwrap();
    assert!(s.accepted(), "{}", s.reply);
    assert_eq!(http_status(metrics3, "/readyz").await.unwrap(), 200);
    queues_empty(&nodes.iter().collect::<Vec<_>>()).await;
    // A proposal node 3 forwarded just before the cut can sit in the TCP
    // connection until the heal and still be committed then, as a timed-out
    // write can in any Raft system: a 451 after a timeout means the outcome
    // is unknown, and the client's retry may make a duplicate (RFC 5321
    // 6.1 prefers that to a loss). Never more than one copy, though.
    let got = arrived(&sink);
    let dups: Vec<_> = got.iter().filter(|(_, &n)| n > 1).collect();
    assert!(dups.is_empty(), "delivered more than once: {dups:?}");
    shutdown(nodes).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fourth_node_catches_up_from_a_snapshot_and_votes() {
    let dns = skein_tests::mail::example_org_dns().await;
    // Every attempt is deferred: the queue keeps its mail.
    let sink = SinkMta::builder().defer_all().start().await.unwrap();
    let tweak = |c: &mut TestConfig| {
        c.snapshot_every = 20;
        c.retry_schedule = vec!["1h".into()];
    };
    let mut plan = ClusterPlan::new(3, dns.addr(), sink.port(), tweak)
        .await
        .unwrap();
    let mut nodes = plan.start_all().await;
    for i in 0..40 {
        let s = send(
            nodes[i % 3].smtp_addrs[0],
            "a@client.test",
            &["b@example.org"],
            &tokened(&format!("q-{i}")),
        )
        .await
        .unwrap();
        assert!(s.accepted());
    }
    // Wait until every message was tried once and is deferred.
    let reader = nodes[0].cluster().reader().clone();
    wait_for(Duration::from_secs(30), "40 deferred messages", || {
        let r = reader.clone();
        async move { r.read().messages().filter(|m| m.attempts == 1).count() == 40 }
    })
    .await
    .unwrap();

    log_purged_past(&nodes.iter().collect::<Vec<_>>(), 20).await;
    let c4 = plan.joining_node(4, tweak).await.unwrap();
    let node4 = Node::start(c4.config()).await.unwrap();
    // Ask a follower: the change is forwarded to the leader.
    let leader = wait_for_leader(&plan.admins()[..3], Duration::from_secs(10))
        .await
        .unwrap();
    let via = plan
        .configs
        .iter()
        .find(|c| c.node_id != leader && c.node_id != 4)
        .unwrap()
        .admin_addr();
    let started = Instant::now();
    let voters = add_node(via, 4, c4.advertise.unwrap()).await.unwrap();
    println!(
        "node 4 caught up and became a voter in {:?}",
        started.elapsed()
    );
    assert_eq!(voters, vec![1, 2, 3, 4]);

    // It caught up from a snapshot (the log before it was purged) and holds the same queue.
    holds_snapshot(&node4, "node 4 to install a snapshot").await;
    let leader_reader = nodes[(leader - 1) as usize].cluster().reader().clone();
    let r4 = node4.cluster().reader().clone();
    wait_for(
        Duration::from_secs(10),
        "node 4's queue to equal the leader's",
        || {
            let (a, b) = (leader_reader.clone(), r4.clone());
            async move { a.applied() == b.applied() && *a.read() == *b.read() }
        },
    )
    .await
    .unwrap();
    assert_eq!(r4.read().len(), 40);
    let s4 = status(c4.admin_addr()).await.unwrap();
    assert!(s4.nodes.iter().any(|n| n.id == 4 && n.voter));

    // With four voters a commit needs three: stop node 2 (not the leader if
    // avoidable) and node 4's vote is needed for every 250.
    let stop = if leader == 2 { 1 } else { 2 };
    let stopped = nodes.remove((stop - 1) as usize);
    stopped.shutdown(Duration::from_secs(2)).await;
    let live = nodes.iter().find(|n| n.cluster().id() != stop).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let s = send(
            live.smtp_addrs[0],
            "a@client.test",
            &["b@example.org"],
            &tokened("needs-four"),
        )
        .await
        .unwrap();
        if s.accepted() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no commit with node 4 voting: {}",
            s.reply
        );
    }
    // Node 2 is gone for good: remove it; the cluster goes on with three.
    let via = plan.config(4).admin_addr();
    let voters = skein_tests::cluster::remove_node(via, stop).await.unwrap();
    assert_eq!(voters.len(), 3);
    assert!(!voters.contains(&stop));
    let s = send(
        node4.smtp_addrs[0],
        "a@client.test",
        &["b@example.org"],
        &tokened("after-remove"),
    )
    .await
    .unwrap();
    assert!(s.accepted(), "{}", s.reply);
    nodes.push(node4);
    shutdown(nodes).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn peers_and_clients_without_the_secret_or_token_are_refused() {
    let dns = skein_tests::mail::example_org_dns().await;
    let sink = SinkMta::builder().start().await.unwrap();
    let plan = ClusterPlan::new(1, dns.addr(), sink.port(), |_| {})
        .await
        .unwrap();
    let nodes = plan.start_all().await;
    let addr = plan.configs[0].cluster;
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();

    let with = |secret: Option<&str>| {
        let mut r = tonic::Request::new(RaftPayload {
            data: vec![1, 2, 3].into(),
        });
        if let Some(s) = secret {
            r.metadata_mut()
                .insert(skein_proto::SECRET_HEADER, s.parse().unwrap());
        }
        r
    };
    let mut raft = RaftClient::new(ch.clone());
    for secret in [None, Some("wrong")] {
        let e = raft.vote(with(secret)).await.unwrap_err();
        assert_eq!(
            e.code(),
            tonic::Code::Unauthenticated,
            "vote with {secret:?}"
        );
        let e = raft.append_entries(with(secret)).await.unwrap_err();
        assert_eq!(
            e.code(),
            tonic::Code::Unauthenticated,
            "append with {secret:?}"
        );
        let e = raft
            .propose(tonic::Request::new(ProposeRequest {
                command: vec![].into(),
                seq: 0,
            }))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "propose");
    }
    // The right secret gets through authentication (and then a decoding error
    // for this garbage payload).
    let e = raft
        .vote(with(Some(skein_tests::SECRET)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);

    let mut admin = skein_proto::v1::admin_client::AdminClient::new(ch);
    for token in [None, Some("Bearer wrong"), Some("test-token")] {
        let mut r = tonic::Request::new(skein_proto::v1::StatusRequest {});
        if let Some(t) = token {
            r.metadata_mut()
                .insert(skein_proto::AUTH_HEADER, t.parse().unwrap());
        }
        assert_eq!(
            admin.status(r).await.unwrap_err().code(),
            tonic::Code::Unauthenticated,
            "{token:?}"
        );
    }
    assert!(status(addr).await.is_ok());
    shutdown(nodes).await;
}

/// Any node reports the leader, the members and the queue.
#[tokio::test(flavor = "multi_thread")]
async fn status_reports_the_leader_and_the_queue() {
    let dns = skein_tests::mail::example_org_dns().await;
    let sink = SinkMta::builder().start().await.unwrap();
    let plan = ClusterPlan::new(3, dns.addr(), sink.port(), |_| {})
        .await
        .unwrap();
    let nodes = plan.start_all().await;
    let s = status(plan.configs[1].admin_addr()).await.unwrap();
    assert_ne!(s.leader, 0);
    assert_eq!(s.nodes.len(), 3);
    assert!(s.nodes.iter().all(|n| n.voter));
    assert_eq!(s.nodes.iter().filter(|n| n.role == "leader").count(), 1);
    assert_eq!(s.queue.unwrap().messages, 0);
    shutdown(nodes).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn nodes_started_in_any_order_form_one_cluster_and_keep_the_queue_across_restarts() {
    let dns = skein_tests::mail::example_org_dns().await;
    let sink = SinkMta::builder().defer_all().start().await.unwrap();
    let plan = ClusterPlan::new(3, dns.addr(), sink.port(), |c| {
        c.retry_schedule = vec!["1h".into()]
    })
    .await
    .unwrap();
    let start = |ids: [usize; 3]| {
        let plan = &plan;
        async move {
            let mut nodes: Vec<Option<Node>> = vec![None, None, None];
            for (k, i) in ids.into_iter().enumerate() {
                nodes[i] = Some(Node::start(plan.configs[i].config()).await.unwrap());
                if k == 0 {
                    // Alone, the first node cannot commit anything (after a
                    // restart it may still name a leader from its vote, even
                    // itself, but no majority acknowledges it).
                    tokio::time::sleep(Duration::from_millis(800)).await;
                    assert!(
                        !nodes[i].as_ref().unwrap().cluster().can_commit(),
                        "a lone node can commit"
                    );
                }
            }
            wait_for_leader(&plan.admins(), Duration::from_secs(20))
                .await
                .unwrap();
            nodes.into_iter().map(Option::unwrap).collect::<Vec<_>>()
        }
    };
    let nodes = start([2, 0, 1]).await;
    let s = send(
        nodes[1].smtp_addrs[0],
        "a@client.test",
        &["b@example.org"],
        &tokened("kept"),
    )
    .await
    .unwrap();
    let id = s.id.expect("accepted");
    shutdown(nodes).await;

    let nodes = start([1, 2, 0]).await;
    for n in &nodes {
        let r = n.cluster().reader().clone();
        wait_for(
            Duration::from_secs(10),
            "the queued message on every node",
            || {
                let r = r.clone();
                async move { r.read().get(&id).is_some() }
            },
        )
        .await
        .unwrap();
    }
    let s = send(
        nodes[0].smtp_addrs[0],
        "a@client.test",
        &["b@example.org"],
        &tokened("again"),
    )
    .await
    .unwrap();
    assert!(s.accepted());
    shutdown(nodes).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_long_delivery_renews_its_lease_and_nobody_takes_it_over() {
    let dns = skein_tests::mail::example_org_dns().await;
    // The MX takes the body and never answers: the attempt runs until the
    // end-of-data timeout (10s), far longer than the 2s lease.
    let sink = SinkMta::builder().hang_after_data().start().await.unwrap();
    let plan = ClusterPlan::new(3, dns.addr(), sink.port(), |c| {
        c.lease = "2s".into();
        c.claim_interval = "100ms".into();
    })
    .await
    .unwrap();
    let nodes = plan.start_all().await;
    let s = send(
        nodes[0].smtp_addrs[0],
        "a@client.test",
        &["b@example.org"],
        &tokened("long"),
    )
    .await
    .unwrap();
    let id = s.id.unwrap();
    let reader = nodes[1].cluster().reader().clone();
    let first_until = {
        let r = reader.clone();
        wait_for(Duration::from_secs(5), "the message on node 2", || {
            let r = r.clone();
            async move { r.read().get(&id).is_some() }
        })
        .await
        .unwrap();
        let until = r.read().get(&id).unwrap().lease.unwrap().until;
        until
    };
    tokio::time::sleep(Duration::from_secs(6)).await;
    let m = reader.read().get(&id).unwrap().clone();
    let lease = m.lease.unwrap();
    assert_eq!(lease.node, 1, "another node took the message over");
    assert!(
        lease.until >= first_until + 3000,
        "lease not renewed: {} vs {first_until}",
        lease.until
    );
    assert_eq!(m.attempts, 0);
    assert_eq!(
        sink.connections(),
        1,
        "a second attempt was started elsewhere"
    );
    shutdown(nodes).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wiped_node_catches_up_from_a_snapshot() {
    let dns = skein_tests::mail::example_org_dns().await;
    let sink = SinkMta::builder().defer_all().start().await.unwrap();
    let tweak = |c: &mut TestConfig| {
        c.snapshot_every = 20;
        c.retry_schedule = vec!["1h".into()];
    };
    let plan = ClusterPlan::new(3, dns.addr(), sink.port(), tweak)
        .await
        .unwrap();
    let mut nodes = plan.start_all().await;
    for i in 0..30 {
        let s = send(
            nodes[i % 2].smtp_addrs[0],
            "a@client.test",
            &["b@example.org"],
            &tokened(&format!("w-{i}")),
        )
        .await
        .unwrap();
        assert!(s.accepted());
    }
    // Node 3 loses its disk.
    let n3 = nodes.pop().unwrap();
    n3.shutdown(Duration::from_secs(2)).await;
    // A snapshot build on a blocking thread may still be finishing a file
    // in there: removal succeeds once it has.
    let dir = plan.configs[2].data_dir.clone();
    wait_for(
        Duration::from_secs(10),
        "node 3's data directory to go",
        || {
            let gone = std::fs::remove_dir_all(&dir).is_ok() || !dir.exists();
            async move { gone }
        },
    )
    .await
    .unwrap();
    for i in 30..40 {
        let s = send(
            nodes[i % 2].smtp_addrs[0],
            "a@client.test",
            &["b@example.org"],
            &tokened(&format!("w-{i}")),
        )
        .await
        .unwrap();
        assert!(s.accepted());
    }
    log_purged_past(&nodes.iter().collect::<Vec<_>>(), 20).await;
    let n3 = Node::start(plan.configs[2].config()).await.unwrap();
    let (a, b) = (
        nodes[0].cluster().reader().clone(),
        n3.cluster().reader().clone(),
    );
    wait_for(
        Duration::from_secs(20),
        "the wiped node to hold the whole queue again",
        || {
            let (a, b) = (a.clone(), b.clone());
            async move {
                b.read().len() == 40
                    && a.read()
                        .messages()
                        .map(|m| m.id)
                        .eq(b.read().messages().map(|m| m.id))
            }
        },
    )
    .await
    .unwrap();
    holds_snapshot(&n3, "the wiped node to install a snapshot").await;
    // The ids first: reading a body takes the queue's lock again, and a
    // second read while an apply waits for the lock would deadlock.
    let ids: Vec<_> = b.read().messages().map(|m| m.id).collect();
    for id in ids {
        assert!(
            b.body(&id).unwrap().is_some(),
            "body of {id} missing on the wiped node"
        );
    }
    nodes.push(n3);
    shutdown(nodes).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn draining_the_leader_hands_over_and_refuses_nothing() {
    let dns = skein_tests::mail::example_org_dns().await;
    let sink = SinkMta::builder().start().await.unwrap();
    let plan = ClusterPlan::new(3, dns.addr(), sink.port(), |_| {})
        .await
        .unwrap();
    let nodes = plan.start_all().await;
    let leader = wait_for_leader(&plan.admins(), Duration::from_secs(10))
        .await
        .unwrap();
    let targets: Vec<SocketAddr> = nodes.iter().map(|n| n.smtp_addrs[0]).collect();
    let load = skein_tests::mail::Load::start_failover(targets, 6, "drain");
    tokio::time::sleep(Duration::from_millis(800)).await;

    let started = Instant::now();
    let reply = skein_tests::drain(plan.config(leader).admin_addr())
        .await
        .unwrap();
    println!(
        "leader {leader} drained in {:?}; new leader {}, {} leases handed back",
        started.elapsed(),
        reply.leader,
        reply.leases_released
    );
    assert_ne!(reply.leader, leader);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let log = load.stop().await;

    let refused: Vec<_> = log.iter().filter(|s| !s.accepted).collect();
    assert!(
        refused.is_empty(),
        "{} of {} messages refused: {:?}",
        refused.len(),
        log.len(),
        &refused[..refused.len().min(3)]
    );
    let slowest = log.iter().map(|s| s.took).max().unwrap();
    println!(
        "{} messages, none refused; slowest acceptance {slowest:?}",
        log.len()
    );
    let tokens: Vec<String> = log.iter().map(|s| s.token.clone()).collect();
    wait_all_arrived(&sink, &tokens, Duration::from_secs(30))
        .await
        .expect("every message delivered");

    // The drained node: out of rotation, no leases, never leader again.
    let drained = &nodes[(leader - 1) as usize];
    assert!(!drained.cluster().can_commit());
    assert_eq!(
        http_status(plan.config(leader).metrics, "/readyz")
            .await
            .unwrap(),
        503
    );
    let st = status(plan.config(leader).admin_addr()).await.unwrap();
    assert_eq!(st.leader, reply.leader);
    assert!(st.nodes.iter().any(|n| n.id == leader && n.draining));
    let r = send(
        drained.smtp_addrs[0],
        "a@client.test",
        &["b@example.org"],
        &tokened("to-drained"),
    )
    .await
    .unwrap();
    assert_eq!(r.reply.code, 421, "a drained node takes no mail");
    shutdown(nodes).await;
}

/// The soak property on a live cluster: once the mail is delivered and the
/// cluster goes quiet, each node snapshots, purges its log and unlinks the
/// body segments, so its data directory comes back near its starting size.
#[tokio::test(flavor = "multi_thread")]
async fn a_quiet_cluster_gives_the_space_of_delivered_mail_back() {
    let dns = skein_tests::mail::example_org_dns().await;
    let sink = SinkMta::builder().start().await.unwrap();
    let plan = ClusterPlan::new(3, dns.addr(), sink.port(), |_| {})
        .await
        .unwrap();
    let nodes = plan.start_all().await;
    let start: Vec<u64> = nodes
        .iter()
        .map(|n| n.cluster().reader().disk_size())
        .collect();

    // 300 messages of 60 KB: 18 MB through every node, more than a segment.
    let padding = format!("{}\r\n", "x".repeat(998)).repeat(60);
    let mut senders = tokio::task::JoinSet::new();
    for t in 0..10 {
        let (addr, padding) = (nodes[t % 3].smtp_addrs[0], padding.clone());
        senders.spawn(async move {
            let mut tokens = Vec::new();
            for i in 0..30 {
                let token = format!("soak-{t}-{i}");
                let mut body = tokened(&token);
                body.extend_from_slice(padding.as_bytes());
                let s = send(addr, "a@client.test", &["b@example.org"], &body)
                    .await
                    .unwrap();
                assert!(s.accepted(), "refused: {}", s.reply);
                tokens.push(token);
            }
            tokens
        });
    }
    let mut tokens = Vec::new();
    while let Some(t) = senders.join_next().await {
        tokens.extend(t.unwrap());
    }
    wait_all_arrived(&sink, &tokens, Duration::from_secs(60))
        .await
        .expect("all delivered");
    let peak: Vec<u64> = nodes
        .iter()
        .map(|n| n.cluster().reader().disk_size())
        .collect();
    queues_empty(&nodes.iter().collect::<Vec<_>>()).await;

    for (i, n) in nodes.iter().enumerate() {
        let reader = n.cluster().reader().clone();
        let (s, p) = (start[i], peak[i]);
        assert!(p > s + 15_000_000, "node {}: {s} → {p} bytes", i + 1);
        let r = wait_for(
            Duration::from_secs(60),
            "the node to give the space back",
            || {
                let r = reader.clone();
                async move { r.body_segments() == 1 && r.disk_size() < s + (p - s) / 4 }
            },
        )
        .await;
        assert!(
            r.is_ok(),
            "node {}: data dir {s} → peak {p} → {} bytes, {} body segments",
            i + 1,
            reader.disk_size(),
            reader.body_segments()
        );
    }
    shutdown(nodes).await;
}
