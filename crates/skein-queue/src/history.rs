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

/// Where an event stands in the log: the index of the entry that made it
/// and its place among that entry's events. Events read in this order, and
/// an entry applied again makes the same positions.
type Pos = (u64, u32);

/// Where events live: one sled tree, keyed by message id. Each save writes
/// one record per message: key id + the log index of its first event in the
/// save (24 bytes), value the message's events of the save with their
/// positions. Stores before that wrote one record per event, keyed id + log
/// index + place (28 bytes); both are read and pruned. An entry applied
/// again after a crash may land in a record of another save: reads keep one
/// event per position.
///
/// Events are recorded in memory as entries are applied and written when
/// the state machine saves (see `store::sm`), before the state's own batch:
/// a crash before that loses none, because the entries that made them are
/// applied again from the log.
#[derive(Clone)]
pub struct History {
    tree: sled::Tree,
    mem: Arc<Mutex<Unsaved>>,
    /// One save at a time.
    saving: Arc<Mutex<()>>,
}

#[derive(Default)]
struct Unsaved {
    /// Recorded since the last save began.
    recorded: BTreeMap<(u128, u64, u32), Event>,
    /// Being written by the save under way (readers still see them).
    writing: Arc<BTreeMap<(u128, u64, u32), Event>>,
}

const RECORD_KEY_LEN: usize = 24;
const EVENT_KEY_LEN: usize = 28;

pub(crate) const HISTORY_TREE: &str = "history";

fn record_key(id: u128, index: u64) -> [u8; RECORD_KEY_LEN] {
    let mut k = [0u8; RECORD_KEY_LEN];
    k[..16].copy_from_slice(&id.to_be_bytes());
    k[16..].copy_from_slice(&index.to_be_bytes());
    k
}

/// The events of one stored record, either form, with their positions.
fn decode(k: &[u8], v: &[u8]) -> Result<Vec<(Pos, Event)>, crate::StoreError> {
    match k.len() {
        RECORD_KEY_LEN => {
            let events: Vec<(u64, u32, Event)> = postcard::from_bytes(v)?;
            Ok(events.into_iter().map(|(i, n, e)| ((i, n), e)).collect())
        }
        EVENT_KEY_LEN => {
            let index = u64::from_be_bytes(k[16..24].try_into().expect("8 bytes"));
            let n = u32::from_be_bytes(k[24..].try_into().expect("4 bytes"));
            Ok(vec![((index, n), postcard::from_bytes(v)?)])
        }
        len => Err(crate::StoreError::Corrupt(format!(
            "history key of {len} bytes"
        ))),
    }
}

impl History {
    pub(crate) fn open(db: &sled::Db) -> Result<Self, sled::Error> {
        Ok(History {
            tree: db.open_tree(HISTORY_TREE)?,
            mem: Arc::default(),
            saving: Arc::default(),
        })
    }

