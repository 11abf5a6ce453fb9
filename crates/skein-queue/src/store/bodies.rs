//! Message bodies and the Raft log, in append-only segment files beside sled.
//!
//! A queue writes every body once and deletes it soon after; sled 0.34 keeps
//! the space such insert-then-delete traffic frees (its files plateau at a few
//! times the live data). Bodies therefore live in `<data_dir>/bodies/<n>.seg`,
//! appended in order, and a segment file is unlinked whole once nothing refers
//! to it: when the queue drains, the disk space comes back.
//!
//! The segments are also the Raft log's write-ahead log: an entry is one
//! record, its bodies followed by its metadata (see [`Bodies::append_record`]),
//! so one sync of the segment makes the entry durable — no second write
//! anywhere else. A segment begins with [`SEG_MAGIC`] and holds framed
//! records; [`Bodies::scan`] reads the log's records back in the order they
//! were written. (Segments from before the log moved here have no magic and
//! hold bare bodies; they are read only through the references sled keeps.)
//!
//! Each body is written once per node. The Raft log entry that carried it and
//! the queued message (state machine) both hold a [`BodyRef`] to the same
//! bytes; references are counted per segment in memory and recounted when the
//! store opens (the log's from its records, the queue's from sled).
//!
//! Two rules keep this crash-safe:
//! - Segments are synced before every sled flush ([`Bodies::sync`]), so sled
//!   never durably names a body that is not on disk.
//! - A dropped reference counts only once a sled flush begun after the drop
//!   has finished ([`Bodies::release`] queues it, [`Bodies::take_releases`]
//!   takes the queue before a flush, [`Bodies::settle`] applies it after). A crash can bring back a reference
//!   sled had not yet written away; its segment is then still there.

use std::collections::HashMap;
use std::fs::{File, OpenOptions, TryLockError};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::StoreError;

/// A segment takes new records until it reaches this size.
pub const SEGMENT_BYTES: u64 = 16 << 20;

/// The first bytes of every segment that holds framed records.
const SEG_MAGIC: &[u8; 8] = b"SKEINSG2";
const SEG_HEAD: u64 = SEG_MAGIC.len() as u64;

/// A record's header: `S K <kind> 0`, the metadata's length (u32), the
/// bodies' length (u64) and the metadata's CRC-32 (u32), little endian.
/// The bodies follow, then the metadata.
const REC_HEAD: u64 = 20;

/// A Raft log entry: its metadata is the entry without its bodies and a
/// reference to each (see the log store).
pub(crate) const KIND_ENTRY: u8 = 1;
/// One body and no metadata (snapshot installs, entries applied directly).
pub(crate) const KIND_BODY: u8 = 2;
/// The log is cut from an index on (metadata: the index).
pub(crate) const KIND_TRUNCATE: u8 = 3;
/// A log record an open found past a hole in the log: never read again.
const KIND_DEAD: u8 = 0xff;

/// A record the log wrote, read back by [`Bodies::scan`].
pub(crate) struct Scanned {
    pub kind: u8,
    /// Where the record begins (to mark it dead).
    pub at: RecordAt,
    /// Where its metadata is, and the metadata.
    pub meta_ref: BodyRef,
    pub meta: Vec<u8>,
}

/// The segment and offset a record begins at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RecordAt {
    pub seg: u32,
    pub off: u64,
}

/// A record appended: where its metadata is, and its bodies.
pub(crate) struct Written {
    pub at: RecordAt,
    pub meta: BodyRef,
    pub bodies: Vec<BodyRef>,
}

/// Where a body lives: segment, offset, length and CRC-32 of the bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BodyRef {
    pub seg: u32,
    pub off: u64,
    pub len: u32,
    pub crc: u32,
}

pub struct Bodies {
    dir: PathBuf,
    inner: Mutex<Inner>,
    /// Readers hold it from looking a reference up in sled until they have
    /// read the bytes; unlinking waits for them (see [`Bodies::guard`]).
    gc: RwLock<()>,
    /// One sync at a time: a second caller waits for the one under way, so
    /// no caller returns while segments it wrote are still being synced.
    syncing: Mutex<()>,
    /// Held for the life of this value: one owner of the directory at a time.
    _lock: File,
}

