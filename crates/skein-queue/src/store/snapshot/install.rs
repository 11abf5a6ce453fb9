//! Installing a snapshot received from the leader (already checked whole,
//! see skein-node's `cluster/receive.rs`): its messages and bodies go into a
//! fresh state tree generation, and one write makes that generation live,
//! so a crash mid-install leaves the old state whole.

use std::io::{BufReader, BufWriter};
use std::path::PathBuf;

use super::files::{SnapshotFiles, Tee};
use super::SnapshotReader;
use crate::store::sm::tree_name;
use crate::store::{
    body_key, flush_all, message_key, sts_key, Bodies, BodyRef, SmHeader, StoreError, KEY_HEADER,
    KEY_SM_TREE,
};
use crate::{QueueState, SnapshotMeta};

/// Bodies written per sled batch while installing a snapshot.
const INSTALL_BATCH_BYTES: usize = 32 << 20;

/// A snapshot written into a new state tree generation, now live on disk.
pub(crate) struct Installed {
    pub(crate) gen: u64,
    pub(crate) tree: sled::Tree,
    pub(crate) state: QueueState,
    pub(crate) header: SmHeader,
}

/// Load a received snapshot into a fresh tree generation and switch to it.
pub(crate) fn install_file(
    db: &sled::Db,
    bodies: &Bodies,
    meta_tree: &sled::Tree,
    snapshots: &SnapshotFiles,
    gen: u64,
    meta: &SnapshotMeta,
    file: std::fs::File,
) -> Result<Installed, StoreError> {
    let name = tree_name(gen);
    db.drop_tree(name.as_bytes())?;
    let tree = db.open_tree(&name)?;
    let mut written: Vec<BodyRef> = Vec::new();
    let mut copy_file: Option<PathBuf> = None;
    let fill = || -> Result<(QueueState, SmHeader), StoreError> {
        // Keep a copy of what we read as our own current snapshot.
        let (copy_path, copy) = snapshots.temp("install")?;
        copy_file = Some(copy_path.clone());
        let tee = Tee {
            r: BufReader::new(file),
            w: BufWriter::new(copy),
        };
        let (header, mut reader) = SnapshotReader::open(tee)?;
        if header.meta.last_log_id != meta.last_log_id {
            return Err(StoreError::Corrupt(
                "snapshot data does not match its metadata".into(),
            ));
        }
        // The count is the sender's word: grow with what really arrives.
        let mut messages = Vec::with_capacity(header.messages.min(4096) as usize);
        let mut batch = sled::Batch::default();
        let mut batch_bytes = 0;
        while let Some((m, body)) = reader.next_message()? {
            batch_bytes += body.len();
            let r = bodies.append(&body)?;
            written.push(r);
            batch.insert(&message_key(&m.id), postcard::to_stdvec(&m)?);
            batch.insert(&body_key(&m.id), postcard::to_stdvec(&r)?);
            messages.push(m);
            if batch_bytes > INSTALL_BATCH_BYTES {
                tree.apply_batch(std::mem::take(&mut batch))?;
                flush_all(db, bodies)?;
                batch_bytes = 0;
            }
        }
        let new_header = SmHeader {
            applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
            cluster_time: header.cluster_time,
        };
        batch.insert(KEY_HEADER, postcard::to_stdvec(&new_header)?);
        let sts: Vec<_> = header
            .sts
            .iter()
            .filter(|p| p.is_valid())
            .cloned()
            .collect();
        for p in &sts {
            batch.insert(sts_key(&p.domain), postcard::to_stdvec(p)?);
        }
        tree.apply_batch(batch)?;
        let Tee { w, .. } = reader.into_inner();
        let copy = w.into_inner().map_err(|e| e.into_error())?;
        copy.sync_all()?;
        snapshots.publish(&copy_path, meta, true)?;
        flush_all(db, bodies)?;
        // The switch: one write names the new generation live.
        meta_tree.insert(KEY_SM_TREE, &gen.to_be_bytes())?;
        flush_all(db, bodies)?;
        let mut state = QueueState::restore(header.cluster_time, messages);
        state.restore_sts(sts);
        Ok((state, new_header))
    };
    let r = fill();
    if r.is_err() {
        // The generation is never made live; its bodies are nobody's, and
        // the copy of a snapshot that failed is no snapshot.
        for w in &written {
            bodies.release(w);
        }
        if let Some(p) = &copy_file {
            let _ = std::fs::remove_file(p);
        }
    }
    let (state, header) = r?;
    Ok(Installed {
        gen,
        tree,
        state,
        header,
    })
}
