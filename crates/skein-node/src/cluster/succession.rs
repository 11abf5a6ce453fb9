//! Taking over from a leader whose process is gone, without waiting out
//! the election timers.
//!
//! openraft's followers refuse to vote while they heard from a leader
//! within its lease (`election_timeout_max`), so after a crash the first
//! election that can win comes a lease after the leader last spoke — and
//! with random timers firing into the lease and failing, often much later.
//!
//! Here a follower that has not heard from its leader for a heartbeat and
//! a half knocks on the leader's cluster port. A refused connection (or one
//! a proxy closes at once) means no process serves there any more: it
//! crashed, was killed or stopped, while its host is up. The followers then settle who leads next without
//! an extra round — the one with the longest log, the lowest id among
//! equals, as each learns from the others' node info — and that one stands
//! for election as the others' leases run out. Anything else (the port
//! answers, or nothing does: a dead host, a partition) is left to the
//! election timers, as before.

use std::time::Duration;

use skein_queue::NodeId;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::Cluster;

/// After the lease has run out here, the others' have too: room for their
/// last heartbeat having arrived a little after ours.
const LEASE_MARGIN: Duration = Duration::from_millis(30);
/// The chosen follower stands this many times, two heartbeats apart, while
/// no leader is known (a vote can be lost to a lease that ran a little long).
const ATTEMPTS: u32 = 3;

/// The leader this follower follows and has not heard from for `silence`.
struct SilentLeader {
    id: NodeId,
    term: u64,
    addr: String,
}

impl Cluster {
    /// Watches the leader from a follower, for as long as the node runs.
    pub async fn take_over_from_gone_leaders(self, mut shutdown: watch::Receiver<bool>) {
        let cfg = self.raft().config().clone();
        let heartbeat = Duration::from_millis(cfg.heartbeat_interval);
        let lease = Duration::from_millis(cfg.election_timeout_max);
        let mut tick = tokio::time::interval(heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The term whose leader was found gone: acted on once.
        let mut handled = None;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
            let Some(gone) = self.silent_leader(heartbeat * 3 / 2) else {
                continue;
            };
            if handled == Some(gone.term) || !process_gone(&gone.addr, heartbeat).await {
                continue;
            }
            handled = Some(gone.term);
            let next = self.next_leader(gone.id, lease / 2).await;
            tracing::info!(
                leader = gone.id,
                next,
                "nothing serves the leader's cluster port: its process is gone"
            );
            if next == Some(self.id()) {
                self.stand_after_lease(&gone, heartbeat, lease).await;
            }
        }
    }

    fn silent_leader(&self, silence: Duration) -> Option<SilentLeader> {
        if self.is_draining() {
            return None;
        }
        let quiet = self.since_leader_contact()?;
        if quiet < silence.as_secs_f64() {
            return None;
        }
        let m = self.raft().metrics().borrow().clone();
        let id = m.current_leader.filter(|l| *l != self.id())?;
        let addr = m.membership_config.membership().get_node(&id)?.addr.clone();
        Some(SilentLeader {
            id,
            term: m.current_term,
            addr,
        })
    }

    /// Who stands first once `gone` is gone: of the voters that answer
    /// (this one included) and are not draining, the longest log, then the
    /// lowest id. Every follower asks the same and comes to the same answer.
    async fn next_leader(&self, gone: NodeId, within: Duration) -> Option<NodeId> {
        let infos = tokio::time::timeout(within, self.gather_node_info())
            .await
            .unwrap_or_default();
        infos
            .into_iter()
            .filter(|(id, _, voter, _)| *voter && *id != gone)
            .filter_map(|(id, _, _, info)| info.filter(|i| !i.draining).map(|i| (id, i)))
            .max_by_key(|(id, i)| (i.last_log_index, std::cmp::Reverse(*id)))
            .map(|(id, _)| id)
    }

    /// Stand for election as soon as every follower's lease on `gone` has
    /// run out, and again while nobody leads.
    async fn stand_after_lease(&self, gone: &SilentLeader, heartbeat: Duration, lease: Duration) {
        let quiet = Duration::from_secs_f64(self.since_leader_contact().unwrap_or(0.0));
        tokio::time::sleep(lease.saturating_sub(quiet) + LEASE_MARGIN).await;
        for _ in 0..ATTEMPTS {
            let m = self.raft().metrics().borrow().clone();
            let led = m.current_leader.is_some_and(|l| l != gone.id);
            let spoke = self
                .since_leader_contact()
                .is_some_and(|s| s < lease.as_secs_f64());
            if led || spoke || self.is_draining() {
                return;
            }
            tracing::info!(term = m.current_term, "standing for election");
            if let Err(e) = self.raft().trigger().elect().await {
                tracing::warn!(error = %e, "could not stand for election");
                return;
            }
            tokio::time::sleep(heartbeat * 2).await;
        }
    }
}

/// Whether no process serves at `addr`, as far as `within` shows: the
/// connection is refused, or (through a proxy or NAT whose backend is
/// gone) closed before a byte. A live node never closes a new connection
/// unasked: it waits for the TLS hello or greets with HTTP/2 settings. A
/// timeout, a name that does not resolve or a byte say nothing of the sort.
async fn process_gone(addr: &str, within: Duration) -> bool {
    let probe = async {
        let mut s = match TcpStream::connect(addr).await {
            Ok(s) => s,
            Err(e) => return e.kind() == std::io::ErrorKind::ConnectionRefused,
        };
        let mut byte = [0u8; 1];
        match s.read(&mut byte).await {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    };
    tokio::time::timeout(within, probe).await.unwrap_or(false)
}