struct Inner {
    active: u32,
    active_len: u64,
    files: HashMap<u32, Segment>,
    /// References per segment.
    refs: HashMap<u32, u64>,
    /// Releases not yet known to be durable in sled.
    released: Vec<u32>,
    /// Segments written since the last sync, and whether the directory changed.
    dirty: Vec<u32>,
    dir_dirty: bool,
    /// Every store has counted its references ([`Bodies::finish_open`]);
    /// until then a count of zero means nothing and no segment may go.
    counted: bool,
}

struct Segment {
    file: Arc<File>,
    /// The file's size: for a segment an earlier build made from a spare
    /// of zeros, more than what was appended.
    len: u64,
}

impl Inner {
    /// Segments nothing refers to, besides the active one.
    fn unused(&self) -> Vec<u32> {
        self.files
            .keys()
            .copied()
            .filter(|n| *n != self.active && !self.refs.contains_key(n))
            .collect()
    }
}

fn seg_name(n: u32) -> String {
    format!("{n:08}.seg")
}

/// Lock `dir`, waiting a little for a previous owner in this process (a
/// store being dropped while a node restarts in place) to let go.
fn lock_dir(dir: &Path) -> Result<File, StoreError> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("LOCK"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(TryLockError::WouldBlock) => {
                return Err(StoreError::Io(std::io::Error::other(format!(
                    "{} is in use by another process",
                    dir.display()
                ))))
            }
            Err(TryLockError::Error(e)) => return Err(e.into()),
        }
    }
}

