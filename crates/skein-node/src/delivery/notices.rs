//! Which delivery status notifications an outcome calls for, built before
//! the outcome is committed so that both travel in one entry.
//!
//! Rules (RFC 3461): the sender's NOTIFY decides; without one, failures and
//! delays are reported, successes are not. A message from the null sender
//! (itself a notice) never gets one. A delay notice goes once, after
//! `delivery.delay_warning`, if set.

use skein_queue::{
    Message, MessageId, NewMessage, NewRecipient, Notice, NoticeKind, Outcome, RcptOutcome,
    RcptState,
};
use skein_smtp::{MailParams, Notify, RcptParams, ReversePath};
use tokio::time::Instant;

use super::dsn::{self, Action, RecipientStatus};
use super::Worker;
use crate::clock::now_ms;

fn wants(notify: Option<Notify>, action: Action) -> bool {
    match notify {
        None => matches!(action, Action::Failed | Action::Delayed),
        Some(n) if n.never => false,
        Some(n) => match action {
            Action::Failed => n.failure,
            Action::Delayed => n.delay,
            Action::Relayed | Action::Delivered => n.success,
        },
    }
}

/// The message as the local replica holds it, waiting briefly for the
/// replica to catch up with the entry that queued it.
pub(super) async fn local_message(
    w: &Worker,
    id: MessageId,
    ok: impl Fn(&Message) -> bool,
) -> Option<Message> {
    let mut applied = w.cluster.reader().subscribe();
    let deadline = Instant::now() + super::REPLICA_WAIT;
    loop {
        if let Some(m) = w.cluster.reader().read().get(&id).filter(|m| ok(m)) {
            return Some(m.clone());
        }
        tokio::time::timeout_at(deadline, applied.changed())
            .await
            .ok()?
            .ok()?;
    }
}

/// The notices an outcome calls for. `successes` are the recipients whose
/// delivery Skein itself must report if asked (NOTIFY=SUCCESS): relayed to a
/// peer without DSN, or delivered by LMTP.
pub(super) async fn for_outcome(
    w: &Worker,
    o: &Outcome,
    successes: &[(u32, Action)],
) -> Vec<Notice> {
    let failed: Vec<(u32, &str)> = o
        .recipients
        .iter()
        .filter_map(|(i, r)| match r {
            RcptOutcome::Failed { reply } => Some((*i, reply.as_str())),
            _ => None,
        })
        .collect();
    let deferred: Vec<(u32, &str)> = o
        .recipients
        .iter()
        .filter_map(|(i, r)| match r {
            RcptOutcome::Deferred { reply } => Some((*i, reply.as_str())),
            _ => None,
        })
        .collect();
    let delay_due = |m: &Message| {
        w.cfg.delay_warning.is_some_and(|d| {
            !m.warned && now_ms().saturating_sub(m.received_at) >= d.as_millis() as u64
        })
    };
    // The successes with the reply each delivery got.
    let delivered: Vec<(u32, Action, &str)> = successes
        .iter()
        .filter_map(|&(i, action)| {
            o.recipients.iter().find_map(|(j, r)| match r {
                RcptOutcome::Delivered { reply } if *j == i => Some((i, action, reply.as_str())),
                _ => None,
            })
        })
        .collect();
    if failed.is_empty() && deferred.is_empty() && delivered.is_empty() {
        return Vec::new();
    }
    let Some(m) = local_message(w, o.id, |_| true).await else {
        tracing::warn!(queue_id = %o.id, "message not in the local replica; no notice built");
        return Vec::new();
    };
    if m.sender == ReversePath::Null {
        if !failed.is_empty() {
            tracing::info!(queue_id = %o.id, "a notice failed: no notice about a notice");
        }
        return Vec::new();
    }
    let pick = |list: &[(u32, &str)], action: Action| -> Vec<(u32, String)> {
        list.iter()
            .filter(|(i, _)| {
                m.recipients.get(*i as usize).is_some_and(|r| {
                    r.state == RcptState::Pending && wants(r.params.notify, action)
                })
            })
            .map(|(i, reply)| (*i, reply.to_string()))
            .collect()
    };
    let mut out = Vec::new();
    let failures = pick(&failed, Action::Failed);
    if !failures.is_empty() {
        out.extend(build(w, &m, Action::Failed, &failures));
    }
    for action in [Action::Relayed, Action::Delivered] {
        let done: Vec<(u32, &str)> = delivered
            .iter()
            .filter(|(_, a, _)| *a == action)
            .map(|&(i, _, reply)| (i, reply))
            .collect();
        let done = pick(&done, action);
        if !done.is_empty() {
            out.extend(build(w, &m, action, &done));
        }
    }
    if delay_due(&m) {
        let delays = pick(&deferred, Action::Delayed);
        if !delays.is_empty() {
            out.extend(build(w, &m, Action::Delayed, &delays));
        }
    }
    out
}

fn build(w: &Worker, m: &Message, action: Action, rcpts: &[(u32, String)]) -> Option<Notice> {
    let ReversePath::Mailbox(to) = &m.sender else {
        return None;
    };
    let body = match w.cluster.reader().body(&m.id) {
        Ok(Some(b)) => b,
        _ => {
            tracing::warn!(queue_id = %m.id, "body missing; the notice returns no content");
            Default::default()
        }
    };
    let now = now_ms();
    let id = w.ids.next(now);
    let id_text = id.to_string();
    let date = dsn::rfc2822(now);
    let until = dsn::rfc2822(m.received_at + w.cfg.max_queue_time.as_millis() as u64);
    let statuses = rcpts
        .iter()
        .filter_map(|(i, reply)| {
            let r = m.recipients.get(*i as usize)?;
            Some(RecipientStatus {
                address: &r.address,
                orcpt: r.params.orcpt.as_deref(),
                diagnostic: reply,
            })
        })
        .collect();
    let notice = dsn::Notice {
        action,
        message: m,
        recipients: statuses,
        body: &body,
        hostname: &w.hostname,
        id: &id_text,
        date: &date,
        retry_until: (action == Action::Delayed).then_some(until.as_str()),
        return_limit: w.cfg.bounce_size_limit,
    };
    let rendered = notice.render();
    tracing::info!(queue_id = %m.id, notice_id = %id, action = ?action, to = %skein_smtp::Escaped(to), "notice built");
    Some(Notice {
        about: m.id,
        kind: match action {
            Action::Failed => NoticeKind::Failure,
            Action::Delayed => NoticeKind::Delay,
            Action::Relayed | Action::Delivered => NoticeKind::Relayed,
        },
        message: NewMessage {
            id,
            sender: ReversePath::Null,
            recipients: vec![NewRecipient {
                address: to.clone(),
                params: RcptParams::default(),
            }],
            params: MailParams {
                smtputf8: to.is_utf8(),
                ..Default::default()
            },
            body: rendered.into(),
            owner: w.cluster.id(),
            lease_ms: w.lease_ms(),
        },
    })
}
