//! What happened to each message: the events the state machine derives
//! from the log as it applies it — accepted, taken over, each attempt and
//! what it did to each recipient, bounced, held, released, deleted.
//!
//! Every node applies the same log, so every node records the same events
//! and any node answers `skeinctl trace`, whoever accepted or delivered the
//! message. The history is derived data kept beside the queue, not part of
//! it: it is not in snapshots (a node that caught up from one knows the
//! history from then on), and it is pruned locally — after a retention
//! period, and oldest first beyond a count — so it stays bounded on disk.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::{MessageId, Millis, NodeId};

/// The reply text of a recipient failed because its message was too long
/// in the queue (the delivery worker writes it; history calls it expired).
pub const EXPIRED_PREFIX: &str = "message expired after";

/// One thing that happened to a message, in cluster time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub at: Millis,
    /// The node that did it; `None` for an operator's command.
    pub node: Option<NodeId>,
    pub kind: EventKind,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    /// Queued: over SMTP by `node`, or a notice built by `node`.
    Accepted {
        /// The reverse-path, `<>` for a notice.
        from: String,
        /// The client as the accepting node's Received header names it.
        client: Option<String>,
        recipients: u32,
    },
    /// `node` claimed the message while `from` still held it, lapsed.
    TakenOver {
        from: NodeId,
    },
    /// `node` reported an attempt on `recipients` recipients.
    Attempt {
        recipients: u32,
    },
    Delivered {
        recipient: String,
        reply: String,
    },
    Deferred {
        recipient: String,
        reply: String,
    },
    Failed {
        recipient: String,
        reply: String,
    },
    /// Failed for having waited too long in the queue.
    Expired {
        recipient: String,
        reply: String,
    },
    /// A notice about the message was queued.
    Bounced {
        notice: MessageId,
        kind: String,
    },
    Held,
    Released,
    Deleted,
    /// Queued from a backup by `skeinctl restore`.
    Restored,
}

impl EventKind {
    /// The name `skeinctl trace` shows.
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::Accepted { .. } | EventKind::Restored => "accepted",
            EventKind::TakenOver { .. } => "taken_over",
            EventKind::Attempt { .. } => "attempt",
            EventKind::Delivered { .. } => "delivered",
            EventKind::Deferred { .. } => "deferred",
            EventKind::Failed { .. } => "failed",
            EventKind::Expired { .. } => "expired",
            EventKind::Bounced { .. } => "bounced",
            EventKind::Held => "held",
            EventKind::Released => "released",
            EventKind::Deleted => "deleted",
        }
    }
}

/// The client named by a Received header Skein wrote first in `body`:
/// `"client.test [192.0.2.1]"` from `Received: from client.test ([192.0.2.1])`.
pub fn client_of(body: &[u8]) -> Option<String> {
    let line = body.split(|&b| b == b'\r').next()?;
    let rest = line.strip_prefix(b"Received: from ")?;
    let text = std::str::from_utf8(rest).ok()?;
    let (helo, rest) = text.split_once(" ([")?;
    let (ip, _) = rest.split_once("])")?;
    let ok = |s: &str| !s.is_empty() && s.len() <= 255 && s.bytes().all(|b| b.is_ascii_graphic());
    (ok(helo) && ok(ip)).then(|| format!("{helo} [{ip}]"))
}

/// Where events live: one sled tree, keyed by message id, then the log
/// index and position of the entry that made them, so a message's events
/// read in order and re-applying an entry writes the same keys again.
///
/// Events are recorded in memory as entries are applied and written to the
/// tree when the state machine saves (see `store::sm`), in one batch before
/// the state's own: a crash before that loses none, because the entries
/// that made them are applied again from the log and make the same keys.
#[derive(Clone)]
pub struct History {
    tree: sled::Tree,
    unsaved: Arc<Mutex<BTreeMap<[u8; KEY_LEN], Event>>>,
}

const KEY_LEN: usize = 28;

pub(crate) const HISTORY_TREE: &str = "history";

impl History {
    pub(crate) fn open(db: &sled::Db) -> Result<Self, sled::Error> {
        Ok(History {
            tree: db.open_tree(HISTORY_TREE)?,
            unsaved: Arc::default(),
        })
    }

    fn unsaved(&self) -> MutexGuard<'_, BTreeMap<[u8; KEY_LEN], Event>> {
        self.unsaved.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn key(id: &MessageId, index: u64, n: u32) -> [u8; KEY_LEN] {
        let mut k = [0u8; KEY_LEN];
        k[..16].copy_from_slice(&id.0.to_be_bytes());
        k[16..24].copy_from_slice(&index.to_be_bytes());
        k[24..].copy_from_slice(&n.to_be_bytes());
        k
    }

    /// Record the events of the entry at log `index`, in order (in memory
    /// until [`History::save`]).
    pub(crate) fn record(&self, index: u64, events: &[(MessageId, Event)]) {
        if events.is_empty() {
            return;
        }
        let mut unsaved = self.unsaved();
        for (n, (id, e)) in events.iter().enumerate() {
            unsaved.insert(Self::key(id, index, n as u32), e.clone());
        }
    }