/// Builds of 2026-12-01 wrote spare segments of zeros ahead of need, as
/// `spare.tmp` and then `spare.zero` (see docs/performance.md, sessions 15
/// and 16: on one disk shared by three nodes they cost more acceptance
/// latency than the cheaper syncs over them saved). A data directory such
/// a build left may hold one: removed, never used (a crash could have kept
/// records written to a spare just put to use while losing its rename).
fn remove_spares(dir: &Path) -> std::io::Result<()> {
    for name in ["spare.tmp", "spare.zero"] {
        match std::fs::remove_file(dir.join(name)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Releases taken before one flush; hand them to [`Bodies::settle`] after it.
#[must_use]
pub struct Settling(Vec<u32>);

impl Bodies {
    /// Open the segments under `dir`. Counts start at zero: the stores add
    /// theirs ([`Bodies::retain`]) and then [`Bodies::finish_open`] removes
    /// every segment nothing refers to.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)?;
        let lock = lock_dir(dir)?;
        remove_spares(dir)?;
        let mut files = HashMap::new();
        let mut last = 0;
        for e in std::fs::read_dir(dir)? {
            let path = e?.path();
            let Some(n) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".seg"))
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let file = OpenOptions::new().read(true).write(true).open(&path)?;
            let len = file.metadata()?.len();
            files.insert(
                n,
                Segment {
                    file: Arc::new(file),
                    len,
                },
            );
            last = last.max(n);
        }
        let bodies = Bodies {
            dir: dir.to_path_buf(),
            inner: Mutex::new(Inner {
                active: last,
                active_len: 0,
                files,
                refs: HashMap::new(),
                released: Vec::new(),
                dirty: Vec::new(),
                dir_dirty: false,
                counted: false,
            }),
            gc: RwLock::new(()),
            syncing: Mutex::new(()),
            _lock: lock,
        };
        // New bodies always go to a fresh segment: the end of the old one may
        // hold a torn write.
        bodies.roll(&mut bodies.lock())?;
        Ok(bodies)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn roll(&self, inner: &mut Inner) -> Result<(), StoreError> {
        let n = inner
            .active
            .checked_add(1)
            .ok_or_else(|| StoreError::Corrupt("body segment numbers exhausted".into()))?;
        let path = self.dir.join(seg_name(n));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        if let Err(e) = file.write_all_at(SEG_MAGIC, 0) {
            // Nothing names the file yet: remove it, so that the next roll
            // (once the disk has room again) does not find its name taken.
            let _ = std::fs::remove_file(&path);
            return Err(e.into());
        }
        inner.files.insert(
            n,
            Segment {
                file: Arc::new(file),
                len: SEG_HEAD,
            },
        );
        inner.active = n;
        inner.active_len = SEG_HEAD;
        inner.dir_dirty = true;
        // Synced with the next sync, like the directory entry.
        inner.dirty.push(n);
        Ok(())
    }

    /// Remove the segments no store counted at open.
    pub fn finish_open(&self) -> Result<(), StoreError> {
        let mut inner = self.lock();
        for n in inner.unused() {
            inner.files.remove(&n);
            std::fs::remove_file(self.dir.join(seg_name(n)))?;
        }
        sync_dir(&self.dir)?;
        inner.dir_dirty = false;
        inner.counted = true;
        Ok(())
    }

    /// Append a body; the returned reference is counted once (for the
    /// record that will hold it). Durable after the next [`Bodies::sync`].
    pub fn append(&self, body: &[u8]) -> Result<BodyRef, StoreError> {
        let w = self.append_record(KIND_BODY, &[body], false, |_| Ok(Vec::new()))?;
        Ok(w.bodies[0])
    }

    /// Append one record: `bodies`, then the metadata `meta` makes from
    /// their references. Each body reference is counted once, and the
    /// metadata's too if `count_meta` (a log entry: the log holds it).
    /// Durable after the next [`Bodies::sync`].
    pub(crate) fn append_record(
        &self,
        kind: u8,
        bodies: &[&[u8]],
        count_meta: bool,
        meta: impl FnOnce(&[BodyRef]) -> Result<Vec<u8>, StoreError>,
    ) -> Result<Written, StoreError> {
        let mut lens = Vec::with_capacity(bodies.len());
        for b in bodies {
            lens.push(
                u32::try_from(b.len())
                    .map_err(|_| StoreError::Corrupt("a body over 4 GiB".into()))?,
            );
        }
        let crcs: Vec<u32> = bodies.iter().map(|b| crc32fast::hash(b)).collect();
        let bodies_len: u64 = lens.iter().map(|l| u64::from(*l)).sum();
        let mut inner = self.lock();
        if inner.active_len > SEG_HEAD && inner.active_len + REC_HEAD + bodies_len > SEGMENT_BYTES {
            self.roll(&mut inner)?;
        }
        let (seg, start) = (inner.active, inner.active_len);
        let mut off = start + REC_HEAD;
        let mut refs = Vec::with_capacity(bodies.len());
        for (len, crc) in lens.iter().zip(crcs) {
            refs.push(BodyRef {
                seg,
                off,
                len: *len,
                crc,
            });
            off += u64::from(*len);
        }
        let meta = meta(&refs)?;
        let meta_len = u32::try_from(meta.len())
            .map_err(|_| StoreError::Corrupt("record metadata over 4 GiB".into()))?;
        let meta_ref = BodyRef {
            seg,
            off,
            len: meta_len,
            crc: crc32fast::hash(&meta),
        };
        let total = REC_HEAD + bodies_len + u64::from(meta_len);
        let mut buf = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
        buf.extend_from_slice(&[b'S', b'K', kind, 0]);
        buf.extend_from_slice(&meta_len.to_le_bytes());
        buf.extend_from_slice(&bodies_len.to_le_bytes());
        buf.extend_from_slice(&meta_ref.crc.to_le_bytes());
        for b in bodies {
            buf.extend_from_slice(b);
        }
        buf.extend_from_slice(&meta);
        let s = inner
            .files
            .get_mut(&seg)
            .ok_or_else(|| StoreError::Corrupt("active body segment missing".into()))?;
        if let Err(e) = s.file.write_all_at(&buf, start) {
            // Nothing names the bytes; the next append starts over them.
            return Err(e.into());
        }
        s.len = s.len.max(start + total);
        inner.active_len = start + total;
        let counts = refs.len() as u64 + u64::from(count_meta);
        if counts > 0 {
            *inner.refs.entry(seg).or_insert(0) += counts;
        }
        if inner.dirty.last() != Some(&seg) {
            inner.dirty.push(seg);
        }
        Ok(Written {
            at: RecordAt { seg, off: start },
            meta: meta_ref,
            bodies: refs,
        })
    }

    /// The log's records (every kind but bare bodies), in the order they
    /// were written. A segment is read up to its first record that does not
    /// check out: the torn tail a crash left (nothing after it in that
    /// segment was synced; later records go to later segments, as every
    /// open starts a new one). Call at open, before anything is appended.
    pub(crate) fn scan(&self) -> Result<Vec<Scanned>, StoreError> {
        let mut segs: Vec<(u32, Arc<File>, u64)> = {
            let inner = self.lock();
            inner
                .files
                .iter()
                .map(|(n, s)| (*n, s.file.clone(), s.len))
                .collect()
        };
        segs.sort_unstable_by_key(|(n, _, _)| *n);
        let mut out = Vec::new();
        for (seg, file, len) in segs {
            let mut magic = [0u8; SEG_HEAD as usize];
            if len < SEG_HEAD || file.read_exact_at(&mut magic, 0).is_err() || &magic != SEG_MAGIC {
                continue;
            }
            let mut off = SEG_HEAD;
            while off < len {
                match read_record(&file, seg, off, len)? {
                    Read::Record(next, rec) => {
                        if let Some(rec) = rec {
                            out.push(rec);
                        }
                        off = next;
                    }
                    // The zeros after the records of a segment an earlier
                    // build made from a spare.
                    Read::End => break,
                    Read::Torn => {
                        tracing::info!(
                            segment = seg,
                            offset = off,
                            "a segment ends in a record a crash left unfinished; the rest of it is skipped"
                        );
                        break;
                    }
                }
            }
        }
        Ok(out)
    }

    /// Mark log records dead, for good: they lie past a hole in the log (a
    /// crash kept them, not what came before them) and were never reported
    /// durable. Synced before it returns.
    pub(crate) fn kill(&self, records: &[RecordAt]) -> Result<(), StoreError> {
        let mut files: Vec<(u32, Arc<File>)> = Vec::new();
        for r in records {
            let file = {
                let inner = self.lock();
                inner.files.get(&r.seg).map(|s| s.file.clone())
            };
            let Some(file) = file else { continue };
            file.write_all_at(&[KIND_DEAD], r.off + 2)?;
            if !files.iter().any(|(n, _)| *n == r.seg) {
                files.push((r.seg, file));
            }
        }
        for (_, f) in files {
            f.sync_data()?;
        }
        Ok(())
    }

    /// Count one more holder of `r`.
    pub fn retain(&self, r: &BodyRef) {
        *self.lock().refs.entry(r.seg).or_insert(0) += 1;
    }

    /// A holder of `r` is gone from sled's memory; it counts as gone once the
    /// next flush has finished.
    pub fn release(&self, r: &BodyRef) {
        self.lock().released.push(r.seg);
    }

    /// Hold while reading a reference from sled and then its bytes.
    pub fn guard(&self) -> RwLockReadGuard<'_, ()> {
        self.gc.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The bytes of `r`, checked against its CRC.
    pub fn read(&self, r: &BodyRef) -> Result<Bytes, StoreError> {
        let file = {
            let inner = self.lock();
            inner.files.get(&r.seg).map(|s| s.file.clone())
        };
        let file = file.ok_or_else(|| {
            StoreError::Corrupt(format!("body segment {} is missing", seg_name(r.seg)))
        })?;
        let mut buf = vec![0u8; r.len as usize];
        file.read_exact_at(&mut buf, r.off)?;
        if crc32fast::hash(&buf) != r.crc {
            return Err(StoreError::Corrupt(format!(
                "body at {}+{} fails its checksum",
                seg_name(r.seg),
                r.off
            )));
        }
        Ok(Bytes::from(buf))
    }

    /// The releases so far, to apply once the sled flush that starts after
    /// this call has finished ([`Bodies::settle`]).
    pub fn take_releases(&self) -> Settling {
        Settling(std::mem::take(&mut self.lock().released))
    }

    /// Releases whose flush failed: they wait for the next one.
    pub fn restore(&self, settling: Settling) {
        self.lock().released.extend(settling.0);
    }

    /// Make every appended body durable. Call before each sled flush.
    pub fn sync(&self) -> Result<(), StoreError> {
        let _one = self.syncing.lock().unwrap_or_else(|p| p.into_inner());
        let (files, dir_dirty) = {
            let mut inner = self.lock();
            let dirty = std::mem::take(&mut inner.dirty);
            let files: Vec<Arc<File>> = dirty
                .iter()
                .filter_map(|n| inner.files.get(n).map(|s| s.file.clone()))
                .collect();
            (files, std::mem::replace(&mut inner.dir_dirty, false))
        };
        let r = (|| {
            for f in &files {
                f.sync_data()?;
            }
            if dir_dirty {
                sync_dir(&self.dir)?;
            }
            Ok::<_, std::io::Error>(())
        })();
        if let Err(e) = r {
            self.lock().dir_dirty |= dir_dirty;
            return Err(e.into());
        }
        Ok(())
    }

    /// The flush after [`Bodies::take_releases`] has finished: apply them
    /// and unlink the segments nothing refers to any more.
    pub fn settle(&self, settling: Settling) {
        let mut inner = self.lock();
        if !inner.counted {
            // Not all references are counted yet: keep the releases for a
            // settle after the open.
            inner.released.extend(settling.0);
            return;
        }
        for seg in settling.0 {
            if let Some(c) = inner.refs.get_mut(&seg) {
                *c = c.saturating_sub(1);
                if *c == 0 {
                    inner.refs.remove(&seg);
                }
            }
        }
        // A drained active segment is swapped for an empty one, so an idle
        // queue keeps no dead bodies at all.
        if inner.active_len > SEG_HEAD && !inner.refs.contains_key(&inner.active) {
            if let Err(e) = self.roll(&mut inner) {
                tracing::warn!(error = %e, "could not start a new body segment");
            }
        }
        let unused = inner.unused();
        if unused.is_empty() {
            return;
        }
        // A reader between sled and the file keeps the segment for now; the
        // next settle tries again.
        let Ok(_gc) = self.gc.try_write() else { return };
        for n in unused {
            inner.files.remove(&n);
            if let Err(e) = std::fs::remove_file(self.dir.join(seg_name(n))) {
                tracing::warn!(segment = n, error = %e, "could not remove a body segment");
            }
        }
        inner.dir_dirty = true;
    }

    /// Releases are waiting for a flush.
    pub fn has_releases(&self) -> bool {
        !self.lock().released.is_empty()
    }

    /// Try again to unlink segments a reader kept at the last settle.
    pub fn collect(&self) {
        self.settle(Settling(Vec::new()));
    }

    /// Bytes the segments occupy.
    pub fn disk_size(&self) -> u64 {
        self.lock().files.values().map(|s| s.len).sum()
    }

    /// Segment files present (for tests and metrics).
    pub fn segments(&self) -> usize {
        self.lock().files.len()
    }
}

/// What [`read_record`] found.
enum Read {
    /// The offset after the record and, unless it is a bare body or dead,
    /// the record.
    Record(u64, Option<Scanned>),
    /// Nothing more was written here: the segment's end, or a header of
    /// zeros (of a spare an earlier build made the segment from).
    End,
    /// A record that does not check out: a torn tail.
    Torn,
}

/// The record at `off` of segment `seg` (length `len`).
fn read_record(file: &File, seg: u32, off: u64, len: u64) -> Result<Read, StoreError> {
    let mut h = [0u8; REC_HEAD as usize];
    let n = len.saturating_sub(off).min(REC_HEAD) as usize;
    file.read_exact_at(&mut h[..n], off)?;
    if h[..n].iter().all(|b| *b == 0) {
        return Ok(Read::End);
    }
    if n < REC_HEAD as usize {
        return Ok(Read::Torn);
    }
    let kind = h[2];
    if h[0] != b'S' || h[1] != b'K' || h[3] != 0 {
        return Ok(Read::Torn);
    }
    let meta_len = u64::from(u32::from_le_bytes([h[4], h[5], h[6], h[7]]));
    let bodies_len = u64::from_le_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]);
    let crc = u32::from_le_bytes([h[16], h[17], h[18], h[19]]);
    let Some(end) = (off + REC_HEAD)
        .checked_add(bodies_len)
        .and_then(|e| e.checked_add(meta_len))
        .filter(|e| *e <= len)
    else {
        return Ok(Read::Torn);
    };
    if !matches!(kind, KIND_ENTRY | KIND_BODY | KIND_TRUNCATE | KIND_DEAD) {
        return Ok(Read::Torn);
    }
    let meta_off = off + REC_HEAD + bodies_len;
    let mut meta = vec![0u8; meta_len as usize];
    file.read_exact_at(&mut meta, meta_off)?;
    if crc32fast::hash(&meta) != crc {
        return Ok(Read::Torn);
    }
    if matches!(kind, KIND_BODY | KIND_DEAD) {
        return Ok(Read::Record(end, None));
    }
    Ok(Read::Record(
        end,
        Some(Scanned {
            kind,
            at: RecordAt { seg, off },
            meta_ref: BodyRef {
                seg,
                off: meta_off,
                len: meta_len as u32,
                crc,
            },
            meta,
        }),
    ))
}
