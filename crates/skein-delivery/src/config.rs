//! What a [`Deliverer`](crate::Deliverer) is configured with.

use std::net::SocketAddr;
use std::time::Duration;

/// Settings for outbound delivery, shared by every job.
#[derive(Clone, Debug)]
pub struct DeliveryConfig {
    /// The name we give in EHLO/HELO.
    pub helo_name: String,
    /// The TCP port dialled on MX hosts: 25 in production, the sink's port
    /// in tests.
    pub port: u16,
    /// `None`: the system resolver configuration (`/etc/resolv.conf`).
    /// `Some`: exactly these servers, over UDP with TCP fallback.
    pub nameservers: Option<Vec<SocketAddr>>,
    pub timeouts: Timeouts,
}

impl DeliveryConfig {
    /// Port 25, the system resolver and RFC 5321 timeouts.
    pub fn new(helo_name: impl Into<String>) -> Self {
        DeliveryConfig {
            helo_name: helo_name.into(),
            port: 25,
            nameservers: None,
            timeouts: Timeouts::default(),
        }
    }
}

/// How long each stage of an SMTP session may take. Each read of a reply
/// (and each write of a body block) has the timeout of its stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// Establishing the TCP connection.
    pub connect: Duration,
    /// The server's 220 greeting.
    pub greeting: Duration,
    /// The reply to EHLO (and to HELO when falling back).
    pub ehlo: Duration,
    /// The reply to MAIL FROM.
    pub mail: Duration,
    /// The reply to each RCPT TO.
    pub rcpt: Duration,
    /// The reply to DATA (the 354).
    pub data_init: Duration,
    /// Writing each block of the body.
    pub data_block: Duration,
    /// The reply after the final `.`.
    pub data_term: Duration,
}

impl Timeouts {
    /// Every stage bounded by the same duration; for tests.
    pub fn uniform(d: Duration) -> Self {
        Timeouts {
            connect: d,
            greeting: d,
            ehlo: d,
            mail: d,
            rcpt: d,
            data_init: d,
            data_block: d,
            data_term: d,
        }
    }
}

impl Default for Timeouts {
    /// RFC 5321 §4.5.3.2's minimums; connect is not in the RFC and 30 s is
    /// what Postfix uses.
    fn default() -> Self {
        let min = |m: u64| Duration::from_secs(m * 60);
        Timeouts {
            connect: Duration::from_secs(30),
            greeting: min(5),
            ehlo: min(5),
            mail: min(5),
            rcpt: min(5),
            data_init: min(2),
            data_block: min(3),
            data_term: min(10),
        }
    }
}
