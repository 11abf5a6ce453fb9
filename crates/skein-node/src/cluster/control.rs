//! Operations on the cluster itself: membership changes (made on the leader,
//! forwarded there from any node), a node's view of itself for status
//! reports, and handing leadership over for a drain.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers, ServerState};
use skein_proto::v1::{
    change_membership_request, ChangeMembershipRequest, ElectRequest, NodeInfoReply,
    NodeInfoRequest,
};
use skein_queue::NodeId;

use super::Cluster;

/// Proposals under way get this long to commit before leadership is
/// handed over: far more than a commit takes, well under a proposer's own
/// deadline.
const HANDOVER_SETTLE: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("no leader: the cluster has no majority")]
    NoLeader,
    #[error("{0}")]
    Refused(String),
    #[error("cannot reach node {0}: {1}")]
    Unreachable(NodeId, String),
    #[error("raft stopped: {0}")]
    Fatal(String),
}

/// How long a node being added may go without receiving anything before
/// the addition is called off (a large snapshot counts as progress only
/// once installed, so this is generous).
pub const CATCH_UP_STALL: Duration = Duration::from_secs(30);

/// A membership change.
#[derive(Debug, Clone)]
pub enum Change {
    /// A learner until caught up, then a voter — or, with `learner`, a
    /// non-voting replica for good.
    Add {
        id: NodeId,
        addr: String,
        learner: bool,
    },
    /// Out of the cluster, voter or learner.
    Remove { id: NodeId },
    /// A caught-up learner becomes a voter.
    Promote { id: NodeId },
    /// A voter becomes a learner.
    Demote { id: NodeId },
}

/// The membership after a change.
#[derive(Debug, Clone, Default)]
pub struct Members {
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
    /// The log index of the membership entry.
    pub log_index: u64,
}

fn write_error(e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>) -> ControlError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => {
            ControlError::Refused("leadership changed; try again".into())
        }
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
            ControlError::Refused(e.to_string())
        }
        RaftError::Fatal(f) => ControlError::Fatal(f.to_string()),
    }
}

pub fn role_name(state: ServerState, is_leader: bool) -> &'static str {
    if is_leader {
        return "leader";
    }
    match state {
        ServerState::Leader => "leader",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Follower | ServerState::Shutdown => "follower",
    }
}

impl Cluster {
    /// Make `change` on the leader, from whichever node is asked.
    pub async fn change_membership(&self, change: Change) -> Result<Members, ControlError> {
        let leader = self
            .wait_for_leader_id()
            .await
            .ok_or(ControlError::NoLeader)?;
        if leader == self.id() {
            // Run to the end even if the caller goes away: an addition
            // called off must still take its learner out again.
            let me = self.clone();
            return tokio::spawn(async move { me.change_membership_here(change).await })
                .await
                .map_err(|e| ControlError::Fatal(e.to_string()))?;
        }
        let ch = self
            .peers()
            .channel_for(leader, self.raft())
            .await
            .ok_or_else(|| ControlError::Unreachable(leader, "no known address".into()))?;
        use change_membership_request::Change as Wire;
        let (node_id, change) = match change {
            Change::Add {
                id,
                addr,
                learner: false,
            } => (id, Wire::AddAddr(addr)),
            Change::Add {
                id,
                addr,
                learner: true,
            } => (id, Wire::AddLearnerAddr(addr)),
            Change::Remove { id } => (id, Wire::Remove(true)),
            Change::Promote { id } => (id, Wire::Promote(true)),
            Change::Demote { id } => (id, Wire::Demote(true)),
        };
        let reply = self
            .peers()
            .raft_client(ch)
            .change_membership(ChangeMembershipRequest {
                node_id,
                change: Some(change),
            })
            .await
            .map_err(|s| match s.code() {
                tonic::Code::Unavailable => {
                    ControlError::Unreachable(leader, s.message().to_string())
                }
                _ => ControlError::Refused(s.message().to_string()),
            })?
            .into_inner();
        Ok(Members {
            voters: reply.voters,
            learners: reply.learners,
            log_index: reply.log_index,
        })
    }

