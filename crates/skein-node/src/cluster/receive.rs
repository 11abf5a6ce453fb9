//! Receiving a snapshot from the leader, chunk by chunk, into a file of
//! this node's own — checked all the way, so that no peer can make the
//! store fail (an install that fails stops Raft, and the node with it).
//!
//! openraft's own receiver would seek wherever a chunk says and hand
//! whatever arrived to the store. Here every chunk is checked before it is
//! written: its size, that it starts where the transfer got to (or before,
//! a retry; offset 0 starts a transfer), and that the transfer stays within
//! the room on the disk. When the last chunk is in, the whole file is read
//! through — every declared length, every record, the checksum — and only
//! a snapshot that passes goes to openraft's `install_full_snapshot`. The
//! file is unlinked as soon as it is made: it lives as long as its handle,
//! so nothing is left behind after an install, a failure or an abandoned
//! transfer.

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use openraft::error::{InstallSnapshotError, RaftError, SnapshotMismatch};
use openraft::raft::InstallSnapshotResponse;
use openraft::{Snapshot, SnapshotSegmentId, Vote};
use skein_queue::{NodeId, Raft, SnapshotMeta};
use tonic::Status;

/// The largest chunk taken: openraft sends 4 MiB.
pub const MAX_CHUNK: usize = 8 << 20;
/// Room kept free on the disk whatever a snapshot needs.
const DISK_RESERVE: u64 = 256 << 20;

pub type Answer = Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>;

pub struct Receiver {
    dir: PathBuf,
    transfer: tokio::sync::Mutex<Option<Transfer>>,
}

/// The snapshot being received, as far as it came.
struct Transfer {
    id: String,
    /// One past the last byte received.
    end: u64,
    /// The most bytes it may hold: the room on the disk when it began,
    /// less a reserve.
    budget: u64,
    file: Arc<std::fs::File>,
}

/// One chunk as it came off the wire.
pub struct Chunk {
    pub vote: Vote<NodeId>,
    pub meta: SnapshotMeta,
    pub offset: u64,
    pub data: bytes::Bytes,
    pub done: bool,
}

impl Receiver {
    /// Snapshots are received into `dir` (the store's snapshot directory).
    pub fn new(dir: PathBuf) -> Self {
        Receiver {
            dir,
            transfer: tokio::sync::Mutex::new(None),
        }
    }

    pub async fn chunk(&self, raft: &Raft, c: Chunk) -> Result<Answer, Status> {
        if c.data.len() > MAX_CHUNK {
            return Err(Status::invalid_argument(format!(
                "a snapshot chunk of {} bytes; at most {MAX_CHUNK}",
                c.data.len()
            )));
        }
        let my_vote = raft.metrics().borrow().vote;
        if c.vote < my_vote {
            // A leader of the past: tell it the present, write nothing.
            return Ok(Ok(InstallSnapshotResponse { vote: my_vote }));
        }
        let mut t = self.transfer.lock().await;
        if c.offset == 0 {
            *t = Some(self.begin(&c.meta.snapshot_id)?);
        }
        let Some(tr) = t
            .as_mut()
            .filter(|tr| tr.id == c.meta.snapshot_id && c.offset <= tr.end)
        else {
            // What openraft answers too: the leader starts again from 0.
            let expect = t.as_ref().map_or(0, |tr| tr.end);
            return Ok(Err(RaftError::APIError(
                InstallSnapshotError::SnapshotMismatch(SnapshotMismatch {
                    expect: SnapshotSegmentId {
                        id: c.meta.snapshot_id.clone(),
                        offset: expect,
                    },
                    got: SnapshotSegmentId {
                        id: c.meta.snapshot_id.clone(),
                        offset: c.offset,
                    },
                }),
            )));
        };
        let end = c.offset.saturating_add(c.data.len() as u64);
        if end > tr.budget {
            *t = None;
            return Err(Status::resource_exhausted(format!(
                "a snapshot of {end} bytes or more does not fit on this node's disk"
            )));
        }
        let file = tr.file.clone();
        let (offset, data) = (c.offset, c.data.clone());
        blocking(move || file.write_all_at(&data, offset)).await?;
        tr.end = tr.end.max(end);
        if !c.done {
            return Ok(Ok(InstallSnapshotResponse { vote: my_vote }));
        }
        let tr = t.take().expect("checked above");
        let file =
            Arc::try_unwrap(tr.file).map_err(|_| Status::internal("snapshot file in use"))?;
        let checked = file.try_clone().map_err(internal)?;
        let length = tr.end;
        let header = blocking(move || {
            use std::io::Read;
            let r = std::io::BufReader::new(ReadAt::new(checked)).take(length);
            skein_queue::store::snapshot::verify(r).map_err(std::io::Error::other)
        })
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "refused a snapshot that does not check out");
            Status::invalid_argument(format!("the snapshot does not check out: {e}"))
        })?;
        if header.meta.last_log_id != c.meta.last_log_id {
            return Err(Status::invalid_argument(
                "the snapshot's data does not match its metadata",
            ));
        }
        let snapshot = Snapshot {
            meta: c.meta,
            snapshot: Box::new(tokio::fs::File::from_std(file)),
        };
        Ok(match raft.install_full_snapshot(c.vote, snapshot).await {
            Ok(r) => Ok(InstallSnapshotResponse { vote: r.vote }),
            Err(f) => Err(RaftError::Fatal(f)),
        })
    }

    fn begin(&self, id: &str) -> Result<Transfer, Status> {
        let free = crate::disk::free_bytes(&self.dir).unwrap_or(u64::MAX);
        let n: u64 = rand::random();
        let path = self.dir.join(format!("receive-{n:016x}.tmp"));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(internal)?;
        std::fs::remove_file(&path).map_err(internal)?;
        Ok(Transfer {
            id: id.to_string(),
            end: 0,
            budget: free.saturating_sub(DISK_RESERVE),
            file: Arc::new(file),
        })
    }
}

fn internal(e: std::io::Error) -> Status {
    Status::internal(format!("receiving a snapshot: {e}"))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(internal)
}

/// Reads a file from its start by position, whatever its cursor.
struct ReadAt {
    file: std::fs::File,
    pos: u64,
}

impl ReadAt {
    fn new(file: std::fs::File) -> Self {
        ReadAt { file, pos: 0 }
    }
}

impl std::io::Read for ReadAt {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}
