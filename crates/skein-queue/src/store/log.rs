//! The Raft log, written ahead in the body segments, with group commit.
//!
//! `append` writes each entry as one record of the segments (its bodies,
//! then the entry without them and a reference to each, see
//! [`Bodies::append_record`]) and hands the openraft callback to the
//! flusher, a thread of its own. The flusher takes every callback waiting,
//! syncs the segments once for all of them, and only then reports them
//! durable: one fsync per group commit, nothing written twice. A thread
//! rather than a task: the sync blocks, and a task would hand each one to
//! Tokio's blocking pool and back — two more thread wake-ups per group
//! commit, on every node, for nothing. While one sync runs the next batch
//! gathers: the group commit that makes replicated accepts fast without
//! ever reporting an unsynced append. (Followers get many entries per
//! append. openraft 0.9 waits for each of the leader's appends before the
//! next, so there the batching happens one level up: many proposals in one
//! entry, see skein-node's `cluster/batch.rs`.)
//!
//! Where each entry is lives in memory ([`LogMem`]), rebuilt at open by
//! reading the records back in order: an entry at index `i` cuts the log
//! from `i` on (a truncated tail comes back and is cut again), a truncate
//! record cuts it too, entries at or below the purge point are skipped. The
//! vote and the purge point are in sled, flushed before `save_vote` and
//! `purge` return. Data directories from before the log moved here keep it
//! in sled's `raft_log` tree; the first open moves it over.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{EntryPayload, OptionalSend, StorageError, StorageIOError};
use serde::{Deserialize, Serialize};

use super::bodies::{RecordAt, Scanned, KIND_ENTRY, KIND_TRUNCATE};
use super::{
    flush_all, Bodies, BodyRef, StoreError, StoreStats, KEY_LAST_PURGED, KEY_VOTE, LOG_TREE,
    META_TREE,
};
use crate::{Entry, LogId, NodeId, TypeConfig, Vote};

/// An entry as its record holds it: bodies taken out, referenced in order.
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

/// Under load, releases wait for a sled flush at most this long: the group
/// commit syncs only the segments, and a release counts only after a sled
/// flush (see [`super::bodies`]). The state machine saves as often.
const RELEASE_FLUSH: Duration = Duration::from_millis(100);

type SErr = StorageError<NodeId>;

/// How much the cache of recent entries holds at most: bytes (entries as
/// stored, plus their bodies) and entries.
const RECENT_BYTES: usize = 32 << 20;
const RECENT_ENTRIES: usize = 4096;

/// Where an entry of the log is: its id, its record, its bodies.
#[derive(Clone)]
struct Located {
    log_id: LogId,
    at: RecordAt,
    meta: BodyRef,
    bodies: Vec<BodyRef>,
}

/// The log in memory: where every entry is, the entries appended lately
/// whole, and the purge point.
#[derive(Default)]
pub(crate) struct LogMem {
    index: BTreeMap<u64, Located>,
    recent: Recent,
    last_purged: Option<LogId>,
}

impl LogMem {
    /// Take the entries from `from` on out of the index and the cache.
    fn cut(&mut self, from: u64) -> Vec<Located> {
        self.recent.remove(from..);
        self.index.split_off(&from).into_values().collect()
    }

    /// The body references of the entry at `index`, if it is in the log.
    pub(crate) fn refs(&self, index: u64) -> Option<Vec<BodyRef>> {
        self.index.get(&index).map(|l| l.bodies.clone())
    }

    fn last_log_id(&self) -> Option<LogId> {
        self.index
            .values()
            .next_back()
            .map(|l| l.log_id)
            .or(self.last_purged)
    }
}

/// The entries appended lately, whole (bodies as shared buffers). openraft
/// reads each entry back at once, to send it to every follower and to apply
/// it; from here those reads cost no disk read, checksum or copy. Truncate
/// and purge keep it equal to the log; past its bounds the oldest go (and
/// are read from disk).
#[derive(Default)]
struct Recent {
    entries: BTreeMap<u64, (Entry, usize)>,
    bytes: usize,
}

