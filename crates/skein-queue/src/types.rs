//! What the replicated log carries (requests) and what the queue holds (messages).

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use skein_smtp::{MailParams, Mailbox, RcptParams, ReversePath};

use crate::MessageId;

pub type NodeId = u64;

/// Milliseconds since the Unix epoch. Inside the state machine this is always
/// cluster time: a value that arrived in an entry, never the local clock.
pub type Millis = u64;

/// One entry of application data in the Raft log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// Stamped by the leader when it proposes the entry. The state machine keeps
    /// `cluster_time = max(cluster_time, now)`, so time only moves forward.
    pub now: Millis,
    pub cmd: Command,
}

// Enqueue carries the message; the other commands are small and rarer.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// A message accepted over SMTP, leased to the accepting node in the same entry.
    Enqueue(NewMessage),
    /// Lease up to `max` due messages to `node`; apply picks them deterministically.
    Claim {
        node: NodeId,
        max: u32,
        lease_ms: u64,
    },
    /// Extend `node`'s leases on `ids` (the ones it still holds).
    Renew {
        node: NodeId,
        ids: Vec<MessageId>,
        lease_ms: u64,
    },
    /// Hand leases back without an attempt: the mail is due at once for anyone.
    Release { node: NodeId, ids: Vec<MessageId> },
    /// Outcomes of delivery attempts, committed in batches, with the
    /// delivery status notifications they call for: a failure and its
    /// bounce land in one entry, so a crash never leaves two bounces or none.
    Report {
        node: NodeId,
        outcomes: Vec<Outcome>,
        notices: Vec<Notice>,
    },
    /// Operator actions.
    Admin(AdminCommand),
    /// Commands proposed together, applied in order as if one after another.
    /// The leader batches concurrent proposals so that many messages share
    /// one log entry: one fsync and one replication round for all of them.
    /// A batch holds plain commands: one inside another is refused when
    /// decoding, so no input nests deep enough to exhaust the stack.
    Batch(#[serde(deserialize_with = "plain_commands")] Vec<Command>),
    /// A recipient domain's MTA-STS policy, fetched by one node and kept
    /// by all: every node obeys the same policy, and a domain's policy is
    /// fetched once per `max_age` for the whole cluster.
    SetStsPolicy(StsPolicy),
}

/// The most MTA-STS policies the queue keeps; beyond, the one expiring
/// first goes.
pub const MAX_STS_POLICIES: usize = 10_000;

/// A domain's MTA-STS policy (RFC 8461) as the cluster keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StsPolicy {
    /// Lowercase, without a trailing dot.
    pub domain: String,
    /// The `id=` of the `_mta-sts` TXT record it was fetched under.
    pub id: String,
    pub mode: StsMode,
    /// MX host patterns, lowercase; `*.example.net` stands for one label.
    pub mx: Vec<String>,
    pub max_age: u64,
    /// Unix seconds, by the fetching node's clock: fetch time plus `max_age`.
    pub expires: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StsMode {
    Enforce,
    Testing,
    None,
}

impl StsPolicy {
    /// Within the bounds a fetched policy has (a peer's proposal is
    /// checked again at apply).
    pub fn is_valid(&self) -> bool {
        let name = |s: &str| !s.is_empty() && s.len() <= 253 && s.is_ascii();
        name(&self.domain)
            && (1..=32).contains(&self.id.len())
            && self.id.bytes().all(|b| b.is_ascii_alphanumeric())
            && self.mx.len() <= 64
            && self.mx.iter().all(|m| name(m))
    }
}

/// Decodes a batch's commands, refusing a batch among them.
fn plain_commands<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Command>, D::Error> {
    use std::cell::Cell;
    thread_local! {
        static IN_BATCH: Cell<bool> = const { Cell::new(false) };
    }
    /// Leaves the batch however decoding ends.
    struct Leave;
    impl Drop for Leave {
        fn drop(&mut self) {
            IN_BATCH.with(|b| b.set(false));
        }
    }
    if IN_BATCH.with(|b| b.replace(true)) {
        return Err(serde::de::Error::custom("a batch inside a batch"));
    }
    let _leave = Leave;
    Vec::<Command>::deserialize(d)
}

