//! Commits delivery outcomes in batches: one `Report` entry for everything
//! that finished while the previous one was being committed, with the
//! notices (bounces) those outcomes call for.

use std::sync::Arc;
use std::time::Duration;

use skein_queue::{Command, Notice, Outcome, RcptOutcome, Response};
use tokio::sync::mpsc;

use super::{notices, Worker};

/// Most outcomes in one entry.
const MAX_BATCH: usize = 256;

/// One attempt's outcome, with the recipients whose successful delivery
/// Skein must report itself if the sender asked (see `notices`).
pub(crate) struct Report {
    pub outcome: Outcome,
    pub successes: Vec<(u32, super::dsn::Action)>,
}

pub(crate) async fn reporter(w: Arc<Worker>, mut rx: mpsc::UnboundedReceiver<Report>) {
    let mut batch: Vec<Report> = Vec::new();
    let mut pending_notices: Vec<Notice> = Vec::new();
    // Outcomes of the batch whose notices are already built: notices are
    // built once per outcome and travel with it on every retry.
    let mut built = 0;
    loop {
        if batch.is_empty() {
            match rx.recv().await {
                Some(r) => batch.push(r),
                None => return,
            }
        }
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        for r in &batch[built..] {
            pending_notices.extend(notices::for_outcome(&w, &r.outcome, &r.successes).await);
        }
        built = batch.len();
        let cmd = Command::Report {
            node: w.cluster.id(),
            outcomes: batch.iter().map(|r| r.outcome.clone()).collect(),
            notices: pending_notices.clone(),
        };
        match w.cluster.propose(cmd).await {
            Ok(resp) => {
                if let Response::Reported(queued) = resp {
                    for n in pending_notices
                        .drain(..)
                        .filter(|n| queued.contains(&n.message.id))
                    {
                        w.metrics.messages_bounced.inc();
                        let _ = w.fresh.send(n.message);
                    }
                }
                pending_notices.clear();
                for r in &batch {
                    let finished = r
                        .outcome
                        .recipients
                        .iter()
                        .all(|(_, r)| !matches!(r, RcptOutcome::Deferred { .. }));
                    if finished {
                        w.metrics.messages_delivered.inc();
                    }
                }
                w.finish(batch.drain(..).map(|r| r.outcome.id));
                built = 0;
            }
            Err(e) => {
                // Outcomes are facts: keep them and try again. If this node
                // is cut off, the lease lapses and a peer redelivers; the
                // remote side sees a duplicate, never a loss.
                w.metrics.commit_failures.inc();
                tracing::warn!(count = batch.len(), error = %e, "delivery outcomes not committed; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}
