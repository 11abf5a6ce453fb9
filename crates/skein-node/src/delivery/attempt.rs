//! One delivery attempt of one message: every pending recipient, grouped by
//! domain, delivered concurrently; the outcome goes to the reporter.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use skein_delivery::{Job, RcptResult};
use skein_queue::{Message, MessageId, NewMessage, Outcome, RcptOutcome, RcptState};
use skein_smtp::{Escaped, MailParams, Mailbox, RcptParams, ReversePath};
use tokio::time::Instant;
use tracing::Instrument;

use super::dsn::Action;
use super::report::Report;
use super::Worker;
use crate::clock::now_ms;

#[allow(clippy::large_enum_variant)]
pub(crate) enum Work {
    /// Accepted here: lease held since the Enqueue, body in memory.
    Fresh(NewMessage),
    /// Leased by a Claim entry; read from the local replica.
    Claimed(MessageId),
}

/// A recipient still to deliver.
struct PendingRcpt {
    /// Its place in the message's recipient list, as outcomes name it.
    index: u32,
    address: Mailbox,
    params: RcptParams,
}

/// What an attempt needs to know of a message.
struct Target {
    id: MessageId,
    sender: ReversePath,
    params: MailParams,
    pending: Vec<PendingRcpt>,
    attempts: u32,
    received_at: u64,
    body: Bytes,
}

pub(crate) async fn run(w: Arc<Worker>, work: Work) {
    let id = match &work {
        Work::Fresh(m) => m.id,
        Work::Claimed(id) => *id,
    };
    let span = tracing::info_span!("attempt", queue_id = %id);
    async move {
        let Ok(_slot) = w.slots.clone().acquire_owned().await else {
            return;
        };
        let target = match work {
            Work::Fresh(m) => Some(fresh_target(m)),
            Work::Claimed(id) => claimed_target(&w, id).await,
        };
        let Some(target) = target else {
            w.finish([id]);
            return;
        };
        let started = Instant::now();
        let (outcome, successes) = attempt(&w, &target).await;
        w.metrics
            .delivery_latency
            .observe(started.elapsed().as_secs_f64());
        let _ = w.reports.send(Report { outcome, successes });
    }
    .instrument(span)
    .await
}

fn fresh_target(m: NewMessage) -> Target {
    Target {
        id: m.id,
        pending: m
            .recipients
            .into_iter()
            .enumerate()
            .map(|(i, r)| PendingRcpt {
                index: i as u32,
                address: r.address,
                params: r.params,
            })
            .collect(),
        sender: m.sender,
        params: m.params,
        attempts: 0,
        received_at: m.id.millis(),
        body: m.body,
    }
}

/// Wait for the claimed message in the local replica (it may lag the
/// leader a little), and check it is still ours to deliver.
async fn claimed_target(w: &Worker, id: MessageId) -> Option<Target> {
    let me = w.cluster.id();
    let mut applied = w.cluster.reader().subscribe();
    let deadline = Instant::now() + super::REPLICA_WAIT;
    let msg: Message = loop {
        {
            let state = w.cluster.reader().read();
            match state.get(&id) {
                Some(m) if m.lease.is_some_and(|l| l.node == me) => break m.clone(),
                Some(_) | None => {}
            }
        }
        if tokio::time::timeout_at(deadline, applied.changed())
            .await
            .is_err()
        {
            tracing::debug!("claimed message not visible locally; leaving it to lapse");
            return None;
        }
    };
    if msg.held {
        return None;
    }
    // Never start an attempt on a lease about to run out: another node may
    // take the message over at any moment after.
    let margin = w.lease_ms() / 4;
    if msg.lease.is_some_and(|l| l.until < now_ms() + margin) {
        tracing::info!("lease nearly expired; not starting an attempt");
        return None;
    }
    let body = match w.cluster.reader().body(&id) {
        Ok(Some(b)) => b,
        Ok(None) => {
            tracing::error!("message body missing from the local replica");
            return None;
        }
        Err(e) => {
            tracing::error!(error = %e, "reading the message body failed");
            return None;
        }
    };
    Some(Target {
        id,
        pending: msg
            .recipients
            .iter()
            .enumerate()
            .filter(|(_, r)| r.state == RcptState::Pending)
            .map(|(i, r)| PendingRcpt {
                index: i as u32,
                address: r.address.clone(),
                params: r.params.clone(),
            })
            .collect(),
        sender: msg.sender,
        params: msg.params,
        attempts: msg.attempts,
        received_at: msg.received_at,
        body,
    })
}

