//! The node's seat in the cluster: the openraft instance, proposals with
//! forwarding to the leader, and the Raft transport over gRPC.
//!
//! Every change to the queue goes through [`Cluster::propose`]. On the leader
//! it is stamped with the leader's clock and written through openraft; on a
//! follower it is forwarded to the leader's `Propose` RPC, which does the
//! same. The call returns once the entry is committed and applied, or fails
//! when that does not happen within the commit timeout.

mod batch;
mod control;
mod forward;
mod network;
mod receive;
mod service;
mod succession;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use openraft::{BasicNode, SnapshotPolicy};
use skein_proto::v1::{propose_reply, ProposeReply, ProposeRequest};
use skein_queue::{Command, NodeId, QueueReader, Raft, Response, Stores};
use tokio::sync::watch;
use tokio::time::Instant;

pub use control::{role_name, Change, ControlError};
pub use network::{Network, PeerChannels};
pub use service::{control_status, RaftService, RequireSecret};

use crate::clock::now_ms;
use crate::config::Config;

/// How often a node looks whether it has gone quiet (see
/// [`Cluster::compact_when_quiet`]).
const QUIET_COMPACT: Duration = Duration::from_secs(5);
/// Fewer unpurged entries than this are not worth a snapshot.
const QUIET_COMPACT_MIN_ENTRIES: u64 = 64;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ProposeError {
    /// No commit within the commit timeout: no leader, or no majority.
    #[error("not committed in time")]
    Timeout,
    /// The Raft core stopped (storage failure or shutdown).
    #[error("raft stopped: {0}")]
    Fatal(String),
    #[error("leader refused the proposal: {0}")]
    Refused(String),
    /// No log entry can carry the command: it could never be replicated,
    /// so it is refused at once instead of retried.
    #[error("the command is {size} bytes encoded, over the {limit} bytes a log entry may carry")]
    TooLarge { size: usize, limit: usize },
}

/// One node's handle on the cluster. Cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

struct Inner {
    id: NodeId,
    raft: Raft,
    batcher: batch::Batcher,
    /// Proposals to the leader when this node is not it.
    forwarder: forward::Forwarder,
    reader: QueueReader,
    peers: PeerChannels,
    limits: batch::EntryLimit,
    commit_timeout: Duration,
    /// Drained: no SMTP, no deliveries, no standing for election.
    draining: AtomicBool,
    /// When the leader was last heard from (ms since the epoch; 0: never).
    leader_contact: AtomicU64,
    /// Where this node takes SMTP mail, told to peers in `NodeInfo`.
    smtp_addrs: std::sync::OnceLock<Vec<std::net::SocketAddr>>,
    /// `cluster.site`.
    site: String,
}

impl Cluster {
    /// Start openraft on the node's storage and, on a pristine node, form the
    /// cluster from `[cluster.peers]`.
    pub async fn start(
        config: &Config,
        stores: Stores,
        peers: PeerChannels,
    ) -> anyhow::Result<Cluster> {
        let c = &config.cluster;
        let raft_config = openraft::Config {
            cluster_name: "skein".into(),
            heartbeat_interval: c.heartbeat_interval.as_millis() as u64,
            // Followers stand after a random time in [t, 1.25 t] without a
            // leader. The top of the range is also the leader's lease (no
            // vote is granted within it of its last message), which bounds
            // how soon a crashed leader can be replaced: kept close to t.
            election_timeout_min: c.election_timeout.as_millis() as u64,
            election_timeout_max: (c.election_timeout.as_millis() as u64) * 5 / 4,
            // Big snapshots travel in chunks; each chunk may take a while on a
            // slow link, the whole transfer much longer.
            install_snapshot_timeout: 60_000,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(c.snapshot_every),
            snapshot_max_chunk_size: 4 << 20,
            // Entries kept behind a snapshot, so a briefly lagging follower
            // catches up from the log rather than a whole snapshot.
            max_in_snapshot_log_to_keep: (c.snapshot_every / 2).min(1000),
            max_payload_entries: 256,
            ..Default::default()
        }
        .validate()?;
        let network = Network::new(peers.clone());
        let raft = Raft::new(
            config.node_id,
            Arc::new(raft_config),
            network,
            stores.log,
            stores.state_machine,
        )
        .await?;
        if !raft.is_initialized().await? && c.peers.contains_key(&config.node_id) {
            let members: BTreeMap<NodeId, BasicNode> = c
                .peers
                .iter()
                .map(|(id, addr)| (*id, BasicNode { addr: addr.clone() }))
                .collect();
            tracing::info!(?members, "forming the cluster from cluster.peers");
            // Several nodes doing this with the same peers is safe; a node that
            // finds the cluster already formed is told so and carries on.
            if let Err(e) = raft.initialize(members).await {
                tracing::info!(error = %e, "cluster already formed");
            }
        }
        let limits = batch::EntryLimit::for_transport(peers.max_message());
        Ok(Cluster {
            inner: Arc::new(Inner {
                id: config.node_id,
                batcher: batch::Batcher::start(raft.clone(), limits),
                forwarder: forward::Forwarder::default(),
                limits,
                raft,
                reader: stores.reader,
                peers,
                commit_timeout: c.commit_timeout,
                draining: AtomicBool::new(false),
                leader_contact: AtomicU64::new(0),
                smtp_addrs: std::sync::OnceLock::new(),
                site: c.site.clone(),
            }),
        })
    }

