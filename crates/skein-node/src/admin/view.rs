//! What the admin API shows: cluster status gathered from every member, and
//! the queue as the local replica holds it.

use skein_proto::v1::{
    NodeStatus, QueueCounts, QueuedMessage, QueuedRecipient, StatusReply, TraceEvent,
};
use skein_queue::{Event, EventKind, Message, MessageId, RcptState};

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
                    version: i.version,
                    smtp_addrs: i.smtp_addrs,
                    site: i.site,
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
                    version: String::new(),
                    smtp_addrs: Vec::new(),
                    site: String::new(),
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

/// One event of a message's history, as `skeinctl trace` shows it.
pub fn trace_event(e: Event) -> TraceEvent {
    let mut t = TraceEvent {
        at_ms: e.at,
        node: e.node,
        event: e.kind.name().into(),
        ..Default::default()
    };
    match e.kind {
        EventKind::Accepted {
            from,
            client,
            recipients,
        } => {
            t.from = Some(from);
            t.client = client;
            t.recipients = Some(recipients);
        }
        EventKind::Restored => t.from = Some("a backup (skeinctl restore)".into()),
        EventKind::TakenOver { from } => t.taken_from = Some(from),
        EventKind::Attempt { recipients } => t.recipients = Some(recipients),
        EventKind::Delivered { recipient, reply }
        | EventKind::Deferred { recipient, reply }
        | EventKind::Failed { recipient, reply }
        | EventKind::Expired { recipient, reply } => {
            t.recipient = Some(recipient);
            t.reply = Some(reply);
        }
        EventKind::Bounced { notice, kind } => {
            t.notice = Some(notice.to_string());
            t.notice_kind = Some(kind);
        }
        EventKind::Held | EventKind::Released | EventKind::Deleted => {}
    }
    t
}
