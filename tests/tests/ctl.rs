//! `skeinctl`, the real binary, against live three-node clusters: every
//! command, its JSON field by field, its exit codes, and a backup restored
//! into a fresh cluster.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use skein_node::Node;
use skein_smtp::{EnhancedCode, Reply};
use skein_testkit::{wait_for, SinkMta};
use skein_tests::mail::{tokened, wait_all_arrived};
use skein_tests::{run_ctl, send, ClusterPlan, CtlOut, TOKEN};

/// Run skeinctl against `node` with the admin token and `args`.
async fn ctl(node: SocketAddr, args: &[&str]) -> CtlOut {
    ctl_with(node, Some(TOKEN), args).await
}

async fn ctl_with(node: SocketAddr, token: Option<&str>, args: &[&str]) -> CtlOut {
    run_ctl(skein_tests::skeinctl!(), node, token, None, args).await
}

/// A sink that answers 451 to every recipient until `open` is set.
async fn gated_sink(open: Arc<AtomicBool>) -> SinkMta {
    SinkMta::builder()
        .on_rcpt(move |_| {
            if open.load(Ordering::SeqCst) {
                Reply::new(250, Some(EnhancedCode::new(2, 1, 5)), "ok")
            } else {
                Reply::new(451, Some(EnhancedCode::new(4, 3, 0)), "try later")
            }
        })
        .start()
        .await
        .unwrap()
}

async fn shutdown(nodes: Vec<Node>) {
    for n in nodes {
        n.shutdown(Duration::from_secs(5)).await;
    }
}

/// Queue `n` messages through node 0 and return their tokens and ids.
async fn queue_some(nodes: &[Node], prefix: &str, n: usize) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for i in 0..n {
        let token = format!("{prefix}-{i}");
        let s = send(
            nodes[i % nodes.len()].smtp_addrs[0],
            "sender@client.test",
            &["rcpt@example.org", "other@example.org"],
            &tokened(&token),
        )
        .await
        .unwrap();
        out.push((token, s.id.expect("accepted").to_string()));
    }
    out
}

