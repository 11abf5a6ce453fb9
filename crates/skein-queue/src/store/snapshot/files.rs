//! The snapshot directory, `<data_dir>/snapshots`: the current snapshot
//! (`current.snap`), temporary files while one is built or installed
//! (removed if left over at open), and publishing a finished one in place.

use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::SnapshotReader;
use crate::store::StoreError;
use crate::SnapshotMeta;

/// The file of the current snapshot.
pub(crate) const CURRENT: &str = "current.snap";

/// The snapshot directory and what its current snapshot holds.
pub(crate) struct SnapshotFiles {
    pub(crate) dir: PathBuf,
    pub(crate) current: Mutex<Option<SnapshotMeta>>,
    pub(crate) seq: AtomicU64,
}

impl SnapshotFiles {
    pub(crate) fn open(dir: PathBuf) -> Result<Self, StoreError> {
        // Leftovers of builds or transfers cut short.
        for e in std::fs::read_dir(&dir)? {
            let p = e?.path();
            if p.extension().is_some_and(|x| x == "tmp") {
                let _ = std::fs::remove_file(&p);
            }
        }
        let current = match std::fs::File::open(dir.join(CURRENT)) {
            Ok(f) => Some(SnapshotReader::open(BufReader::new(f))?.0.meta),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e.into()),
        };
        Ok(SnapshotFiles {
            dir,
            current: Mutex::new(current),
            seq: AtomicU64::new(0),
        })
    }

    pub(crate) fn temp(&self, what: &str) -> Result<(PathBuf, std::fs::File), StoreError> {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.join(format!("{what}-{n}.tmp"));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        Ok((path, f))
    }

    /// Make the file at `path` the current snapshot, unless a newer one is
    /// already current (a build that finished after an install). `force` is
    /// for installs, which always replace.
    pub(crate) fn publish(
        &self,
        path: &Path,
        meta: &SnapshotMeta,
        force: bool,
    ) -> Result<bool, StoreError> {
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let newer = cur
            .as_ref()
            .is_none_or(|c| c.last_log_id <= meta.last_log_id);
        if !(force || newer) {
            std::fs::remove_file(path)?;
            return Ok(false);
        }
        std::fs::rename(path, self.dir.join(CURRENT))?;
        std::fs::File::open(&self.dir)?.sync_all()?;
        *cur = Some(meta.clone());
        Ok(true)
    }
}

/// Copies everything read from `r` into `w`.
pub(crate) struct Tee<R, W> {
    pub(crate) r: R,
    pub(crate) w: W,
}

impl<R: Read, W: Write> Read for Tee<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.r.read(buf)?;
        self.w.write_all(&buf[..n])?;
        Ok(n)
    }
}
