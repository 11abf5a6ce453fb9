//! Failures seen as they happen: leader changes and takeovers in the log
//! (at info) and in the counters, and the history kept to its bounds.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use skein_queue::EventKind;
use tokio::sync::{broadcast, watch};

use crate::clock::now_ms;
use crate::cluster::Cluster;
use crate::config::TraceConfig;
use crate::metrics::Metrics;

/// Logs and counts every change of leader this node sees.
pub async fn leader_changes(
    cluster: Cluster,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut m = cluster.raft().metrics();
    let mut seen = None;
    loop {
        let (leader, term) = {
            let v = m.borrow_and_update();
            (v.current_leader, v.current_term)
        };
        if leader != seen {
            match leader {
                Some(l) => {
                    metrics.leader_changes.inc();
                    tracing::info!(leader = l, term, "leader is node {l}");
                }
                None => tracing::info!(term, "no leader: an election is under way"),
            }
            seen = leader;
        }
        tokio::select! {
            r = m.changed() => if r.is_err() { return },
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

/// Logs and counts the messages this node takes over from a node whose
/// leases lapsed: "node 3 took over 42 messages of node 1".
pub async fn takeovers(
    cluster: Cluster,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut events = cluster.reader().events();
    let me = cluster.id();
    loop {
        let first = tokio::select! {
            r = events.recv() => r,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        // Everything applied together is counted together.
        let mut batch = vec![first];
        while let Ok(e) = events.try_recv() {
            batch.push(Ok(e));
        }
        let mut from: BTreeMap<u64, u64> = BTreeMap::new();
        for e in batch {
            match e {
                Ok((_, e)) => {
                    if let (Some(node), EventKind::TakenOver { from: f }) = (e.node, &e.kind) {
                        if node == me {
                            *from.entry(*f).or_default() += 1;
                        }
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::debug!(missed = n, "fell behind the applied events");
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
        for (f, n) in from {
            metrics.takeovers.inc_by(n);
            tracing::info!(
                node = me,
                from = f,
                count = n,
                "node {me} took over {n} messages of node {f}"
            );
        }
    }
}

/// How often the history is pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// Keeps the history within `trace.retention` and `trace.max_events`.
pub async fn prune_history(
    cluster: Cluster,
    cfg: TraceConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs(60),
        PRUNE_EVERY,
    );
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        let history = cluster.reader().history().clone();
        let since = now_ms().saturating_sub(cfg.retention.as_millis() as u64);
        let max = cfg.max_events;
        match tokio::task::spawn_blocking(move || history.prune(since, max)).await {
            Ok(Ok(left)) => tracing::debug!(events = left, "history pruned"),
            Ok(Err(e)) => tracing::warn!(error = %e, "pruning the history failed"),
            Err(_) => return,
        }
    }
}