    fn mem(&self) -> MutexGuard<'_, Unsaved> {
        self.mem.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Record the events of the entry at log `index`, in order (in memory
    /// until [`History::save`]).
    pub(crate) fn record(&self, index: u64, events: &[(MessageId, Event)]) {
        if events.is_empty() {
            return;
        }
        let mut mem = self.mem();
        for (n, (id, e)) in events.iter().enumerate() {
            mem.recorded.insert((id.0, index, n as u32), e.clone());
        }
    }

    /// Write the events recorded since the last save: one record per
    /// message. Recording goes on meanwhile (the writes hold no lock the
    /// apply waits for); the records need no batch, as each stands alone.
    pub(crate) fn save(&self) -> Result<(), crate::StoreError> {
        let _one = self.saving.lock().unwrap_or_else(|p| p.into_inner());
        let writing = {
            let mut mem = self.mem();
            if mem.recorded.is_empty() {
                return Ok(());
            }
            let taken = std::mem::take(&mut mem.recorded);
            mem.writing = Arc::new(taken);
            mem.writing.clone()
        };
        let r = self.write(&writing);
        let mut mem = self.mem();
        if r.is_err() {
            // Kept for the next save; newer ones win a clash.
            for (k, e) in writing.iter() {
                mem.recorded.entry(*k).or_insert_with(|| e.clone());
            }
        }
        mem.writing = Arc::default();
        r
    }

    fn write(&self, events: &BTreeMap<(u128, u64, u32), Event>) -> Result<(), crate::StoreError> {
        let mut group: Vec<(u64, u32, &Event)> = Vec::new();
        let mut it = events.iter().peekable();
        while let Some(((id, index, n), e)) = it.next() {
            group.push((*index, *n, e));
            if it.peek().is_none_or(|((next, _, _), _)| next != id) {
                let first = group[0].0;
                self.tree
                    .insert(record_key(*id, first), postcard::to_stdvec(&group)?)?;
                group.clear();
            }
        }
        Ok(())
    }

    /// The events recorded about `id`, oldest first.
    pub fn events(&self, id: &MessageId) -> Result<Vec<Event>, crate::StoreError> {
        let range = (id.0, 0, 0)..=(id.0, u64::MAX, u32::MAX);
        // Taken first: a save running meanwhile moves events from memory to
        // the tree, never out of sight of both reads.
        let mut all: BTreeMap<Pos, Event> = {
            let mem = self.mem();
            let pick = |m: &BTreeMap<(u128, u64, u32), Event>| {
                m.range(range.clone())
                    .map(|((_, i, n), e)| ((*i, *n), e.clone()))
                    .collect::<Vec<_>>()
            };
            pick(&mem.writing)
                .into_iter()
                .chain(pick(&mem.recorded))
                .collect()
        };
        for kv in self.tree.scan_prefix(id.0.to_be_bytes()) {
            let (k, v) = kv?;
            for (pos, e) in decode(&k, &v)? {
                all.entry(pos).or_insert(e);
            }
        }
        Ok(all.into_values().collect())
    }

    /// Forget events older than `keep_since`, then the oldest records
    /// beyond `max` events. Returns how many events are left. Walks the
    /// whole history: run it rarely.
    pub fn prune(&self, keep_since: Millis, max: usize) -> Result<usize, crate::StoreError> {
        // Per record: its newest event, its count, its key.
        let mut kept: Vec<(Millis, usize, sled::IVec)> = Vec::new();
        for kv in self.tree.iter() {
            let (k, v) = kv?;
            let Ok(events) = decode(&k, &v) else {
                self.tree.remove(&k)?;
                continue;
            };
            let total = events.len();
            let young: Vec<_> = events
                .into_iter()
                .filter(|(_, e)| e.at >= keep_since)
                .collect();
            let Some(newest) = young.iter().map(|(_, e)| e.at).max() else {
                self.tree.remove(&k)?;
                continue;
            };
            if young.len() < total {
                // Rewritten under its own key: only a record (never a
                // single old-style event) can be partly old, and the key
                // only has to be unique and start with the id — a new key
                // could land on another record of the same message.
                let rest: Vec<(u64, u32, &Event)> =
                    young.iter().map(|((i, n), e)| (*i, *n, e)).collect();
                self.tree.insert(&k, postcard::to_stdvec(&rest)?)?;
                kept.push((newest, young.len(), k));
            } else {
                kept.push((newest, total, k));
            }
        }
        let mut left: usize = kept.iter().map(|(_, n, _)| n).sum();
        if left > max {
            kept.sort_unstable_by_key(|(at, _, _)| *at);
            for (_, n, k) in kept {
                if left <= max {
                    break;
                }
                self.tree.remove(k)?;
                left -= n;
            }
        }
        Ok(left)
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

    fn history() -> (tempfile::TempDir, History) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let h = History::open(&db).unwrap();
        (dir, h)
    }

    fn ev(at: Millis, kind: EventKind) -> Event {
        Event {
            at,
            node: Some(1),
            kind,
        }
    }

    fn names(h: &History, id: MessageId) -> Vec<&'static str> {
        h.events(&id)
            .unwrap()
            .iter()
            .map(|e| e.kind.name())
            .collect()
    }

    #[test]
    fn events_read_back_in_order_and_are_pruned_by_age_then_count() {
        let (_dir, h) = history();
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
        assert_eq!(names(&h, a), ["held", "released", "deleted"]);
        assert_eq!(h.events(&b).unwrap().len(), 1);
        assert_eq!(h.prune(11, 100).unwrap(), 3);
        assert_eq!(h.events(&a).unwrap().len(), 2);
        assert_eq!(h.prune(0, 1).unwrap(), 1);
        assert_eq!(h.events(&a).unwrap()[0].kind, EventKind::Deleted);
        assert!(h.events(&b).unwrap().is_empty());
    }

    /// After a crash the entries since the state's last save are applied
    /// again, and their events may be saved in other records than the
    /// first time: a position is read once, however many records hold it.
    #[test]
    fn events_applied_again_in_another_save_read_once() {
        let (_dir, h) = history();
        let a = MessageId(7);
        h.record(5, &[(a, ev(10, EventKind::Held))]);
        h.record(6, &[(a, ev(11, EventKind::Released))]);
        h.record(7, &[(a, ev(12, EventKind::Deleted))]);
        h.save().unwrap();
        assert_eq!(h.tree.len(), 1, "one record per message and save");
        // The state was saved as of entry 5: 6 and 7 come again, in two saves.
        h.record(6, &[(a, ev(11, EventKind::Released))]);
        h.save().unwrap();
        h.record(7, &[(a, ev(12, EventKind::Deleted))]);
        h.save().unwrap();
        assert_eq!(names(&h, a), ["held", "released", "deleted"]);
        // Pruning counts events as stored: the three records hold five.
        assert_eq!(h.prune(0, 10).unwrap(), 5);
        assert_eq!(h.events(&a).unwrap().len(), 3);
    }

    /// Events stored one per record by earlier versions are read beside
    /// the newer records, in order, and pruned the same way.
    #[test]
    fn events_stored_one_per_record_still_read_and_prune() {
        let (_dir, h) = history();
        let a = MessageId(9);
        let mut old = [0u8; EVENT_KEY_LEN];
        old[..16].copy_from_slice(&a.0.to_be_bytes());
        old[16..24].copy_from_slice(&3u64.to_be_bytes());
        h.tree
            .insert(old, postcard::to_stdvec(&ev(5, EventKind::Held)).unwrap())
            .unwrap();
        h.record(8, &[(a, ev(30, EventKind::Released))]);
        h.save().unwrap();
        let names: Vec<_> = h
            .events(&a)
            .unwrap()
            .iter()
            .map(|e| e.kind.name())
            .collect();
        assert_eq!(names, ["held", "released"]);
        assert_eq!(h.prune(10, 100).unwrap(), 1);
        assert_eq!(h.events(&a).unwrap()[0].kind, EventKind::Released);
    }
}
