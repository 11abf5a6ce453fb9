//! The state machine store: [`QueueState`] in memory, applied there at
//! once and saved to its sled tree in batches (see [`Unsaved`]), with
//! snapshots streamed to and from files.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};
use std::time::{Duration, Instant};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{EntryPayload, OptionalSend, StorageError, StorageIOError, StoredMembership};
use tokio::io::AsyncSeekExt;
use tokio::sync::watch;

use super::log::SharedLog;
use super::refs::{Arrivals, Keep, Reclaim};
use super::snapshot::build::SnapshotBuilder;
use super::snapshot::files::{SnapshotFiles, CURRENT};
use super::snapshot::install::{install_file, Installed};
use super::{
    body_key, decode_ref, id_from_key, message_key, sts_key, Bodies, BodyRef, Shared, SmHeader,
    StoreError, KEY_HEADER, KEY_SM_TREE, META_TREE, STS_PREFIX,
};
use crate::state::Touched;
use crate::{
    Entry, LogId, Membership, Message, MessageId, NodeId, QueueState, Response, SnapshotMeta,
    TypeConfig,
};

type SErr = StorageError<NodeId>;

pub struct StateMachineStore {
    db: sled::Db,
    meta: sled::Tree,
    /// The Raft log in memory: applied entries find their bodies'
    /// references there.
    log: SharedLog,
    bodies: Arc<Bodies>,
    shared: Arc<Shared>,
    gen: u64,
    snapshots: Arc<SnapshotFiles>,
}

/// The state is saved when the oldest unsaved apply is this old: by the
/// next apply, or by the saver thread when none comes... Measured with
/// `skein-bench`: 20, 50, 100, 200 and 1000 ms all beat saving every apply;
/// 1000 ms doubled the p99 (a long batch holds sled's write lock, and the
/// log waits), and 100 ms was the best of the rest. Leaving every save to
/// the saver thread was no faster and raised the worst latency (an apply
/// then waits for a thread the scheduler may hold off while it has the
/// lock). See docs/performance.md.
const SAVE_EVERY: Duration = Duration::from_millis(100);
/// ...or this many entries or messages have changed since the last save.
const SAVE_AFTER: usize = 4096;

/// What was applied in memory and is not yet in the state tree. Everything
/// in it can be made again from the Raft log, which keeps every entry
/// until a snapshot covers it, and every snapshot is built after a save.
pub(crate) struct Unsaved {
    /// The state machine's header as of the last apply.
    header: SmHeader,
    /// Messages and MTA-STS domains changed since the last save.
    ids: Vec<MessageId>,
    sts: Vec<String>,
    /// Messages an entry since the last save removed (some may be queued
    /// again since: their stored body is the old one's).
    gone: HashSet<MessageId>,
    arrivals: Arrivals,
    /// Entries applied since the last save, and when the first was.
    entries: usize,
    since: Instant,
    /// Bodies and state trees kept while snapshot builders run (see [`super::refs`]).
    reclaim: Reclaim,
    /// A save that failed: nothing is applied after it (the node stops, as
    /// on any write error).
    failed: Option<String>,
}

impl Unsaved {
    pub(crate) fn header_applied(&self) -> Option<LogId> {
        self.header.applied
    }

    fn due(&self) -> bool {
        self.entries > 0
            && (self.since.elapsed() >= SAVE_EVERY
                || self.entries >= SAVE_AFTER
                || self.ids.len() >= SAVE_AFTER
                // Bodies written by this apply (entries not in the log, as
                // tools apply them) cannot be made again: save at once.
                || self.arrivals.wrote())
            || (self.reclaim.waiting() && !self.reclaim.pinned())
    }

    /// Whether `id` was removed since the last save and has been queued
    /// again, so that the body stored for it is the earlier message's and
    /// the save replaces it — unless a snapshot builder runs, which may
    /// still read the earlier one (the new message then keeps it, as one
    /// queued twice does). Reads follow the same rule as the save.
    fn requeued(&self, id: &MessageId) -> bool {
        self.gone.contains(id) && !self.reclaim.pinned()
    }

