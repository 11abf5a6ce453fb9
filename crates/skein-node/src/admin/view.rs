//! What the admin API shows: cluster status gathered from every member, and
//! the queue as the local replica holds it.

use skein_proto::v1::{NodeStatus, QueueCounts, QueuedMessage, QueuedRecipient, StatusReply};
use skein_queue::{Message, MessageId, RcptState};

use crate::clock::now_ms;
use crate::cluster::Cluster;

pub async fn status(cluster: &Cluster) -> StatusReply {
    let infos = cluster.gather_node_info().await;
    let me = cluster.node_info();
    // The leader's view of everyone's progress, if the leader answered.
    let leader_info = infos
        .iter()
        .find_map(|(id, _, _, info)| info.as_ref().filter(|i| i.role == "leader" && i.id == *id))
        .cloned();
    let leader = leader_info.as_ref().map(|l| l.id).unwrap_or(me.leader);
    let nodes = infos
        .into_iter()
        .map(|(id, addr, voter, info)| {
            let lag = leader_info.as_ref().and_then(|l| {
                if l.id == id {
                    Some(0)
                } else {
                    l.matched
                        .get(&id)
                        .map(|m| l.last_log_index.saturating_sub(*m))
                }
            });
            match info {
                Some(i) => NodeStatus {
                    id,
                    addr,
                    role: i.role,
                    voter,
                    reachable: true,
                    last_log_index: i.last_log_index,
                    applied_index: i.applied_index,
                    lag,
                    draining: i.draining,
                },
                None => NodeStatus {
                    id,
                    addr,
                    role: "unknown".into(),
                    voter,
                    reachable: false,
                    last_log_index: 0,
                    applied_index: 0,
                    lag,
                    draining: false,
                },
            }
        })
        .collect();
    let c = cluster.reader().read().counts(now_ms());
    StatusReply {
        node_id: me.id,
        leader,
        term: leader_info.map(|l| l.term).unwrap_or(me.term),
        nodes,
        queue: Some(QueueCounts {
            messages: c.messages,
            ready: c.ready,
            leased: c.leased,
            deferred: c.deferred,
            held: c.held,
        }),
    }
}

fn rcpt_state(s: RcptState) -> &'static str {
    match s {
        RcptState::Pending => "pending",
        RcptState::Delivered => "delivered",
        RcptState::Failed => "failed",
    }
}

pub fn message(m: &Message, now: u64) -> QueuedMessage {
    QueuedMessage {
        id: m.id.to_string(),
        sender: m.sender.to_string(),
        recipients: m
            .recipients
            .iter()
            .map(|r| QueuedRecipient {
                address: r.address.to_string(),
                state: rcpt_state(r.state).into(),
                last_reply: r.last_reply.clone().unwrap_or_default(),
            })
            .collect(),
        state: m.state(now).as_str().into(),
        size: m.size,
        attempts: m.attempts,
        next_attempt_ms: if m.next_attempt > now {
            m.next_attempt
        } else {
            0
        },
        owner: m
            .lease
            .filter(|l| l.until > now)
            .map(|l| l.node)
            .unwrap_or(0),
        lease_until_ms: m
            .lease
            .filter(|l| l.until > now)
            .map(|l| l.until)
            .unwrap_or(0),
        last_error: m.last_error.clone().unwrap_or_default(),
        received_at_ms: m.received_at,
        accepted_by: m.accepted_by,
    }
}

pub fn list(
    cluster: &Cluster,
    state: Option<&str>,
    domain: &str,
    limit: u64,
) -> Vec<QueuedMessage> {
    let now = now_ms();
    let domain = domain.to_ascii_lowercase();
    let q = cluster.reader().read();
    let matches = q
        .messages()
        .filter(|m| state.is_none_or(|s| m.state(now).as_str() == s))
        .filter(|m| {
            domain.is_empty()
                || m.pending()
                    .any(|(_, r)| r.address.domain_str().eq_ignore_ascii_case(&domain))
        })
        .map(|m| message(m, now));
    if limit == 0 {
        matches.collect()
    } else {
        matches.take(limit as usize).collect()
    }
}

pub fn show(cluster: &Cluster, id: &MessageId) -> Option<QueuedMessage> {
    cluster
        .reader()
        .read()
        .get(id)
        .map(|m| message(m, now_ms()))
}
