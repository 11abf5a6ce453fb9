//! The replicated mail queue of Skein.
//!
//! What it is: the queue state machine ([`QueueState`], a pure function of the
//! log: requests in, state out, no clock or randomness inside), its storage
//! (the Raft log and message bodies in segment files, the vote and the
//! applied state in sled, and snapshots streamed to files), and the openraft type configuration that ties
//! them together ([`TypeConfig`]).
//!
//! What it is not: the network. Raft RPCs, leader forwarding and the delivery
//! workers live in `skein-node`; this crate never opens a socket.
//!
//! Data flow: a node proposes a [`Request`] through openraft; once committed,
//! openraft hands the entry to [`store::StateMachineStore::apply`], which runs
//! [`QueueState::apply`] and writes the touched messages and the applied log id
//! in one atomic sled batch. Nodes read the queue through a [`QueueReader`].

// openraft's error types are large by design; they are returned, not stored.
#![allow(clippy::result_large_err)]

pub mod history;
mod id;
pub mod state;
pub mod store;
mod types;

pub use history::{Event, EventKind, History};
pub use id::{BadMessageId, IdGenerator, MessageId};
pub use state::{Counts, QueueState};
pub use store::{open, QueueReader, StoreError, Stores};
pub use types::*;

openraft::declare_raft_types!(
    /// The openraft type configuration of the queue.
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = tokio::fs::File,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The Raft handle of a Skein node.
pub type Raft = openraft::Raft<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type Membership = openraft::StoredMembership<NodeId, openraft::BasicNode>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, openraft::BasicNode>;
