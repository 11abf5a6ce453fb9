//! The node's delivery worker: what this node delivers, and how the results
//! get back into the replicated queue.
//!
//! Work arrives two ways. Mail this node accepted comes straight from the
//! SMTP session (the fast path: the lease was taken in the Enqueue entry and
//! the body is in memory). Everything else — deferred mail coming due, mail
//! whose holder died — is claimed in batches with a `Claim` entry. Leases of
//! running attempts are renewed; outcomes are committed in batches.

mod attempt;
pub mod dsn;
mod notices;
mod report;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use skein_delivery::{Deliverer, RetryPolicy};
use skein_queue::{Command, IdGenerator, MessageId, NewMessage, Response};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::clock::now_ms;
use crate::cluster::Cluster;
use crate::config::DeliveryConfig;
use crate::metrics::Metrics;

/// How long the worker waits for the local replica to show a message it
/// was told of (claimed, or one an outcome is about): the entry that names
/// it may still be on its way here.
const REPLICA_WAIT: Duration = Duration::from_secs(5);

/// Hands freshly accepted mail to the delivery worker.
#[derive(Clone)]
pub struct Dispatcher {
    tx: mpsc::UnboundedSender<NewMessage>,
}

impl Dispatcher {
    /// A dispatcher whose work lands in the returned receiver (for tests of
    /// the accept path without a delivery worker).
    pub fn channel() -> (Dispatcher, mpsc::UnboundedReceiver<NewMessage>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Dispatcher { tx }, rx)
    }

    pub fn fresh(&self, m: NewMessage) {
        // If the worker is gone the node is stopping; the lease lapses and
        // another node delivers.
        let _ = self.tx.send(m);
    }
}

/// State shared by the worker's tasks.
pub(crate) struct Worker {
    cluster: Cluster,
    deliverer: Deliverer,
    cfg: DeliveryConfig,
    retry: RetryPolicy,
    metrics: Arc<Metrics>,
    /// Messages with an attempt running or an outcome not yet committed.
    in_flight: Mutex<HashMap<MessageId, Instant>>,
    slots: Arc<Semaphore>,
    reports: mpsc::UnboundedSender<report::Report>,
    draining: watch::Sender<bool>,
    /// Notices this node queued are delivered from memory, like fresh mail.
    fresh: mpsc::UnboundedSender<NewMessage>,
    ids: Arc<IdGenerator>,
    hostname: String,
    /// Attempts running, so that a halt (a drill's crash) can cut them off.
    attempts: Mutex<Vec<tokio::task::AbortHandle>>,
}

/// Controls a running worker.
pub struct DeliveryHandle {
    worker: Arc<Worker>,
    tasks: JoinSet<()>,
}

/// Start the worker. `ids` is the node's id generator (notices are new
/// messages); `hostname` names this node in notices.
pub fn start(
    cluster: Cluster,
    deliverer: Deliverer,
    cfg: DeliveryConfig,
    metrics: Arc<Metrics>,
    ids: Arc<IdGenerator>,
    hostname: String,
) -> (Dispatcher, DeliveryHandle) {
    let (fresh_tx, fresh_rx) = mpsc::unbounded_channel();
    let (report_tx, report_rx) = mpsc::unbounded_channel();
    let worker = Arc::new(Worker {
        retry: RetryPolicy::new(cfg.retry_schedule.clone()),
        slots: Arc::new(Semaphore::new(cfg.max_concurrency)),
        cluster,
        deliverer,
        cfg,
        metrics,
        in_flight: Mutex::new(HashMap::new()),
        reports: report_tx,
        draining: watch::channel(false).0,
        fresh: fresh_tx.clone(),
        ids,
        hostname,
        attempts: Mutex::new(Vec::new()),
    });
    let mut tasks = JoinSet::new();
    tasks.spawn(intake(worker.clone(), fresh_rx));
    tasks.spawn(claimer(worker.clone()));
    tasks.spawn(renewer(worker.clone()));
    tasks.spawn(report::reporter(worker.clone(), report_rx));
    (
        Dispatcher { tx: fresh_tx },
        DeliveryHandle { worker, tasks },
    )
}

impl Worker {
    fn lease_ms(&self) -> u64 {
        self.cfg.lease.as_millis() as u64
    }

    fn is_draining(&self) -> bool {
        *self.draining.borrow()
    }

    /// Whether this node claims mail: not while it is a learner, unless
    /// `delivery.deliver_as_learner` says so.
    fn claims(&self) -> bool {
        self.cfg.deliver_as_learner || !self.cluster.is_learner()
    }