impl Recent {
    /// `stored`: the size of the entry without its bodies, as written.
    fn insert(&mut self, entry: Entry, stored: usize) {
        let size = stored
            + match &entry.payload {
                EntryPayload::Normal(req) => req.cmd.body_bytes(),
                _ => 0,
            };
        let index = entry.log_id.index;
        if let Some((_, old)) = self.entries.insert(index, (entry, size)) {
            self.bytes -= old;
        }
        self.bytes += size;
        while self.bytes > RECENT_BYTES || self.entries.len() > RECENT_ENTRIES {
            match self.entries.pop_first() {
                Some((_, (_, old))) => self.bytes -= old,
                None => break,
            }
        }
    }

    /// Forget the entries in `range`.
    fn remove(&mut self, range: impl RangeBounds<u64>) {
        let gone: Vec<u64> = self.entries.range(range).map(|(i, _)| *i).collect();
        for i in gone {
            if let Some((_, old)) = self.entries.remove(&i) {
                self.bytes -= old;
            }
        }
    }

    /// Every entry from `lo` up to `hi` (exclusive), if all are here.
    fn get(&self, lo: u64, hi: u64) -> Option<Vec<Entry>> {
        let len = usize::try_from(hi.checked_sub(lo)?).ok()?;
        let out: Vec<Entry> = self
            .entries
            .range(lo..hi)
            .map(|(_, (e, _))| e.clone())
            .collect();
        (out.len() == len).then_some(out)
    }
}

pub(crate) type SharedLog = Arc<std::sync::Mutex<LogMem>>;

pub(crate) fn lock_log(r: &SharedLog) -> std::sync::MutexGuard<'_, LogMem> {
    r.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Clone)]
pub struct LogStore {
    db: sled::Db,
    meta: sled::Tree,
    bodies: Arc<Bodies>,
    flusher: mpsc::Sender<LogFlushed<TypeConfig>>,
    mem: SharedLog,
}

impl LogStore {
    /// Open the log: read its records back, count their references to
    /// bodies, and move a log sled still holds into the segments.
    pub(crate) fn open(
        db: sled::Db,
        bodies: Arc<Bodies>,
        stats: Arc<StoreStats>,
    ) -> Result<Self, StoreError> {
        let meta = db.open_tree(META_TREE)?;
        let last_purged = match meta.get(KEY_LAST_PURGED)? {
            Some(v) => Some(postcard::from_bytes::<LogId>(&v)?),
            None => None,
        };
        let mut mem = LogMem {
            last_purged,
            ..LogMem::default()
        };
        let dead = replay(&mut mem, bodies.scan()?)?;
        let dead = dead
            .into_iter()
            .chain(check_bodies(&mut mem, &bodies))
            .collect::<Vec<_>>();
        if !dead.is_empty() {
            bodies.kill(&dead)?;
        }
        for l in mem.index.values() {
            bodies.retain(&l.meta);
            for r in &l.bodies {
                bodies.retain(r);
            }
        }
        migrate(&db, &bodies, &mut mem)?;
        let (tx, rx) = mpsc::channel();
        let (db2, bodies2) = (db.clone(), bodies.clone());
        std::thread::Builder::new()
            .name("skein-log-flush".into())
            .spawn(move || flusher(db2, bodies2, stats, rx))?;
        Ok(LogStore {
            db,
            meta,
            bodies,
            flusher: tx,
            mem: Arc::new(std::sync::Mutex::new(mem)),
        })
    }

    /// The log in memory, for the state machine's body references.
    pub(crate) fn mem(&self) -> SharedLog {
        self.mem.clone()
    }

    /// The last entry's log id (or the purge point's), for recovery.
    pub(crate) fn last_log_id(&self) -> Option<LogId> {
        lock_log(&self.mem).last_log_id()
    }