/// The outcome of one attempt, and the delivered recipients Skein must
/// report itself if asked (see `notices::for_outcome`).
async fn attempt(w: &Worker, t: &Target) -> (Outcome, Vec<(u32, Action)>) {
    let retry_after_ms = w.retry.jittered(t.attempts, &mut rand::rng()).as_millis() as u64;
    let age = Duration::from_millis(now_ms().saturating_sub(t.received_at));
    if age > w.cfg.max_queue_time {
        // The reporter builds the bounce for these failures.
        let reply = format!(
            "{} {} in the queue",
            skein_queue::history::EXPIRED_PREFIX,
            humantime::format_duration(w.cfg.max_queue_time)
        );
        let recipients = t
            .pending
            .iter()
            .map(|r| {
                tracing::warn!(to = %Escaped(&r.address), status = "expired", reply = %reply, "delivery");
                (
                    r.index,
                    RcptOutcome::Failed {
                        reply: reply.clone(),
                    },
                )
            })
            .collect();
        let outcome = Outcome {
            id: t.id,
            recipients,
            retry_after_ms,
        };
        return (outcome, Vec::new());
    }

    let mut groups: BTreeMap<String, Vec<&PendingRcpt>> = BTreeMap::new();
    for r in &t.pending {
        groups
            .entry(r.address.domain_str().to_ascii_lowercase())
            .or_default()
            .push(r);
    }
    let deliveries = groups.into_iter().map(|(domain, rcpts)| async move {
        let job = Job {
            id: t.id.to_string(),
            domain: domain.clone(),
            sender: t.sender.clone(),
            params: t.params.clone(),
            recipients: rcpts
                .iter()
                .map(|r| (r.address.clone(), r.params.clone()))
                .collect(),
            body: t.body.clone(),
        };
        let results = w.deliverer.deliver(&job).await;
        rcpts.into_iter().zip(results).collect::<Vec<_>>()
    });
    let mut recipients = Vec::new();
    let mut successes = Vec::new();
    for group in futures::future::join_all(deliveries).await {
        for (r, result) in group {
            // Only a sender who asked for success notices makes the
            // reporter look at a delivery again.
            let asked = r.params.notify.is_some_and(|n| n.success && !n.never);
            match &result {
                RcptResult::Delivered { lmtp: true, .. } if asked => {
                    successes.push((r.index, Action::Delivered))
                }
                RcptResult::Delivered { dsn: false, .. } if asked => {
                    successes.push((r.index, Action::Relayed))
                }
                _ => {}
            }
            recipients.push((r.index, record(w, t, &r.address, result)));
        }
    }
    let outcome = Outcome {
        id: t.id,
        recipients,
        retry_after_ms,
    };
    (outcome, successes)
}

/// Log one recipient's result, Postfix style, and count it.
fn record(w: &Worker, t: &Target, rcpt: &Mailbox, result: RcptResult) -> RcptOutcome {
    let delay = Duration::from_millis(now_ms().saturating_sub(t.received_at)).as_secs_f64();
    match result {
        RcptResult::Delivered {
            reply, host, tls, ..
        } => {
            tracing::info!(to = %Escaped(&rcpt), relay = %host, tls, delay, status = "sent", reply = %reply, "delivery");
            w.metrics.attempt("delivered");
            RcptOutcome::Delivered { reply }
        }
        RcptResult::Deferred { reply } => {
            tracing::info!(to = %Escaped(&rcpt), delay, status = "deferred", reply = %reply, "delivery");
            w.metrics.attempt("deferred");
            w.metrics.deferral(&reply);
            RcptOutcome::Deferred { reply }
        }
        RcptResult::Failed { reply } => {
            tracing::info!(to = %Escaped(&rcpt), delay, status = "bounced", reply = %reply, "delivery");
            w.metrics.attempt("failed");
            w.metrics.recipients_failed.inc();
            RcptOutcome::Failed { reply }
        }
    }
}