    /// Write the events recorded since the last save, in one batch.
    pub(crate) fn save(&self) -> Result<(), crate::StoreError> {
        let mut unsaved = self.unsaved();
        if unsaved.is_empty() {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        for (k, e) in unsaved.iter() {
            batch.insert(&k[..], postcard::to_stdvec(e)?);
        }
        self.tree.apply_batch(batch)?;
        unsaved.clear();
        Ok(())
    }

    /// The events recorded about `id`, oldest first.
    pub fn events(&self, id: &MessageId) -> Result<Vec<Event>, crate::StoreError> {
        let prefix = id.0.to_be_bytes();
        // Taken first: a save running meanwhile moves events from memory to
        // the tree, never out of sight of both reads.
        let mut all: BTreeMap<[u8; KEY_LEN], Event> = {
            let unsaved = self.unsaved();
            let mut lo = [0u8; KEY_LEN];
            lo[..16].copy_from_slice(&prefix);
            let mut hi = [0xffu8; KEY_LEN];
            hi[..16].copy_from_slice(&prefix);
            unsaved
                .range(lo..=hi)
                .map(|(k, e)| (*k, e.clone()))
                .collect()
        };
        for kv in self.tree.scan_prefix(prefix) {
            let (k, v) = kv?;
            let k: [u8; KEY_LEN] = k
                .as_ref()
                .try_into()
                .map_err(|_| crate::StoreError::Corrupt("history key".into()))?;
            if let std::collections::btree_map::Entry::Vacant(slot) = all.entry(k) {
                slot.insert(postcard::from_bytes(&v)?);
            }
        }
        Ok(all.into_values().collect())
    }

    /// Forget events older than `keep_since`, then the oldest beyond `max`.
    /// Returns how many are left. Walks the whole history: run it rarely.
    pub fn prune(&self, keep_since: Millis, max: usize) -> Result<usize, crate::StoreError> {
        let mut kept: Vec<(Millis, sled::IVec)> = Vec::new();
        for kv in self.tree.iter() {
            let (k, v) = kv?;
            let at = postcard::from_bytes::<Event>(&v).map(|e| e.at).unwrap_or(0);
            if at < keep_since {
                self.tree.remove(&k)?;
            } else {
                kept.push((at, k));
            }
        }
        if kept.len() > max {
            kept.sort_unstable_by_key(|(at, _)| *at);
            let excess = kept.len() - max;
            for (_, k) in kept.drain(..excess) {
                self.tree.remove(k)?;
            }
        }
        Ok(kept.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_comes_from_our_own_received_header() {
        let body = b"Received: from client.test ([192.0.2.1])\r\n\tby mx (Skein) with ESMTP id X; now\r\nSubject: x\r\n\r\n";
        assert_eq!(client_of(body).as_deref(), Some("client.test [192.0.2.1]"));
        let v6 = b"Received: from c ([IPv6:2001:db8::1])\r\n";
        assert_eq!(client_of(v6).as_deref(), Some("c [IPv6:2001:db8::1]"));
        assert_eq!(client_of(b"Subject: no\r\n"), None);
        assert_eq!(client_of(b"Received: from a b ([x])\r\n"), None);
    }

    #[test]
    fn events_read_back_in_order_and_are_pruned_by_age_then_count() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let h = History::open(&db).unwrap();
        let ev = |at, kind| Event {
            at,
            node: Some(1),
            kind,
        };
        let a = MessageId(7);
        let b = MessageId(8);
        h.record(
            5,
            &[
                (a, ev(10, EventKind::Held)),
                (b, ev(11, EventKind::Held)),
                (a, ev(12, EventKind::Released)),
            ],
        );
        h.save().unwrap();
        h.record(6, &[(a, ev(20, EventKind::Deleted))]);
        // Unsaved events read with the saved ones, in order.
        assert_eq!(h.events(&a).unwrap().len(), 3);
        h.save().unwrap();
        // Re-applying an entry writes the same keys: no duplicates.
        h.record(6, &[(a, ev(20, EventKind::Deleted))]);
        assert_eq!(h.events(&a).unwrap().len(), 3);
        h.save().unwrap();
        let names: Vec<_> = h
            .events(&a)
            .unwrap()
            .iter()
            .map(|e| e.kind.name())
            .collect();
        assert_eq!(names, ["held", "released", "deleted"]);
        assert_eq!(h.events(&b).unwrap().len(), 1);
        assert_eq!(h.prune(11, 100).unwrap(), 3);
        assert_eq!(h.events(&a).unwrap().len(), 2);
        assert_eq!(h.prune(0, 1).unwrap(), 1);
        assert_eq!(h.events(&a).unwrap()[0].kind, EventKind::Deleted);
        assert!(h.events(&b).unwrap().is_empty());
    }
}