    /// When no entry has been applied for a while, snapshot and purge the
    /// whole log: the bodies it names, and their disk space, go now rather
    /// than after `cluster.snapshot_every` more entries. Only when the queue
    /// is smaller than the log, since a snapshot writes the whole queue.
    pub async fn compact_when_quiet(self, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(QUIET_COMPACT);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seen = None;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
            let m = self.inner.raft.metrics().borrow().clone();
            let applied = m.last_applied.map(|l| l.index);
            let quiet = applied == seen;
            seen = applied;
            let Some(applied) = applied else { continue };
            if !quiet {
                continue;
            }
            let purged = m.purged.map_or(0, |l| l.index);
            let in_log = applied.saturating_sub(purged);
            let queued = self.inner.reader.read().len() as u64;
            if in_log < QUIET_COMPACT_MIN_ENTRIES || queued > in_log {
                continue;
            }
            let r = if m.snapshot.is_none_or(|s| s.index < applied) {
                tracing::debug!(applied, "quiet: snapshot");
                self.inner.raft.trigger().snapshot().await
            } else {
                tracing::debug!(applied, "quiet: purge the log");
                self.inner.raft.trigger().purge_log(applied).await
            };
            if r.is_err() {
                return;
            }
        }
    }

    /// Resolves when Raft has stopped on its own, on a storage error (a
    /// full or failing disk): the node must not live on half-alive.
    pub async fn failed(&self) -> String {
        let mut m = self.inner.raft.metrics();
        loop {
            if let Err(f) = &m.borrow_and_update().running_state {
                return f.to_string();
            }
            if m.changed().await.is_err() {
                return "Raft stopped".into();
            }
        }
    }

    pub fn id(&self) -> NodeId {
        self.inner.id
    }

    pub fn raft(&self) -> &Raft {
        &self.inner.raft
    }

    pub fn reader(&self) -> &QueueReader {
        &self.inner.reader
    }

    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::Acquire)
    }

    pub fn set_draining(&self) {
        self.inner.draining.store(true, Ordering::Release);
    }

    /// A leader handing over takes no new proposals (they wait for the
    /// next leader).
    pub(crate) fn set_leader_paused(&self, paused: bool) {
        self.inner.batcher.pause(paused);
    }

    /// A message from the leader arrived (an append or a heartbeat).
    pub(crate) fn note_leader_contact(&self) {
        self.inner.leader_contact.store(now_ms(), Ordering::Relaxed);
    }

    /// Seconds since this node last heard from a leader: zero on the leader
    /// itself, `None` if never.
    pub fn since_leader_contact(&self) -> Option<f64> {
        if self.current_leader() == Some(self.id()) {
            return Some(0.0);
        }
        match self.inner.leader_contact.load(Ordering::Relaxed) {
            0 => None,
            t => Some(now_ms().saturating_sub(t) as f64 / 1000.0),
        }
    }

    /// Where this node takes SMTP mail (set once its listeners are bound).
    pub fn set_smtp_addrs(&self, addrs: Vec<std::net::SocketAddr>) {
        let _ = self.inner.smtp_addrs.set(addrs);
    }

    pub fn smtp_addrs(&self) -> &[std::net::SocketAddr] {
        self.inner.smtp_addrs.get().map_or(&[], Vec::as_slice)
    }

    pub fn peers(&self) -> &PeerChannels {
        &self.inner.peers
    }

    /// The leader's id, waiting up to the commit timeout for an election.
    pub async fn wait_for_leader_id(&self) -> Option<NodeId> {
        let r = self
            .inner
            .raft
            .wait(Some(self.inner.commit_timeout))
            .metrics(|m| m.current_leader.is_some(), "a leader")
            .await;
        r.ok().and_then(|m| m.current_leader)
    }

    /// The largest encoded command one log entry may carry.
    pub fn max_command_bytes(&self) -> usize {
        self.inner.limits.0
    }

    pub fn commit_timeout(&self) -> Duration {
        self.inner.commit_timeout
    }

    /// Commit `cmd` and return the state machine's answer, within the commit
    /// timeout. A command too large for any log entry is refused at once.
    pub async fn propose(&self, cmd: Command) -> Result<Response, ProposeError> {
        self.inner.limits.check(&cmd)?;
        let deadline = Instant::now() + self.inner.commit_timeout;
        tokio::time::timeout_at(deadline, self.propose_until(cmd, deadline))
            .await
            .unwrap_or(Err(ProposeError::Timeout))
    }

    async fn propose_until(
        &self,
        cmd: Command,
        deadline: Instant,
    ) -> Result<Response, ProposeError> {
        // Straight to the leader this node knows of: a follower's own Raft
        // would only answer "forward to" after a trip through its core.
        let mut hint = self.current_leader();
        loop {
            let target = match hint.take() {
                Some(id) if id != self.inner.id => Some(id),
                _ => None,
            };
            let result = match target {
                None => self.propose_local(cmd.clone()).await,
                Some(leader) => self.forward(leader, &cmd).await,
            };
            match result {
                Ok(r) => return Ok(r),
                Err(Step::Forward(Some(leader))) => hint = Some(leader),
                Err(Step::Forward(None)) | Err(Step::Retry) => {
                    // No leader known (an election is running) or the leader
                    // could not be reached: wait a little and ask again.
                    self.wait_for_leader(deadline).await;
                    hint = self.current_leader();
                }
                Err(Step::Fail(e)) => return Err(e),
            }
        }
    }

    /// Propose on this node: it must be the leader, or the answer says who is.
    pub(crate) async fn propose_local(&self, cmd: Command) -> Result<Response, Step> {
        self.inner.batcher.propose(cmd).await
    }

    async fn forward(&self, leader: NodeId, cmd: &Command) -> Result<Response, Step> {
        let Some(addr) = network::member_addr(&self.inner.raft, leader) else {
            return Err(Step::Retry);
        };
        let command: bytes::Bytes = postcard::to_stdvec(cmd)
            .map_err(|e| Step::Fail(ProposeError::Refused(e.to_string())))?
            .into();
        let reply = match self
            .inner
            .forwarder
            .send(&self.inner.peers, leader, &addr, command.clone())
            .await
        {
            forward::Sent::Reply(r) => r,
            forward::Sent::Broken => return Err(Step::Retry),
            forward::Sent::Unsupported => self.forward_unary(leader, &addr, command).await?,
        };
        match reply.result {
            Some(propose_reply::Result::Response(b)) => postcard::from_bytes(&b)
                .map_err(|e| Step::Fail(ProposeError::Refused(e.to_string()))),
            Some(propose_reply::Result::ForwardTo(0)) | None => Err(Step::Forward(None)),
            Some(propose_reply::Result::ForwardTo(id)) => Err(Step::Forward(Some(id))),
            Some(propose_reply::Result::Error(e)) => {
                tracing::debug!(leader, error = %e, "leader could not commit");
                Err(Step::Retry)
            }
        }
    }

    /// One call per proposal, to a leader that does not know the stream.
    async fn forward_unary(
        &self,
        leader: NodeId,
        addr: &str,
        command: bytes::Bytes,
    ) -> Result<ProposeReply, Step> {
        let channel = self.inner.peers.channel(addr).map_err(|_| Step::Retry)?;
        let mut client = self.inner.peers.raft_client(channel);
        match client.propose(ProposeRequest { command, seq: 0 }).await {
            Ok(r) => Ok(r.into_inner()),
            Err(status) => {
                tracing::debug!(leader, %status, "forwarding a proposal failed");
                Err(Step::Retry)
            }
        }
    }

    pub fn current_leader(&self) -> Option<NodeId> {
        self.inner.raft.metrics().borrow().current_leader
    }

    async fn wait_for_leader(&self, deadline: Instant) {
        let pause = Instant::now() + Duration::from_millis(50);
        let mut m = self.inner.raft.metrics();
        // Wake on the first change of metrics (e.g. a leader elected), but
        // never spin: at least the pause, at most until the deadline.
        let _ = tokio::time::timeout_at(
            deadline.min(pause + Duration::from_millis(200)),
            m.changed(),
        )
        .await;
        tokio::time::sleep_until(pause.min(deadline)).await;
    }

    /// Whether this node can commit now: it knows a leader, and if it is the
    /// leader, a majority acknowledged it recently.
    pub fn can_commit(&self) -> bool {
        if self.is_draining() {
            return false;
        }
        let m = self.inner.raft.metrics().borrow().clone();
        match m.current_leader {
            None => false,
            Some(l) if l == self.inner.id => m
                .millis_since_quorum_ack
                .is_some_and(|ms| ms < self.inner.commit_timeout.as_millis() as u64),
            // A follower forwards to the leader it names, but after a restart
            // that name comes from the persisted vote alone: only recent
            // contact shows the leader is really there.
            Some(_) => self
                .since_leader_contact()
                .is_some_and(|s| s < self.inner.commit_timeout.as_secs_f64()),
        }
    }

    pub async fn shutdown(&self) {
        if let Err(e) = self.inner.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
    }
}

/// What to do after one try of a proposal.
#[derive(Debug, Clone)]
pub(crate) enum Step {
    Forward(Option<NodeId>),
    Retry,
    Fail(ProposeError),
}
