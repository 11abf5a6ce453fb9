//! Configuration: the TOML file of `shared/CONTRACT.md`, parsed into a
//! checked [`Config`]. Every problem is reported at once, each with its key,
//! and a missing file means the embedded single-node defaults.

mod files;
mod raw;
#[cfg(test)]
mod tests;
mod validate;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;

pub use validate::Problem;

pub use crate::secrets::Secret;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub node_id: u64,
    pub data_dir: PathBuf,
    pub log_format: LogFormat,
    pub log_level: Option<String>,
    pub smtp: SmtpConfig,
    pub cluster: ClusterConfig,
    pub admin: AdminConfig,
    pub delivery: DeliveryConfig,
    pub routes: Vec<Route>,
    /// `[[dkim]]`: keys that sign trusted clients' mail.
    pub dkim: Vec<DkimConfig>,
    pub metrics: MetricsConfig,
    pub trace: TraceConfig,
    /// Where the secrets came from, for the permission checks at start.
    pub secrets: Secrets,
}

/// One `[[dkim]]` table.
#[derive(Debug, Clone)]
pub struct DkimConfig {
    /// Lowercase; mail whose `From:` is at this domain is signed (`d=`).
    pub domain: String,
    pub selector: String,
    pub key_file: PathBuf,
    pub headers: Vec<String>,
    pub header_canon: Canon,
    pub body_canon: Canon,
    /// `x=`: how long after signing a verifier should accept the signature.
    pub expire: Option<Duration>,
}

/// A DKIM canonicalization (RFC 6376 3.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Canon {
    Simple,
    Relaxed,
}

/// The secrets a config holds: keys written inline, files read.
#[derive(Debug, Clone, Default)]
pub struct Secrets {
    pub inline: Vec<String>,
    pub files: Vec<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct SmtpConfig {
    pub listen: Vec<SocketAddr>,
    pub submission_listen: Vec<SocketAddr>,
    pub hostname: String,
    pub max_message_size: usize,
    /// New mail is refused (`452 4.3.1`) while the data directory's file
    /// system has less free space than this, or than two maximum messages.
    pub queue_minfree: u64,
    pub max_recipients: usize,
    pub relay_networks: Vec<IpNet>,
    /// Clients greeted at once, without `greet_pause` (default: the relay
    /// networks).
    pub greet_pause_exceptions: Vec<IpNet>,
    /// Clients not held to `max_connections_per_ip` (default: the relay
    /// networks).
    pub connection_limit_exceptions: Vec<IpNet>,
    /// Lowercase domain names anyone may send to.
    pub accept_domains: Vec<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    /// Wait this long before the greeting; a client that talks first is
    /// refused (pipelining before the greeting). Zero disables the check.
    pub greet_pause: Duration,
    /// A command or a block of data must arrive within this (RFC 5321
    /// §4.5.3.2.7: 5 minutes).
    pub timeout: Duration,
    /// Message data slower than this (bytes/s, after a few seconds' grace)
    /// ends the session: one-byte trickling cannot hold a slot for long.
    pub min_data_rate: u64,
    pub tls_reload_interval: Duration,
    /// Submission users: name → argon2 PHC hash.
    pub users: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub listen: SocketAddr,
    /// What peers dial to reach this node (`host:port`).
    pub advertise: String,
    /// Where the node is (a data centre, a region): shown in status, and
    /// what `skeinctl drill --site` fails at once.
    pub site: String,
    /// `None`: the one kept in the data directory (made at first start).
    pub secret: Option<Secret>,
    pub tls: Option<TlsFiles>,
    /// Initial voters, identical on every node; this node included.
    pub peers: BTreeMap<u64, String>,
    /// How long an SMTP session waits for its message to commit before 451.
    pub commit_timeout: Duration,
    pub heartbeat_interval: Duration,
    /// Elections start after a random time in [t, 2t] without a leader.
    pub election_timeout: Duration,
    /// Build a snapshot (and purge the log) after this many entries.
    pub snapshot_every: u64,
}

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// `None`: a token is made at first start and kept in the data directory.
    pub token: Option<Secret>,
}

#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    pub nameservers: Option<Vec<SocketAddr>>,
    pub port: u16,
    pub retry_schedule: Vec<Duration>,
    pub max_queue_time: Duration,
    /// Tell the sender once when a message has waited this long (None: never).
    pub delay_warning: Option<Duration>,
    pub lease: Duration,
    /// How often an idle node looks for due mail to claim.
    pub claim_interval: Duration,
    /// Whether this node delivers while it is a learner (a non-voting
    /// replica, e.g. at a second site). Off: mail accepted there is left
    /// to the voters to claim.
    pub deliver_as_learner: bool,
    pub concurrency_per_domain: usize,
    /// Deliveries one node runs at once.
    pub max_concurrency: usize,
    pub connect_timeout: Duration,
    /// Overrides every per-command timeout of RFC 5321 §4.5.3.2 when set.
    pub command_timeout: Option<Duration>,
    /// STARTTLS policy for delivery to MX hosts.
    pub tls: TlsPolicy,
    /// Extra CA certificates (PEM) trusted under `tls = "verify"`.
    pub tls_ca_file: Option<PathBuf>,
    /// How long an idle outbound connection is kept for the next message.
    pub connection_reuse: Duration,
    /// The most of an original message a notice returns (bytes); a larger
    /// message comes back as its headers, whatever RET= asked.
    pub bounce_size_limit: usize,
    /// Obey recipient domains' MTA-STS policies (RFC 8461).
    pub mta_sts: bool,
    /// The HTTPS port policies are fetched from (443; others for tests).
    pub mta_sts_port: u16,
    /// Honour MX hosts' DNSSEC-proven TLSA records (DANE, RFC 7672).
    pub dane: bool,
    /// DNSKEY records DNSSEC is validated from, instead of the root's keys.
    pub dnssec_trust_anchors: Option<PathBuf>,
    /// Send TLS-RPT reports (RFC 8460) to domains that ask for them.
    pub tls_reports: bool,
    pub tls_report_interval: Duration,
}

/// `[[route]]` entries are the delivery engine's own type.
pub use skein_delivery::{Credentials, Relay, Route, TlsPolicy};

/// How long each replica keeps what happened to messages (`skeinctl trace`).
#[derive(Debug, Clone)]
pub struct TraceConfig {
    pub retention: Duration,
    /// Events kept at most; the oldest go first beyond this.
    pub max_events: usize,
}

#[derive(Debug, Clone)]
pub struct MetricsConfig {
    pub listen: SocketAddr,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}", .0.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Problem>),
}

impl Config {
    /// The embedded defaults: a single-node cluster on loopback.
    pub fn defaults() -> Config {
        Self::parse("").expect("the embedded defaults are valid")
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        validate::parse(&text, true).map_err(ConfigError::Invalid)
    }

    /// Parse and check a config text; on failure, every problem found.
    /// The files the config names are not read: see [`Config::load`].
    pub fn parse(text: &str) -> Result<Config, Vec<Problem>> {
        validate::parse(text, false)
    }

    pub fn is_single_node(&self) -> bool {
        self.cluster.peers.keys().all(|id| *id == self.node_id)
    }
}