    /// Append `entry` and sync it, outside Raft (recovery).
    pub(crate) fn append_synced(&self, entry: Entry) -> Result<(), StoreError> {
        self.write_entry(entry)?;
        self.bodies.sync()
    }

    /// An entry read back whole from its record.
    fn read_entry(&self, l: &Located) -> Result<Entry, StoreError> {
        let Stored { mut entry, bodies } = decode_stored(&self.bodies.read(&l.meta)?)?;
        if let EntryPayload::Normal(req) = &mut entry.payload {
            let slots = req.cmd.bodies_mut();
            if slots.len() != bodies.len() {
                return Err(StoreError::Corrupt(format!(
                    "entry {} lost its bodies",
                    entry.log_id
                )));
            }
            for (slot, r) in slots.into_iter().zip(&bodies) {
                *slot = self.bodies.read(r)?;
            }
        }
        Ok(entry)
    }

    /// Write one entry's record and put it in the log in memory.
    fn write_entry(&self, mut entry: Entry) -> Result<(), StoreError> {
        // The bodies go into the record as they are; its metadata is the
        // entry without them, and the cache gets it whole.
        let mut taken = Vec::new();
        if let EntryPayload::Normal(req) = &mut entry.payload {
            for body in req.cmd.bodies_mut() {
                taken.push(std::mem::take(body));
            }
        }
        let slices: Vec<&[u8]> = taken.iter().map(|b| &b[..]).collect();
        let w = self
            .bodies
            .append_record(KIND_ENTRY, &slices, true, |refs| {
                Ok(postcard::to_stdvec(&StoredRef {
                    entry: &entry,
                    bodies: refs,
                })?)
            });
        drop(slices);
        if let EntryPayload::Normal(req) = &mut entry.payload {
            for (slot, body) in req.cmd.bodies_mut().into_iter().zip(taken) {
                *slot = body;
            }
        }
        let w = w?;
        let index = entry.log_id.index;
        let mut mem = lock_log(&self.mem);
        // openraft truncates before it appends over entries; whatever was
        // there is gone either way.
        let gone = mem.cut(index);
        mem.index.insert(
            index,
            Located {
                log_id: entry.log_id,
                at: w.at,
                meta: w.meta,
                bodies: w.bodies,
            },
        );
        mem.recent.insert(entry, w.meta.len as usize);
        drop(mem);
        release(&self.bodies, &gone);
        Ok(())
    }

    async fn flush(&self) -> Result<(), StoreError> {
        let (db, bodies) = (self.db.clone(), self.bodies.clone());
        tokio::task::spawn_blocking(move || flush_all(&db, &bodies))
            .await
            .map_err(|e| StoreError::Io(std::io::Error::other(e.to_string())))?
    }
}

/// The entries are gone from the log: their records and bodies may go.
fn release(bodies: &Bodies, gone: &[Located]) {
    for l in gone {
        bodies.release(&l.meta);
        for r in &l.bodies {
            bodies.release(r);
        }
    }
}

/// Rebuild the log from its records, in the order they were written.
/// Returns the records past a hole: entries after one were never reported
/// durable (a sync covers everything written before it), and a crash kept
/// them without what came first.
fn replay(mem: &mut LogMem, records: Vec<Scanned>) -> Result<Vec<RecordAt>, StoreError> {
    let mut dead = Vec::new();
    for rec in records {
        if !dead.is_empty() {
            dead.push(rec.at);
            continue;
        }
        match rec.kind {
            KIND_TRUNCATE => {
                let from: u64 = postcard::from_bytes(&rec.meta)?;
                mem.cut(from);
            }
            KIND_ENTRY => {
                let Stored { entry, bodies } = decode_stored(&rec.meta)?;
                let i = entry.log_id.index;
                if mem.last_purged.is_some_and(|p| i <= p.index) {
                    continue;
                }
                let next = match mem.index.keys().next_back() {
                    Some(last) => Some(last + 1),
                    None => mem.last_purged.map(|p| p.index + 1),
                };
                if next.is_some_and(|n| i > n) {
                    tracing::warn!(
                        index = i,
                        "log records past a hole a crash left are dropped (never reported durable)"
                    );
                    dead.push(rec.at);
                    continue;
                }
                mem.cut(i);
                mem.index.insert(
                    i,
                    Located {
                        log_id: entry.log_id,
                        at: rec.at,
                        meta: rec.meta_ref,
                        bodies,
                    },
                );
            }
            _ => {}
        }
    }
    Ok(dead)
}

