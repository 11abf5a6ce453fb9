//! Who holds a body, and when its segment may go.
//!
//! A body is written to a segment once per node ([`Bodies::append`], which
//! hands the writer one count) and then held by whoever names it:
//!
//! 1. **A log entry.** The log writes an entry's bodies when it appends it
//!    and keeps that count until truncate or purge removes the entry.
//! 2. **A queued message.** The state tree's `b<id>` holds one count while
//!    the message is queued. Applies are saved to the tree in batches (see
//!    `sm::Unsaved`); until then a body is named by the log entry that
//!    brought it, which the log keeps until a snapshot, built after a save,
//!    covers it. Saving an entry that is in the log takes a new count
//!    ([`Arrived::InLog`]); applying one that is not (tools apply entries
//!    directly) writes the body, saves at once, and moves the writer's count
//!    to the message ([`Arrived::Written`]). A message that already has a
//!    body keeps it; a body for a message that did not stay queued is
//!    dropped, and one removed and queued again gets the new one.
//! 3. **A snapshot builder.** While one runs ([`Reclaim::pin`]), nothing
//!    removed from the state loses its body: removed messages wait in
//!    [`Reclaim`] with their `b<id>`, and state trees replaced by an
//!    installed snapshot wait with theirs. The first save with no builder
//!    running lets them go.
//!
//! A segment goes when no count is left (and, for crash safety, only once
//! the sled flush after the last release has finished — see [`super::bodies`]).
//! On open, counts are rebuilt: every log entry from its record, and
//! every `b<id>` of a queued message from sled; a `b<id>` whose message is gone was
//! waiting in [`Reclaim`] and is forgotten.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::log::{stored_refs, SharedLog};
use super::{Bodies, BodyRef, StoreError};
use crate::{MessageId, Request};

/// How a body reached the applies since the last save.
#[derive(Clone, Copy)]
pub(crate) enum Arrived {
    /// Named by the stored log entry: the log keeps its count, a message
    /// that keeps the body takes its own.
    InLog(BodyRef),
    /// Written by this apply: the count is the apply's to give to the
    /// message or to release.
    Written(BodyRef),
}

/// What a queued message does about a body that arrived for it.
pub(crate) enum Keep {
    /// It has a body already; nothing to store.
    Had,
    /// Store this reference under `b<id>`.
    Store(BodyRef),
}

/// The bodies the entries applied since the last save carry, by message
/// id, and the count changes the save makes. Retains happen before the
/// state batch is written, releases after it.
#[derive(Default)]
pub(crate) struct Arrivals {
    by_id: HashMap<MessageId, Arrived>,
    /// Messages the entry being applied brought a body for first.
    fresh: Vec<MessageId>,
    wrote: bool,
    retain: Vec<BodyRef>,
    release: Vec<BodyRef>,
}

impl Arrivals {
    /// Note the bodies of the entry at `index`: the references the log
    /// stored them under, or, for an entry not in the log, written now.
    pub(crate) fn collect(
        &mut self,
        bodies: &Bodies,
        log: &SharedLog,
        index: u64,
        req: &Request,
    ) -> Result<(), StoreError> {
        let carried = req.cmd.bodies();
        if carried.is_empty() {
            return Ok(());
        }
        if let Some(refs) = stored_refs(log, index) {
            if refs.len() == carried.len() {
                for ((id, _), r) in carried.iter().zip(refs) {
                    self.arrive(*id, Arrived::InLog(r));
                }
                return Ok(());
            }
        }
        for (id, body) in carried {
            let r = bodies.append(body)?;
            self.arrive(id, Arrived::Written(r));
        }
        self.wrote = true;
        Ok(())
    }

    /// The body that arrived for `id` since the last save, if any.
    pub(crate) fn body(&self, id: &MessageId) -> Option<BodyRef> {
        self.by_id.get(id).map(|a| match a {
            Arrived::InLog(r) | Arrived::Written(r) => *r,
        })
    }

