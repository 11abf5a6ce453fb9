//! What a [`Deliverer`](crate::Deliverer) is configured with.

use std::net::SocketAddr;
use std::time::Duration;

use rustls_pki_types::CertificateDer;

use crate::own::OwnAddrs;
use crate::tls::TlsPolicy;

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
    /// TLS for delivery to MX hosts (routes have their own).
    pub tls: TlsPolicy,
    /// CA certificates trusted under `verify` besides the Mozilla roots.
    pub extra_roots: Vec<CertificateDer<'static>>,
    /// Relays that replace the MX lookup for some domains.
    pub routes: Vec<Route>,
    /// Connections (and so deliveries) one node opens to one destination at
    /// once: a domain's MX hosts, or a relay.
    pub concurrency_per_destination: usize,
    /// How long an idle connection is kept for the next message to the same
    /// destination; zero turns reuse off.
    pub connection_reuse: Duration,
    /// Where this cluster itself takes mail: MX hosts at these addresses
    /// are never delivered to (mail loops back to myself).
    pub own: OwnAddrs,
    /// Obey recipient domains' MTA-STS policies (RFC 8461).
    pub mta_sts: bool,
    /// The HTTPS port MTA-STS policies are fetched from: 443, other ports
    /// only for tests.
    pub mta_sts_port: u16,
    /// Honour MX hosts' DNSSEC-proven TLSA records (DANE, RFC 7672).
    pub dane: bool,
    /// DNSKEY records (zone-file form) DNSSEC answers are validated from;
    /// `None`: the root zone's keys, built in.
    pub dnssec_trust_anchors: Option<std::path::PathBuf>,
}

impl DeliveryConfig {
    /// Port 25, the system resolver, RFC 5321 timeouts, opportunistic TLS
    /// (DANE and MTA-STS where published), 20 connections per destination kept idle for 5 s.
    pub fn new(helo_name: impl Into<String>) -> Self {
        DeliveryConfig {
            helo_name: helo_name.into(),
            port: 25,
            nameservers: None,
            timeouts: Timeouts::default(),
            tls: TlsPolicy::May,
            extra_roots: Vec::new(),
            routes: Vec::new(),
            concurrency_per_destination: 20,
            connection_reuse: Duration::from_secs(5),
            own: OwnAddrs::new(),
            mta_sts: true,
            mta_sts_port: 443,
            dane: true,
            dnssec_trust_anchors: None,
        }
    }

    /// The route for `domain`: an exact match first, then `*`.
    pub fn route_for(&self, domain: &str) -> Option<&Route> {
        self.routes
            .iter()
            .find(|r| r.domain.eq_ignore_ascii_case(domain))
            .or_else(|| self.routes.iter().find(|r| r.domain == "*"))
    }
}

/// `[[route]]`: mail for `domain` goes to `relay` instead of the domain's MX.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// A lowercase domain, or `*` for every domain without its own route.
    pub domain: String,
    pub relay: Relay,
    pub tls: TlsPolicy,
    /// AUTH PLAIN with these, after STARTTLS (smarthosts).
    pub auth: Option<Credentials>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Relay {
    /// A smarthost speaking SMTP.
    Smtp { host: String, port: u16 },
    /// A mailbox store speaking LMTP (RFC 2033): a reply per recipient.
    Lmtp { host: String, port: u16 },
}

impl Relay {
    pub fn host(&self) -> &str {
        match self {
            Relay::Smtp { host, .. } | Relay::Lmtp { host, .. } => host,
        }
    }

    pub fn port(&self) -> u16 {
        match self {
            Relay::Smtp { port, .. } | Relay::Lmtp { port, .. } => *port,
        }
    }

    pub fn is_lmtp(&self) -> bool {
        matches!(self, Relay::Lmtp { .. })
    }
}

impl std::fmt::Display for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Relay::Smtp { host, port } => write!(f, "smtp://{host}:{port}"),
            Relay::Lmtp { host, port } => write!(f, "lmtp://{host}:{port}"),
        }
    }
}

/// A user name and password for AUTH PLAIN. `Debug` hides the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &"…")
            .finish()
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
