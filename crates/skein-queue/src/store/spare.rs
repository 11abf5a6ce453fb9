//! Spare segments: files of zeros written ahead of need, so that the log's
//! appends overwrite blocks already on disk.
//!
//! A sync of a file that grew must write the file's new size as well as the
//! bytes (ext4 without a journal writes the inode in a second, waited-for
//! I/O; with a journal it commits a transaction). A sync of bytes written
//! over blocks the file already has writes the bytes alone. Measured on the
//! project's 2-vCPU test machine, 20 KB appends with a sync each: 490–640 µs
//! and 150–180 µs of CPU per sync growing the file, 245 µs and 100 µs over
//! zeros (`fallocate` gets half way: its extents are marked unwritten and
//! the first write to each is a metadata change again). PostgreSQL fills
//! its WAL segments with zeros for the same reason.
//!
//! So the body segments start as spares: once the active segment is a
//! quarter full, a thread of their own writes [`SEGMENT_BYTES`] of zeros to
//! `spare.tmp`, syncs it and renames it `spare.zero`; the next roll renames
//! the spare to the new segment's name. The log's scan ends a segment at the
//! first record header of zeros. If no spare is ready (the first segment
//! after an open, writing one failed, or the segment filled first), the new
//! segment is an empty file that grows, as before. The price: each
//! segment's bytes are written twice (zeros, then records, off the commit
//! path), and a node holds up to one spare segment more on disk. A node
//! that takes little mail writes no spares.
//!
//! The zeros go to the disk a little at a time. Written whole and synced
//! once, 16 MiB sat in the disk's queue ahead of the log's syncs: three
//! nodes on one disk at 1,200 messages a second each wrote a spare every
//! 1.3 s, and every 1.3 s acceptance stalled (p99 42 ms against 23 without
//! spares). Now each 256 KiB is written out and waited for
//! (`sync_file_range`, without the cache flush of a sync; one sync at the
//! end covers the file) and followed by 2 ms of pause. Timed alone, 20 KiB
//! appends each synced while spares are written beside them: p99 0.6–1.4 ms
//! with no spares, 1.7–4.4 ms (worst 21 ms) with spares written whole,
//! 1.0–1.4 ms paced.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use super::bodies::SEGMENT_BYTES;

/// A spare ready for use: zeros, synced.
const READY: &str = "spare.zero";
/// A spare being written.
const WRITING: &str = "spare.tmp";
/// Zeros written and synced at a time...
const CHUNK: usize = 256 << 10;
/// ...with this pause after each: a spare takes 64 × (a sync of 256 KiB +
/// 2 ms), about 0.2 s here, while the three quarters of a segment before
/// it is needed take 0.3 s to fill at 40 MB/s.
const PAUSE: std::time::Duration = std::time::Duration::from_millis(2);

pub(crate) struct Spares {
    dir: PathBuf,
    ready: Arc<Mutex<Option<File>>>,
    ask: Option<SyncSender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Spares {
    /// Remove the spares an earlier run left and start the thread that
    /// writes them when asked. A `spare.tmp` may be half written; and a
    /// `spare.zero` may not be zeros: a roll renames the spare to its
    /// segment, and the records written to it next can reach the disk while
    /// a crash loses the rename (the directory is synced after the segment,
    /// before any of those records counts as durable) — reused, its old
    /// records would read as the new segment's.
    pub fn start(dir: &Path) -> std::io::Result<Self> {
        for name in [WRITING, READY] {
            match std::fs::remove_file(dir.join(name)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        let ready = Arc::new(Mutex::new(None));
        // One request waiting is enough: the thread makes one spare at a time.
        let (ask, asked) = sync_channel::<()>(1);
        let thread = {
            let (dir, ready) = (dir.to_path_buf(), ready.clone());
            std::thread::Builder::new()
                .name("skein-seg-spare".into())
                .spawn(move || {
                    while asked.recv().is_ok() {
                        if lock(&ready).is_some() {
                            continue;
                        }
                        match write_spare(&dir) {
                            Ok(f) => *lock(&ready) = Some(f),
                            Err(e) => {
                                // The next roll asks again; until then new
                                // segments grow as they are written.
                                tracing::warn!(error = %e, dir = %dir.display(), "could not write a spare body segment");
                                let _ = std::fs::remove_file(dir.join(WRITING));
                            }
                        }
                    }
                })?
        };
        Ok(Spares {
            dir: dir.to_path_buf(),
            ready,
            ask: Some(ask),
            thread: Some(thread),
        })
    }

    /// Have a spare written, unless one is ready or being written.
    pub fn ask(&self) {
        if let Some(a) = &self.ask {
            let _ = a.try_send(());
        }
    }

    /// The ready spare, renamed to `to`; `None` if there is none (or the
    /// rename failed).
    pub fn take(&self, to: &Path) -> Option<File> {
        let spare = lock(&self.ready).take()?;
        match std::fs::rename(self.dir.join(READY), to) {
            Ok(()) => Some(spare),
            Err(e) => {
                tracing::warn!(error = %e, "could not put a spare body segment to use");
                None
            }
        }
    }

    /// Bytes the spare occupies on disk.
    pub fn bytes(&self) -> u64 {
        if lock(&self.ready).is_some() {
            SEGMENT_BYTES
        } else {
            0
        }
    }

    /// Whether a spare is ready (for tests).
    #[cfg(test)]
    pub fn is_ready(&self) -> bool {
        lock(&self.ready).is_some()
    }
}

impl Drop for Spares {
    fn drop(&mut self) {
        // The thread ends once the channel closes; wait for it, so that no
        // spare is being written when the directory has a new owner.
        drop(self.ask.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn lock(m: &Mutex<Option<File>>) -> MutexGuard<'_, Option<File>> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Write `len` bytes at `off` to the disk and wait for them, without the
/// cache flush of a sync (one sync at the end covers the whole file).
#[cfg(target_os = "linux")]
fn write_out(f: &File, off: u64, len: usize) -> std::io::Result<()> {
    use std::os::unix::io::AsRawFd;
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    // SAFETY: a system call on a descriptor `f` keeps open; no memory is passed.
    let r = unsafe { libc::sync_file_range(f.as_raw_fd(), off as i64, len as i64, flags) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn write_out(f: &File, _off: u64, _len: usize) -> std::io::Result<()> {
    f.sync_data()
}

fn write_spare(dir: &Path) -> std::io::Result<File> {
    let path = dir.join(WRITING);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)?;
    let zeros = vec![0u8; CHUNK];
    let mut off = 0;
    while off < SEGMENT_BYTES {
        let n = (SEGMENT_BYTES - off).min(CHUNK as u64) as usize;
        f.write_all_at(&zeros[..n], off)?;
        // A chunk at a time to the disk, with a pause: the log's syncs, on
        // the same disk, wait behind one chunk at most instead of the
        // whole file.
        write_out(&f, off, n)?;
        off += n as u64;
        std::thread::sleep(PAUSE);
    }
    f.sync_data()?;
    std::fs::rename(&path, dir.join(READY))?;
    Ok(f)
}
