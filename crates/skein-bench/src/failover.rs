//! Failover under load: a fresh 3-node cluster of release `skeind`
//! processes at their default Raft timings takes mail on every node; after
//! a while its leader is killed with SIGKILL, and the run measures how long
//! until a survivor answers 250 again, and whether any election happened
//! before the kill (there should be none under normal load).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use skein_testkit::{DnsServer, SinkMta};
use skein_tests::mail::metric;
use skein_tests::{wait_for_leader, ProcessNode, TestConfig};

use crate::load::{message, Conn, Envelope};

/// How long the cluster runs under load before and after the kill.
const BEFORE: Duration = Duration::from_secs(3);
const AFTER: Duration = Duration::from_secs(4);

/// One run's result.
#[derive(Debug)]
pub struct FailoverRun {
    /// SIGKILL of the leader to the first 250 from a survivor.
    pub resumed: Duration,
    /// Messages accepted before the kill, and leader changes seen by the
    /// nodes meanwhile (beyond the first election).
    pub accepted_before: usize,
    pub elections_before: f64,
}

/// Accepted messages: which node, when.
type Accepts = Arc<Mutex<Vec<(usize, Instant)>>>;

pub async fn run_once(
    skeind: &Path,
    sessions_per_node: usize,
    size: usize,
) -> anyhow::Result<FailoverRun> {
    let dir = tempfile::tempdir()?;
    let dns = DnsServer::builder()
        .mx("example.org", 10, "mx.example.org")
        .a("mx.example.org", Ipv4Addr::LOCALHOST)
        .start()
        .await?;
    let sink = SinkMta::builder().forget_commands().start().await?;
    let mut configs: Vec<TestConfig> = (1..=3)
        .map(|id| {
            let mut c = TestConfig::new(
                id,
                dir.path().join(format!("node{id}")),
                dns.addr(),
                sink.port(),
            )
            .with_fixed_ports();
            // The product's timings, not the tests' quick ones.
            c.raft_timings = None;
            c.commit_timeout = "10s".into();
            c.lease = "30s".into();
            c
        })
        .collect();
    let peers: Vec<(u64, SocketAddr)> = configs.iter().map(|c| (c.node_id, c.cluster)).collect();
    for c in &mut configs {
        c.peers = peers.clone();
    }
    let bin = skeind.to_str().expect("utf-8 path");
    let mut nodes = ProcessNode::start_all(bin, &configs).await?;
    let admins: Vec<SocketAddr> = configs.iter().map(|c| c.cluster).collect();
    let leader = wait_for_leader(&admins, Duration::from_secs(30)).await?;
    let changes_at_start = leader_changes(&configs).await;

    let accepts: Accepts = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let envelope = Envelope::new("load@bench.test", "sink@example.org")?;
    let mut sessions = Vec::new();
    for (i, c) in configs.iter().enumerate() {
        for s in 0..sessions_per_node {
            let (accepts, stop, envelope, addr) =
                (accepts.clone(), stop.clone(), envelope.clone(), c.smtp);
            sessions.push(tokio::spawn(async move {
                session(i, s, addr, size, envelope, accepts, stop).await
            }));
        }
    }
    tokio::time::sleep(BEFORE).await;
    let elections_before = leader_changes(&configs).await - changes_at_start;
    let accepted_before = accepts.lock().unwrap_or_else(|p| p.into_inner()).len();
    let victim = (leader - 1) as usize;
    nodes[victim].kill9();
    let killed = Instant::now();
    tokio::time::sleep(AFTER).await;
    stop.store(true, Ordering::Relaxed);
    for s in sessions {
        let _ = s.await;
    }
    for mut node in nodes {
        let _ = node.terminate();
    }
    let resumed = accepts
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|(node, at)| *node != victim && *at > killed)
        .map(|(_, at)| *at - killed)
        .min()
        .ok_or_else(|| anyhow::anyhow!("no survivor accepted mail within {AFTER:?}"))?;
    Ok(FailoverRun {
        resumed,
        accepted_before,
        elections_before,
    })
}

/// Sends messages to `addr` one after another until told to stop; a broken
/// connection is reopened (the node may be the one killed: then it fails
/// until the end).
async fn session(
    node: usize,
    s: usize,
    addr: SocketAddr,
    size: usize,
    envelope: Envelope,
    accepts: Accepts,
    stop: Arc<AtomicBool>,
) {
    let mut conn: Option<Conn> = None;
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match Conn::open(addr).await {
                Ok(c) => conn.insert(c),
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        n += 1;
        let body = message(
            node * 1_000_000 + s * 10_000 + n,
            size,
            "load@bench.test",
            "sink",
        );
        match c.send(&envelope, &body).await {
            Ok((r, _)) if r.code == 250 => accepts
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((node, Instant::now())),
            Ok(_) => {}
            Err(_) => conn = None,
        }
    }
}

/// Leader changes seen, summed over the nodes.
pub async fn leader_changes(configs: &[TestConfig]) -> f64 {
    let mut total = 0.0;
    for c in configs {
        total += metric(c.metrics, "skein_leader_changes_total")
            .await
            .unwrap_or(0.0);
    }
    total
}
