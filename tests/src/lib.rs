//! The harness for whole-system tests: nodes in process and as real
//! `skeind` processes, several nodes on distinct addresses behind a network
//! the test can cut, a small SMTP client, and configs with test timings.
//! The fake peers (DNS server, recording MTA) come from `skein-testkit`.

pub mod client;
pub mod cluster;
pub mod config;
pub mod ctl;
pub mod fabric;
pub mod mail;
pub mod process;
pub mod tls;

pub use client::{send, send_with_params, Submission};
pub use cluster::{add_node, drain, list_queue, remove_node, status, wait_for_leader, ClusterPlan};
pub use config::{free_addr, free_port, SecretConf, TestConfig, SECRET, TOKEN};
pub use ctl::{run_ctl, CtlOut};
pub use fabric::Fabric;
pub use process::{dir_size, ProcessNode};
