//! Skein's benchmarks. Not tests: they measure and print numbers.
//!
//! - [`load`]: the load generator behind `skein-load` — concurrent SMTP
//!   sessions, each sending messages over one connection, timing every
//!   acceptance (end of DATA to the reply).
//! - `skein-bench` (a binary): starts 1- and 3-node clusters of release
//!   `skeind` processes with a DNS server and a receiving MTA, drives the
//!   load and prints a table; with `--failover N`, kills the leader of a
//!   3-node cluster under load N times ([`failover`]) and prints how soon
//!   survivors accept again; with `--placement`, runs clusters spread over
//!   sites with simulated round trips between them ([`placement`]); with
//!   `--sync DIR`, times the log's kind of sync on DIR's file system
//!   ([`sync`]).

pub mod failover;
pub mod load;
pub mod placement;
pub mod sync;