/// Check every body the log names: after a power cut, a record may be on
/// disk without all of its bodies (the pages of one file reach the disk in
/// any order until a sync). Such an entry was never reported durable, so
/// the log is cut before the first; their records are returned, to kill.
fn check_bodies(mem: &mut LogMem, bodies: &Bodies) -> Vec<RecordAt> {
    let torn = mem
        .index
        .values()
        .find(|l| torn(bodies, &l.bodies, l.log_id.index))
        .map(|l| l.log_id.index);
    match torn {
        Some(from) => mem.cut(from).into_iter().map(|l| l.at).collect(),
        None => Vec::new(),
    }
}

/// Whether a body of the entry at `index` never reached the disk; said in
/// the log, as the entries from there on are dropped.
fn torn(bodies: &Bodies, refs: &[BodyRef], index: u64) -> bool {
    let torn = refs.iter().any(|r| bodies.read(r).is_err());
    if torn {
        tracing::warn!(
            index,
            "log entries past a body that never reached the disk are dropped"
        );
    }
    torn
}

/// Move a log sled still holds (a data directory from before the log moved
/// to the segments) into records, then drop the tree. A crash part way
/// moves it again: the records written first are cut by the same entries.
fn migrate(db: &sled::Db, bodies: &Bodies, mem: &mut LogMem) -> Result<(), StoreError> {
    if !db
        .tree_names()
        .iter()
        .any(|n| n.as_ref() == LOG_TREE.as_bytes())
    {
        return Ok(());
    }
    let old = db.open_tree(LOG_TREE)?;
    let mut moved = 0u64;
    for kv in old.iter() {
        let (_, v) = kv?;
        let Stored {
            entry,
            bodies: refs,
        } = decode_stored(&v)?;
        let i = entry.log_id.index;
        if mem.last_purged.is_some_and(|p| i <= p.index) {
            continue;
        }
        // As at every open: an entry whose body never reached the disk
        // ends the log.
        if torn(bodies, &refs, i) {
            break;
        }
        let w = bodies.append_record(KIND_ENTRY, &[], true, |_| {
            Ok(postcard::to_stdvec(&StoredRef {
                entry: &entry,
                bodies: &refs,
            })?)
        })?;
        for r in &refs {
            bodies.retain(r);
        }
        release(bodies, &mem.cut(i));
        mem.index.insert(
            i,
            Located {
                log_id: entry.log_id,
                at: w.at,
                meta: w.meta,
                bodies: refs,
            },
        );
        moved += 1;
    }
    bodies.sync()?;
    db.drop_tree(LOG_TREE)?;
    db.flush()?;
    tracing::info!(
        entries = moved,
        "the Raft log moved from sled to the segments"
    );
    Ok(())
}

/// The group-commit loop: one sync of the segments for every append
/// waiting. Releases wait for a sled flush, at most [`RELEASE_FLUSH`]
/// under load; when idle, it still flushes now and then so that released
/// bodies can be unlinked. Ends when the log store is gone.
fn flusher(
    db: sled::Db,
    bodies: Arc<Bodies>,
    stats: Arc<StoreStats>,
    rx: mpsc::Receiver<LogFlushed<TypeConfig>>,
) {
    let mut waiting = Vec::new();
    let mut flushed = Instant::now();
    loop {
        match rx.recv_timeout(IDLE_FLUSH) {
            Ok(first) => waiting.push(first),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if bodies.has_releases() {
                    if let Err(e) = flush_all(&db, &bodies) {
                        tracing::warn!(error = %e, "idle flush failed");
                    }
                    flushed = Instant::now();
                } else {
                    bodies.collect();
                }
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
        waiting.extend(rx.try_iter());
        let began = Instant::now();
        let result = bodies.sync();
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
                Err(e) => Err(std::io::Error::other(e.to_string())),
            };
            cb.log_io_completed(r);
        }
        // Unlink what is no longer referenced, once the appends are out.
        if result.is_ok() && bodies.has_releases() && flushed.elapsed() >= RELEASE_FLUSH {
            if let Err(e) = flush_all(&db, &bodies) {
                tracing::warn!(error = %e, "flush for released bodies failed");
            }
            flushed = Instant::now();
        }
    }
}

