//! The state machine store: [`QueueState`] in memory, persisted to sled on
//! every apply, with snapshots streamed to and from files.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{EntryPayload, OptionalSend, StorageError, StorageIOError, StoredMembership};
use tokio::io::AsyncSeekExt;
use tokio::sync::watch;

use super::log::SharedRecent;
use super::refs::{Arrivals, Keep, Reclaim};
use super::snapshot::build::SnapshotBuilder;
use super::snapshot::files::{SnapshotFiles, CURRENT};
use super::snapshot::install::{install_file, Installed};
use super::{
    body_key, decode_ref, id_from_key, message_key, sts_key, Bodies, Shared, SmHeader, StoreError,
    KEY_HEADER, KEY_SM_TREE, LOG_TREE, META_TREE, STS_PREFIX,
};
use crate::state::Touched;
use crate::{
    Entry, LogId, Membership, Message, NodeId, QueueState, Response, SnapshotMeta, TypeConfig,
};

type SErr = StorageError<NodeId>;

pub struct StateMachineStore {
    db: sled::Db,
    meta: sled::Tree,
    /// The Raft log: applied entries find their bodies' references there
    /// (recent ones in its cache).
    log: sled::Tree,
    recent: SharedRecent,
    bodies: Arc<Bodies>,
    shared: Arc<Shared>,
    gen: u64,
    header: SmHeader,
    snapshots: Arc<SnapshotFiles>,
    /// Bodies and state trees kept while snapshot builders run (see [`super::refs`]).
    reclaim: Reclaim,
}

pub(crate) fn tree_name(gen: u64) -> String {
    format!("sm.{gen}")
}

fn decode_header(v: Option<sled::IVec>) -> Result<SmHeader, StoreError> {
    Ok(match v {
        Some(v) => postcard::from_bytes(&v)?,
        None => SmHeader::default(),
    })
}

impl StateMachineStore {
    pub(crate) fn open(
        db: sled::Db,
        snapshot_dir: PathBuf,
        bodies: Arc<Bodies>,
        recent: SharedRecent,
    ) -> Result<(Self, Arc<Shared>), StoreError> {
        let meta = db.open_tree(META_TREE)?;
        let log = db.open_tree(LOG_TREE)?;
        let gen = match meta.get(KEY_SM_TREE)? {
            Some(v) => u64::from_be_bytes(
                v.as_ref()
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("sm_tree".into()))?,
            ),
            None => 0,
        };
        let live = tree_name(gen);
        // Generations left behind by an install that crashed, or not yet dropped.
        for name in db.tree_names() {
            if name.starts_with(b"sm.") && name.as_ref() != live.as_bytes() {
                db.drop_tree(&name)?;
            }
        }
        let tree = db.open_tree(&live)?;
        let header = decode_header(tree.get(KEY_HEADER)?)?;
        let mut messages = Vec::new();
        for kv in tree.scan_prefix(b"m") {
            let (_, v) = kv?;
            messages.push(postcard::from_bytes::<Message>(&v)?);
        }
        let mut state = QueueState::restore(header.cluster_time, messages);
        let mut policies = Vec::new();
        for v in tree.scan_prefix(STS_PREFIX).values() {
            policies.push(postcard::from_bytes(&v?)?);
        }
        state.restore_sts(policies);
        // Count the bodies of queued messages; forget those whose removal was
        // deferred when the node stopped (nothing counts them, so their
        // segments go unless the log still names them).
        for kv in tree.scan_prefix(b"b") {
            let (k, v) = kv?;
            match id_from_key(&k) {
                Some(id) if state.get(&id).is_some() => bodies.retain(&decode_ref(&v)?),
                _ => {
                    tree.remove(k)?;
                }
            }
        }
        let snapshots = Arc::new(SnapshotFiles::open(snapshot_dir)?);
        let (applied, _) = watch::channel(header.applied);
        let reclaim = Reclaim::default();
        let shared = Arc::new(Shared {
            state: RwLock::new(state),
            tree: RwLock::new(tree),
            applied,
            pins: reclaim.pins(),
            bodies: bodies.clone(),
            history: crate::History::open(&db)?,
            events: tokio::sync::broadcast::channel(4096).0,
        });
        let store = StateMachineStore {
            db,
            meta,
            log,
            recent,
            bodies,
            shared: shared.clone(),
            gen,
            header,
            snapshots,
            reclaim,
        };
        Ok((store, shared))
    }

    fn tree(&self) -> sled::Tree {
        self.shared
            .tree
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn apply_entries(
        &mut self,
        entries: impl IntoIterator<Item = Entry>,
    ) -> Result<Vec<Response>, StoreError> {
        let mut touched = Touched::default();
        let mut arrivals = Arrivals::default();
        let mut responses = Vec::new();
        let tree = self.tree();
        let mut state = self.shared.state.write().unwrap_or_else(|p| p.into_inner());
        for entry in entries {
            self.header.applied = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => responses.push(Response::Done),
                EntryPayload::Normal(req) => {
                    arrivals.collect(
                        &self.bodies,
                        &self.log,
                        &self.recent,
                        entry.log_id.index,
                        &req,
                    )?;
                    let from = touched.events.len();
                    responses.push(state.apply(&req, &mut touched));
                    // Keyed by the entry: re-applying it after a crash
                    // writes the same events again, never twice.
                    self.shared
                        .history
                        .record(entry.log_id.index, &touched.events[from..])?;
                }
                EntryPayload::Membership(m) => {
                    self.header.membership = StoredMembership::new(Some(entry.log_id), m);
                    responses.push(Response::Done);
                }
            }
        }
        self.header.cluster_time = state.cluster_time();

        let pinned = self.reclaim.pinned();
        let mut batch = sled::Batch::default();
        touched.ids.sort_unstable();
        touched.ids.dedup();
        for id in &touched.ids {
            match state.get(id) {
                Some(m) => {
                    batch.insert(&message_key(id), postcard::to_stdvec(m)?);
                    let has_body = tree.contains_key(body_key(id))?;
                    if let Some(Keep::Store(r)) = arrivals.keep(id, has_body) {
                        batch.insert(&body_key(id), postcard::to_stdvec(&r)?);
                    }
                }
                None => {
                    batch.remove(&message_key(id));
                    if pinned {
                        self.reclaim.defer(*id);
                    } else if let Some(v) = tree.get(body_key(id))? {
                        batch.remove(&body_key(id));
                        arrivals.removed(decode_ref(&v)?);
                    }
                }
            }
        }
        if !pinned {
            for id in self.reclaim.take_deferred() {
                if state.get(&id).is_some() {
                    continue;
                }
                if let Some(v) = tree.get(body_key(&id))? {
                    batch.remove(&body_key(&id));
                    arrivals.removed(decode_ref(&v)?);
                }
            }
        }
        touched.sts.sort_unstable();
        touched.sts.dedup();
        for domain in &touched.sts {
            match state.sts_policy(domain) {
                Some(p) => batch.insert(sts_key(domain), postcard::to_stdvec(p)?),
                None => batch.remove(sts_key(domain)),
            }
        }
        batch.insert(KEY_HEADER, postcard::to_stdvec(&self.header)?);
        arrivals.retain_stored(&self.bodies);
        if arrivals.wrote() {
            // Bodies this apply wrote must be on disk before sled can be.
            self.bodies.sync()?;
        }
        // The whole batch, with the applied log id, lands atomically.
        tree.apply_batch(batch)?;
        drop(state);
        arrivals.release_dropped(&self.bodies);
        for e in touched.events {
            // Nobody listening is fine.
            let _ = self.shared.events.send(e);
        }
        if !pinned {
            self.drop_stale_trees()?;
        }
        self.shared.applied.send_replace(self.header.applied);
        Ok(responses)
    }

    /// Drop state trees an installed snapshot replaced, releasing their bodies.
    fn drop_stale_trees(&mut self) -> Result<(), StoreError> {
        for name in self.reclaim.take_stale_trees() {
            let old = self.db.open_tree(name.as_bytes())?;
            for v in old.scan_prefix(b"b").values() {
                self.bodies.release(&decode_ref(&v?)?);
            }
            self.db.drop_tree(name.as_bytes())?;
        }
        Ok(())
    }

    /// Make an installed snapshot live in memory; `install_file` did the disk part.
    fn switch_to(&mut self, installed: Installed) -> Result<(), StoreError> {
        let old = tree_name(self.gen);
        self.gen = installed.gen;
        self.header = installed.header;
        self.reclaim.retire_tree(old);
        *self.shared.tree.write().unwrap_or_else(|p| p.into_inner()) = installed.tree;
        *self.shared.state.write().unwrap_or_else(|p| p.into_inner()) = installed.state;
        if !self.reclaim.pinned() {
            self.drop_stale_trees()?;
        }
        self.shared.applied.send_replace(self.header.applied);
        Ok(())
    }
}

