//! Building a snapshot: the queue as it stood at one log index, written in
//! the snapshot format to a file beside the current one, then published.
//! While a builder runs it holds a [`Pin`], and bodies of messages removed
//! meanwhile stay on disk, so every body it names is there to read.

use std::io::BufWriter;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use openraft::storage::Snapshot;
use openraft::{RaftSnapshotBuilder, StorageError, StorageIOError};

use super::files::SnapshotFiles;
use super::{SnapshotHeader, SnapshotWriter};
use crate::store::refs::Pin;
use crate::store::{body_key, decode_ref, Bodies, SmHeader, StoreError};
use crate::{NodeId, QueueState, SnapshotMeta, TypeConfig};

fn snap_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::write_snapshot(None, &e).into()
}

pub struct SnapshotBuilder {
    pub(crate) state: QueueState,
    pub(crate) header: SmHeader,
    pub(crate) tree: sled::Tree,
    pub(crate) bodies: Arc<Bodies>,
    pub(crate) snapshots: Arc<SnapshotFiles>,
    pub(crate) pin: Option<Pin>,
    /// Saving the state before the build failed: the build fails too.
    pub(crate) failed: Option<String>,
}

pub(crate) fn build_file(
    state: QueueState,
    header: SmHeader,
    tree: sled::Tree,
    bodies: &Bodies,
    snapshots: &SnapshotFiles,
) -> Result<(SnapshotMeta, std::fs::File), StoreError> {
    let last = header.applied;
    let n = snapshots.seq.fetch_add(1, Ordering::Relaxed);
    let meta = SnapshotMeta {
        last_log_id: last,
        last_membership: header.membership.clone(),
        snapshot_id: match last {
            Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, n),
            None => format!("0-0-{n}"),
        },
    };
    let (path, file) = snapshots.temp("build")?;
    let snap_header = SnapshotHeader {
        meta: meta.clone(),
        cluster_time: state.cluster_time(),
        messages: state.len() as u64,
        sts: state.sts_policies().cloned().collect(),
    };
    let file = write_queue(BufWriter::new(file), &snap_header, &state, &tree, bodies)?
        .into_inner()
        .map_err(|e| e.into_error())?;
    file.sync_all()?;
    // Open before publishing: if a newer snapshot wins, the unlinked file
    // stays readable through this handle.
    let read = std::fs::File::open(&path)?;
    snapshots.publish(&path, &meta, false)?;
    Ok((meta, read))
}

/// Write the queue `state` (body references from `tree`) in the snapshot
/// format. The caller holds a pin, so every body the state names is still there.
pub(crate) fn write_queue<W: std::io::Write>(
    w: W,
    header: &SnapshotHeader,
    state: &QueueState,
    tree: &sled::Tree,
    bodies: &Bodies,
) -> Result<W, StoreError> {
    let mut w = SnapshotWriter::new(w, header)?;
    for m in state.messages() {
        let r = tree
            .get(body_key(&m.id))?
            .ok_or_else(|| StoreError::Corrupt(format!("body of {} missing", m.id)))?;
        w.add(m, &bodies.read(&decode_ref(&r)?)?)?;
    }
    w.finish()
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        if let Some(e) = &self.failed {
            return Err(snap_err(std::io::Error::other(e.clone())));
        }
        let state = std::mem::take(&mut self.state);
        let header = self.header.clone();
        let tree = self.tree.clone();
        let bodies = self.bodies.clone();
        let snapshots = self.snapshots.clone();
        let pin = self.pin.take();
        let (meta, file) = tokio::task::spawn_blocking(move || {
            let r = build_file(state, header, tree, &bodies, &snapshots);
            drop(pin);
            r
        })
        .await
        .map_err(snap_err)?
        .map_err(snap_err)?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(tokio::fs::File::from_std(file)),
        })
    }
}
