//! Storage for the Raft log, the vote and the state machine.
//!
//! The Raft log is written ahead in the body segments under
//! `<data_dir>/bodies` (see [`log`] and [`bodies`]): one record per entry,
//! its bodies and then the entry without them. The rest is in one sled
//! database per node, in `<data_dir>/db`:
//! - tree `raft_meta`: `vote`, `last_purged`, `sm_tree` (which state tree is live)
//! - tree `sm.<gen>`: the state machine. `s` → [`SmHeader`]; `m<id>` → a
//!   [`crate::Message`]; `b<id>` → the [`BodyRef`] of its body; saved in
//!   batches, the log holding what is applied and not yet saved (see
//!   [`sm`]). Installing a
//!   snapshot fills a fresh generation and switches `sm_tree` to it in one
//!   write, so a crash mid-install leaves the old state whole.
//!
//! Each body is written once, in its log entry's record, and shared by the
//! log entry and the queued message.
//! Snapshots are files in `<data_dir>/snapshots` (see [`snapshot`]).

pub mod bodies;
mod log;
pub mod recovery;
mod refs;
mod sm;
pub mod snapshot;

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

pub use self::bodies::{Bodies, BodyRef, Settling};
pub use self::log::LogStore;
pub use self::sm::StateMachineStore;
use crate::{LogId, Membership, MessageId, QueueState};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage: {0}")]
    Sled(#[from] sled::Error),
    #[error("storage io: {0}")]
    Io(#[from] std::io::Error),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

impl From<postcard::Error> for StoreError {
    fn from(e: postcard::Error) -> Self {
        StoreError::Corrupt(e.to_string())
    }
}

/// The tree the Raft log was kept in before it moved to the segments
/// (read once, to move it; see the log store).
pub(crate) const LOG_TREE: &str = "raft_log";
pub(crate) const META_TREE: &str = "raft_meta";
pub(crate) const KEY_VOTE: &[u8] = b"vote";
pub(crate) const KEY_LAST_PURGED: &[u8] = b"last_purged";
pub(crate) const KEY_SM_TREE: &[u8] = b"sm_tree";
pub(crate) const KEY_HEADER: &[u8] = b"s";
/// State tree keys of MTA-STS policies: this, then the domain.
pub(crate) const STS_PREFIX: &[u8] = b"t";

pub(crate) fn sts_key(domain: &str) -> Vec<u8> {
    [STS_PREFIX, domain.as_bytes()].concat()
}

/// The state machine's own record of where it is, written with every apply.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SmHeader {
    pub applied: Option<LogId>,
    pub membership: Membership,
    pub cluster_time: u64,
}

pub(crate) fn message_key(id: &MessageId) -> [u8; 17] {
    prefixed(b'm', id)
}

pub(crate) fn body_key(id: &MessageId) -> [u8; 17] {
    prefixed(b'b', id)
}

fn prefixed(p: u8, id: &MessageId) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = p;
    k[1..].copy_from_slice(&id.to_bytes());
    k
}

pub(crate) fn id_from_key(k: &[u8]) -> Option<MessageId> {
    let b: [u8; 16] = k.get(1..17)?.try_into().ok()?;
    Some(MessageId::from_bytes(b))
}

/// Flush sled the only safe way: bodies synced first. The body references
/// dropped before the flush come back, to be settled once the caller has
/// done what the flush was for (see [`Bodies::settle`]); on an error they
/// wait for the next flush.
pub(crate) fn flush_durable(db: &sled::Db, bodies: &Bodies) -> Result<Settling, StoreError> {
    let settling = bodies.take_releases();
    match bodies.sync().and_then(|()| Ok(db.flush().map(|_| ())?)) {
        Ok(()) => Ok(settling),
        Err(e) => {
            bodies.restore(settling);
            Err(e)
        }
    }
}

/// [`flush_durable`], settled at once.
pub(crate) fn flush_all(db: &sled::Db, bodies: &Bodies) -> Result<(), StoreError> {
    let settling = flush_durable(db, bodies)?;
    bodies.settle(settling);
    Ok(())
}

