//! The Raft log and vote in sled, with group commit.
//!
//! `append` writes the entries into sled's memory and hands the openraft
//! callback to the flusher, a thread of its own. The flusher takes every
//! callback waiting, calls one `flush` (an fsync) for all of them, and only
//! then reports them durable. A thread rather than a task: the flush blocks,
//! and a task would hand each one to Tokio's blocking pool and back — two
//! more thread wake-ups per group commit, on every node, for nothing.
//! While one flush runs the next batch gathers: the group commit that makes
//! replicated accepts fast without ever reporting an unflushed append.
//! (Followers get many entries per append. openraft 0.9 waits for each of
//! the leader's appends before the next, so there the batching happens one
//! level up: many proposals in one entry, see skein-node's `cluster/batch.rs`.)
//!
//! Bodies are taken out of each entry and appended to the body segments
//! ([`super::bodies`]); sled keeps the entry with a reference per body, and
//! reads put the bodies back. Every flush syncs the segments first.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{EntryPayload, OptionalSend, StorageError, StorageIOError};
use serde::{Deserialize, Serialize};

use super::{
    flush_all, flush_durable, Bodies, BodyRef, StoreError, StoreStats, KEY_LAST_PURGED, KEY_VOTE,
    LOG_TREE, META_TREE,
};
use crate::{Entry, LogId, NodeId, TypeConfig, Vote};

/// An entry as sled holds it: bodies taken out, referenced in order.
#[derive(Serialize, Deserialize)]
pub(crate) struct Stored {
    pub entry: Entry,
    pub bodies: Vec<BodyRef>,
}

/// [`Stored`] borrowed, for writing: the same encoding.
#[derive(Serialize)]
pub(crate) struct StoredRef<'a> {
    pub entry: &'a Entry,
    pub bodies: &'a [BodyRef],
}

/// How often settled-but-unflushed body releases are flushed when no
/// appends come to do it (an idle queue gives its disk space back).
const IDLE_FLUSH: Duration = Duration::from_secs(1);

type SErr = StorageError<NodeId>;

/// How much the cache of recent entries holds at most: bytes (entries as
/// stored, plus their bodies) and entries.
const RECENT_BYTES: usize = 32 << 20;
const RECENT_ENTRIES: usize = 4096;

/// The entries appended lately, whole (bodies as shared buffers), with the
/// references their bodies were stored under. openraft reads each entry back
/// at once, to send it to every follower and to apply it; from here those
/// reads cost no disk read, checksum or copy. Truncate and purge keep it
/// equal to the log; past its bounds the oldest go (and are read from disk).
#[derive(Default)]
pub(crate) struct Recent {
    entries: BTreeMap<u64, RecentEntry>,
    bytes: usize,
}

/// An entry whole, the references its bodies were stored under, and what
/// it counts against the cache's bound.
struct RecentEntry {
    entry: Entry,
    refs: Vec<BodyRef>,
    size: usize,
}

impl Recent {
    /// `stored`: the size of the entry without its bodies, as written.
    fn insert(&mut self, entry: Entry, refs: Vec<BodyRef>, stored: usize) {
        let size = stored
            + match &entry.payload {
                EntryPayload::Normal(req) => req.cmd.body_bytes(),
                _ => 0,
            };
        let index = entry.log_id.index;
        if let Some(old) = self
            .entries
            .insert(index, RecentEntry { entry, refs, size })
        {
            self.bytes -= old.size;
        }
        self.bytes += size;
        while self.bytes > RECENT_BYTES || self.entries.len() > RECENT_ENTRIES {
            match self.entries.pop_first() {
                Some((_, old)) => self.bytes -= old.size,
                None => break,
            }
        }
    }

    /// Forget the entries in `range`.
    fn remove(&mut self, range: impl RangeBounds<u64>) {
        let gone: Vec<u64> = self.entries.range(range).map(|(i, _)| *i).collect();
        for i in gone {
            if let Some(old) = self.entries.remove(&i) {
                self.bytes -= old.size;
            }
        }
    }