pub(crate) fn decode_stored(v: &[u8]) -> Result<Stored, StoreError> {
    Ok(postcard::from_bytes(v)?)
}

/// The body references stored with the entry at `index`, if it is in the log.
pub(crate) fn stored_refs(log: &SharedLog, index: u64) -> Option<Vec<BodyRef>> {
    lock_log(log).refs(index)
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
        // Taken before the look-up: a purged entry's segment is not
        // unlinked between finding its record and reading it.
        let _guard = self.bodies.guard();
        let located: Vec<Located> = {
            let mem = lock_log(&self.mem);
            if let Some(hi) = hi {
                if let Some(entries) = mem.recent.get(lo, hi) {
                    return Ok(entries);
                }
            }
            let r = match hi {
                Some(hi) if hi <= lo => return Ok(Vec::new()),
                Some(hi) => mem.index.range(lo..hi),
                None => mem.index.range(lo..),
            };
            r.map(|(_, l)| l.clone()).collect()
        };
        let mut out = Vec::with_capacity(located.len());
        for l in &located {
            out.push(
                self.read_entry(l)
                    .map_err(|e| StorageIOError::read_logs(&e))?,
            );
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, SErr> {
        let mem = lock_log(&self.mem);
        Ok(LogState {
            last_purged_log_id: mem.last_purged,
            last_log_id: mem.last_log_id(),
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
        for entry in entries {
            self.write_entry(entry)
                .map_err(|e| StorageIOError::write_logs(&e))?;
        }
        // Readable now; durable when the flusher says so.
        if let Err(mpsc::SendError(cb)) = self.flusher.send(callback) {
            cb.log_io_completed(Err(std::io::Error::other("log flusher stopped")));
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), SErr> {
        let gone = lock_log(&self.mem).cut(log_id.index);
        if gone.is_empty() {
            return Ok(());
        }
        // Recorded, so that a reopen cuts the log here too; durable with
        // the next sync, which comes before the appends that follow are
        // reported (a crash before it brings back entries never committed,
        // as a crash before the truncate would).
        let r = self.bodies.append_record(KIND_TRUNCATE, &[], false, |_| {
            Ok(postcard::to_stdvec(&log_id.index)?)
        });
        release(&self.bodies, &gone);
        r.map(|_| ())
            .map_err(|e| StorageIOError::write_logs(&e).into())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), SErr> {
        // The purge point is on disk before the entries leave: a reopen
        // must never find entries after it missing from before them.
        let v = postcard::to_stdvec(&log_id).map_err(|e| StorageIOError::write_logs(&e))?;
        self.meta
            .insert(KEY_LAST_PURGED, v)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        self.flush()
            .await
            .map_err(|e| StorageIOError::write_logs(&e))?;
        let gone: Vec<Located> = {
            let mut mem = lock_log(&self.mem);
            mem.recent.remove(..=log_id.index);
            let keep = match log_id.index.checked_add(1) {
                Some(next) => mem.index.split_off(&next),
                None => BTreeMap::new(),
            };
            let gone = std::mem::replace(&mut mem.index, keep);
            if mem.last_purged.is_none_or(|p| p.index < log_id.index) {
                mem.last_purged = Some(log_id);
            }
            gone.into_values().collect()
        };
        release(&self.bodies, &gone);
        Ok(())
    }
}
