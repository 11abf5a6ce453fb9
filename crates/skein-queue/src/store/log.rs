//! The Raft log and vote in sled, with group commit.
//!
//! `append` writes the entries into sled's memory and hands the openraft
//! callback to a flusher task. The flusher takes every callback waiting, calls
//! one `flush` (an fsync) for all of them, and only then reports them durable.
//! While one flush runs the next batch gathers: the group commit that makes
//! replicated accepts fast without ever reporting an unflushed append.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{OptionalSend, StorageError, StorageIOError};
use tokio::sync::mpsc;

use super::{chunked, StoreError, KEY_LAST_PURGED, KEY_VOTE, LOG_TREE, META_TREE};
use crate::{Entry, LogId, NodeId, TypeConfig, Vote};

type SErr = StorageError<NodeId>;

#[derive(Clone)]
pub struct LogStore {
    db: sled::Db,
    log: sled::Tree,
    meta: sled::Tree,
    flusher: mpsc::UnboundedSender<LogFlushed<TypeConfig>>,
}

impl LogStore {
    pub(crate) fn open(db: sled::Db) -> Result<Self, StoreError> {
        let log = db.open_tree(LOG_TREE)?;
        let meta = db.open_tree(META_TREE)?;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(flusher(db.clone(), rx));
        Ok(LogStore {
            db,
            log,
            meta,
            flusher: tx,
        })
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

    async fn flush(&self) -> Result<(), sled::Error> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.flush())
            .await
            .map_err(|e| sled::Error::ReportableBug(e.to_string()))?
            .map(|_| ())
    }
}

/// The group-commit loop: one fsync for every append waiting.
async fn flusher(db: sled::Db, mut rx: mpsc::UnboundedReceiver<LogFlushed<TypeConfig>>) {
    let mut waiting = Vec::new();
    while let Some(first) = rx.recv().await {
        waiting.push(first);
        while let Ok(more) = rx.try_recv() {
            waiting.push(more);
        }
        let db2 = db.clone();
        let result = match tokio::task::spawn_blocking(move || db2.flush()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(std::io::Error::other(e.to_string())),
            Err(e) => Err(std::io::Error::other(e.to_string())),
        };
        for cb in waiting.drain(..) {
            let r = match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
            };
            cb.log_io_completed(r);
        }
    }
}

fn index_key(i: u64) -> [u8; 8] {
    i.to_be_bytes()
}

fn decode_entry(v: &[u8]) -> Result<Entry, SErr> {
    postcard::from_bytes(v).map_err(|e| StorageIOError::read_logs(&e).into())
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
        let iter = match hi {
            Some(hi) => self.log.range(index_key(lo)..index_key(hi)),
            None => self.log.range(index_key(lo)..),
        };
        let mut out = Vec::new();
        for kv in chunked::group(iter, 8) {
            let (_, v) = kv.map_err(|e| StorageIOError::read_logs(&e))?;
            out.push(decode_entry(&v)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, SErr> {
        let last_purged_log_id = self.last_purged()?;
        let last = match self.log.last().map_err(|e| StorageIOError::read_logs(&e))? {
            Some((k, _)) => {
                let v = chunked::get(&self.log, &k[..8])
                    .map_err(|e| StorageIOError::read_logs(&e))?
                    .unwrap_or_default();
                Some(decode_entry(&v)?.log_id)
            }
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
        let mut batch = sled::Batch::default();
        for e in entries {
            let v = postcard::to_stdvec(&e)
                .map_err(|err| StorageIOError::write_log_entry(e.log_id, &err))?;
            // Chunked: sled would keep large values in memory.
            chunked::insert(&mut batch, &index_key(e.log_id.index), &v);
        }
        self.log
            .apply_batch(batch)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        // Readable now; durable when the flusher says so.
        if let Err(mpsc::error::SendError(cb)) = self.flusher.send(callback) {
            cb.log_io_completed(Err(std::io::Error::other("log flusher stopped")));
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), SErr> {
        let mut batch = sled::Batch::default();
        for kv in self.log.range(index_key(log_id.index)..) {
            let (k, _) = kv.map_err(|e| StorageIOError::write_logs(&e))?;
            batch.remove(k);
        }
        self.log
            .apply_batch(batch)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), SErr> {
        // Record the purge point first: a crash part way leaves entries below
        // it, which are never read, rather than a hole above it.
        let v = postcard::to_stdvec(&log_id).map_err(|e| StorageIOError::write_logs(&e))?;
        self.meta
            .insert(KEY_LAST_PURGED, v)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        let mut batch = sled::Batch::default();
        let below = match log_id.index.checked_add(1) {
            Some(next) => self.log.range(..index_key(next)),
            None => self.log.range::<&[u8], _>(..),
        };
        for kv in below {
            let (k, _) = kv.map_err(|e| StorageIOError::write_logs(&e))?;
            batch.remove(k);
        }
        self.log
            .apply_batch(batch)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }
}