    /// Every entry from `lo` up to `hi` (exclusive), if all are here.
    fn get(&self, lo: u64, hi: u64) -> Option<Vec<Entry>> {
        let len = usize::try_from(hi.checked_sub(lo)?).ok()?;
        let out: Vec<Entry> = self
            .entries
            .range(lo..hi)
            .map(|(_, r)| r.entry.clone())
            .collect();
        (out.len() == len).then_some(out)
    }

    pub(crate) fn refs(&self, index: u64) -> Option<Vec<BodyRef>> {
        self.entries.get(&index).map(|r| r.refs.clone())
    }
}

pub(crate) type SharedRecent = Arc<std::sync::Mutex<Recent>>;

fn lock_recent(r: &SharedRecent) -> std::sync::MutexGuard<'_, Recent> {
    r.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Clone)]
pub struct LogStore {
    db: sled::Db,
    log: sled::Tree,
    meta: sled::Tree,
    bodies: Arc<Bodies>,
    flusher: mpsc::Sender<LogFlushed<TypeConfig>>,
    recent: SharedRecent,
}

impl LogStore {
    /// Open the log and count its references to bodies.
    pub(crate) fn open(
        db: sled::Db,
        bodies: Arc<Bodies>,
        stats: Arc<StoreStats>,
    ) -> Result<Self, StoreError> {
        let log = db.open_tree(LOG_TREE)?;
        let meta = db.open_tree(META_TREE)?;
        // Count the references, and check every body: after a power cut,
        // sled may hold entries it wrote back on its own whose bodies never
        // reached the disk. Such entries were never reported durable (every
        // flush syncs the bodies first), so the log is cut before the first.
        let mut torn = None;
        for kv in log.iter() {
            let (k, v) = kv?;
            let refs = decode_stored(&v)?.bodies;
            if torn.is_none() && refs.iter().any(|r| bodies.read(r).is_err()) {
                torn = Some(k);
            }
            if torn.is_none() {
                for r in &refs {
                    bodies.retain(r);
                }
            }
        }
        if let Some(from) = torn {
            tracing::warn!(
                index = u64::from_be_bytes(from[..8].try_into().unwrap_or_default()),
                "log entries past a body that never reached the disk are dropped"
            );
            let mut batch = sled::Batch::default();
            for k in log.range(from..).keys() {
                batch.remove(k?);
            }
            log.apply_batch(batch)?;
            db.flush()?;
        }
        let (tx, rx) = mpsc::channel();
        let (db2, bodies2) = (db.clone(), bodies.clone());
        std::thread::Builder::new()
            .name("skein-log-flush".into())
            .spawn(move || flusher(db2, bodies2, stats, rx))?;
        Ok(LogStore {
            db,
            log,
            meta,
            bodies,
            flusher: tx,
            recent: SharedRecent::default(),
        })
    }

    /// The cache of recent entries, for the state machine's body references.
    pub(crate) fn recent(&self) -> SharedRecent {
        self.recent.clone()
    }

    /// An entry read back whole, its bodies from their segments.
    fn decode_entry(&self, v: &[u8]) -> Result<Entry, SErr> {
        let Stored { mut entry, bodies } =
            decode_stored(v).map_err(|e| StorageIOError::read_logs(&e))?;
        if let EntryPayload::Normal(req) = &mut entry.payload {
            let slots = req.cmd.bodies_mut();
            if slots.len() != bodies.len() {
                let e = StoreError::Corrupt(format!("entry {} lost its bodies", entry.log_id));
                return Err(StorageIOError::read_logs(&e).into());
            }
            for (slot, r) in slots.into_iter().zip(&bodies) {
                *slot = self
                    .bodies
                    .read(r)
                    .map_err(|e| StorageIOError::read_logs(&e))?;
            }
        }
        Ok(entry)
    }

    /// The body references of the entries in `range`, for releasing.
    fn refs_in(
        &self,
        iter: impl Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>,
    ) -> Result<Vec<BodyRef>, StoreError> {
        let mut refs = Vec::new();
        for kv in iter {
            let (_, v) = kv?;
            refs.extend(decode_stored(&v)?.bodies);
        }
        Ok(refs)
    }

