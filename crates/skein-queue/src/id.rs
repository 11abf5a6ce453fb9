//! Message ids: made by the accepting node, unique in the cluster, sortable by time.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// A queue id: 48 bits of milliseconds since the Unix epoch, 32 bits of the
/// accepting node's id and a 48-bit per-process sequence that starts at a random
/// value. The node part makes ids from different nodes distinct; the random start
/// keeps a restarted node from reusing an id within the same millisecond.
///
/// Shown as 26 characters of Crockford base32, like a ULID, so ids sort by
/// acceptance time in `skeinctl queue list` and logs.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MessageId(pub u128);

const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
const LEN: usize = 26;

impl MessageId {
    /// Milliseconds since the epoch at which the accepting node made the id.
    pub fn millis(&self) -> u64 {
        (self.0 >> 80) as u64
    }

    /// The node that accepted the message.
    pub fn node(&self) -> u64 {
        ((self.0 >> 48) & 0xFFFF_FFFF) as u64
    }

    /// Big-endian bytes: keys in sled sort like the ids.
    pub fn to_bytes(&self) -> [u8; 16] {
        self.0.to_be_bytes()
    }

    pub fn from_bytes(b: [u8; 16]) -> Self {
        MessageId(u128::from_be_bytes(b))
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = [0u8; LEN];
        let mut v = self.0;
        for slot in out.iter_mut().rev() {
            *slot = ALPHABET[(v & 31) as usize];
            v >>= 5;
        }
        // Only ASCII from ALPHABET was written.
        f.write_str(std::str::from_utf8(&out).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a queue id: expected 26 characters of Crockford base32")]
pub struct BadMessageId;

impl FromStr for MessageId {
    type Err = BadMessageId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != LEN {
            return Err(BadMessageId);
        }
        let mut v: u128 = 0;
        for (i, c) in s.bytes().enumerate() {
            let c = c.to_ascii_uppercase();
            // Crockford: I and L read as 1, O as 0.
            let c = match c {
                b'I' | b'L' => b'1',
                b'O' => b'0',
                c => c,
            };
            let d = ALPHABET.iter().position(|&a| a == c).ok_or(BadMessageId)? as u128;
            // The first character carries only the top 3 bits of 128.
            if i == 0 && d > 7 {
                return Err(BadMessageId);
            }
            v = (v << 5) | d;
        }
        Ok(MessageId(v))
    }
}

/// Makes ids for one node. One per node, never a process-wide global, so that
/// several nodes can run in one process.
#[derive(Debug)]
pub struct IdGenerator {
    node: u64,
    seq: AtomicU64,
}

impl IdGenerator {
    pub fn new(node: u64) -> Self {
        IdGenerator {
            node,
            seq: AtomicU64::new(rand_seed() & 0xFFFF_FFFF_FFFF),
        }
    }

    pub fn next(&self, now_millis: u64) -> MessageId {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) & 0xFFFF_FFFF_FFFF;
        let v = ((now_millis as u128 & 0xFFFF_FFFF_FFFF) << 80)
            | ((self.node as u128 & 0xFFFF_FFFF) << 48)
            | seq as u128;
        MessageId(v)
    }
}

/// A seed that differs between process starts; it needs no cryptographic quality.
fn rand_seed() -> u64 {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_parse_round_trip() {
        let g = IdGenerator::new(7);
        for t in [0u64, 1, 1_700_000_000_000, (1 << 48) - 1] {
            let id = g.next(t);
            let s = id.to_string();
            assert_eq!(s.len(), 26);
            assert_eq!(s.parse::<MessageId>().unwrap(), id);
            assert_eq!(s.to_lowercase().parse::<MessageId>().unwrap(), id);
            assert_eq!(id.millis(), t);
            assert_eq!(id.node(), 7);
        }
        assert_eq!(
            MessageId(u128::MAX)
                .to_string()
                .parse::<MessageId>()
                .unwrap(),
            MessageId(u128::MAX)
        );
    }

    #[test]
    fn ids_sort_by_time_and_are_distinct() {
        let a = IdGenerator::new(1);
        let b = IdGenerator::new(2);
        let x = a.next(1000);
        let y = b.next(1000);
        let z = a.next(1001);
        assert_ne!(x, y);
        assert!(x < z && y < z);
    }

    #[test]
    fn bad_ids_are_refused() {
        for s in [
            "",
            "abc",
            "8ZZZZZZZZZZZZZZZZZZZZZZZZZ",
            "0000000000000000000000000U",
            "00000000000000000000000000X",
        ] {
            assert!(s.parse::<MessageId>().is_err(), "{s}");
        }
    }
}