pub(crate) fn decode_ref(v: &[u8]) -> Result<BodyRef, StoreError> {
    Ok(postcard::from_bytes(v)?)
}

/// Counters of the log's group commit (read by the node's metrics).
#[derive(Debug, Default)]
pub struct StoreStats {
    /// Group commits: one sync of the segments each.
    pub flushes: std::sync::atomic::AtomicU64,
    /// Appends made durable by them.
    pub appends: std::sync::atomic::AtomicU64,
    /// Time spent in them, in microseconds.
    pub flush_micros: std::sync::atomic::AtomicU64,
}

/// What the state machine shares with the rest of the node: the queue in
/// memory, the live state tree (for bodies), what is not saved to it yet,
/// and a signal on every apply.
pub(crate) struct Shared {
    pub state: RwLock<QueueState>,
    pub tree: RwLock<sled::Tree>,
    /// Locked after `state`, never before it.
    pub unsaved: std::sync::Mutex<sm::Unsaved>,
    pub db: sled::Db,
    /// Tests stop the saver thread to see what a crash before a save leaves.
    #[cfg(test)]
    pub saver_paused: std::sync::atomic::AtomicBool,
    pub applied: watch::Sender<Option<LogId>>,
    /// Readers of a consistent view (snapshot builders, backups). While any
    /// runs, bodies of removed messages stay on disk.
    pub pins: Arc<std::sync::atomic::AtomicUsize>,
    pub bodies: Arc<Bodies>,
    /// What happened to each message, recorded as entries are applied.
    pub history: crate::History,
    /// The same events as they are applied, for whoever listens.
    pub events: tokio::sync::broadcast::Sender<(MessageId, crate::Event)>,
}

/// A read-only view of the local replica of the queue. Cheap to clone.
#[derive(Clone)]
pub struct QueueReader {
    shared: Arc<Shared>,
    db: sled::Db,
    snapshot_dir: PathBuf,
    stats: Arc<StoreStats>,
}

impl QueueReader {
    /// Read the queue in memory. Keep the closure short: apply waits for it.
    pub fn read(&self) -> RwLockReadGuard<'_, QueueState> {
        self.shared.read_state()
    }

    /// A message body from the local replica.
    pub fn body(&self, id: &MessageId) -> Result<Option<Bytes>, StoreError> {
        let bodies = &self.shared.bodies;
        let _guard = bodies.guard();
        match self.shared.body_ref(id)? {
            Some(r) => Ok(Some(bodies.read(&r)?)),
            None => Ok(None),
        }
    }

    /// Save what was applied to the state tree now (it is saved within a
    /// tenth of a second anyway; the log holds it until then), then call
    /// `then` with the state as saved and its last applied log id, before
    /// anything else is applied.
    fn save<T>(&self, then: impl FnOnce(&QueueState, Option<LogId>) -> T) -> Result<T, StoreError> {
        let state = self.read();
        let mut u = self.shared.unsaved();
        self.shared.save(&state, &mut u)?;
        Ok(then(&state, u.header_applied()))
    }

    /// Write a consistent copy of the whole queue to `path`, in the snapshot
    /// format (see [`snapshot`]), synced to disk. Returns the message count.
    pub fn backup(&self, path: &Path) -> Result<u64, StoreError> {
        let _pin = refs::Pin::on(&self.shared.pins);
        // Saved, so the tree names the body of every message in the copy;
        // the pin keeps them while it is written.
        let (state, applied) = self.save(|state, applied| (state.clone(), applied))?;
        let tree = self.shared.tree();
        let header = snapshot::SnapshotHeader {
            meta: crate::SnapshotMeta {
                last_log_id: applied,
                snapshot_id: "backup".into(),
                ..Default::default()
            },
            cluster_time: state.cluster_time(),
            messages: state.len() as u64,
            sts: state.sts_policies().cloned().collect(),
        };
        let file = std::fs::File::create(path)?;
        let file = snapshot::build::write_queue(
            std::io::BufWriter::new(file),
            &header,
            &state,
            &tree,
            &self.shared.bodies,
        )?
        .into_inner()
        .map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok(header.messages)
    }

    /// What happened to messages, as recorded by this replica.
    pub fn history(&self) -> &crate::History {
        &self.shared.history
    }

    /// Every event as it is applied (a slow listener misses some: it is
    /// told so by the channel, and the history keeps them all).
    pub fn events(&self) -> tokio::sync::broadcast::Receiver<(MessageId, crate::Event)> {
        self.shared.events.subscribe()
    }

    /// Changes whenever entries are applied; carries the last applied log id.
    pub fn subscribe(&self) -> watch::Receiver<Option<LogId>> {
        self.shared.applied.subscribe()
    }

    pub fn applied(&self) -> Option<LogId> {
        *self.shared.applied.borrow()
    }

    /// Write everything applied so far to disk (the log store does this for
    /// every batch of appends; tools that apply directly call it).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.save(|_, _| ())?;
        flush_all(&self.db, &self.shared.bodies)
    }

    /// Bytes the store occupies on disk: sled, body segments, snapshots.
    pub fn disk_size(&self) -> u64 {
        let snapshots: u64 = std::fs::read_dir(&self.snapshot_dir)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok()?.metadata().ok())
            .map(|m| m.len())
            .sum();
        self.db.size_on_disk().unwrap_or(0) + self.shared.bodies.disk_size() + snapshots
    }

    /// Counters of the group commit.
    pub fn stats(&self) -> &StoreStats {
        &self.stats
    }

    /// The data directory the store lives in.
    pub fn data_dir(&self) -> &Path {
        self.snapshot_dir.parent().unwrap_or(&self.snapshot_dir)
    }

    /// Body segment files on disk.
    pub fn body_segments(&self) -> usize {
        self.shared.bodies.segments()
    }
}