impl Command {
    /// The message bodies the command carries, in a fixed order, with the
    /// id of the message each belongs to.
    pub fn bodies(&self) -> Vec<(MessageId, &Bytes)> {
        let mut out = Vec::new();
        self.visit_bodies(&mut out);
        out
    }

    fn visit_bodies<'a>(&'a self, out: &mut Vec<(MessageId, &'a Bytes)>) {
        match self {
            Command::Enqueue(m) => out.push((m.id, &m.body)),
            Command::Admin(AdminCommand::Import { message, body }) => out.push((message.id, body)),
            Command::Report { notices, .. } => {
                out.extend(notices.iter().map(|n| (n.message.id, &n.message.body)))
            }
            Command::Batch(cmds) => cmds.iter().for_each(|c| c.visit_bodies(out)),
            _ => {}
        }
    }

    /// The same bodies, mutable, in the order of [`Command::bodies`].
    pub fn bodies_mut(&mut self) -> Vec<&mut Bytes> {
        let mut out = Vec::new();
        self.visit_bodies_mut(&mut out);
        out
    }

    fn visit_bodies_mut<'a>(&'a mut self, out: &mut Vec<&'a mut Bytes>) {
        match self {
            Command::Enqueue(m) => out.push(&mut m.body),
            Command::Admin(AdminCommand::Import { body, .. }) => out.push(body),
            Command::Report { notices, .. } => {
                out.extend(notices.iter_mut().map(|n| &mut n.message.body))
            }
            Command::Batch(cmds) => cmds.iter_mut().for_each(|c| c.visit_bodies_mut(out)),
            _ => {}
        }
    }

    /// Bytes of message bodies the command carries.
    pub fn body_bytes(&self) -> usize {
        self.bodies().iter().map(|(_, b)| b.len()).sum()
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum AdminCommand {
    Hold(MessageId),
    Unhold(MessageId),
    Delete(MessageId),
    /// Make deferred mail due now: one message, or all when `None`.
    RetryNow(Option<MessageId>),
    /// Queue a message from a backup as it was (without its lease); a
    /// message already queued is left alone.
    Import {
        message: Box<Message>,
        body: Bytes,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NewMessage {
    pub id: MessageId,
    pub sender: ReversePath,
    pub recipients: Vec<NewRecipient>,
    pub params: MailParams,
    /// The message as it will be sent: Received header prepended, dot-unstuffed.
    pub body: Bytes,
    /// The accepting node; it holds the first lease.
    pub owner: NodeId,
    pub lease_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NewRecipient {
    pub address: Mailbox,
    pub params: RcptParams,
}

/// The result of one delivery attempt of one message by the lease holder.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    pub id: MessageId,
    /// Per recipient, by index into the message's recipient list.
    pub recipients: Vec<(u32, RcptOutcome)>,
    /// When recipients remain pending: how long until the next attempt.
    pub retry_after_ms: u64,
}

/// A delivery status notification (RFC 3464) to enqueue, if the report
/// that carries it really changes what it reports on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Notice {
    /// The message the notice is about.
    pub about: MessageId,
    pub kind: NoticeKind,
    /// The notice itself, from the null sender to the original sender.
    pub message: NewMessage,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NoticeKind {
    /// Enqueued only if this report fails a recipient that was pending.
    Failure,
    /// Enqueued only once per message (the message remembers).
    Delay,
    /// Enqueued only if this report delivers a recipient that was pending
    /// (NOTIFY=SUCCESS to a server that could not take the DSN on).
    Relayed,
}

impl NoticeKind {
    /// The kind as operators see it: in history events and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            NoticeKind::Failure => "failure",
            NoticeKind::Delay => "delay",
            NoticeKind::Relayed => "success",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RcptOutcome {
    Delivered { reply: String },
    Deferred { reply: String },
    Failed { reply: String },
}

/// The answer of the state machine to one entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Blank or membership entries, and commands with nothing to say.
    Done,
    /// `duplicate` when the id was already queued (a retried proposal).
    Enqueued { duplicate: bool },
    /// The ids leased (Claim) or still held (Renew).
    Leased(Vec<MessageId>),
    /// An admin command named a message that is not queued.
    NotFound,
    /// How many messages an admin command changed.
    Changed(u64),
    /// The notices a report enqueued (the rest were not called for).
    Reported(Vec<MessageId>),
    /// The answers to a batch, in its order.
    Batch(Vec<Response>),
}

/// A queued message as every node's state machine holds it. The body is stored
/// apart, by id, so that this stays small and can live in memory.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub id: MessageId,
    pub sender: ReversePath,
    pub recipients: Vec<Recipient>,
    pub params: MailParams,
    pub size: u64,
    /// Cluster time of the Enqueue entry.
    pub received_at: Millis,
    pub accepted_by: NodeId,
    pub attempts: u32,
    pub next_attempt: Millis,
    pub last_error: Option<String>,
    pub lease: Option<Lease>,
    pub held: bool,
    /// A delay notice was sent.
    pub warned: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub node: NodeId,
    pub until: Millis,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Recipient {
    pub address: Mailbox,
    pub params: RcptParams,
    pub state: RcptState,
    pub last_reply: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RcptState {
    Pending,
    Delivered,
    Failed,
}

/// How `skeinctl` sorts messages; computed from the message and cluster time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MessageState {
    Ready,
    Leased,
    Deferred,
    Held,
}

impl MessageState {
    pub fn as_str(&self) -> &'static str {
        match self {
            MessageState::Ready => "ready",
            MessageState::Leased => "leased",
            MessageState::Deferred => "deferred",
            MessageState::Held => "held",
        }
    }
}

impl Message {
    pub fn state(&self, now: Millis) -> MessageState {
        if self.held {
            MessageState::Held
        } else if self.lease.is_some_and(|l| l.until > now) {
            MessageState::Leased
        } else if self.next_attempt > now {
            MessageState::Deferred
        } else {
            MessageState::Ready
        }
    }

    /// When the message can next be claimed: after its retry time and after any
    /// lease on it runs out.
    pub fn due_at(&self) -> Millis {
        match self.lease {
            Some(l) => self.next_attempt.max(l.until),
            None => self.next_attempt,
        }
    }

    pub fn pending(&self) -> impl Iterator<Item = (usize, &Recipient)> {
        self.recipients
            .iter()
            .enumerate()
            .filter(|(_, r)| r.state == RcptState::Pending)
    }

    pub fn is_finished(&self) -> bool {
        self.recipients
            .iter()
            .all(|r| r.state != RcptState::Pending)
    }
}

#[cfg(test)]
mod decoding {
    use super::*;

    /// postcard's encoding of `Command::Batch` nested `depth` times around
    /// a Claim, written by hand the way a hostile peer would.
    fn nested(depth: usize) -> Vec<u8> {
        let batch = 6u8; // Command::Batch's variant index
        let mut v = Vec::new();
        for _ in 0..depth {
            v.push(batch);
            v.push(1); // one command in the batch
        }
        let claim = Command::Claim {
            node: 1,
            max: 1,
            lease_ms: 1,
        };
        v.extend(postcard::to_stdvec(&claim).unwrap());
        v
    }

    #[test]
    fn a_batch_of_commands_decodes_and_a_nested_batch_of_any_depth_is_refused() {
        let claim = Command::Claim {
            node: 1,
            max: 1,
            lease_ms: 1,
        };
        let one = Command::Batch(vec![claim.clone()]);
        let bytes = postcard::to_stdvec(&one).unwrap();
        assert_eq!(bytes, nested(1), "the hand-made encoding is postcard's");
        assert_eq!(postcard::from_bytes::<Command>(&bytes).unwrap(), one);
        for depth in [2, 3, 1000, 1_000_000] {
            assert!(
                postcard::from_bytes::<Command>(&nested(depth)).is_err(),
                "depth {depth}"
            );
        }
        // A refusal leaves nothing behind: the next decode is clean.
        assert_eq!(postcard::from_bytes::<Command>(&nested(1)).unwrap(), one);
    }
}
