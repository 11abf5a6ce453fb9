//! Large values stored as runs of small ones.
//!
//! sled 0.34 keeps pages holding large values (from about 64 KiB) in memory
//! whatever its cache size, so a queue of big messages would sit in RAM. Split
//! into chunks of at most [`CHUNK`] bytes, the same data stays within the
//! cache (measured: 1 GiB and 3 GiB of 1 MiB values use ~1 GiB resident whole,
//! ~80 MiB chunked). A value is stored under `prefix ++ u32 chunk number`.

use super::StoreError;

pub const CHUNK: usize = 8 << 10;

fn key(prefix: &[u8], n: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + 4);
    k.extend_from_slice(prefix);
    k.extend_from_slice(&n.to_be_bytes());
    k
}

/// Write `value` under `prefix` (at least one chunk, even when empty).
pub fn insert(batch: &mut sled::Batch, prefix: &[u8], value: &[u8]) {
    if value.is_empty() {
        batch.insert(key(prefix, 0), &[][..]);
        return;
    }
    for (n, c) in value.chunks(CHUNK).enumerate() {
        batch.insert(key(prefix, n as u32), c);
    }
}

/// The value under `prefix`, or `None` when there is none.
pub fn get(tree: &sled::Tree, prefix: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
    let mut out: Option<Vec<u8>> = None;
    for kv in tree.scan_prefix(prefix) {
        let (_, v) = kv?;
        out.get_or_insert_with(Vec::new).extend_from_slice(&v);
    }
    Ok(out)
}

/// Group the chunked values of an ordered key range by their prefix of
/// `prefix_len` bytes: `(prefix, value)` in key order.
pub fn group(
    iter: impl Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>,
    prefix_len: usize,
) -> impl Iterator<Item = Result<(Vec<u8>, Vec<u8>), StoreError>> {
    let mut iter = iter.peekable();
    std::iter::from_fn(move || {
        let (k, v) = match iter.next()? {
            Ok(kv) => kv,
            Err(e) => return Some(Err(e.into())),
        };
        let prefix = k.get(..prefix_len).unwrap_or(&k).to_vec();
        let mut value = v.to_vec();
        while let Some(Ok((k2, _))) = iter.peek() {
            if k2.get(..prefix_len) != Some(&prefix[..]) {
                break;
            }
            match iter.next() {
                Some(Ok((_, v2))) => value.extend_from_slice(&v2),
                Some(Err(e)) => return Some(Err(e.into())),
                None => break,
            }
        }
        Some(Ok((prefix, value)))
    })
}
