//! What a log sync costs depending on where the appended bytes land: at the
//! end of a file that grows (what the log store does), over zeros written
//! ahead (spare segments, tried and given up: docs/performance.md), or over
//! space reserved with `fallocate`. Each way appends records of one size, each followed by
//! `fdatasync`, and reports wall time and CPU time (this thread's) per sync.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

/// How the file under the appends was prepared.
#[derive(Clone, Copy, Debug)]
pub enum Under {
    /// Nothing: every append grows the file.
    Growing,
    /// Zeros written and synced first (a spare segment, as once tried).
    Zeros,
    /// `fallocate`d: reserved, but marked unwritten.
    Fallocated,
}

pub const ALL: [Under; 3] = [Under::Growing, Under::Zeros, Under::Fallocated];

/// Per sync, on average.
pub struct Cost {
    pub wall: Duration,
    pub cpu: Duration,
}

fn thread_cpu() -> Duration {
    // SAFETY: getrusage writes into the zeroed struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut u) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(u.ru_utime) + tv(u.ru_stime)
}

fn prepare(path: &Path, under: Under, bytes: u64) -> std::io::Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    match under {
        Under::Growing => {}
        Under::Zeros => {
            let zeros = vec![0u8; 1 << 20];
            let mut off = 0;
            while off < bytes {
                let n = (bytes - off).min(zeros.len() as u64) as usize;
                f.write_all_at(&zeros[..n], off)?;
                off += n as u64;
            }
        }
        Under::Fallocated => {
            // SAFETY: a plain syscall on an open descriptor.
            let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, bytes as libc::off_t) };
            if r != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    f.sync_all()?;
    Ok(f)
}

/// `count` appends of `record` bytes to a new file in `dir` prepared as
/// `under`, each followed by a sync.
pub fn measure(dir: &Path, under: Under, record: usize, count: usize) -> std::io::Result<Cost> {
    let path = dir.join("skein-sync-bench.seg");
    let f = prepare(&path, under, (record * count) as u64)?;
    let data: Vec<u8> = (0..record).map(|i| (i * 31 % 251) as u8).collect();
    let (t0, c0) = (Instant::now(), thread_cpu());
    for i in 0..count {
        f.write_all_at(&data, (i * record) as u64)?;
        f.sync_data()?;
    }
    let (wall, cpu) = (t0.elapsed(), thread_cpu().saturating_sub(c0));
    drop(f);
    std::fs::remove_file(&path)?;
    Ok(Cost {
        wall: wall / count as u32,
        cpu: cpu / count as u32,
    })
}
