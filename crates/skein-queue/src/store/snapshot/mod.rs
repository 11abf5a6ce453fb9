//! The snapshot file format, streamed in both directions so that a queue of
//! gigabytes never has to sit in memory.
//!
//! ```text
//! "SKEINSN2"
//! u32 LE length, postcard(SnapshotHeader)
//! per message: u32 LE length, postcard(Message), u64 LE length, body
//! u32 LE CRC-32 of everything before it
//! ```
//! The same format serves `skeinctl backup`. "SKEINSN1" files (before the
//! header carried MTA-STS policies) are still read.
//!
//! Beside the format: [`files`] (the snapshot directory), `build` (writing
//! one from the queue) and `install` (loading a received one).

pub(crate) mod build;
pub(crate) mod files;
pub(crate) mod install;

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

use super::StoreError;
use crate::{Message, SnapshotMeta, StsPolicy};

const MAGIC: &[u8; 8] = b"SKEINSN2";
/// The format before the header carried MTA-STS policies.
const MAGIC_V1: &[u8; 8] = b"SKEINSN1";
/// A message record is metadata only; anything larger is corruption.
const MAX_RECORD: u32 = 64 << 20;
/// No message body is larger than this (twice the largest
/// `smtp.max_message_size` allowed): a declared length above it is
/// corruption, refused before anything is read.
pub const MAX_BODY: u64 = 1 << 30;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotHeader {
    pub meta: SnapshotMeta,
    pub cluster_time: u64,
    pub messages: u64,
    /// Recipient domains' MTA-STS policies.
    pub sts: Vec<StsPolicy>,
}

/// The header of a "SKEINSN1" file.
#[derive(Deserialize)]
struct HeaderV1 {
    meta: SnapshotMeta,
    cluster_time: u64,
    messages: u64,
}

pub struct SnapshotWriter<W: Write> {
    w: W,
    crc: crc32fast::Hasher,
}

impl<W: Write> SnapshotWriter<W> {
    pub fn new(w: W, header: &SnapshotHeader) -> Result<Self, StoreError> {
        let mut s = SnapshotWriter {
            w,
            crc: crc32fast::Hasher::new(),
        };
        s.put(MAGIC)?;
        let h = postcard::to_stdvec(header)?;
        s.put(&(h.len() as u32).to_le_bytes())?;
        s.put(&h)?;
        Ok(s)
    }

    pub fn add(&mut self, m: &Message, body: &[u8]) -> Result<(), StoreError> {
        let rec = postcard::to_stdvec(m)?;
        self.put(&(rec.len() as u32).to_le_bytes())?;
        self.put(&rec)?;
        self.put(&(body.len() as u64).to_le_bytes())?;
        self.put(body)?;
        Ok(())
    }

    pub fn finish(mut self) -> Result<W, StoreError> {
        let crc = self.crc.clone().finalize();
        self.w.write_all(&crc.to_le_bytes())?;
        self.w.flush()?;
        Ok(self.w)
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.crc.update(b);
        self.w.write_all(b)
    }
}

pub struct SnapshotReader<R: Read> {
    r: R,
    crc: crc32fast::Hasher,
    remaining: u64,
}

impl<R: Read> SnapshotReader<R> {
    pub fn open(r: R) -> Result<(SnapshotHeader, Self), StoreError> {
        let mut s = SnapshotReader {
            r,
            crc: crc32fast::Hasher::new(),
            remaining: 0,
        };
        let mut magic = [0u8; 8];
        s.take(&mut magic)?;
        if &magic != MAGIC && &magic != MAGIC_V1 {
            return Err(StoreError::Corrupt("not a Skein snapshot".into()));
        }
        let len = s.take_u32()?;
        if len > MAX_RECORD {
            return Err(StoreError::Corrupt("snapshot header too large".into()));
        }
        let h = s.take_len(len as u64)?;
        let header: SnapshotHeader = if &magic == MAGIC_V1 {
            let v1: HeaderV1 = postcard::from_bytes(&h)?;
            SnapshotHeader {
                meta: v1.meta,
                cluster_time: v1.cluster_time,
                messages: v1.messages,
                sts: Vec::new(),
            }
        } else {
            postcard::from_bytes(&h)?
        };
        s.remaining = header.messages;
        Ok((header, s))
    }

    /// The next message and its body; `None` after the last one, once the
    /// checksum has been verified.
    pub fn next_message(&mut self) -> Result<Option<(Message, Vec<u8>)>, StoreError> {
        let Some((m, blen)) = self.next_head()? else {
            return Ok(None);
        };
        let body = self.take_len(blen)?;
        Ok(Some((m, body)))
    }

    /// Like [`Self::next_message`], but the body only passes through the
    /// checksum, unkept: a snapshot of any size is checked in little memory.
    pub fn skip_message(&mut self) -> Result<Option<Message>, StoreError> {
        let Some((m, blen)) = self.next_head()? else {
            return Ok(None);
        };
        let mut sink = CrcSink(&mut self.crc);
        let n = io::copy(&mut (&mut self.r).take(blen), &mut sink)?;
        if n != blen {
            return Err(StoreError::Corrupt("snapshot truncated".into()));
        }
        Ok(Some(m))
    }

