//! Any bytes as a snapshot (from a peer's InstallSnapshot, or a backup
//! file to restore): reading never panics, never allocates on a declared
//! length before the data is there, and verification agrees with reading
//! every message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use skein_queue::store::snapshot::{verify, SnapshotReader};

fuzz_target!(|data: &[u8]| {
    let verified = verify(data).is_ok();
    let mut read = false;
    if let Ok((_, mut r)) = SnapshotReader::open(data) {
        read = loop {
            match r.next_message() {
                Ok(Some(_)) => {}
                Ok(None) => break true,
                Err(_) => break false,
            }
        };
    }
    assert_eq!(verified, read, "verify and a full read disagree");
});
