//! Commits delivery outcomes in batches: one `Report` entry for everything
//! that finished while the previous one was being committed, with the
//! notices (bounces) those outcomes call for.
//!
//! Every entry is bounded. An outcome travels with its own notices, and the
//! outcomes waiting are cut into reports of at most [`REPORT_BYTES`]
//! encoded: however many large bounces one node has to send, each report
//! replicates, and a report that cannot commit for now holds back nothing
//! that came after it beyond the next retry. An outcome that no entry could
//! ever carry (impossible with bounded notices and reply texts, but checked)
//! is given up with an error at once rather than retried forever.

use std::sync::Arc;
use std::time::Duration;

use skein_queue::{Command, Notice, Outcome, RcptOutcome, Response};
use tokio::sync::mpsc;

use super::{notices, Worker};
use crate::cluster::ProposeError;

/// Most outcomes gathered before the next round of commits.
const MAX_BATCH: usize = 256;
/// A report stops growing at this many bytes encoded: well under what one
/// log entry may carry, so that replication of a report is never the one
/// that holds the log up.
const REPORT_BYTES: usize = 4 << 20;

/// One attempt's outcome, with the recipients whose successful delivery
/// Skein must report itself if the sender asked (see `notices`).
pub(crate) struct Report {
    pub outcome: Outcome,
    pub successes: Vec<(u32, super::dsn::Action)>,
}

/// An outcome waiting to be committed with the notices it calls for. The
/// notices are built once and travel with the outcome on every retry.
struct Pending {
    outcome: Outcome,
    notices: Vec<Notice>,
    /// How the message ends with this outcome, if it does.
    ends: Option<Ending>,
    /// Encoded size of the outcome and its notices.
    size: usize,
}

pub(crate) async fn reporter(w: Arc<Worker>, mut rx: mpsc::UnboundedReceiver<Report>) {
    let mut waiting: Vec<Pending> = Vec::new();
    loop {
        let mut fresh = Vec::new();
        if waiting.is_empty() {
            match rx.recv().await {
                Some(r) => fresh.push(r),
                None => return,
            }
        }
        while waiting.len() + fresh.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(r) => fresh.push(r),
                Err(_) => break,
            }
        }
        for r in fresh {
            let notices = notices::for_outcome(&w, &r.outcome, &r.successes).await;
            let ends = ending(&w, &r.outcome);
            waiting.push(Pending::new(r.outcome, notices, ends));
        }
        let mut failed = false;
        let mut kept = Vec::new();
        for chunk in split(std::mem::take(&mut waiting)) {
            if failed {
                // A commit just failed: do not hammer the cluster with the
                // rest; they go with the next round.
                kept.extend(chunk);
                continue;
            }
            match commit(&w, &chunk).await {
                Ok(()) => {}
                Err(ProposeError::TooLarge { size, limit }) => {
                    // Only a single outcome can be too large (a chunk of
                    // several is never over REPORT_BYTES). Its lease lapses
                    // and the message is tried again by whoever claims it.
                    for p in &chunk {
                        tracing::error!(queue_id = %p.outcome.id, size, limit, "delivery outcome too large for any log entry; given up");
                    }
                    w.finish(chunk.iter().map(|p| p.outcome.id));
                }
                Err(e) => {
                    // Outcomes are facts: keep them and try again. If this
                    // node is cut off, the lease lapses and a peer
                    // redelivers; the remote side sees a duplicate, never a
                    // loss.
                    w.metrics.commit_failures.inc();
                    tracing::warn!(count = chunk.len(), error = %e, "delivery outcomes not committed; retrying");
                    failed = true;
                    kept.extend(chunk);
                }
            }
        }
        waiting = kept;
        if failed {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Pending {
    fn new(outcome: Outcome, notices: Vec<Notice>, ends: Option<Ending>) -> Self {
        let size = postcard::experimental::serialized_size(&(&outcome, &notices)).unwrap_or(0);
        Pending {
            outcome,
            notices,
            ends,
            size,
        }
    }
}

/// How a message ends, for `skein_messages_delivered_total` and
/// `skein_messages_failed_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ending {
    /// Every recipient delivered.
    Delivered,
    /// Every recipient decided, at least one failed (in this attempt or an
    /// earlier one).
    Failed,
}

