//! Outbound delivery for one destination domain: MX resolution
//! (hickory-resolver), the SMTP client, and the retry schedule.
//!
//! A [`Job`] is one message for the recipients of one domain. The
//! [`Deliverer`] finds the domain's mail exchangers (RFC 5321 §5.1, null MX
//! per RFC 7505), tries each host and address in order until one SMTP
//! session gives every recipient a [`RcptResult`], and returns those
//! results in the recipients' order. It never fails as a whole: DNS
//! trouble, refused connections and timeouts all become results.
//!
//! This crate does not queue, retry or bounce by itself: the node records
//! the results in the replicated queue and asks [`RetryPolicy`] when to try
//! again.
//!
//! Where a job goes: a `[[route]]` relay (SMTP smarthost, optionally with
//! AUTH, or LMTP) when one matches the domain, the domain's MX hosts
//! otherwise. STARTTLS follows the [`TlsPolicy`]; PIPELINING is used when
//! offered; connections are reused for the next message to the same
//! destination, and no more than `concurrency_per_destination` are open to
//! one destination at once.
//!
//! Map of the crate:
//! - [`canary`]: the drill's canary mail, delivered to nowhere.
//! - [`config`]: [`DeliveryConfig`] and the per-stage [`Timeouts`].
//! - [`job`]: [`Job`] in, [`RcptResult`] out.
//! - `route`: MX lookup and ordering, implicit MX, address literals.
//! - [`session`]: one client connection: commands out, replies in, timed.
//! - `transaction`: the SMTP dialogue and what each reply means.
//! - `deliverer`: destinations, the slot, the loop over hosts and addresses.
//! - `own`: the cluster's own listeners, which mail is never sent back to.
//! - `conn`: the client stream (plain or TLS) and the connection pool.
//! - [`tls`]: the TLS policy and rustls client configurations.
//! - [`mta_sts`]: recipient domains' MTA-STS policies (RFC 8461).
//! - [`retry`]: the [`RetryPolicy`] schedule.

pub mod canary;
pub mod config;
mod conn;
pub mod dane;
mod deliverer;
mod error;
pub mod job;
pub mod mta_sts;
mod own;
pub mod retry;
mod route;
pub mod session;
pub mod tls;
mod transaction;

pub use config::{Credentials, DeliveryConfig, Relay, Route, Timeouts};
pub use deliverer::Deliverer;
pub use error::DeliveryError;
pub use job::{Job, RcptResult};
pub use own::OwnAddrs;
pub use retry::RetryPolicy;
pub use session::{Session, SessionError, Stage};
pub use tls::TlsPolicy;