    fn last_purged(&self) -> Result<Option<LogId>, SErr> {
        match self
            .meta
            .get(KEY_LAST_PURGED)
            .map_err(|e| StorageIOError::read_logs(&e))?
        {
            Some(v) => Ok(Some(
                postcard::from_bytes(&v).map_err(|e| StorageIOError::read_logs(&e))?,
            )),
            None => Ok(None),
        }
    }

    /// Take the entries `range` yields out of the log, and release their
    /// bodies (truncating the tail, purging the head).
    fn remove_entries(&self, range: impl Fn() -> sled::Iter) -> Result<(), StoreError> {
        let refs = self.refs_in(range())?;
        let mut batch = sled::Batch::default();
        for kv in range() {
            batch.remove(kv?.0);
        }
        self.log.apply_batch(batch)?;
        for r in &refs {
            self.bodies.release(r);
        }
        Ok(())
    }

    async fn flush(&self) -> Result<(), StoreError> {
        let (db, bodies) = (self.db.clone(), self.bodies.clone());
        tokio::task::spawn_blocking(move || flush_all(&db, &bodies))
            .await
            .map_err(|e| StoreError::Io(std::io::Error::other(e.to_string())))?
    }
}

/// The group-commit loop: one sync of the body segments and one sled flush
/// for every append waiting. When idle, it still flushes now and then so that
/// released bodies can be unlinked. Ends when the log store is gone.
fn flusher(
    db: sled::Db,
    bodies: Arc<Bodies>,
    stats: Arc<StoreStats>,
    rx: mpsc::Receiver<LogFlushed<TypeConfig>>,
) {
    let mut waiting = Vec::new();
    loop {
        match rx.recv_timeout(IDLE_FLUSH) {
            Ok(first) => waiting.push(first),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if bodies.has_releases() {
                    if let Err(e) = flush_all(&db, &bodies) {
                        tracing::warn!(error = %e, "idle flush failed");
                    }
                } else {
                    bodies.collect();
                }
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
        waiting.extend(rx.try_iter());
        let began = std::time::Instant::now();
        let (result, settling) = match flush_durable(&db, &bodies) {
            Ok(settling) => (Ok(()), Some(settling)),
            Err(e) => (Err(std::io::Error::other(e.to_string())), None),
        };
        stats.flushes.fetch_add(1, Ordering::Relaxed);
        stats
            .appends
            .fetch_add(waiting.len() as u64, Ordering::Relaxed);
        stats
            .flush_micros
            .fetch_add(began.elapsed().as_micros() as u64, Ordering::Relaxed);
        for cb in waiting.drain(..) {
            let r = match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
            };
            cb.log_io_completed(r);
        }
        // Unlink what the flush made unreferenced, once the appends are out.
        if let Some(settling) = settling {
            bodies.settle(settling);
        }
    }
}

/// The key of the entry at index `i`: the index, big endian, then four
/// zero bytes (entries were once split into numbered chunks; the one chunk
/// left keeps the layout every data directory has).
pub(crate) fn entry_key(i: u64) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..8].copy_from_slice(&i.to_be_bytes());
    k
}

/// Where the entries from index `i` begin (any key of an index sorts
/// after its 8-byte prefix).
fn index_key(i: u64) -> [u8; 8] {
    i.to_be_bytes()
}

pub(crate) fn decode_stored(v: &[u8]) -> Result<Stored, StoreError> {
    Ok(postcard::from_bytes(v)?)
}