/// Everything `open` gives a node: the two openraft stores and a reader.
pub struct Stores {
    pub log: LogStore,
    pub state_machine: StateMachineStore,
    pub reader: QueueReader,
}

/// Open (or create) the storage of one node under `dir`. Must be called
/// inside a Tokio runtime: the log store runs its group-commit flusher there.
pub fn open(dir: &Path) -> Result<Stores, StoreError> {
    std::fs::create_dir_all(dir)?;
    let db = open_db(&dir.join("db"))?;
    let snapshot_dir: PathBuf = dir.join("snapshots");
    std::fs::create_dir_all(&snapshot_dir)?;
    let bodies = Arc::new(Bodies::open(&dir.join("bodies"))?);
    let stats = Arc::new(StoreStats::default());
    let log = LogStore::open(db.clone(), bodies.clone(), stats.clone())?;
    if let Some(req) = recovery::pending(dir)? {
        recovery::apply(&db, &log, dir, &req)?;
    }
    let (state_machine, shared) =
        StateMachineStore::open(db.clone(), snapshot_dir.clone(), bodies.clone(), log.mem())?;
    // Both stores have counted their references: drop what nothing names.
    bodies.finish_open()?;
    let reader = QueueReader {
        shared,
        db,
        snapshot_dir,
        stats,
    };
    Ok(Stores {
        log,
        state_machine,
        reader,
    })
}

const CACHE_BYTES: u64 = 64 << 20;

/// Open sled, waiting a little for a previous holder of the same database in
/// this process (a node restarting in place) to let go of its file lock.
fn open_db(path: &Path) -> Result<sled::Db, StoreError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let r = sled::Config::new()
            .path(path)
            // Flushes are ours: before every vote and purge is reported
            // saved, and for released bodies (see the log's flusher).
            .flush_every_ms(None)
            // sled caches 1 GiB by default; it holds only the queue's
            // metadata (the log and bodies are in segments), so a small cache keeps
            // memory bounded whatever the queue size.
            .cache_capacity(CACHE_BYTES)
            .open();
        match r {
            // sled reports a held lock only as an I/O error with this text.
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            r => return Ok(r?),
        }
    }
}

#[cfg(test)]
mod tests;
