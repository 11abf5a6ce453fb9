//! Canary mail of a failure drill (`skeinctl drill`): addressed to a
//! reserved domain that never leaves the cluster. The delivery engine
//! "delivers" it to nowhere after [`DELIVERY_TIME`] — long enough that the
//! node delivering holds leases when a drill strikes, so takeover can be
//! measured — and records it like any delivery.
//!
//! The SMTP server takes mail for the domain only with a local part that
//! carries a MAC made with the cluster's admin token: no stranger can use
//! the cluster as a sink.

use std::time::Duration;

/// The domain of canary recipients (RFC 6761 reserves `.invalid`).
pub const DOMAIN: &str = "skein-drill.invalid";

/// How long a canary takes to be "delivered".
pub const DELIVERY_TIME: Duration = Duration::from_millis(1500);

/// The reply recorded for a delivered canary.
pub const REPLY: &str = "250 2.0.0 canary delivered and discarded (skein drill)";

/// The MAC of `label` under `key`, as 16 hex digits.
fn mac(key: &[u8], label: &str) -> String {
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    let tag = ring::hmac::sign(&k, label.as_bytes());
    tag.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The local part of canary `n` of drill `run` (letters, digits and `-`).
pub fn local_part(key: &[u8], run: &str, n: u64) -> String {
    let label = format!("drill-{run}-{n}");
    let m = mac(key, &label);
    format!("{label}-{m}")
}

/// Whether `local` is a canary local part made with `key`.
pub fn verify(key: &[u8], local: &str) -> bool {
    let Some((label, m)) = local.rsplit_once('-') else {
        return false;
    };
    if !label.starts_with("drill-") || m.len() != 16 {
        return false;
    }
    let want = mac(key, label);
    // Constant time: the MAC is what a guesser would be working on (both
    // are 16 hex digits, so the lengths say nothing).
    want.bytes()
        .zip(m.bytes())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_local_parts_made_with_the_key_verify() {
        let l = local_part(b"token-0123456789abcdef", "r1", 7);
        assert!(l.starts_with("drill-r1-7-"), "{l}");
        assert!(verify(b"token-0123456789abcdef", &l));
        assert!(!verify(b"another-token-0123456", &l));
        assert!(!verify(
            b"token-0123456789abcdef",
            "drill-r1-8-0000000000000000"
        ));
        assert!(!verify(b"token-0123456789abcdef", "postmaster"));
        let tampered = l.replace("-7-", "-8-");
        assert!(!verify(b"token-0123456789abcdef", &tampered));
    }
}
