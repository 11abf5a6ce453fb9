//! Proposals batched into log entries.
//!
//! openraft 0.9 appends the leader's entries one at a time and waits for each
//! append to be flushed before it takes the next, so one entry per message
//! would cost one fsync per message on the leader whatever the load. The
//! batcher instead gathers every proposal that arrives while earlier writes
//! are under way (from this node's sessions and workers, and forwarded by
//! followers) into one `Command::Batch` entry: one append, one fsync and one
//! replication round for all of them. Under light load a batch is a single
//! command and nothing waits; under heavy load batches grow by themselves.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use skein_queue::{Command, Raft, Request, Response};
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::{ProposeError, Step};
use crate::clock::now_ms;

/// Client writes under way at once; proposals arriving meanwhile gather.
const IN_FLIGHT: usize = 2;
/// A batch stops growing at this many commands or encoded bytes; a command
/// that would take it past the bytes leaves in the next batch, so no entry
/// is larger than its largest command or this, whichever is more.
const MAX_COMMANDS: usize = 512;
const MAX_BATCH_BYTES: usize = 4 << 20;

pub(crate) struct Proposal {
    cmd: Command,
    /// The command's encoded size.
    size: usize,
    reply: oneshot::Sender<Result<Response, Step>>,
}

#[derive(Clone)]
pub(crate) struct Batcher {
    tx: mpsc::UnboundedSender<Proposal>,
    limits: EntryLimit,
    /// Proposals given to this batcher and not yet answered.
    waiting: Arc<AtomicUsize>,
    /// Handing leadership over: new proposals are sent to the next leader.
    paused: Arc<AtomicBool>,
}

/// Counts one proposal as waiting for as long as it lives.
struct Waiting(Arc<AtomicUsize>);

impl Waiting {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Waiting(count.clone())
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The largest command one log entry may carry: what the cluster transport
/// delivers (the gRPC message limit) less room for the request around it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct EntryLimit(pub usize);

/// Room left in a gRPC message for everything around one entry's command.
const ENVELOPE: usize = 64 << 10;

impl EntryLimit {
    pub(crate) fn for_transport(max_grpc: usize) -> Self {
        EntryLimit(max_grpc.saturating_sub(ENVELOPE))
    }

    /// The command's encoded size, or the refusal of a command that no log
    /// entry can carry: it would never replicate, so it must never be
    /// retried.
    pub(crate) fn check(&self, cmd: &Command) -> Result<usize, ProposeError> {
        let size = postcard::experimental::serialized_size(cmd)
            .map_err(|e| ProposeError::Refused(format!("unencodable command: {e}")))?;
        if size > self.0 {
            return Err(ProposeError::TooLarge {
                size,
                limit: self.0,
            });
        }
        Ok(size)
    }
}

impl Batcher {
    pub(crate) fn start(raft: Raft, limits: EntryLimit) -> Batcher {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(raft, rx));
        Batcher {
            tx,
            limits,
            waiting: Arc::new(AtomicUsize::new(0)),
            paused: Arc::new(AtomicBool::new(false)),
        }
    }

    pub(crate) fn pause(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst);
    }

    /// Wait up to `within` for every proposal under way to be answered.
    /// Before leadership moves on purpose: a write still in flight when
    /// this node stops leading could be left without an answer until its
    /// proposer gives up, and its client would be told 451 for mail that
    /// may well be queued.
    pub(crate) async fn settle(&self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        while self.waiting.load(Ordering::SeqCst) > 0 {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }

    /// Write `cmd` through this node's Raft (it must be the leader) in the
    /// next batch, and return its answer.
    pub(crate) async fn propose(&self, cmd: Command) -> Result<Response, Step> {
        let size = self.limits.check(&cmd).map_err(Step::Fail)?;
        // Counted before the pause is looked at: whatever `settle` does not
        // wait for sees the pause and goes to the next leader.
        let _waiting = Waiting::new(&self.waiting);
        if self.paused.load(Ordering::SeqCst) {
            return Err(Step::Forward(None));
        }
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Proposal { cmd, size, reply }).is_err() {
            return Err(Step::Fail(ProposeError::Fatal("raft stopped".into())));
        }
        rx.await
            .unwrap_or_else(|_| Err(Step::Fail(ProposeError::Fatal("raft stopped".into()))))
    }
}

async fn run(raft: Raft, mut rx: mpsc::UnboundedReceiver<Proposal>) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    // A proposal that did not fit in the last batch starts the next.
    let mut held: Option<Proposal> = None;
    loop {
        // Take a slot first: while none is free, proposals queue up and
        // leave together in the next batch.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let first = match held.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        // A proposer that gave up (its client was told 451) is not waiting
        // for an answer: what it proposed is not written.
        if first.reply.is_closed() {
            drop(slot);
            continue;
        }
        let mut bytes = first.size;
        let mut batch = vec![first];
        while batch.len() < MAX_COMMANDS {
            match rx.try_recv() {
                Ok(p) if p.reply.is_closed() => {}
                Ok(p) if bytes + p.size > MAX_BATCH_BYTES => {
                    held = Some(p);
                    break;
                }
                Ok(p) => {
                    bytes += p.size;
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        let raft = raft.clone();
        tokio::spawn(async move {
            write(&raft, batch).await;
            drop(slot);
        });
    }
}

async fn write(raft: &Raft, batch: Vec<Proposal>) {
    let (mut cmds, replies): (Vec<Command>, Vec<_>) =
        batch.into_iter().map(|p| (p.cmd, p.reply)).unzip();
    // Commands of at most MAX_BATCH_BYTES together, or one command alone
    // that passed EntryLimit::check: never more than one entry can carry.
    let n = cmds.len();
    let cmd = if n == 1 {
        cmds.remove(0)
    } else {
        Command::Batch(cmds)
    };
    let result = raft.client_write(Request { now: now_ms(), cmd }).await;
    let answers: Result<Vec<Response>, Step> = match result {
        Ok(r) => match r.data {
            Response::Batch(v) if n > 1 && v.len() == n => Ok(v),
            other if n == 1 => Ok(vec![other]),
            other => Err(Step::Fail(ProposeError::Refused(format!(
                "a batch of {n} got the answer {other:?}"
            )))),
        },
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
            Err(Step::Forward(f.leader_id))
        }
        Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e))) => {
            Err(Step::Fail(ProposeError::Refused(e.to_string())))
        }
        Err(RaftError::Fatal(f)) => Err(Step::Fail(ProposeError::Fatal(f.to_string()))),
    };
    match answers {
        Ok(v) => {
            for (reply, a) in replies.into_iter().zip(v) {
                let _ = reply.send(Ok(a));
            }
        }
        Err(step) => {
            for reply in replies {
                let _ = reply.send(Err(step.clone()));
            }
        }
    }
}
