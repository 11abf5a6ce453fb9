//! Fake peers for Skein's tests: real servers on 127.0.0.1 with random
//! ports, configured with builders.
//!
//! - [`DnsServer`]: an authoritative DNS server (UDP and TCP) answering MX,
//!   A, AAAA, TXT and CNAME questions from records given to its builder, with
//!   NXDOMAIN, NODATA and SERVFAIL on demand.
//! - [`SignedDns`]: an authoritative server for a DNSSEC-signed zone (and
//!   unsigned ones), with the trust anchor a validating resolver needs.
//! - [`SinkMta`]: a receiving SMTP server that records what it is sent and
//!   answers with scripted replies, parsing with `skein-smtp`.
//! - [`StaticHttps`]: an HTTPS server giving one fixed response (MTA-STS
//!   policies, good and bad).
//! - [`self_signed`]: a certificate for a name and a server configuration
//!   presenting it.
//! - [`wait_until`] / [`wait_for`]: poll a condition with a deadline.
//! - [`converse`]: a scripted pipelining SMTP client for server tests.
//!
//! It is not a test framework and knows nothing of Skein's nodes or queue:
//! any crate's tests may use it. Errors are `anyhow`, since the only caller
//! is a test that unwraps them.

mod converse;
mod dns;
mod https;
mod sink;
mod tls;
mod wait;

pub use converse::{codes, converse, converse_after_tls};
pub use dns::{DnsServer, DnsServerBuilder, RecordKind, SignedDns, SignedDnsBuilder};
pub use https::StaticHttps;
pub use sink::{Hang, Received, SinkMta, SinkMtaBuilder};
pub use tls::{self_signed, SelfSigned};
pub use wait::{wait_for, wait_until};
