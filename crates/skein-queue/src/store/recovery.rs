//! Making one node the single voter of a new configuration, when its
//! cluster's majority is gone for good (`skeinctl cluster recover --force`).
//!
//! Raft cannot do this by itself: every change of membership is committed
//! by a majority of the old one. So the node is changed from below, while
//! Raft is stopped: the request is a file in the data directory, and the
//! next [`super::open`] applies it before Raft starts —
//!
//! - a membership entry naming this node the only voter is appended after
//!   the last entry of its log, in a term higher than any it has seen;
//! - its vote becomes a committed vote for itself in that term.
//!
//! openraft then starts the node as the leader of a one-voter cluster,
//! which commits and applies everything in its log: mail it holds that the
//! old majority had not committed yet is kept, not dropped. The old members
//! are not in the new configuration; more join with `add-node`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use openraft::{BasicNode, CommittedLeaderId, EntryPayload, LogId, Membership, Vote};
use serde::{Deserialize, Serialize};

use super::log::LogStore;
use super::{StoreError, KEY_VOTE, META_TREE};
use crate::{Entry, NodeId};

/// The request, in the data directory.
const REQUEST: &str = "recover.request";

/// What the next open is asked to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// The node to become the single voter (this one).
    pub node_id: NodeId,
    /// The address peers dial it at.
    pub addr: String,
}

fn request_path(dir: &Path) -> PathBuf {
    dir.join(REQUEST)
}

/// Ask the next open of the store in `dir` to make `req.node_id` the single
/// voter. Durable when it returns.
pub fn request(dir: &Path, req: &Request) -> Result<(), StoreError> {
    let tmp = dir.join(format!("{REQUEST}.tmp"));
    let bytes = postcard::to_stdvec(req)?;
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, request_path(dir))?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// The request waiting in `dir`, if any.
pub fn pending(dir: &Path) -> Result<Option<Request>, StoreError> {
    match std::fs::read(request_path(dir)) {
        Ok(bytes) => Ok(Some(postcard::from_bytes(&bytes)?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Apply the request to the database (Raft not running), then remove it.
/// Returns the log id of the new membership entry. Applying a request
/// twice (a crash between the flush and the removal) only appends a second
/// membership entry naming the same single voter.
pub(crate) fn apply(
    db: &sled::Db,
    log: &LogStore,
    dir: &Path,
    req: &Request,
) -> Result<LogId<NodeId>, StoreError> {
    let meta = db.open_tree(META_TREE)?;
    let last = log.last_log_id();
    let vote: Option<Vote<NodeId>> = match meta.get(KEY_VOTE)? {
        Some(v) => Some(postcard::from_bytes(&v)?),
        None => None,
    };
    let seen_term = vote
        .map(|v| v.leader_id().term)
        .into_iter()
        .chain(last.map(|l| l.leader_id.term))
        .max()
        .unwrap_or(0);
    let term = seen_term + 1;
    let index = last.map_or(0, |l| l.index + 1);
    let log_id = LogId::new(CommittedLeaderId::new(term, req.node_id), index);
    let membership = Membership::new(
        vec![BTreeSet::from([req.node_id])],
        BTreeMap::from([(
            req.node_id,
            BasicNode {
                addr: req.addr.clone(),
            },
        )]),
    );
    let entry = Entry {
        log_id,
        payload: EntryPayload::Membership(membership),
    };
    log.append_synced(entry)?;
    meta.insert(
        KEY_VOTE,
        postcard::to_stdvec(&Vote::new_committed(term, req.node_id))?,
    )?;
    db.flush()?;
    std::fs::remove_file(request_path(dir))?;
    std::fs::File::open(dir)?.sync_all()?;
    tracing::warn!(
        node = req.node_id,
        term,
        index,
        "recovered: this node is the single voter of a new configuration"
    );
    Ok(log_id)
}