    /// The change itself; this node must be the leader.
    pub(crate) async fn change_membership_here(
        &self,
        change: Change,
    ) -> Result<Members, ControlError> {
        let raft = self.raft();
        let voters = self.voters();
        let learners = self.learners();
        let resp = match change {
            Change::Add { id, addr, learner } => {
                if voters.contains(&id) || learners.contains(&id) {
                    return Err(ControlError::Refused(format!(
                        "node {id} is already a member"
                    )));
                }
                tracing::info!(node = id, addr = %addr, learner, "adding a node: learner until caught up");
                let added = raft
                    .add_learner(id, BasicNode { addr: addr.clone() }, false)
                    .await
                    .map_err(write_error)?;
                if let Err(why) = self.wait_caught_up(id, added.log_id.index).await {
                    tracing::warn!(node = id, addr = %addr, "{why}; taking the learner out again");
                    let _ = raft
                        .change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([id])), false)
                        .await;
                    return Err(ControlError::Refused(format!(
                        "node {id} at {addr} {why}: is it running and reachable, does it have \
                         the cluster's secret, and does its certificate (if any) chain to the \
                         cluster CA?"
                    )));
                }
                if learner {
                    tracing::info!(node = id, "node caught up; it stays a learner");
                    added
                } else {
                    tracing::info!(node = id, "node caught up; making it a voter");
                    raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
                        .await
                        .map_err(write_error)?
                }
            }
            Change::Remove { id } if learners.contains(&id) => {
                tracing::info!(node = id, "removing a learner");
                raft.change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([id])), false)
                    .await
                    .map_err(write_error)?
            }
            Change::Remove { id } | Change::Demote { id } if !voters.contains(&id) => {
                return Err(ControlError::Refused(format!("node {id} is not a voter")));
            }
            Change::Remove { .. } | Change::Demote { .. } if voters.len() == 1 => {
                return Err(ControlError::Refused(
                    "cannot take away the last voter".into(),
                ));
            }
            Change::Remove { id } => {
                tracing::info!(node = id, "removing a node from the voters");
                raft.change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])), false)
                    .await
                    .map_err(write_error)?
            }
            Change::Demote { id } => {
                tracing::info!(node = id, "making a voter a learner");
                raft.change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])), true)
                    .await
                    .map_err(write_error)?
            }
            Change::Promote { id } => {
                if !learners.contains(&id) {
                    return Err(ControlError::Refused(format!("node {id} is not a learner")));
                }
                let last = self.raft().metrics().borrow().last_log_index.unwrap_or(0);
                if let Err(why) = self.wait_caught_up(id, last).await {
                    return Err(ControlError::Refused(format!(
                        "node {id} {why}: not made a voter"
                    )));
                }
                tracing::info!(node = id, "making a learner a voter");
                raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
                    .await
                    .map_err(write_error)?
            }
        };
        Ok(match resp.membership.as_ref() {
            Some(m) => Members {
                voters: m.voter_ids().collect(),
                learners: m.learner_ids().collect(),
                log_index: resp.log_id.index,
            },
            None => Members {
                log_index: resp.log_id.index,
                ..Members::default()
            },
        })
    }

    /// Wait until the new learner `id` holds the log up to `index` (the
    /// entry that added it). openraft's own blocking add counts a learner
    /// within `replication_lag_threshold` entries as caught up, even one
    /// that never received anything; a voter that cannot be reached would
    /// only weaken the quorum. Gives up when the learner makes no progress
    /// for [`CATCH_UP_STALL`].
    async fn wait_caught_up(&self, id: NodeId, index: u64) -> Result<(), String> {
        let mut metrics = self.raft().metrics();
        let mut best = None;
        let mut progress_at = tokio::time::Instant::now();
        loop {
            let matched = {
                let m = metrics.borrow_and_update();
                let Some(repl) = &m.replication else {
                    return Err("was not caught up before this node lost leadership".into());
                };
                repl.get(&id).copied().flatten().map(|l| l.index)
            };
            if matched >= Some(index) {
                return Ok(());
            }
            if matched > best {
                best = matched;
                progress_at = tokio::time::Instant::now();
            }
            let stalled = progress_at + CATCH_UP_STALL;
            if tokio::time::Instant::now() >= stalled {
                return Err(format!(
                    "received no log entries for {}",
                    humantime::format_duration(CATCH_UP_STALL)
                ));
            }
            let _ = tokio::time::timeout_at(stalled, metrics.changed()).await;
        }
    }

    /// The voters of the membership this node knows.
    pub fn voters(&self) -> BTreeSet<NodeId> {
        self.raft()
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect()
    }

    /// The learners (non-voting replicas) of the membership this node knows.
    pub fn learners(&self) -> BTreeSet<NodeId> {
        self.raft()
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .learner_ids()
            .collect()
    }

    /// Whether this node is a learner: it never counts toward a commit.
    pub fn is_learner(&self) -> bool {
        let me = self.id();
        self.raft()
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .learner_ids()
            .any(|l| l == me)
    }

    /// This node's view of itself.
    pub fn node_info(&self) -> NodeInfoReply {
        let m = self.raft().metrics().borrow().clone();
        let is_leader = m.current_leader == Some(m.id);
        let matched: HashMap<NodeId, u64> = match (&m.replication, is_leader) {
            (Some(r), true) => r
                .iter()
                .map(|(id, l)| (*id, l.map(|l| l.index).unwrap_or(0)))
                .collect(),
            _ => HashMap::new(),
        };
        NodeInfoReply {
            id: m.id,
            role: role_name(m.state, is_leader).into(),
            term: m.current_term,
            leader: m.current_leader.unwrap_or(0),
            last_log_index: m.last_log_index.unwrap_or(0),
            applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
            draining: self.is_draining(),
            matched,
            smtp_addrs: self.smtp_addrs().iter().map(|a| a.to_string()).collect(),
            version: env!("CARGO_PKG_VERSION").into(),
            can_commit: self.can_commit(),
            site: self.inner.site.clone(),
            features: vec![crate::sts::FEATURE.into()],
        }
    }

    /// Every member's view of itself, asked in parallel; `None` for a member
    /// that did not answer in time.
    pub async fn gather_node_info(&self) -> Vec<(NodeId, String, bool, Option<NodeInfoReply>)> {
        let members: Vec<(NodeId, String, bool)> = {
            let m = self.raft().metrics();
            let m = m.borrow();
            let membership = m.membership_config.membership();
            let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
            membership
                .nodes()
                .map(|(id, n)| (*id, n.addr.clone(), voters.contains(id)))
                .collect()
        };
        let asks = members.into_iter().map(|(id, addr, voter)| async move {
            if id == self.id() {
                return (id, addr, voter, Some(self.node_info()));
            }
            let target = addr.clone();
            let info = async move {
                let ch = self.peers().channel(&target).ok()?;
                let r = self
                    .peers()
                    .raft_client(ch)
                    .node_info(NodeInfoRequest {})
                    .await
                    .ok()?;
                Some(r.into_inner())
            };
            (
                id,
                addr,
                voter,
                tokio::time::timeout(Duration::from_secs(2), info)
                    .await
                    .ok()
                    .flatten(),
            )
        });
        futures::future::join_all(asks).await
    }

    /// Stop standing for election here and, if this node leads, hand the
    /// leadership over. openraft 0.9 has no leader transfer, and followers
    /// refuse to vote while they hear from a leader (its lease). So the
    /// leader stops: it takes no new proposals (forwarders wait and retry,
    /// so clients see a pause, not a refusal) and sends no heartbeats; once
    /// its lease has run out the most up-to-date voter, asked to, wins an
    /// election with a higher term, and this node, no longer standing,
    /// follows it.
    pub async fn give_up_leadership(&self, within: Duration) -> Result<NodeId, ControlError> {
        self.raft().runtime_config().elect(false);
        let deadline = tokio::time::Instant::now() + within;
        let mut stopped = false;
        let result = loop {
            let info = self.node_info();
            if info.leader != 0 && info.leader != self.id() {
                break Ok(info.leader);
            }
            if info.leader == self.id() {
                if !stopped {
                    // New proposals wait for the next leader; those under
                    // way commit here first, while this node still leads.
                    self.set_leader_paused(true);
                    if !self.inner.batcher.settle(HANDOVER_SETTLE).await {
                        tracing::warn!("proposals still under way as leadership moves");
                    }
                    self.raft().runtime_config().heartbeat(false);
                    stopped = true;
                }
                let voters = self.voters();
                let mut peers: Vec<(NodeId, u64)> = info
                    .matched
                    .iter()
                    .filter(|(id, _)| **id != self.id() && voters.contains(id))
                    .map(|(id, m)| (*id, *m))
                    .collect();
                peers.sort_by_key(|(_, m)| std::cmp::Reverse(*m));
                let Some((target, _)) = peers.first().copied() else {
                    break Err(ControlError::Refused(
                        "no other voter to hand leadership to".into(),
                    ));
                };
                if let Some(ch) = self.peers().channel_for(target, self.raft()).await {
                    if let Err(e) = self.peers().raft_client(ch).elect(ElectRequest {}).await {
                        tracing::debug!(target, error = %e, "peer could not start an election");
                    }
                }
            }
            if tokio::time::Instant::now() >= deadline {
                break Err(ControlError::Refused(
                    "leadership did not move in time".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(150)).await;
        };
        if stopped {
            self.set_leader_paused(false);
            self.raft().runtime_config().heartbeat(true);
        }
        if let Ok(leader) = &result {
            tracing::info!(leader, "leadership handed over");
        }
        result
    }
}