fn sm_err(e: impl std::error::Error + 'static) -> SErr {
    StorageIOError::write_state_machine(&e).into()
}

fn snap_err(e: impl std::error::Error + 'static) -> SErr {
    StorageIOError::write_snapshot(None, &e).into()
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, Membership), SErr> {
        Ok((self.header.applied, self.header.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, SErr>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // sled writes go to memory and its own log buffers; nothing here
        // waits on the disk, so this runs inline.
        self.apply_entries(entries).map_err(sm_err)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            state: self
                .shared
                .state
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            header: self.header.clone(),
            tree: self.tree(),
            bodies: self.bodies.clone(),
            snapshots: self.snapshots.clone(),
            pin: Some(self.reclaim.pin()),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<tokio::fs::File>, SErr> {
        // Unlinked at once: the file lives as long as its handle, so it is
        // gone after the install, a failure or an abandoned transfer alike.
        let (path, f) = self.snapshots.temp("receive").map_err(snap_err)?;
        std::fs::remove_file(&path).map_err(snap_err)?;
        Ok(Box::new(tokio::fs::File::from_std(f)))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<tokio::fs::File>,
    ) -> Result<(), SErr> {
        let mut file = *snapshot;
        file.seek(std::io::SeekFrom::Start(0))
            .await
            .map_err(snap_err)?;
        let file = file.into_std().await;
        let (db, bodies, meta_tree, snapshots, gen) = (
            self.db.clone(),
            self.bodies.clone(),
            self.meta.clone(),
            self.snapshots.clone(),
            self.gen + 1,
        );
        let meta2 = meta.clone();
        let installed = tokio::task::spawn_blocking(move || {
            install_file(&db, &bodies, &meta_tree, &snapshots, gen, &meta2, file)
        })
        .await
        .map_err(snap_err)?
        .map_err(snap_err)?;
        self.switch_to(installed).map_err(snap_err)
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, SErr> {
        let cur = self
            .snapshots
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let Some(meta) = cur else { return Ok(None) };
        let f = tokio::fs::File::open(self.snapshots.dir.join(CURRENT))
            .await
            .map_err(|e| StorageIOError::read_snapshot(None, &e))?;
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(f),
        }))
    }
}
