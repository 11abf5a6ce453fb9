//! The state machine store: [`QueueState`] in memory, persisted to sled on
//! every apply, with snapshots streamed to and from files.

use std::collections::HashMap;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    EntryPayload, OptionalSend, RaftSnapshotBuilder, StorageError, StorageIOError, StoredMembership,
};
use tokio::io::AsyncSeekExt;
use tokio::sync::watch;

use super::log::{stored_refs, SharedRecent};
use super::snapshot::{SnapshotHeader, SnapshotReader, SnapshotWriter};
use super::{
    body_key, decode_ref, flush_all, id_from_key, message_key, Bodies, BodyRef, Shared, SmHeader,
    StoreError, KEY_HEADER, KEY_SM_TREE, LOG_TREE, META_TREE,
};
use crate::state::Touched;
use crate::{
    Entry, LogId, Membership, Message, MessageId, NodeId, QueueState, Request, Response,
    SnapshotMeta, TypeConfig,
};

type SErr = StorageError<NodeId>;

const CURRENT: &str = "current.snap";
/// Bodies written per sled batch while installing a snapshot.
const INSTALL_BATCH_BYTES: usize = 32 << 20;

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
    /// Snapshot builders running. While any runs, bodies of removed messages
    /// stay on disk (their ids wait in `deferred`), so the builder's view of
    /// the queue keeps every body it names.
    pins: Arc<AtomicUsize>,
    deferred: Vec<MessageId>,
    /// Old state trees replaced by an installed snapshot; dropped once no
    /// builder can still be reading them.
    stale_trees: Vec<String>,
}

/// The snapshot directory and what its current snapshot holds.
struct SnapshotFiles {
    dir: PathBuf,
    current: Mutex<Option<SnapshotMeta>>,
    seq: AtomicU64,
}

