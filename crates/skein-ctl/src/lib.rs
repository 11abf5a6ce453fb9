//! `skeinctl`, the admin CLI of a Skein cluster.
//!
//! The admin API it talks to (status, queue inspection and steering,
//! membership, drain, backup over gRPC on the cluster port) arrives with the
//! operations work; until then the binary says so and exits 1.
