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
//! again. TLS, pipelining, connection reuse and LMTP are not here yet; the
//! client is built to take them ([`Session`] is generic over its stream).
//!
//! Map of the crate:
//! - [`config`]: [`DeliveryConfig`] and the per-stage [`Timeouts`].
//! - [`job`]: [`Job`] in, [`RcptResult`] out.
//! - `route`: MX lookup and ordering, implicit MX, address literals.
//! - [`session`]: one client connection: commands out, replies in, timed.
//! - `transaction`: the SMTP dialogue and what each reply means.
//! - `deliverer`: the loop over hosts and addresses.
//! - [`retry`]: the [`RetryPolicy`] schedule.

pub mod config;
mod deliverer;
mod error;
pub mod job;
pub mod retry;
mod route;
pub mod session;
mod transaction;

pub use config::{DeliveryConfig, Timeouts};
pub use deliverer::Deliverer;
pub use error::DeliveryError;
pub use job::{Job, RcptResult};
pub use retry::RetryPolicy;
pub use session::{Session, SessionError, Stage};