fn tree_name(gen: u64) -> String {
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
        let state = QueueState::restore(header.cluster_time, messages);
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
        let pins = Arc::new(AtomicUsize::new(0));
        let shared = Arc::new(Shared {
            state: RwLock::new(state),
            tree: RwLock::new(tree),
            applied,
            pins: pins.clone(),
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
            pins,
            deferred: Vec::new(),
            stale_trees: Vec::new(),
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

    /// The body references of a request's bodies, by message id: from the
    /// stored log entry, or (an entry applied without being in this log, as
    /// tools do) written now. The bool says whether the reference is already
    /// counted for this caller (written now) or must be retained.
    fn body_refs(
        &self,
        index: u64,
        req: &Request,
        out: &mut HashMap<MessageId, (BodyRef, bool)>,
    ) -> Result<bool, StoreError> {
        let bodies = req.cmd.bodies();
        if bodies.is_empty() {
            return Ok(false);
        }
        if let Some(refs) = stored_refs(&self.log, &self.recent, index)? {
            if refs.len() == bodies.len() {
                for ((id, _), r) in bodies.iter().zip(refs) {
                    if let Some((old, true)) = out.insert(*id, (r, false)) {
                        self.bodies.release(&old);
                    }
                }
                return Ok(false);
            }
        }
        for (id, body) in bodies {
            let r = self.bodies.append(body)?;
            if let Some((old, true)) = out.insert(id, (r, true)) {
                self.bodies.release(&old);
            }
        }
        Ok(true)
    }

    fn apply_entries(
        &mut self,
        entries: impl IntoIterator<Item = Entry>,
    ) -> Result<Vec<Response>, StoreError> {
        let mut touched = Touched::default();
        let mut bodies: HashMap<MessageId, (BodyRef, bool)> = HashMap::new();
        let mut written = false;
        let mut responses = Vec::new();
        let tree = self.tree();
        let mut state = self.shared.state.write().unwrap_or_else(|p| p.into_inner());
        for entry in entries {
            self.header.applied = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => responses.push(Response::Done),
                EntryPayload::Normal(req) => {
                    written |= self.body_refs(entry.log_id.index, &req, &mut bodies)?;
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

        let pinned = self.pins.load(Ordering::Acquire) > 0;
        let mut batch = sled::Batch::default();
        let mut retained = Vec::new();
        let mut released = Vec::new();
        touched.ids.sort_unstable();
        touched.ids.dedup();
        for id in &touched.ids {
            match state.get(id) {
                Some(m) => {
                    batch.insert(&message_key(id), postcard::to_stdvec(m)?);
                    // A message queued before keeps the body it has.
                    if let Some((r, counted)) = bodies.remove(id) {
                        if tree.contains_key(body_key(id))? {
                            if counted {
                                released.push(r);
                            }
                        } else {
                            batch.insert(&body_key(id), postcard::to_stdvec(&r)?);
                            if !counted {
                                retained.push(r);
                            }
                        }
                    }
                }
                None => {
                    batch.remove(&message_key(id));
                    if pinned {
                        self.deferred.push(*id);
                    } else if let Some(v) = tree.get(body_key(id))? {
                        batch.remove(&body_key(id));
                        released.push(decode_ref(&v)?);
                    }
                }
            }
        }
        // Written here but not kept (the message came and went in this batch).
        released.extend(bodies.into_values().filter(|(_, c)| *c).map(|(r, _)| r));
        if !pinned {
            for id in self.deferred.drain(..) {
                if state.get(&id).is_some() {
                    continue;
                }
                if let Some(v) = tree.get(body_key(&id))? {
                    batch.remove(&body_key(&id));
                    released.push(decode_ref(&v)?);
                }
            }
        }
        batch.insert(KEY_HEADER, postcard::to_stdvec(&self.header)?);
        for r in &retained {
            self.bodies.retain(r);
        }
        if written {
            // Bodies this apply wrote must be on disk before sled can be.
            self.bodies.sync()?;
        }
        // The whole batch, with the applied log id, lands atomically.
        tree.apply_batch(batch)?;
        drop(state);
        for r in &released {
            self.bodies.release(r);
        }
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
        for name in self.stale_trees.drain(..) {
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
        self.deferred.clear();
        self.stale_trees.push(old);
        *self.shared.tree.write().unwrap_or_else(|p| p.into_inner()) = installed.tree;
        *self.shared.state.write().unwrap_or_else(|p| p.into_inner()) = installed.state;
        if self.pins.load(Ordering::Acquire) == 0 {
            self.drop_stale_trees()?;
        }
        self.shared.applied.send_replace(self.header.applied);
        Ok(())
    }
}

/// A snapshot written into a new state tree generation, now live on disk.
struct Installed {
    gen: u64,
    tree: sled::Tree,
    state: QueueState,
    header: SmHeader,
}

/// Load a received snapshot into a fresh tree generation and switch to it.
fn install_file(
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
        tree.apply_batch(batch)?;
        let Tee { w, .. } = reader.into_inner();
        let copy = w.into_inner().map_err(|e| e.into_error())?;
        copy.sync_all()?;
        snapshots.publish(&copy_path, meta, true)?;
        flush_all(db, bodies)?;
        // The switch: one write names the new generation live.
        meta_tree.insert(KEY_SM_TREE, &gen.to_be_bytes())?;
        flush_all(db, bodies)?;
        Ok((
            QueueState::restore(header.cluster_time, messages),
            new_header,
        ))
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

impl SnapshotFiles {
    fn open(dir: PathBuf) -> Result<Self, StoreError> {
        // Leftovers of builds or transfers cut short.
        for e in std::fs::read_dir(&dir)? {
            let p = e?.path();
            if p.extension().is_some_and(|x| x == "tmp") {
                let _ = std::fs::remove_file(&p);
            }
        }
        let current = match std::fs::File::open(dir.join(CURRENT)) {
            Ok(f) => Some(SnapshotReader::open(BufReader::new(f))?.0.meta),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e.into()),
        };
        Ok(SnapshotFiles {
            dir,
            current: Mutex::new(current),
            seq: AtomicU64::new(0),
        })
    }

    fn temp(&self, what: &str) -> Result<(PathBuf, std::fs::File), StoreError> {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.join(format!("{what}-{n}.tmp"));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        Ok((path, f))
    }

    /// Make the file at `path` the current snapshot, unless a newer one is
    /// already current (a build that finished after an install). `force` is
    /// for installs, which always replace.
    fn publish(&self, path: &Path, meta: &SnapshotMeta, force: bool) -> Result<bool, StoreError> {
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let newer = cur
            .as_ref()
            .is_none_or(|c| c.last_log_id <= meta.last_log_id);
        if !(force || newer) {
            std::fs::remove_file(path)?;
            return Ok(false);
        }
        std::fs::rename(path, self.dir.join(CURRENT))?;
        std::fs::File::open(&self.dir)?.sync_all()?;
        *cur = Some(meta.clone());
        Ok(true)
    }
}

/// Copies everything read from `r` into `w`.
struct Tee<R, W> {
    r: R,
    w: W,
}

impl<R: Read, W: Write> Read for Tee<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.r.read(buf)?;
        self.w.write_all(&buf[..n])?;
        Ok(n)
    }
}

/// Decrements the pin count when a builder is done, however it ends.
pub(crate) struct Pin(pub(crate) Arc<AtomicUsize>);

impl Drop for Pin {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

pub struct SnapshotBuilder {
    state: QueueState,
    header: SmHeader,
    tree: sled::Tree,
    bodies: Arc<Bodies>,
    snapshots: Arc<SnapshotFiles>,
    pin: Option<Pin>,
}

fn build_file(
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

fn sm_err(e: impl std::error::Error + 'static) -> SErr {
    StorageIOError::write_state_machine(&e).into()
}

fn snap_err(e: impl std::error::Error + 'static) -> SErr {
    StorageIOError::write_snapshot(None, &e).into()
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, SErr> {
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
        self.pins.fetch_add(1, Ordering::AcqRel);
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
            pin: Some(Pin(self.pins.clone())),
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
