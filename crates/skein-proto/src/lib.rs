//! gRPC services of Skein, generated at build time from `proto/` by
//! tonic-prost-build with protox (no system `protoc` needed).
//!
//! What it is: message types, clients and server traits. What it is not:
//! any behaviour — the services are implemented in `skein-node`.

#![allow(clippy::all)]

pub mod v1 {
    tonic::include_proto!("skein.v1");
}

/// The metadata key that carries the cluster secret on node-to-node calls.
pub const SECRET_HEADER: &str = "x-skein-secret";
/// The metadata key that carries the admin token (as `Bearer <token>`).
pub const AUTH_HEADER: &str = "authorization";