    /// Mark a message in flight; false if it already is.
    fn begin(&self, id: MessageId) -> bool {
        self.in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, Instant::now())
            .is_none()
    }

    fn finish(&self, ids: impl IntoIterator<Item = MessageId>) {
        let mut f = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        for id in ids {
            f.remove(&id);
        }
    }

    fn in_flight_ids(&self) -> Vec<MessageId> {
        self.in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .copied()
            .collect()
    }

    /// Start an attempt, remembered until it ends.
    fn spawn_attempt(self: &Arc<Self>, work: attempt::Work) {
        let handle = tokio::spawn(attempt::run(self.clone(), work)).abort_handle();
        let mut a = self.attempts.lock().unwrap_or_else(|p| p.into_inner());
        if a.len() >= 1024 {
            a.retain(|h| !h.is_finished());
        }
        a.push(handle);
    }

    /// Give leases back so other nodes can take the mail at once.
    async fn release(&self, ids: Vec<MessageId>) {
        if ids.is_empty() {
            return;
        }
        let n = ids.len();
        match self
            .cluster
            .propose(Command::Release {
                node: self.cluster.id(),
                ids: ids.clone(),
            })
            .await
        {
            Ok(_) => tracing::info!(count = n, "leases handed back"),
            Err(e) => {
                tracing::warn!(count = n, error = %e, "could not hand leases back; they will expire")
            }
        }
        self.finish(ids);
    }
}

async fn intake(w: Arc<Worker>, mut rx: mpsc::UnboundedReceiver<NewMessage>) {
    while let Some(m) = rx.recv().await {
        if w.is_draining() {
            w.release(vec![m.id]).await;
            continue;
        }
        if w.begin(m.id) {
            w.spawn_attempt(attempt::Work::Fresh(m));
        }
    }
}

/// Claims due mail while this node has delivery capacity.
async fn claimer(w: Arc<Worker>) {
    let mut draining = w.draining.subscribe();
    loop {
        let pause = next_pause(&w);
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = draining.wait_for(|d| *d) => return,
        }
        let capacity = w.slots.available_permits().min(64);
        if capacity == 0 || !w.claims() || !w.cluster.reader().read().has_claimable(now_ms()) {
            continue;
        }
        let cmd = Command::Claim {
            node: w.cluster.id(),
            max: capacity as u32,
            lease_ms: w.lease_ms(),
        };
        match w.cluster.propose(cmd).await {
            Ok(Response::Leased(ids)) => {
                if !ids.is_empty() {
                    tracing::debug!(count = ids.len(), "claimed");
                }
                for id in ids {
                    if w.begin(id) {
                        w.spawn_attempt(attempt::Work::Claimed(id));
                    }
                }
            }
            Ok(other) => tracing::warn!(?other, "unexpected answer to a claim"),
            Err(e) => tracing::debug!(error = %e, "claim not committed"),
        }
    }
}

/// Sleep until the next message comes due, but no longer than the claim interval.
fn next_pause(w: &Worker) -> Duration {
    let now = now_ms();
    let due = w.cluster.reader().read().next_due();
    let until_due = due
        .map(|t| Duration::from_millis(t.saturating_sub(now)))
        .unwrap_or(w.cfg.claim_interval);
    until_due.clamp(Duration::from_millis(20), w.cfg.claim_interval)
}

/// Renews the leases of long deliveries, well before they run out.
async fn renewer(w: Arc<Worker>) {
    let every = w.cfg.lease / 3;
    loop {
        tokio::time::sleep(every).await;
        let old: Vec<MessageId> = {
            let f = w.in_flight.lock().unwrap_or_else(|p| p.into_inner());
            f.iter()
                .filter(|(_, t)| t.elapsed() >= every)
                .map(|(id, _)| *id)
                .collect()
        };
        if old.is_empty() {
            continue;
        }
        let cmd = Command::Renew {
            node: w.cluster.id(),
            ids: old.clone(),
            lease_ms: w.lease_ms(),
        };
        match w.cluster.propose(cmd).await {
            Ok(Response::Leased(held)) => {
                let held: HashSet<MessageId> = held.into_iter().collect();
                for id in old.iter().filter(|id| !held.contains(id)) {
                    tracing::warn!(queue_id = %id, "lease lost to another node");
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "lease renewal not committed"),
        }
    }
}

/// Drains the worker from anywhere (the admin API's `node drain`).
#[derive(Clone)]
pub struct DeliveryControl {
    worker: Arc<Worker>,
}

impl DeliveryControl {
    /// Stop taking new work, give running attempts up to `grace` to finish
    /// and report, then hand back every lease still held. Returns how many
    /// leases were handed back.
    pub async fn drain(&self, grace: Duration) -> usize {
        self.worker.draining.send_replace(true);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline && !self.worker.in_flight_ids().is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let left = self.worker.in_flight_ids();
        let n = left.len();
        self.worker.release(left).await;
        n
    }
}

impl DeliveryHandle {
    pub fn control(&self) -> DeliveryControl {
        DeliveryControl {
            worker: self.worker.clone(),
        }
    }

    pub async fn drain(&mut self, grace: Duration) {
        self.control().drain(grace).await;
    }

    pub fn in_flight(&self) -> usize {
        self.worker.in_flight_ids().len()
    }

    pub fn shutdown(&mut self) {
        self.tasks.abort_all();
    }

    /// Stop at once, as a crash would: no attempt finishes, no lease is
    /// handed back.
    pub fn halt(&mut self) {
        self.tasks.abort_all();
        for h in self
            .worker
            .attempts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            h.abort();
        }
    }
}
