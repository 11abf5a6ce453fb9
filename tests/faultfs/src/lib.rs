//! Disk faults for one process, injected with `LD_PRELOAD`.
//!
//! The fault campaign starts each node with this library preloaded and
//! `SKEIN_FAULTFS` naming a control file. The library maps the file's first
//! four bytes (a little-endian `u32`, shared with the campaign) and reads
//! them on every call it wraps:
//!
//! - `0`: nothing changes;
//! - `1`: **full disk** — `write`, `pwrite64`, `writev`, `pwritev64` and
//!   `fallocate64` on regular files under `SKEIN_FAULTFS_DIR` (the data
//!   directory) fail with `ENOSPC`, as on a full data volume (logs, pipes and
//!   sockets are left alone);
//! - `n ≥ 2`: **slow disk** — every `fsync` and `fdatasync` first waits
//!   `n` milliseconds, as on a saturated or network block device.
//!
//! Everything else goes to the real C library (`dlsym(RTLD_NEXT, …)`). The
//! library never calls Rust I/O, which would come back through these
//! wrappers.

#![allow(clippy::missing_safety_doc)]

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use libc::{c_char, c_int, c_void, iovec, off64_t, size_t, ssize_t};

const FULL: u32 = 1;

/// Address of the mapped control word; 1 while not yet mapped, 0 for none.
static CONTROL: AtomicUsize = AtomicUsize::new(1);

unsafe fn map_control() -> usize {
    let name = libc::getenv(c"SKEIN_FAULTFS".as_ptr());
    if name.is_null() {
        return 0;
    }
    let fd = libc::open(name as *const c_char, libc::O_RDONLY | libc::O_CLOEXEC);
    if fd < 0 {
        return 0;
    }
    let p = libc::mmap(
        std::ptr::null_mut(),
        4096,
        libc::PROT_READ,
        libc::MAP_SHARED,
        fd,
        0,
    );
    libc::close(fd);
    if p == libc::MAP_FAILED {
        0
    } else {
        p as usize
    }
}

fn mode() -> u32 {
    let mut p = CONTROL.load(Ordering::Acquire);
    if p == 1 {
        p = unsafe { map_control() };
        CONTROL.store(p, Ordering::Release);
    }
    if p == 0 {
        return 0;
    }
    // SAFETY: p is a live shared mapping of at least four bytes, never unmapped.
    unsafe { (*(p as *const AtomicU32)).load(Ordering::Relaxed) }
}

unsafe fn regular(fd: c_int) -> bool {
    let mut st: libc::stat64 = std::mem::zeroed();
    libc::fstat64(fd, &mut st) == 0 && (st.st_mode & libc::S_IFMT) == libc::S_IFREG
}

/// Whether `fd` is a file under `SKEIN_FAULTFS_DIR` (any file when unset).
unsafe fn in_dir(fd: c_int) -> bool {
    let dir = libc::getenv(c"SKEIN_FAULTFS_DIR".as_ptr());
    if dir.is_null() {
        return true;
    }
    let dir = std::ffi::CStr::from_ptr(dir).to_bytes();
    // "/proc/self/fd/<fd>", built without allocating.
    let mut link = [0u8; 40];
    let prefix = b"/proc/self/fd/";
    link[..prefix.len()].copy_from_slice(prefix);
    let mut digits = [0u8; 12];
    let (mut n, mut i) = (fd as u32, digits.len());
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let len = digits.len() - i;
    link[prefix.len()..prefix.len() + len].copy_from_slice(&digits[i..]);
    let mut target = [0u8; 4096];
    let got = libc::readlink(
        link.as_ptr() as *const c_char,
        target.as_mut_ptr() as *mut c_char,
        target.len(),
    );
    let path = &target[..got.max(0) as usize];
    path.starts_with(dir) && matches!(path.get(dir.len()), None | Some(b'/'))
}

unsafe fn full(fd: c_int) -> bool {
    if mode() == FULL && regular(fd) && in_dir(fd) {
        *libc::__errno_location() = libc::ENOSPC;
        true
    } else {
        false
    }
}

fn slow() {
    let m = mode();
    if m > FULL {
        unsafe { libc::usleep(m.saturating_mul(1000)) };
    }
}

/// The next definition of `name` (the C library's), looked up once.
macro_rules! real {
    ($name:literal, $ty:ty) => {{
        static P: AtomicUsize = AtomicUsize::new(0);
        let mut p = P.load(Ordering::Relaxed);
        if p == 0 {
            p = libc::dlsym(
                libc::RTLD_NEXT,
                concat!($name, "\0").as_ptr() as *const c_char,
            ) as usize;
            P.store(p, Ordering::Relaxed);
        }
        std::mem::transmute::<usize, $ty>(p)
    }};
}

#[no_mangle]
pub unsafe extern "C" fn write(fd: c_int, buf: *const c_void, n: size_t) -> ssize_t {
    if full(fd) {
        return -1;
    }
    real!(
        "write",
        unsafe extern "C" fn(c_int, *const c_void, size_t) -> ssize_t
    )(fd, buf, n)
}

#[no_mangle]
pub unsafe extern "C" fn pwrite64(
    fd: c_int,
    buf: *const c_void,
    n: size_t,
    off: off64_t,
) -> ssize_t {
    if full(fd) {
        return -1;
    }
    real!(
        "pwrite64",
        unsafe extern "C" fn(c_int, *const c_void, size_t, off64_t) -> ssize_t
    )(fd, buf, n, off)
}

#[no_mangle]
pub unsafe extern "C" fn writev(fd: c_int, iov: *const iovec, n: c_int) -> ssize_t {
    if full(fd) {
        return -1;
    }
    real!(
        "writev",
        unsafe extern "C" fn(c_int, *const iovec, c_int) -> ssize_t
    )(fd, iov, n)
}

#[no_mangle]
pub unsafe extern "C" fn pwritev64(
    fd: c_int,
    iov: *const iovec,
    n: c_int,
    off: off64_t,
) -> ssize_t {
    if full(fd) {
        return -1;
    }
    real!(
        "pwritev64",
        unsafe extern "C" fn(c_int, *const iovec, c_int, off64_t) -> ssize_t
    )(fd, iov, n, off)
}

#[no_mangle]
pub unsafe extern "C" fn fallocate64(fd: c_int, mode: c_int, off: off64_t, len: off64_t) -> c_int {
    if full(fd) {
        return -1;
    }
    real!(
        "fallocate64",
        unsafe extern "C" fn(c_int, c_int, off64_t, off64_t) -> c_int
    )(fd, mode, off, len)
}

#[no_mangle]
pub unsafe extern "C" fn fsync(fd: c_int) -> c_int {
    slow();
    real!("fsync", unsafe extern "C" fn(c_int) -> c_int)(fd)
}

#[no_mangle]
pub unsafe extern "C" fn fdatasync(fd: c_int) -> c_int {
    slow();
    real!("fdatasync", unsafe extern "C" fn(c_int) -> c_int)(fd)
}
