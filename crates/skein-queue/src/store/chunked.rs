//! Log entries under `index ++ u32 chunk number` keys.
//!
//! Entries were once split into 8 KiB chunks, for sled 0.34 keeps pages with
//! large values in memory whatever its cache size; that mattered while bodies
//! were in sled. Bodies now live in segments and entries leave the log soon,
//! so an entry is written as chunk 0 alone (one insert, atomic, and no sled
//! batch on the hot path). Reads still join every chunk under a prefix, so
//! logs written either way read back the same.

use super::StoreError;

/// The key of chunk `n` of the value under `prefix`.
pub fn key(prefix: &[u8], n: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + 4);
    k.extend_from_slice(prefix);
    k.extend_from_slice(&n.to_be_bytes());
    k
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