/// The body references stored with the entry at `index`, if it is in the log.
pub(crate) fn stored_refs(
    log: &sled::Tree,
    recent: &SharedRecent,
    index: u64,
) -> Result<Option<Vec<BodyRef>>, StoreError> {
    if let Some(refs) = lock_recent(recent).refs(index) {
        return Ok(Some(refs));
    }
    Ok(match log.get(entry_key(index))? {
        Some(v) => Some(decode_stored(&v)?.bodies),
        None => None,
    })
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, SErr> {
        let lo = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let hi = match range.end_bound() {
            Bound::Included(i) => i.checked_add(1),
            Bound::Excluded(i) => Some(*i),
            Bound::Unbounded => None,
        };
        if let Some(hi) = hi {
            if let Some(entries) = lock_recent(&self.recent).get(lo, hi) {
                return Ok(entries);
            }
        }
        let iter = match hi {
            Some(hi) => self.log.range(index_key(lo)..index_key(hi)),
            None => self.log.range(index_key(lo)..),
        };
        let mut out = Vec::new();
        // Purged entries' segments are not unlinked while this is held.
        let _guard = self.bodies.guard();
        for kv in iter {
            let (_, v) = kv.map_err(|e| StorageIOError::read_logs(&e))?;
            out.push(self.decode_entry(&v)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, SErr> {
        let last_purged_log_id = self.last_purged()?;
        let last = match self.log.last().map_err(|e| StorageIOError::read_logs(&e))? {
            Some((_, v)) => Some(
                decode_stored(&v)
                    .map_err(|e| StorageIOError::read_logs(&e))?
                    .entry
                    .log_id,
            ),
            None => None,
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id: last.or(last_purged_log_id),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), SErr> {
        let v = postcard::to_stdvec(vote).map_err(|e| StorageIOError::write_vote(&e))?;
        self.meta
            .insert(KEY_VOTE, v)
            .map_err(|e| StorageIOError::write_vote(&e))?;
        // A vote must be on disk before we answer for it.
        self.flush()
            .await
            .map_err(|e| StorageIOError::write_vote(&e))?;
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, SErr> {
        match self
            .meta
            .get(KEY_VOTE)
            .map_err(|e| StorageIOError::read_vote(&e))?
        {
            Some(v) => Ok(Some(
                postcard::from_bytes(&v).map_err(|e| StorageIOError::read_vote(&e))?,
            )),
            None => Ok(None),
        }
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), SErr>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut written = Vec::new();
        let r = (|| {
            for mut entry in entries {
                // The bodies go to their segment; sled gets the entry without
                // them, the cache gets it whole (they are put back).
                let mut refs = Vec::new();
                let mut taken = Vec::new();
                if let EntryPayload::Normal(req) = &mut entry.payload {
                    for body in req.cmd.bodies_mut() {
                        let r = self.bodies.append(body)?;
                        written.push(r);
                        refs.push(r);
                        taken.push(std::mem::take(body));
                    }
                }
                let index = entry.log_id.index;
                let v = postcard::to_stdvec(&StoredRef {
                    entry: &entry,
                    bodies: &refs,
                })?;
                if let EntryPayload::Normal(req) = &mut entry.payload {
                    for (slot, body) in req.cmd.bodies_mut().into_iter().zip(taken) {
                        *slot = body;
                    }
                }
                // One insert per entry, not a batch: sled writes out (and
                // syncs) its buffer on every batch, which on the hot path
                // cost more than the flush itself. An insert is atomic, and a
                // crash keeps a prefix of them; none of this was reported
                // durable before the flush anyway. One chunk, however large:
                // entries leave the log soon, so sled holding a large one in
                // memory for a while does no harm.
                let stored = v.len();
                self.log.insert(entry_key(index), v)?;
                lock_recent(&self.recent).insert(entry, refs, stored);
            }
            Ok::<_, StoreError>(())
        })();
        if let Err(e) = r {
            for w in &written {
                self.bodies.release(w);
            }
            return Err(StorageIOError::write_logs(&e).into());
        }
        // Readable now; durable when the flusher says so.
        if let Err(mpsc::SendError(cb)) = self.flusher.send(callback) {
            cb.log_io_completed(Err(std::io::Error::other("log flusher stopped")));
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), SErr> {
        lock_recent(&self.recent).remove(log_id.index..);
        self.remove_entries(|| self.log.range(index_key(log_id.index)..))
            .map_err(|e| StorageIOError::write_logs(&e).into())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), SErr> {
        lock_recent(&self.recent).remove(..=log_id.index);
        // Record the purge point first: a crash part way leaves entries below
        // it, which are never read, rather than a hole above it.
        let v = postcard::to_stdvec(&log_id).map_err(|e| StorageIOError::write_logs(&e))?;
        self.meta
            .insert(KEY_LAST_PURGED, v)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        self.remove_entries(|| match log_id.index.checked_add(1) {
            Some(next) => self.log.range(..index_key(next)),
            None => self.log.range::<&[u8], _>(..),
        })
        .map_err(|e| StorageIOError::write_logs(&e).into())
    }
}
