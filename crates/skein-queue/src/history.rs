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

/// Where events live. Each save writes its events as a few records of the
/// `history.saves` tree — one sled insert per [`EVENTS_PER_RECORD`] events
/// rather than one per message, which cost a 3-node cluster about 7 % of
/// its CPU (docs/performance.md). A record's key is the cluster time of its
/// newest event, then the position of its first: records sort by time, so
/// pruning walks them oldest first, and a trace reads only records saved
/// since the message was queued — every event of a message is at or after
/// the time in its id, which the accepting node took just before proposing
/// it (see [`trace_from`]). A record's value lists the message of each
/// event first, then the events, so a trace decodes only records that hold
/// the message it asks about.
///
/// Stores before that kept one record per message per save in the
/// `history` tree, keyed by message id and log index (24 bytes) — and
/// before that one per event (28 bytes): both are still read and pruned, and
/// nothing is written there any more.
///
/// Events are recorded in memory as entries are applied and written when
/// the state machine saves (see `store::sm`), before the state's own batch:
/// a crash before that loses none, because the entries that made them are
/// applied again from the log. An entry applied again after a crash may
/// land in a record of another save: reads keep one event per message and
/// position.
#[derive(Clone)]
pub struct History {
    /// Records of saves.
    saves: sled::Tree,
    /// Records of earlier versions, keyed by message.
    legacy: sled::Tree,
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

/// At most this many events go in one record: a record stays well below
/// the size at which sled writes a value to a file of its own.
const EVENTS_PER_RECORD: usize = 256;
/// How much earlier than the time in a message's id a trace starts
/// reading: room for the accepting node's clock to have stepped back
/// between taking the id and proposing the message.
const TRACE_SLACK_MS: Millis = 60_000;

const SAVE_KEY_LEN: usize = 20;
const RECORD_KEY_LEN: usize = 24;
const EVENT_KEY_LEN: usize = 28;

pub(crate) const HISTORY_TREE: &str = "history";
pub(crate) const SAVES_TREE: &str = "history.saves";

fn save_key(newest: Millis, first: Pos) -> [u8; SAVE_KEY_LEN] {
    let mut k = [0u8; SAVE_KEY_LEN];
    k[..8].copy_from_slice(&newest.to_be_bytes());
    k[8..16].copy_from_slice(&first.0.to_be_bytes());
    k[16..].copy_from_slice(&first.1.to_be_bytes());
    k
}

/// The cluster time of the newest event in the record under `key`.
fn newest_of(key: &[u8]) -> Option<Millis> {
    (key.len() == SAVE_KEY_LEN).then(|| u64::from_be_bytes(key[..8].try_into().expect("8 bytes")))
}

/// Where a trace of `id` starts reading the saves: the time in the id (its
/// top 48 bits, see [`crate::IdGenerator`]) less [`TRACE_SLACK_MS`].
fn trace_from(id: &MessageId) -> Millis {
    ((id.0 >> 80) as u64).saturating_sub(TRACE_SLACK_MS)
}

/// The message of each event of a save's record, and the rest of the
/// record (the events, in the same order).
fn record_ids(v: &[u8]) -> Result<(Vec<u128>, &[u8]), crate::StoreError> {
    Ok(postcard::take_from_bytes(v)?)
}

/// The events of one record of an earlier version, either form, with their
/// positions.
fn decode_legacy(k: &[u8], v: &[u8]) -> Result<Vec<(Pos, Event)>, crate::StoreError> {
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

/// Which tree a record pruning keeps is in.
#[derive(Clone, Copy)]
enum Kept {
    Saves,
    Legacy,
}

impl History {
    pub(crate) fn open(db: &sled::Db) -> Result<Self, sled::Error> {
        Ok(History {
            saves: db.open_tree(SAVES_TREE)?,
            legacy: db.open_tree(HISTORY_TREE)?,
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

    /// Write the events recorded since the last save. Recording goes on
    /// meanwhile (the writes hold no lock the apply waits for); the records
    /// need no batch, as each stands alone.
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

    /// The events in log order, [`EVENTS_PER_RECORD`] to a record.
    fn write(&self, events: &BTreeMap<(u128, u64, u32), Event>) -> Result<(), crate::StoreError> {
        let mut all: Vec<(Pos, u128, &Event)> = events
            .iter()
            .map(|((id, i, n), e)| ((*i, *n), *id, e))
            .collect();
        all.sort_unstable_by_key(|(pos, id, _)| (*pos, *id));
        for chunk in all.chunks(EVENTS_PER_RECORD) {
            let newest = chunk.iter().map(|(_, _, e)| e.at).max().unwrap_or(0);
            let ids: Vec<u128> = chunk.iter().map(|(_, id, _)| *id).collect();
            let events: Vec<(u64, u32, &Event)> =
                chunk.iter().map(|((i, n), _, e)| (*i, *n, *e)).collect();
            let mut v = postcard::to_stdvec(&ids)?;
            v.extend_from_slice(&postcard::to_stdvec(&events)?);
            self.saves.insert(save_key(newest, chunk[0].0), v)?;
        }
        Ok(())
    }

    /// The events recorded about `id`, oldest first. Reads the records of
    /// every save since the message was queued: on a busy node, and for a
    /// message queued long ago, that is much of the history — run it off
    /// the async threads.
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
        for kv in self.saves.range(trace_from(id).to_be_bytes()..) {
            let (_, v) = kv?;
            let (ids, rest) = record_ids(&v)?;
            if !ids.contains(&id.0) {
                continue;
            }
            let events: Vec<(u64, u32, Event)> = postcard::from_bytes(rest)?;
            if events.len() != ids.len() {
                return Err(crate::StoreError::Corrupt(format!(
                    "a history record names {} messages for {} events",
                    ids.len(),
                    events.len()
                )));
            }
            for (m, (i, n, e)) in ids.into_iter().zip(events) {
                if m == id.0 {
                    all.entry((i, n)).or_insert(e);
                }
            }
        }
        for kv in self.legacy.scan_prefix(id.0.to_be_bytes()) {
            let (k, v) = kv?;
            for (pos, e) in decode_legacy(&k, &v)? {
                all.entry(pos).or_insert(e);
            }
        }
        Ok(all.into_values().collect())
    }

    /// Forget records whose newest event is older than `keep_since` (a
    /// record of a save spans moments, so its older events go with it),
    /// then the oldest records beyond `max` events. Returns how many
    /// events are left. Walks the whole history: run it rarely.
    pub fn prune(&self, keep_since: Millis, max: usize) -> Result<usize, crate::StoreError> {
        // Per record: its newest event, its count, its tree and key.
        let mut kept: Vec<(Millis, usize, Kept, sled::IVec)> = Vec::new();
        for kv in self.saves.iter() {
            let (k, v) = kv?;
            let count = record_ids(&v).map(|(ids, _)| ids.len());
            match (newest_of(&k), count) {
                (Some(newest), Ok(count)) if newest >= keep_since => {
                    kept.push((newest, count, Kept::Saves, k));
                }
                _ => {
                    self.saves.remove(&k)?;
                }
            }
        }
        for kv in self.legacy.iter() {
            let (k, v) = kv?;
            let Ok(events) = decode_legacy(&k, &v) else {
                self.legacy.remove(&k)?;
                continue;
            };
            let total = events.len();
            let young: Vec<_> = events
                .into_iter()
                .filter(|(_, e)| e.at >= keep_since)
                .collect();
            let Some(newest) = young.iter().map(|(_, e)| e.at).max() else {
                self.legacy.remove(&k)?;
                continue;
            };
            if young.len() < total {
                // Rewritten under its own key: only a record (never a
                // single old-style event) can be partly old.
                let rest: Vec<(u64, u32, &Event)> =
                    young.iter().map(|((i, n), e)| (*i, *n, e)).collect();
                self.legacy.insert(&k, postcard::to_stdvec(&rest)?)?;
            }
            kept.push((newest, young.len(), Kept::Legacy, k));
        }
        let mut left: usize = kept.iter().map(|(_, n, _, _)| n).sum();
        if left > max {
            kept.sort_unstable_by_key(|(at, _, _, _)| *at);
            for (_, n, tree, k) in kept {
                if left <= max {
                    break;
                }
                match tree {
                    Kept::Saves => self.saves.remove(k)?,
                    Kept::Legacy => self.legacy.remove(k)?,
                };
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
        // Re-applying an entry writes the same events (here under the
        // same key): no duplicates.
        h.record(6, &[(a, ev(20, EventKind::Deleted))]);
        assert_eq!(h.events(&a).unwrap().len(), 3);
        h.save().unwrap();
        assert_eq!(names(&h, a), ["held", "released", "deleted"]);
        assert_eq!(h.events(&b).unwrap().len(), 1);
        // A save's record stays whole while its newest event is young...
        assert_eq!(h.prune(12, 100).unwrap(), 4);
        assert_eq!(h.events(&a).unwrap().len(), 3);
        // ...and goes when that one is old.
        assert_eq!(h.prune(13, 100).unwrap(), 1);
        assert_eq!(names(&h, a), ["deleted"]);
        assert!(h.events(&b).unwrap().is_empty());
        // Beyond the count, the oldest records go first.
        h.record(7, &[(b, ev(30, EventKind::Released))]);
        h.save().unwrap();
        assert_eq!(h.prune(0, 1).unwrap(), 1);
        assert!(h.events(&a).unwrap().is_empty());
        assert_eq!(names(&h, b), ["released"]);
    }

    /// A save writes one record per [`EVENTS_PER_RECORD`] events, whatever
    /// the number of messages they are about, and each message's events
    /// read back from among the others.
    #[test]
    fn a_save_writes_a_record_per_so_many_events_not_per_message() {
        let (_dir, h) = history();
        let ids: Vec<MessageId> = (1..=300).map(MessageId).collect();
        for (i, id) in ids.iter().enumerate() {
            let at = 1000 + i as u64;
            h.record(
                10 + i as u64,
                &[
                    (*id, ev(at, EventKind::Held)),
                    (*id, ev(at, EventKind::Released)),
                ],
            );
        }
        h.save().unwrap();
        assert_eq!(h.saves.len(), 600_usize.div_ceil(EVENTS_PER_RECORD));
        for id in [ids[0], ids[127], ids[128], ids[299]] {
            assert_eq!(names(&h, id), ["held", "released"]);
        }
        assert_eq!(h.prune(0, usize::MAX).unwrap(), 600);
    }

    /// A trace reads the records saved since the time in the message's id
    /// (less the slack), not the whole history: a damaged record from long
    /// before stops a trace of an older message, never one of a newer.
    #[test]
    fn a_trace_reads_only_records_saved_since_the_message_was_queued() {
        let (_dir, h) = history();
        let ids = crate::IdGenerator::new(1);
        let day = 86_400_000;
        let old = ids.next(day);
        let new = ids.next(3 * day);
        h.record(5, &[(old, ev(day, EventKind::Held))]);
        h.record(6, &[(new, ev(3 * day, EventKind::Held))]);
        h.save().unwrap();
        h.saves
            .insert(save_key(2 * day, (1, 0)), &b"\xff\xff\xff"[..])
            .unwrap();
        assert_eq!(names(&h, new), ["held"]);
        assert!(matches!(h.events(&old), Err(crate::StoreError::Corrupt(_))));
        // Pruning drops what it cannot read.
        assert_eq!(h.prune(0, 100).unwrap(), 2);
        assert_eq!(names(&h, old), ["held"]);
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
        assert_eq!(h.saves.len(), 1, "one record per save");
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

    /// Events stored by earlier versions — one record per message and
    /// save, and before that one per event — are read beside the newer
    /// records, in order, and pruned the same way.
    #[test]
    fn events_stored_by_earlier_versions_still_read_and_prune() {
        let (_dir, h) = history();
        let a = MessageId(9);
        let mut one = [0u8; EVENT_KEY_LEN];
        one[..16].copy_from_slice(&a.0.to_be_bytes());
        one[16..24].copy_from_slice(&3u64.to_be_bytes());
        h.legacy
            .insert(one, postcard::to_stdvec(&ev(5, EventKind::Held)).unwrap())
            .unwrap();
        let mut per_message = [0u8; RECORD_KEY_LEN];
        per_message[..16].copy_from_slice(&a.0.to_be_bytes());
        per_message[16..].copy_from_slice(&4u64.to_be_bytes());
        let saved: Vec<(u64, u32, Event)> = vec![
            (4, 0, ev(6, EventKind::Released)),
            (4, 1, ev(20, EventKind::Held)),
        ];
        h.legacy
            .insert(per_message, postcard::to_stdvec(&saved).unwrap())
            .unwrap();
        h.record(8, &[(a, ev(30, EventKind::Released))]);
        h.save().unwrap();
        assert_eq!(names(&h, a), ["held", "released", "held", "released"]);
        // The old forms are pruned event by event.
        assert_eq!(h.prune(10, 100).unwrap(), 2);
        assert_eq!(names(&h, a), ["held", "released"]);
        assert_eq!(h.prune(10, 1).unwrap(), 1);
        assert_eq!(names(&h, a), ["released"]);
    }
}