    fn check(&self) -> Result<(), StoreError> {
        match &self.failed {
            Some(e) => Err(StoreError::Io(std::io::Error::other(format!(
                "an earlier save of the queue state failed: {e}"
            )))),
            None => Ok(()),
        }
    }
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

impl Shared {
    pub(crate) fn read_state(&self) -> RwLockReadGuard<'_, QueueState> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_state(&self) -> RwLockWriteGuard<'_, QueueState> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Take after the state lock, never before it.
    pub(crate) fn unsaved(&self) -> MutexGuard<'_, Unsaved> {
        self.unsaved.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn tree(&self) -> sled::Tree {
        self.tree.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Where the body of queued message `id` is: in the state tree, or,
    /// queued since the last save, where it arrived.
    pub(crate) fn body_ref(&self, id: &MessageId) -> Result<Option<BodyRef>, StoreError> {
        let state = self.read_state();
        if state.get(id).is_none() {
            return Ok(None);
        }
        // Held across both reads: a save moves a reference from the one
        // to the other while holding it.
        let unsaved = self.unsaved();
        if unsaved.requeued(id) {
            return Ok(unsaved.arrivals.body(id));
        }
        match self.tree().get(body_key(id))? {
            Some(v) => Ok(Some(decode_ref(&v)?)),
            None => Ok(unsaved.arrivals.body(id)),
        }
    }

    /// Write what was applied since the last save to the state tree: the
    /// history first, then every changed message, body reference and
    /// policy with the header in one batch, so the tree on disk is always
    /// the state as of one applied entry. `state` is the live state,
    /// locked by the caller, as of `u.header.applied`.
    pub(crate) fn save(&self, state: &QueueState, u: &mut Unsaved) -> Result<(), StoreError> {
        u.check()?;
        let r = self.save_unchecked(state, u);
        if let Err(e) = &r {
            u.failed = Some(e.to_string());
        }
        r
    }

    fn save_unchecked(&self, state: &QueueState, u: &mut Unsaved) -> Result<(), StoreError> {
        // Events before the state: after a crash between the two, applying
        // the entries again writes the same events under the same keys.
        self.history.save()?;
        if u.entries == 0 && !u.reclaim.waiting() {
            return Ok(());
        }
        let tree = self.tree();
        let pinned = u.reclaim.pinned();
        let mut arrivals = std::mem::take(&mut u.arrivals);
        let mut batch = sled::Batch::default();
        u.ids.sort_unstable();
        u.ids.dedup();
        for id in &u.ids {
            match state.get(id) {
                Some(m) => {
                    batch.insert(&message_key(id), postcard::to_stdvec(m)?);
                    let mut has_body = tree.contains_key(body_key(id))?;
                    if has_body && u.requeued(id) {
                        // The stored body is the earlier message's.
                        if let Some(v) = tree.get(body_key(id))? {
                            arrivals.removed(decode_ref(&v)?);
                        }
                        has_body = false;
                    }
                    if let Some(Keep::Store(r)) = arrivals.keep(id, has_body) {
                        batch.insert(&body_key(id), postcard::to_stdvec(&r)?);
                    }
                }
                None => {
                    batch.remove(&message_key(id));
                    if pinned {
                        u.reclaim.defer(*id);
                    } else if let Some(v) = tree.get(body_key(id))? {
                        batch.remove(&body_key(id));
                        arrivals.removed(decode_ref(&v)?);
                    }
                }
            }
        }
        if !pinned {
            for id in u.reclaim.take_deferred() {
                if state.get(&id).is_some() {
                    continue;
                }
                if let Some(v) = tree.get(body_key(&id))? {
                    batch.remove(&body_key(&id));
                    arrivals.removed(decode_ref(&v)?);
                }
            }
        }
        u.sts.sort_unstable();
        u.sts.dedup();
        for domain in &u.sts {
            match state.sts_policy(domain) {
                Some(p) => batch.insert(sts_key(domain), postcard::to_stdvec(p)?),
                None => batch.remove(sts_key(domain)),
            }
        }
        batch.insert(KEY_HEADER, postcard::to_stdvec(&u.header)?);
        arrivals.retain_stored(&self.bodies);
        // Bodies this save names must be on disk before sled can be: those
        // written for tools' entries, and those of log entries a follower
        // applied before its own flush of them (openraft applies what the
        // leader committed). Usually the log's flush synced them already,
        // and this costs nothing.
        self.bodies.sync()?;
        // The whole batch, with the applied log id, lands atomically.
        tree.apply_batch(batch)?;
        arrivals.release_dropped(&self.bodies);
        u.ids.clear();
        u.sts.clear();
        u.gone.clear();
        u.entries = 0;
        if !pinned {
            self.drop_stale_trees(&mut u.reclaim)?;
        }
        Ok(())
    }

    /// Save if enough is waiting (the saver thread's tick).
    fn save_if_due(&self) -> Result<(), StoreError> {
        #[cfg(test)]
        if self.saver_paused.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(());
        }
        // The history needs no lock of the state's: saved early, its
        // events are the same ones the state's save would write.
        self.history.save()?;
        let state = self.read_state();
        let mut u = self.unsaved();
        if u.failed.is_none() && u.due() {
            self.save(&state, &mut u)?;
        }
        Ok(())
    }

