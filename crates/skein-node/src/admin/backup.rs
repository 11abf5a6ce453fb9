//! Backup and restore of the whole queue.
//!
//! A backup is a consistent copy of the local replica at one applied log
//! index (bodies pinned while it is written), in the snapshot file format,
//! streamed in chunks. A restore streams such a file in and queues each
//! message through Raft (`AdminCommand::Import`), so the receiving cluster
//! replicates it like any other change; ids are kept, and a message already
//! queued is left alone, so a restore can be repeated safely.

use std::path::{Path, PathBuf};
use std::pin::Pin;

use futures::{Stream, StreamExt};
use skein_proto::v1::{BackupChunk, RestoreReply};
use skein_queue::store::snapshot::SnapshotReader;
use skein_queue::{AdminCommand, Command, Response as QResponse};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::{Status, Streaming};

use crate::clock::now_ms;
use crate::cluster::Cluster;

pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<BackupChunk, Status>> + Send>>;

const CHUNK: usize = 1 << 20;
/// Imports in flight at once during a restore.
const RESTORE_CONCURRENCY: usize = 16;

/// Removes a temporary file however the stream using it ends. (Files left
/// by a crash are removed at start with the other snapshot temporaries.)
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn temp_path(data_dir: &Path, what: &str) -> PathBuf {
    data_dir
        .join("snapshots")
        .join(format!("{what}-{}-{}.tmp", now_ms(), rand::random::<u32>()))
}

fn io_status(e: impl std::fmt::Display) -> Status {
    Status::internal(format!("backup: {e}"))
}

pub async fn backup(cluster: &Cluster, data_dir: &Path) -> Result<ChunkStream, Status> {
    let tmp = TempFile(temp_path(data_dir, "backup"));
    let reader = cluster.reader().clone();
    let path = tmp.0.clone();
    let count = tokio::task::spawn_blocking(move || reader.backup(&path))
        .await
        .map_err(io_status)?
        .map_err(io_status)?;
    tracing::info!(messages = count, "backup written; streaming it");
    let file = tokio::fs::File::open(&tmp.0).await.map_err(io_status)?;
    let stream = futures::stream::unfold((file, tmp), |(mut file, tmp)| async move {
        let mut buf = vec![0u8; CHUNK];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(BackupChunk { data: buf.into() }), (file, tmp)))
            }
            Err(e) => Some((Err(io_status(e)), (file, tmp))),
        }
    });
    Ok(Box::pin(stream))
}

pub async fn restore(
    cluster: &Cluster,
    data_dir: &Path,
    mut chunks: Streaming<BackupChunk>,
) -> Result<RestoreReply, Status> {
    let tmp = TempFile(temp_path(data_dir, "restore"));
    let mut file = tokio::fs::File::create(&tmp.0).await.map_err(io_status)?;
    while let Some(chunk) = chunks.message().await? {
        file.write_all(&chunk.data).await.map_err(io_status)?;
    }
    file.flush().await.map_err(io_status)?;
    drop(file);

    // Read messages on a blocking thread, queue them from here.
    let (tx, rx) = tokio::sync::mpsc::channel(RESTORE_CONCURRENCY);
    let path = tmp.0.clone();
    let reading = tokio::task::spawn_blocking(move || -> Result<(), String> {
        let f = std::fs::File::open(&path).map_err(|e| e.to_string())?;
        let (_, mut r) =
            SnapshotReader::open(std::io::BufReader::new(f)).map_err(|e| e.to_string())?;
        while let Some((m, body)) = r.next_message().map_err(|e| e.to_string())? {
            if tx.blocking_send((m, body)).is_err() {
                break;
            }
        }
        Ok(())
    });
    let results: Vec<Result<QResponse, crate::cluster::ProposeError>> =
        tokio_stream::wrappers::ReceiverStream::new(rx)
            .map(|(m, body)| {
                let cmd = Command::Admin(AdminCommand::Import {
                    message: Box::new(m),
                    body: body.into(),
                });
                async move { cluster.propose(cmd).await }
            })
            .buffer_unordered(RESTORE_CONCURRENCY)
            .collect()
            .await;
    reading
        .await
        .map_err(io_status)?
        .map_err(|e| Status::invalid_argument(format!("not a usable backup: {e}")))?;
    let (mut queued, mut present) = (0, 0);
    for r in results {
        match r {
            Ok(QResponse::Changed(1)) => queued += 1,
            Ok(_) => present += 1,
            Err(e) => {
                return Err(Status::unavailable(format!(
                    "restore stopped after {queued} messages: {e}"
                )))
            }
        }
    }
    tracing::info!(queued, present, "restore done");
    Ok(RestoreReply { queued, present })
}
