//! Wall-clock time in milliseconds. Used to stamp proposals and to judge
//! leases locally; never read inside the state machine.

use std::time::{SystemTime, UNIX_EPOCH};

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