    /// Drop state trees an installed snapshot replaced, releasing their bodies.
    fn drop_stale_trees(&self, reclaim: &mut Reclaim) -> Result<(), StoreError> {
        for name in reclaim.take_stale_trees() {
            let old = self.db.open_tree(name.as_bytes())?;
            for v in old.scan_prefix(b"b").values() {
                self.bodies.release(&decode_ref(&v?)?);
            }
            self.db.drop_tree(name.as_bytes())?;
        }
        Ok(())
    }
}

/// Saves what applies left unsaved once it is due, so an idle store is
/// saved too; ends with the store.
fn spawn_saver(shared: Weak<Shared>) {
    let r = std::thread::Builder::new()
        .name("skein-sm-save".into())
        .spawn(move || loop {
            std::thread::sleep(SAVE_EVERY / 2);
            let Some(shared) = shared.upgrade() else {
                return;
            };
            if let Err(e) = shared.save_if_due() {
                tracing::error!(error = %e, "saving the queue state failed");
            }
        });
    if let Err(e) = r {
        // Applies and snapshots still save; only an idle tail waits.
        tracing::warn!(error = %e, "could not start the state saver thread");
    }
}

impl StateMachineStore {
    pub(crate) fn open(
        db: sled::Db,
        snapshot_dir: PathBuf,
        bodies: Arc<Bodies>,
        log: SharedLog,
    ) -> Result<(Self, Arc<Shared>), StoreError> {
        let meta = db.open_tree(META_TREE)?;
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
            unsaved: Mutex::new(Unsaved {
                header,
                ids: Vec::new(),
                sts: Vec::new(),
                gone: HashSet::new(),
                arrivals: Arrivals::default(),
                entries: 0,
                since: Instant::now(),
                reclaim,
                failed: None,
            }),
            db: db.clone(),
            #[cfg(test)]
            saver_paused: Default::default(),
            bodies: bodies.clone(),
            history: crate::History::open(&db)?,
            events: tokio::sync::broadcast::channel(4096).0,
        });
        spawn_saver(Arc::downgrade(&shared));
        let store = StateMachineStore {
            db,
            meta,
            log,
            bodies,
            shared: shared.clone(),
            gen,
            snapshots,
        };
        Ok((store, shared))
    }

    /// Apply `entries` to the queue in memory; the state tree follows at the
    /// next save (see [`Unsaved`]).
    fn apply_entries(
        &mut self,
        entries: impl IntoIterator<Item = Entry>,
    ) -> Result<Vec<Response>, StoreError> {
        let shared = self.shared.clone();
        let mut touched = Touched::default();
        let mut responses = Vec::new();
        let mut state = shared.write_state();
        let mut u = shared.unsaved();
        u.check()?;
        for entry in entries {
            u.header.applied = Some(entry.log_id);
            if u.entries == 0 {
                u.since = Instant::now();
            }
            u.entries += 1;
            match entry.payload {
                EntryPayload::Blank => responses.push(Response::Done),
                EntryPayload::Normal(req) => {
                    u.arrivals
                        .collect(&self.bodies, &self.log, entry.log_id.index, &req)?;
                    let from = touched.events.len();
                    let ids_from = touched.ids.len();
                    responses.push(state.apply(&req, &mut touched));
                    for id in &touched.ids[ids_from..] {
                        if state.get(id).is_none() {
                            u.gone.insert(*id);
                            u.arrivals.forget(id);
                        }
                    }
                    u.arrivals.entry_applied(|id| state.get(id).is_some());
                    // Keyed by the entry: re-applying it after a crash
                    // writes the same events again, never twice.
                    shared
                        .history
                        .record(entry.log_id.index, &touched.events[from..]);
                }
                EntryPayload::Membership(m) => {
                    u.header.membership = StoredMembership::new(Some(entry.log_id), m);
                    responses.push(Response::Done);
                }
            }
        }
        u.header.cluster_time = state.cluster_time();
        u.ids.append(&mut touched.ids);
        u.sts.append(&mut touched.sts);
        if u.due() {
            shared.save(&state, &mut u)?;
        }
        let applied = u.header.applied;
        drop(u);
        drop(state);
        for e in touched.events {
            // Nobody listening is fine.
            let _ = shared.events.send(e);
        }
        shared.applied.send_replace(applied);
        Ok(responses)
    }

    /// Make an installed snapshot live in memory; `install_file` did the disk part.
    fn switch_to(&mut self, installed: Installed) -> Result<(), StoreError> {
        let shared = self.shared.clone();
        let mut state = shared.write_state();
        let mut u = shared.unsaved();
        // What was applied since the last save is older than the snapshot,
        // which replaces it (the history of it is kept).
        std::mem::take(&mut u.arrivals).release_dropped(&self.bodies);
        u.ids.clear();
        u.sts.clear();
        u.gone.clear();
        u.entries = 0;
        let old = tree_name(self.gen);
        self.gen = installed.gen;
        u.header = installed.header;
        u.reclaim.retire_tree(old);
        *shared.tree.write().unwrap_or_else(|p| p.into_inner()) = installed.tree;
        *state = installed.state;
        if !u.reclaim.pinned() {
            shared.drop_stale_trees(&mut u.reclaim)?;
        }
        let applied = u.header.applied;
        drop(u);
        drop(state);
        shared.applied.send_replace(applied);
        Ok(())
    }
}

impl Drop for StateMachineStore {
    /// A store closed in order saves what it applied (a crash leaves that
    /// to the log).
    fn drop(&mut self) {
        let state = self.shared.read_state();
        let mut u = self.shared.unsaved();
        if u.failed.is_none() {
            if let Err(e) = self.shared.save(&state, &mut u) {
                tracing::warn!(error = %e, "saving the queue state at close failed");
            }
        }
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
        let u = self.shared.unsaved();
        Ok((u.header.applied, u.header.membership.clone()))
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
        let state = self.shared.read_state();
        let mut u = self.shared.unsaved();
        // Saved first: the log is purged up to the snapshot once it is
        // built, so the state tree must not need those entries again.
        let failed = self
            .shared
            .save(&state, &mut u)
            .err()
            .map(|e| e.to_string());
        SnapshotBuilder {
            state: state.clone(),
            header: u.header.clone(),
            tree: self.shared.tree(),
            bodies: self.bodies.clone(),
            snapshots: self.snapshots.clone(),
            pin: Some(u.reclaim.pin()),
            failed,
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