/// How the message ends with `o`: not at all while a recipient is still
/// deferred. Earlier attempts' failures are in the local replica (the
/// message is there: this node holds its lease).
fn ending(w: &Worker, o: &Outcome) -> Option<Ending> {
    let mut failed = false;
    for (_, r) in &o.recipients {
        match r {
            RcptOutcome::Deferred { .. } => return None,
            RcptOutcome::Failed { .. } => failed = true,
            RcptOutcome::Delivered { .. } => {}
        }
    }
    let failed_before = || {
        w.cluster.reader().read().get(&o.id).is_some_and(|m| {
            m.recipients
                .iter()
                .any(|r| r.state == skein_queue::RcptState::Failed)
        })
    };
    Some(if failed || failed_before() {
        Ending::Failed
    } else {
        Ending::Delivered
    })
}

/// Cuts the waiting outcomes into reports of at most [`REPORT_BYTES`]
/// each (an outcome larger than that goes alone), in order.
fn split(waiting: Vec<Pending>) -> Vec<Vec<Pending>> {
    let mut chunks: Vec<Vec<Pending>> = Vec::new();
    let mut bytes = 0;
    for p in waiting {
        match chunks.last_mut() {
            Some(last) if !last.is_empty() && bytes + p.size <= REPORT_BYTES => {
                bytes += p.size;
                last.push(p);
            }
            _ => {
                bytes = p.size;
                chunks.push(vec![p]);
            }
        }
    }
    chunks
}

/// Commits one report; on success hands the notices it queued to delivery
/// and marks its outcomes done.
async fn commit(w: &Worker, chunk: &[Pending]) -> Result<(), ProposeError> {
    let cmd = Command::Report {
        node: w.cluster.id(),
        outcomes: chunk.iter().map(|p| p.outcome.clone()).collect(),
        notices: chunk.iter().flat_map(|p| p.notices.clone()).collect(),
    };
    let resp = w.cluster.propose(cmd).await?;
    if let Response::Reported(queued) = resp {
        for n in chunk
            .iter()
            .flat_map(|p| &p.notices)
            .filter(|n| queued.contains(&n.message.id))
        {
            w.metrics.notice(n.kind);
            let _ = w.fresh.send(n.message.clone());
        }
    }
    for p in chunk {
        match p.ends {
            Some(Ending::Delivered) => w.metrics.messages_delivered.inc(),
            Some(Ending::Failed) => w.metrics.messages_failed.inc(),
            None => 0,
        };
    }
    w.finish(chunk.iter().map(|p| p.outcome.id));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use skein_queue::MessageId;

    fn pending(id: u128, size: usize) -> Pending {
        Pending {
            outcome: Outcome {
                id: MessageId(id),
                recipients: Vec::new(),
                retry_after_ms: 0,
            },
            notices: Vec::new(),
            ends: None,
            size,
        }
    }

    #[test]
    fn reports_are_cut_by_size_in_order_and_a_large_outcome_goes_alone() {
        let mb = 1 << 20;
        let sizes = [mb, 2 * mb, 2 * mb, 9 * mb, 100, 100];
        let chunks = split(
            sizes
                .iter()
                .enumerate()
                .map(|(i, s)| pending(i as u128, *s))
                .collect(),
        );
        let ids: Vec<Vec<u128>> = chunks
            .iter()
            .map(|c| c.iter().map(|p| p.outcome.id.0).collect())
            .collect();
        assert_eq!(ids, vec![vec![0, 1], vec![2], vec![3], vec![4, 5]]);
        for c in &chunks {
            let total: usize = c.iter().map(|p| p.size).sum();
            assert!(c.len() == 1 || total <= REPORT_BYTES);
        }
    }
}