/// Wait until `skeinctl queue list` shows `n` messages in `state`.
async fn wait_state(node: SocketAddr, state: &str, n: usize) {
    wait_for(
        Duration::from_secs(20),
        &format!("{n} message(s) {state}"),
        || async move {
            let o = ctl(node, &["--json", "queue", "list", "--state", state]).await;
            o.code == 0 && o.json().as_array().map(Vec::len) == Some(n)
        },
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn every_command_against_a_live_cluster() {
    let dns = skein_tests::mail::example_org_dns().await;
    let open = Arc::new(AtomicBool::new(false));
    let sink = gated_sink(open.clone()).await;
    let mut plan = ClusterPlan::new(3, dns.addr(), sink.port(), |c| {
        c.retry_schedule = vec!["1h".into()]
    })
    .await
    .unwrap();
    let nodes = plan.start_all().await;
    let via = plan.configs[1].admin_addr();

    // --- status, in JSON and as a table.
    let st = ctl(via, &["status", "--json"]).await.json();
    let leader = st["leader"].as_u64().unwrap();
    assert!((1..=3).contains(&leader), "{st}");
    assert!(st["term"].as_u64().unwrap() >= 1);
    let members = st["nodes"].as_array().unwrap();
    assert_eq!(members.len(), 3);
    for (m, c) in members.iter().zip(&plan.configs) {
        assert_eq!(m["id"].as_u64(), Some(c.node_id));
        assert_eq!(
            m["addr"].as_str(),
            Some(c.admin_addr().to_string().as_str())
        );
        let role = m["role"].as_str().unwrap();
        assert_eq!(role == "leader", c.node_id == leader, "{m}");
        assert_eq!(m["voter"], Value::Bool(true));
        assert_eq!(m["reachable"], Value::Bool(true));
        assert!(m["last_log_index"].as_u64().unwrap() >= 1);
        assert!(m["applied"].as_u64().is_some());
        assert!(m["lag"].as_u64().is_some(), "{m}");
    }
    for k in ["messages", "ready", "leased", "deferred", "held"] {
        assert_eq!(st["queue"][k].as_u64(), Some(0), "queue.{k} in {st}");
    }
    let table = ctl(via, &["status"]).await;
    assert_eq!(table.code, 0, "{}", table.stderr);
    assert!(
        table.stdout.contains(&format!("leader {leader}, term")),
        "{}",
        table.stdout
    );
    assert!(table.stdout.contains("LAST LOG"), "{}", table.stdout);
    assert!(
        table.stdout.contains("queue: 0 messages"),
        "{}",
        table.stdout
    );

    // --- mail that the receiver defers.
    let queued = queue_some(&nodes, "ctl", 3).await;
    wait_state(via, "deferred", 3).await;
    let st = ctl(via, &["--json", "status"]).await.json();
    assert_eq!(st["queue"]["messages"].as_u64(), Some(3), "{st}");
    assert_eq!(st["queue"]["deferred"].as_u64(), Some(3), "{st}");

    let list = ctl(via, &["--json", "queue", "list"]).await.json();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 3);
    for m in list {
        assert!(
            queued.iter().any(|(_, id)| m["id"].as_str() == Some(id)),
            "{m}"
        );
        assert_eq!(m["sender"].as_str(), Some("sender@client.test"));
        let rcpts = m["recipients"].as_array().unwrap();
        assert_eq!(rcpts.len(), 2);
        assert_eq!(rcpts[0]["address"].as_str(), Some("rcpt@example.org"));
        assert_eq!(rcpts[0]["state"].as_str(), Some("pending"));
        assert_eq!(m["state"].as_str(), Some("deferred"));
        assert!(m["size"].as_u64().unwrap() > 20);
        assert!(m["attempts"].as_u64().unwrap() >= 1);
        let next = m["next_attempt"].as_str().expect("next_attempt set");
        humantime::parse_rfc3339(next).expect("next_attempt is RFC 3339");
        assert_eq!(m["owner"], Value::Null, "deferred mail has no lease");
        assert!(m["last_error"].as_str().unwrap().contains("451"), "{m}");
    }
    let limited = ctl(via, &["--json", "queue", "list", "--limit", "2"])
        .await
        .json();
    assert_eq!(limited.as_array().unwrap().len(), 2);
    let by_domain = ctl(
        via,
        &["--json", "queue", "list", "--domain", "nowhere.test"],
    )
    .await
    .json();
    assert_eq!(by_domain.as_array().unwrap().len(), 0);
    let table = ctl(via, &["queue", "list"]).await;
    assert!(table.stdout.contains(&queued[0].1), "{}", table.stdout);
    assert!(table.stdout.contains("3 message(s)"), "{}", table.stdout);

    // --- show.
    let (_, id0) = &queued[0];
    let m = ctl(via, &["--json", "queue", "show", id0]).await.json();
    assert_eq!(m["id"].as_str(), Some(id0.as_str()));
    assert_eq!(m["state"].as_str(), Some("deferred"));
    assert!(m["recipients"][1]["last_reply"]
        .as_str()
        .unwrap()
        .contains("451"));
    let shown = ctl(via, &["queue", "show", id0]).await;
    assert!(shown.stdout.contains("last error:"), "{}", shown.stdout);
    assert!(
        shown.stdout.contains("other@example.org"),
        "{}",
        shown.stdout
    );
    let zero = "0".repeat(26);
    let missing = ctl(via, &["queue", "show", &zero]).await;
    assert_eq!(missing.code, 1, "{}", missing.stderr);
    let bad = ctl(via, &["queue", "show", "not-an-id"]).await;
    assert_eq!(bad.code, 1);
    assert!(bad.stderr.contains("not a queue id"), "{}", bad.stderr);

    // --- hold and release.
    let held = ctl(via, &["--json", "queue", "hold", id0]).await.json();
    assert_eq!(held["changed"].as_u64(), Some(1));
    wait_state(via, "held", 1).await;
    let released = ctl(via, &["queue", "release", id0]).await;
    assert_eq!(released.code, 0, "{}", released.stderr);
    assert!(released.stdout.contains("1 message(s) released"));
    wait_state(via, "held", 0).await;

    // --- delete one, then retry the rest once the receiver takes mail.
    let (_, id2) = &queued[2];
    let deleted = ctl(via, &["--json", "queue", "delete", id2]).await.json();
    assert_eq!(deleted["changed"].as_u64(), Some(1));
    assert_eq!(ctl(via, &["queue", "show", id2]).await.code, 1);
    open.store(true, Ordering::SeqCst);
    let (_, id1) = &queued[1];
    let one = ctl(via, &["--json", "queue", "retry", id1]).await.json();
    assert_eq!(one["changed"].as_u64(), Some(1));
    let all = ctl(via, &["--json", "queue", "retry", "--all"])
        .await
        .json();
    assert!(all["changed"].as_u64().unwrap() <= 1, "{all}");
    wait_all_arrived(
        &sink,
        &[queued[0].0.clone(), queued[1].0.clone()],
        Duration::from_secs(30),
    )
    .await
    .expect("retried mail delivered");
    wait_state(via, "all", 0).await;
    assert!(
        !skein_tests::mail::arrived(&sink).contains_key(&queued[2].0),
        "deleted mail was delivered"
    );

    // --- membership: a fourth node joins and leaves.
    let c4 = plan.joining_node(4, |_| {}).await.unwrap();
    let n4 = Node::start(c4.config()).await.unwrap();
    let added = ctl(
        via,
        &[
            "--json",
            "cluster",
            "add-node",
            "4",
            &c4.admin_addr().to_string(),
        ],
    )
    .await
    .json();
    assert_eq!(added["voters"], serde_json::json!([1, 2, 3, 4]), "{added}");
    let st = ctl(via, &["--json", "status"]).await.json();
    assert_eq!(st["nodes"].as_array().unwrap().len(), 4, "{st}");
    let removed = ctl(via, &["cluster", "remove-node", "4"]).await;
    assert_eq!(removed.code, 0, "{}", removed.stderr);
    assert!(
        removed.stdout.contains("voters now: 1, 2, 3"),
        "{}",
        removed.stdout
    );
    n4.shutdown(Duration::from_secs(5)).await;

    // --- backup.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("queue.snap");
    let b = ctl(via, &["--json", "backup", file.to_str().unwrap()])
        .await
        .json();
    let meta = std::fs::metadata(&file).unwrap();
    let size = meta.len();
    assert!(size > 0);
    assert_eq!(b["bytes"].as_u64(), Some(size));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o600,
        "a backup holds the whole queue: its owner's alone"
    );

    // --- drain a follower.
    let follower = (1..=3).find(|&i| i != leader).unwrap();
    let fnode = plan.config(follower).admin_addr();
    let d = ctl(fnode, &["--json", "node", "drain"]).await.json();
    assert_eq!(d["node"].as_u64(), Some(follower));
    assert_eq!(d["leader"].as_u64(), Some(leader));
    let st = ctl(via, &["--json", "status"]).await.json();
    let drained = st["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"].as_u64() == Some(follower))
        .unwrap();
    assert_eq!(drained["draining"], Value::Bool(true), "{st}");

    // --- refusals: wrong or missing token, an unreachable node, bad usage.
    let wrong = ctl_with(via, Some("not-the-token"), &["status"]).await;
    assert_eq!(wrong.code, 3, "{}", wrong.stderr);
    assert!(wrong.stderr.contains("token"), "{}", wrong.stderr);
    let none = ctl_with(via, None, &["queue", "list"]).await;
    assert_eq!(none.code, 3, "{}", none.stderr);
    let nobody = skein_tests::free_addr("127.0.0.1".parse().unwrap());
    let unreachable = ctl(nobody, &["status"]).await;
    assert_eq!(unreachable.code, 3, "{}", unreachable.stderr);
    assert!(
        unreachable.stderr.contains("unreachable"),
        "{}",
        unreachable.stderr
    );
    assert_eq!(ctl(via, &["queue", "frobnicate"]).await.code, 2);
    assert_eq!(ctl(via, &["queue", "retry"]).await.code, 2);

    shutdown(nodes).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backup_restored_into_a_fresh_cluster_delivers_every_message() {
    let dns = skein_tests::mail::example_org_dns().await;
    let open = Arc::new(AtomicBool::new(false));
    let old_sink = gated_sink(open).await;
    let plan = ClusterPlan::new(3, dns.addr(), old_sink.port(), |c| {
        c.retry_schedule = vec!["1h".into()]
    })
    .await
    .unwrap();
    let nodes = plan.start_all().await;
    let via = plan.configs[0].admin_addr();
    let queued = queue_some(&nodes, "restore", 12).await;
    wait_state(via, "deferred", 12).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("queue.snap");
    let b = ctl(via, &["backup", file.to_str().unwrap()]).await;
    assert_eq!(b.code, 0, "{}", b.stderr);
    shutdown(nodes).await;
    drop(plan);

    // A new cluster with nothing in common but the backup file.
    let sink = SinkMta::builder().start().await.unwrap();
    let plan = ClusterPlan::new(3, dns.addr(), sink.port(), |_| {})
        .await
        .unwrap();
    let nodes = plan.start_all().await;
    let via = plan.configs[2].admin_addr();
    let r = ctl(via, &["--json", "restore", file.to_str().unwrap()])
        .await
        .json();
    assert_eq!(r["queued"].as_u64(), Some(12), "{r}");
    assert_eq!(r["present"].as_u64(), Some(0), "{r}");
    // The restored mail keeps its schedule; the documented restore makes it
    // due at once.
    let retry = ctl(via, &["queue", "retry", "--all"]).await;
    assert_eq!(retry.code, 0, "{}", retry.stderr);
    let tokens: Vec<String> = queued.iter().map(|(t, _)| t.clone()).collect();
    let got = wait_all_arrived(&sink, &tokens, Duration::from_secs(30))
        .await
        .expect("every restored message delivered");
    assert!(
        got.values().all(|&n| n == 1),
        "delivered more than once: {got:?}"
    );
    wait_state(via, "all", 0).await;

    // A backup that is not one is refused and queues nothing.
    let junk = dir.path().join("junk.snap");
    std::fs::write(&junk, b"this is not a backup").unwrap();
    let j = ctl(via, &["restore", junk.to_str().unwrap()]).await;
    assert_eq!(j.code, 1, "{}", j.stderr);
    assert!(j.stderr.contains("not a usable backup"), "{}", j.stderr);
    let absent = ctl(
        via,
        &["restore", dir.path().join("absent").to_str().unwrap()],
    )
    .await;
    assert_eq!(absent.code, 1);
    shutdown(nodes).await;
}