    /// The first body for a message is its own: the state ignores a later
    /// enqueue of a queued id. (One removed meanwhile was forgotten, see
    /// [`Arrivals::forget`].)
    fn arrive(&mut self, id: MessageId, a: Arrived) {
        match self.by_id.entry(id) {
            std::collections::hash_map::Entry::Occupied(_) => {
                if let Arrived::Written(r) = a {
                    self.release.push(r);
                }
            }
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(a);
                self.fresh.push(id);
            }
        }
    }

    /// The entry whose bodies were collected last is applied: a body for a
    /// message it did not queue (refused, or queued and gone again) is
    /// nobody's.
    pub(crate) fn entry_applied(&mut self, queued: impl Fn(&MessageId) -> bool) {
        for id in std::mem::take(&mut self.fresh) {
            if !queued(&id) {
                self.forget(&id);
            }
        }
    }

    /// Message `id` left the queue: a body that arrived for it is not the
    /// one of a message queued later under the same id.
    pub(crate) fn forget(&mut self, id: &MessageId) {
        if let Some(Arrived::Written(r)) = self.by_id.remove(id) {
            self.release.push(r);
        }
    }

    /// The message `id` is queued at this save; `has_body` says whether
    /// its `b<id>` is already stored.
    pub(crate) fn keep(&mut self, id: &MessageId, has_body: bool) -> Option<Keep> {
        let arrived = self.by_id.remove(id)?;
        Some(match (arrived, has_body) {
            (Arrived::InLog(_), true) => Keep::Had,
            (Arrived::Written(r), true) => {
                self.release.push(r);
                Keep::Had
            }
            (Arrived::InLog(r), false) => {
                self.retain.push(r);
                Keep::Store(r)
            }
            (Arrived::Written(r), false) => Keep::Store(r),
        })
    }

    /// A queued message's stored `b<id>` was removed.
    pub(crate) fn removed(&mut self, r: BodyRef) {
        self.release.push(r);
    }

    /// Whether bodies were written here (entries not in the log), which no
    /// replay can write again: the store saves at once.
    pub(crate) fn wrote(&self) -> bool {
        self.wrote
    }

    /// Before the state batch: counts for the references it stores.
    pub(crate) fn retain_stored(&mut self, bodies: &Bodies) {
        for r in self.retain.drain(..) {
            bodies.retain(&r);
        }
    }

    /// After the state batch: counts for what it removed, and for bodies
    /// written for messages that did not stay.
    pub(crate) fn release_dropped(self, bodies: &Bodies) {
        let unkept = self.by_id.into_values().filter_map(|a| match a {
            Arrived::Written(r) => Some(r),
            Arrived::InLog(_) => None,
        });
        for r in self.release.iter().copied().chain(unkept) {
            bodies.release(&r);
        }
    }
}

/// What waits for snapshot builders to finish before it may go (rule 3).
#[derive(Default)]
pub(crate) struct Reclaim {
    pins: Arc<AtomicUsize>,
    /// Messages removed while pinned; their `b<id>` still holds the body.
    deferred: Vec<MessageId>,
    /// State trees replaced by an installed snapshot, still holding theirs.
    stale_trees: Vec<String>,
}

impl Reclaim {
    /// Held by a snapshot builder for as long as it runs.
    pub(crate) fn pin(&self) -> Pin {
        Pin::on(&self.pins)
    }

    /// The count of running builders, as readers outside the apply see it.
    pub(crate) fn pins(&self) -> Arc<AtomicUsize> {
        self.pins.clone()
    }

    pub(crate) fn pinned(&self) -> bool {
        self.pins.load(Ordering::Acquire) > 0
    }

    pub(crate) fn defer(&mut self, id: MessageId) {
        self.deferred.push(id);
    }

    /// Removed messages whose bodies may go now that nothing is pinned.
    pub(crate) fn take_deferred(&mut self) -> Vec<MessageId> {
        std::mem::take(&mut self.deferred)
    }

    /// A snapshot replaced the state tree `name`: the deferred removals
    /// belonged to it, and it goes once nothing is pinned.
    pub(crate) fn retire_tree(&mut self, name: String) {
        self.deferred.clear();
        self.stale_trees.push(name);
    }

    /// Whether removals or trees wait to be let go.
    pub(crate) fn waiting(&self) -> bool {
        !self.deferred.is_empty() || !self.stale_trees.is_empty()
    }

    pub(crate) fn take_stale_trees(&mut self) -> Vec<String> {
        std::mem::take(&mut self.stale_trees)
    }
}

/// One running snapshot builder (or reader); the pin goes when it drops,
/// however the builder ends.
pub(crate) struct Pin(Arc<AtomicUsize>);

impl Pin {
    /// Pin through a shared count (readers outside the store's apply).
    pub(crate) fn on(pins: &Arc<AtomicUsize>) -> Pin {
        pins.fetch_add(1, Ordering::AcqRel);
        Pin(pins.clone())
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}
