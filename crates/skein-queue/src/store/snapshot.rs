//! The snapshot file format, streamed in both directions so that a queue of
//! gigabytes never has to sit in memory.
//!
//! ```text
//! "SKEINSN1"
//! u32 LE length, postcard(SnapshotHeader)
//! per message: u32 LE length, postcard(Message), u64 LE length, body
//! u32 LE CRC-32 of everything before it
//! ```
//! The same format serves `skeinctl backup`.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

use super::StoreError;
use crate::{Message, SnapshotMeta};

const MAGIC: &[u8; 8] = b"SKEINSN1";
/// A message record is metadata only; anything larger is corruption.
const MAX_RECORD: u32 = 64 << 20;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotHeader {
    pub meta: SnapshotMeta,
    pub cluster_time: u64,
    pub messages: u64,
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
        if &magic != MAGIC {
            return Err(StoreError::Corrupt("not a Skein snapshot".into()));
        }
        let len = s.take_u32()?;
        if len > MAX_RECORD {
            return Err(StoreError::Corrupt("snapshot header too large".into()));
        }
        let mut h = vec![0u8; len as usize];
        s.take(&mut h)?;
        let header: SnapshotHeader = postcard::from_bytes(&h)?;
        s.remaining = header.messages;
        Ok((header, s))
    }

    /// The next message and its body; `None` after the last one, once the
    /// checksum has been verified.
    pub fn next_message(&mut self) -> Result<Option<(Message, Vec<u8>)>, StoreError> {
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
        let mut rec = vec![0u8; len as usize];
        self.take(&mut rec)?;
        let m: Message = postcard::from_bytes(&rec)?;
        let mut b = [0u8; 8];
        self.take(&mut b)?;
        let blen = u64::from_le_bytes(b);
        let mut body = Vec::new();
        (&mut self.r).take(blen).read_to_end(&mut body)?;
        if body.len() as u64 != blen {
            return Err(StoreError::Corrupt("snapshot truncated".into()));
        }
        self.crc.update(&body);
        Ok(Some((m, body)))
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

    fn take_u32(&mut self) -> Result<u32, StoreError> {
        let mut b = [0u8; 4];
        self.take(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }
}
