//! `skeind`, one node of a Skein cluster.
//!
//! What it is: the daemon that wires the parts together — SMTP listeners,
//! the replicated queue (openraft over gRPC, stored in sled), the delivery
//! worker, metrics and health. What it is not: the SMTP grammar
//! (`skein-smtp`), the queue's state machine and storage (`skein-queue`), or
//! the outbound client (`skein-delivery`).
//!
//! Map of the crate:
//! - [`config`]: the TOML config, checked, every problem with its key.
//! - [`node`]: [`Node::start`] binds, starts and returns a running node;
//!   [`Node::shutdown`] is the graceful stop.
//! - [`cluster`]: the openraft instance, proposals (forwarded to the
//!   leader from followers), the Raft transport over tonic.
//! - [`smtp`]: listeners, sessions (generic over the stream) and the accept
//!   path that answers 250 only after a majority commit.
//! - [`delivery`]: the worker that claims, delivers, renews leases and
//!   commits outcomes in batches.
//! - [`metrics`]: Prometheus metrics, `/healthz` and `/readyz`.
//! - [`admin`]: the admin API (status, membership) on the cluster port.
//! - [`tls`]: certificates reloaded from disk; the cluster's mutual TLS.
//! - [`privilege`]: the least-privilege checks made at start.
//! - [`secrets`]: the cluster secret and the admin token, made at first
//!   start when the config has none.
//! - [`observe`]: leader changes and takeovers logged and counted; the
//!   history kept to its bounds.
//! - [`own`]: where this cluster takes mail, which delivery never sends to.

// openraft's error types are large by design; they are returned, not stored.
#![allow(clippy::result_large_err)]

pub mod admin;
pub mod cli;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod delivery;
pub mod disk;
pub mod dkim;
pub mod metrics;
pub mod node;
pub mod observe;
pub mod own;
pub mod privilege;
pub mod secrets;
pub mod smtp;
pub mod sts;
pub mod tls;
pub mod tlsrpt;

pub use config::Config;
pub use node::Node;