    /// The next message record and its body's declared length, both
    /// checked against the limits; after the last one, the checksum is
    /// verified and the answer is `None`.
    fn next_head(&mut self) -> Result<Option<(Message, u64)>, StoreError> {
        if self.remaining == 0 {
            let expected = self.crc.clone().finalize();
            let mut b = [0u8; 4];
            self.r.read_exact(&mut b)?;
            if u32::from_le_bytes(b) != expected {
                return Err(StoreError::Corrupt("snapshot checksum mismatch".into()));
            }
            return Ok(None);
        }
        self.remaining -= 1;
        let len = self.take_u32()?;
        if len > MAX_RECORD {
            return Err(StoreError::Corrupt("snapshot record too large".into()));
        }
        let rec = self.take_len(len as u64)?;
        let m: Message = postcard::from_bytes(&rec)?;
        let mut b = [0u8; 8];
        self.take(&mut b)?;
        let blen = u64::from_le_bytes(b);
        if blen > MAX_BODY {
            return Err(StoreError::Corrupt("snapshot body too large".into()));
        }
        Ok(Some((m, blen)))
    }

    pub fn into_inner(self) -> R {
        self.r
    }

    fn take(&mut self, buf: &mut [u8]) -> Result<(), StoreError> {
        self.r.read_exact(buf).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => StoreError::Corrupt("snapshot truncated".into()),
            _ => StoreError::Io(e),
        })?;
        self.crc.update(buf);
        Ok(())
    }

    /// `len` bytes, read as they come: memory grows with the data really
    /// there, never ahead of it on a declared length alone.
    fn take_len(&mut self, len: u64) -> Result<Vec<u8>, StoreError> {
        let mut out = Vec::with_capacity(len.min(64 << 10) as usize);
        (&mut self.r).take(len).read_to_end(&mut out)?;
        if out.len() as u64 != len {
            return Err(StoreError::Corrupt("snapshot truncated".into()));
        }
        self.crc.update(&out);
        Ok(out)
    }

    fn take_u32(&mut self) -> Result<u32, StoreError> {
        let mut b = [0u8; 4];
        self.take(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }
}

/// Counts what is written into a checksum, and keeps nothing.
struct CrcSink<'a>(&'a mut crc32fast::Hasher);

impl Write for CrcSink<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Reads a whole snapshot through, without keeping it: every declared
/// length checked before anything is read, every message decoded, the
/// checksum compared. What passes can be installed; what does not is
/// refused before it touches the store.
pub fn verify<R: Read>(r: R) -> Result<SnapshotHeader, StoreError> {
    let (header, mut reader) = SnapshotReader::open(r)?;
    while reader.skip_message()?.is_some() {}
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(messages: u64) -> SnapshotHeader {
        SnapshotHeader {
            meta: SnapshotMeta::default(),
            cluster_time: 7,
            messages,
            sts: Vec::new(),
        }
    }

    #[test]
    fn policies_travel_in_the_header_and_an_old_file_still_reads() {
        let mut h = header(0);
        h.sts.push(StsPolicy {
            domain: "example.org".into(),
            id: "20261130".into(),
            mode: crate::StsMode::Enforce,
            mx: vec!["*.example.org".into()],
            max_age: 86400,
            expires: 1_800_000_000,
        });
        let bytes = SnapshotWriter::new(Vec::new(), &h)
            .unwrap()
            .finish()
            .unwrap();
        assert_eq!(verify(&bytes[..]).unwrap(), h);

        // "SKEINSN1": the same header without policies.
        let mut v = Vec::new();
        v.extend_from_slice(MAGIC_V1);
        let old = postcard::to_stdvec(&(SnapshotMeta::default(), 7u64, 0u64)).unwrap();
        v.extend_from_slice(&(old.len() as u32).to_le_bytes());
        v.extend_from_slice(&old);
        let crc = crc32fast::hash(&v);
        v.extend_from_slice(&crc.to_le_bytes());
        assert_eq!(verify(&v[..]).unwrap(), header(0));
    }

    #[test]
    fn absurd_declared_sizes_are_refused_without_reading_ahead() {
        // A header that declares more messages than there are.
        let mut w = SnapshotWriter::new(Vec::new(), &header(u64::MAX)).unwrap();
        w.put(&4u32.to_le_bytes()).unwrap();
        let bytes = w.finish().unwrap();
        assert!(verify(&bytes[..]).is_err());

        // A record, and a body, longer than the limits.
        for (rec, body) in [(u32::MAX, 0u64), (8, u64::MAX), (8, MAX_BODY + 1)] {
            let mut v = Vec::new();
            v.extend_from_slice(MAGIC);
            let h = postcard::to_stdvec(&header(1)).unwrap();
            v.extend_from_slice(&(h.len() as u32).to_le_bytes());
            v.extend_from_slice(&h);
            v.extend_from_slice(&rec.to_le_bytes());
            v.extend_from_slice(&[0u8; 8]);
            v.extend_from_slice(&body.to_le_bytes());
            let e = verify(&v[..]).unwrap_err();
            assert!(matches!(e, StoreError::Corrupt(_)), "{e:?}");
        }
    }

    #[test]
    fn a_written_snapshot_verifies_and_a_flipped_byte_does_not() {
        let w = SnapshotWriter::new(Vec::new(), &header(0)).unwrap();
        let mut bytes = w.finish().unwrap();
        assert_eq!(verify(&bytes[..]).unwrap(), header(0));
        let last = bytes.len() - 5;
        bytes[last] ^= 1;
        assert!(verify(&bytes[..]).is_err());
    }
}
