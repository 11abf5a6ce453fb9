//! From [`RawConfig`] to [`Config`], collecting every problem with its key.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;

use super::raw::*;
use super::*;

/// One thing wrong with a config, and the key it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

pub(super) struct Checker {
    problems: Vec<Problem>,
    secrets: Secrets,
    /// Read the certificate, key and CA files the config names.
    check_files: bool,
}

impl Checker {
    /// Record a problem; the first one said about a key is the one kept
    /// (a value of the wrong type is then not also "missing").
    pub(super) fn problem(&mut self, key: impl Into<String>, message: impl Into<String>) {
        let key = key.into();
        if self.problems.iter().any(|p| p.key == key) {
            return;
        }
        self.problems.push(Problem {
            key,
            message: message.into(),
        });
    }

    fn duration(&mut self, key: &str, v: Option<&String>, default: Duration) -> Duration {
        match v {
            None => default,
            Some(s) => match humantime::parse_duration(s) {
                Ok(d) => d,
                Err(e) => {
                    self.problem(
                        key,
                        format!("{s:?} is not a duration such as \"30s\" or \"5m\" ({e})"),
                    );
                    default
                }
            },
        }
    }

    fn socket_addr(&mut self, key: &str, s: &str) -> Option<SocketAddr> {
        match s.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.problem(
                    key,
                    format!("{s:?} is not an IP address with a port, such as \"0.0.0.0:25\""),
                );
                None
            }
        }
    }

    fn socket_addrs(
        &mut self,
        key: &str,
        v: Option<&Vec<String>>,
        default: &[&str],
    ) -> Vec<SocketAddr> {
        match v {
            None => default.iter().filter_map(|s| s.parse().ok()).collect(),
            Some(list) => list
                .iter()
                .enumerate()
                .filter_map(|(i, s)| self.socket_addr(&format!("{key}[{i}]"), s))
                .collect(),
        }
    }

    /// A `host:port` that peers or clients dial; the host may be a name.
    fn host_port(&mut self, key: &str, s: &str) {
        let ok = match s.rsplit_once(':') {
            Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0),
            None => false,
        };
        if !ok {
            self.problem(key, format!("{s:?} is not host:port"));
        }
    }

    fn path(&mut self, key: &str, v: Option<&String>) -> Option<PathBuf> {
        let s = v?;
        if s.is_empty() {
            self.problem(key, "must not be empty");
            return None;
        }
        Some(PathBuf::from(s))
    }

    /// `s` as a [`Secret`] if it is long enough and can travel in a gRPC
    /// header (printable ASCII).
    fn strong(&mut self, key: &str, s: String) -> Option<Secret> {
        if s.len() < crate::secrets::MIN_SECRET_LEN {
            self.problem(
                key,
                format!(
                    "is {} bytes; use at least {} (e.g. `openssl rand -hex 16`)",
                    s.len(),
                    crate::secrets::MIN_SECRET_LEN
                ),
            );
            return None;
        }
        if !s.bytes().all(|b| b.is_ascii_graphic()) {
            self.problem(key, "must be printable ASCII without spaces");
            return None;
        }
        Some(Secret::new(s))
    }

    fn has_problem(&self, key: &str) -> bool {
        self.problems
            .iter()
            .any(|p| p.key == key || p.key.starts_with(&format!("{key}_")))
    }

    fn secret(
        &mut self,
        key: &str,
        inline: Option<&String>,
        file_key: &str,
        file: Option<&String>,
    ) -> Option<String> {
        match (inline, file) {
            (Some(_), Some(_)) => {
                self.problem(key, format!("set either {key} or {file_key}, not both"));
                None
            }
            (Some(s), None) if s.is_empty() => {
                self.problem(key, "must not be empty");
                None
            }
            (Some(s), None) => {
                self.secrets.inline.push(key.to_string());
                Some(s.clone())
            }
            (None, Some(path)) => match std::fs::read_to_string(path) {
                Ok(s) if !s.trim().is_empty() => {
                    self.secrets.files.push(PathBuf::from(path));
                    Some(s.trim().to_string())
                }
                Ok(_) => {
                    self.problem(file_key, format!("{path} is empty"));
                    None
                }
                Err(e) => {
                    self.problem(file_key, format!("cannot read {path}: {e}"));
                    None
                }
            },
            (None, None) => None,
        }
    }
}

/// The file as written, every key that has a value of the wrong type
/// reported with its key (and then left out, so that every other key is
/// still read and checked): one run shows every problem.
fn raw_config(c: &mut Checker, text: &str) -> Option<RawConfig> {
    let mut table: toml::Table = match text.parse() {
        Ok(t) => t,
        Err(e) => {
            c.problem("(file)", e.to_string().trim().to_string());
            return None;
        }
    };
    // Each round takes out one key of the wrong type; a file has fewer keys.
    for _ in 0..1000 {
        let mut unknown = Vec::new();
        let mut track = serde_path_to_error::Track::new();
        let de =
            serde_path_to_error::Deserializer::new(toml::Value::Table(table.clone()), &mut track);
        let raw: Result<RawConfig, _> =
            serde_ignored::deserialize(de, |path| unknown.push(path.to_string()));
        match raw {
            Ok(raw) => {
                for key in unknown {
                    c.problem(key, "unknown key");
                }
                return Some(raw);
            }
            Err(e) => {
                let path = track.path();
                c.problem(path.to_string(), wrong_type(&e.to_string()));
                if !remove(&mut table, &path) {
                    return None;
                }
            }
        }
    }
    None
}

/// serde's "invalid type: string \"2526\", expected u64" in an operator's words.
fn wrong_type(msg: &str) -> String {
    // toml adds "\nin `key`": the key is said already.
    let msg = msg.lines().next().unwrap_or("").trim();
    let Some(rest) = msg.strip_prefix("invalid type: ") else {
        return msg.to_string();
    };
    let (found, expected) = rest
        .split_once(", expected ")
        .unwrap_or((rest, "something else"));
    let expected = match expected {
        "u64" | "u32" | "u16" | "u8" | "usize" | "i64" => "a whole number",
        "a sequence" => "a list",
        "a map" => "a table",
        "a boolean" => "true or false",
        other => other,
    };
    format!("expected {expected}, found {found}")
}

/// Take the value at `path` out of `table`; false if there is none.
fn remove(table: &mut toml::Table, path: &serde_path_to_error::Path) -> bool {
    use serde_path_to_error::Segment;
    fn take(v: &mut toml::Value, segments: &[&Segment]) -> bool {
        match (segments, v) {
            ([Segment::Map { key }], toml::Value::Table(t)) => t.remove(key.as_str()).is_some(),
            ([Segment::Seq { index }], toml::Value::Array(a)) if *index < a.len() => {
                a.remove(*index);
                true
            }
            ([Segment::Map { key }, rest @ ..], toml::Value::Table(t)) if !rest.is_empty() => {
                t.get_mut(key.as_str()).is_some_and(|n| take(n, rest))
            }
            ([Segment::Seq { index }, rest @ ..], toml::Value::Array(a)) if !rest.is_empty() => {
                a.get_mut(*index).is_some_and(|n| take(n, rest))
            }
            _ => false,
        }
    }
    let segments: Vec<&Segment> = path
        .iter()
        .filter(|s| matches!(s, Segment::Map { .. } | Segment::Seq { .. }))
        .collect();
    let mut here = toml::Value::Table(std::mem::take(table));
    let ok = take(&mut here, &segments);
    if let toml::Value::Table(t) = here {
        *table = t;
    }
    ok
}

pub(super) fn parse(text: &str, check_files: bool) -> Result<Config, Vec<Problem>> {
    let mut c = Checker {
        problems: Vec::new(),
        secrets: Secrets::default(),
        check_files,
    };
    let Some(raw) = raw_config(&mut c, text) else {
        return Err(c.problems);
    };
    let mut config = check(&mut c, raw);
    config.secrets = std::mem::take(&mut c.secrets);
    if c.problems.is_empty() {
        Ok(config)
    } else {
        Err(c.problems)
    }
}

fn check(c: &mut Checker, raw: RawConfig) -> Config {
    let node_id = raw.node_id.unwrap_or(1);
    if node_id == 0 {
        c.problem("node_id", "must be 1 or more");
    }
    let log_format = match raw.log_format.as_deref() {
        None | Some("text") => LogFormat::Text,
        Some("json") => LogFormat::Json,
        Some(other) => {
            c.problem(
                "log_format",
                format!("{other:?} is neither \"text\" nor \"json\""),
            );
            LogFormat::Text
        }
    };
    if let Some(l) = &raw.log_level {
        if tracing_subscriber::EnvFilter::try_new(l).is_err() {
            c.problem("log_level", format!("{l:?} is not a RUST_LOG style filter"));
        }
    }
    let smtp = check_smtp(c, &raw.smtp);
    let cluster = check_cluster(c, node_id, &raw.cluster);
    let admin = AdminConfig {
        token: c
            .secret(
                "admin.token",
                raw.admin.token.as_ref(),
                "admin.token_file",
                raw.admin.token_file.as_ref(),
            )
            .and_then(|t| c.strong("admin.token", t)),
    };
    let delivery = check_delivery(c, &raw.delivery);
    if c.check_files {
        super::files::check(c, &smtp, &cluster, &delivery);
    }
    let routes = raw
        .route
        .iter()
        .enumerate()
        .filter_map(|(i, r)| check_route(c, i, r))
        .collect();
    let dkim: Vec<DkimConfig> = raw
        .dkim
        .iter()
        .enumerate()
        .filter_map(|(i, d)| check_dkim(c, i, d))
        .collect();
    let metrics = MetricsConfig {
        listen: raw
            .metrics
            .listen
            .as_deref()
            .and_then(|s| c.socket_addr("metrics.listen", s))
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9100))),
    };
    let retention = c.duration(
        "trace.retention",
        raw.trace.retention.as_ref(),
        Duration::from_secs(7 * 86400),
    );
    let max_events = raw.trace.max_events.unwrap_or(2_000_000);
    if max_events == 0 {
        c.problem("trace.max_events", "must be 1 or more");
    }
    let trace = TraceConfig {
        retention,
        max_events: max_events as usize,
    };
    Config {
        node_id,
        data_dir: PathBuf::from(raw.data_dir.as_deref().unwrap_or("./skein-data")),
        log_format,
        log_level: raw.log_level,
        smtp,
        cluster,
        admin,
        delivery,
        routes,
        dkim,
        metrics,
        trace,
        secrets: Secrets::default(),
    }
}

fn check_smtp(c: &mut Checker, r: &RawSmtp) -> SmtpConfig {
    let listen = c.socket_addrs("smtp.listen", r.listen.as_ref(), &["127.0.0.1:2525"]);
    let submission_listen =
        c.socket_addrs("smtp.submission_listen", r.submission_listen.as_ref(), &[]);
    let hostname = match &r.hostname {
        Some(h) if is_domain(h) => h.to_ascii_lowercase(),
        Some(h) => {
            c.problem("smtp.hostname", format!("{h:?} is not a domain name"));
            h.clone()
        }
        None => system_hostname(),
    };
    let max_message_size = r.max_message_size.unwrap_or(26_214_400);
    if max_message_size < 1024 {
        c.problem("smtp.max_message_size", "must be at least 1024 bytes");
    }
    // Twice this is the gRPC message limit, and what a snapshot reader
    // accepts as one body.
    if max_message_size > 512 << 20 {
        c.problem(
            "smtp.max_message_size",
            "must be at most 536870912 (512 MiB)",
        );
    }
    let queue_minfree = r.queue_minfree.unwrap_or(256 << 20);
    let max_recipients = r.max_recipients.unwrap_or(1000);
    if max_recipients == 0 {
        c.problem("smtp.max_recipients", "must be 1 or more");
    }
    let relay_networks = networks(c, "smtp.relay_networks", r.relay_networks.as_ref())
        .unwrap_or_else(|| vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()]);
    // Trusted clients are not throttled by what is meant for strangers
    // (Postfix: postscreen_access_list = permit_mynetworks,
    // smtpd_client_connection_limit_exceptions = $mynetworks).
    let greet_pause_exceptions = networks(
        c,
        "smtp.greet_pause_exceptions",
        r.greet_pause_exceptions.as_ref(),
    )
    .unwrap_or_else(|| relay_networks.clone());
    let connection_limit_exceptions = networks(
        c,
        "smtp.client_connection_limit_exceptions",
        r.client_connection_limit_exceptions.as_ref(),
    )
    .unwrap_or_else(|| relay_networks.clone());
    let accept_domains = r
        .accept_domains
        .iter()
        .flatten()
        .enumerate()
        .filter_map(|(i, d)| {
            if is_domain(d) {
                Some(d.to_ascii_lowercase())
            } else {
                c.problem(
                    format!("smtp.accept_domains[{i}]"),
                    format!("{d:?} is not a domain name"),
                );
                None
            }
        })
        .collect();
    let tls_cert = c.path("smtp.tls_cert", r.tls_cert.as_ref());
    let tls_key = c.path("smtp.tls_key", r.tls_key.as_ref());
    if tls_cert.is_some() != tls_key.is_some() {
        c.problem(
            "smtp.tls_cert",
            "tls_cert and tls_key go together: set both or neither",
        );
    }
    let max_connections = r.max_connections.unwrap_or(1000);
    if max_connections == 0 {
        c.problem("smtp.max_connections", "must be 1 or more");
    }
    let max_connections_per_ip = r.max_connections_per_ip.unwrap_or(50);
    if max_connections_per_ip == 0 {
        c.problem("smtp.max_connections_per_ip", "must be 1 or more");
    }
    let greet_pause = c.duration(
        "smtp.greet_pause",
        r.greet_pause.as_ref(),
        Duration::from_millis(300),
    );
    let timeout = c.duration("smtp.timeout", r.timeout.as_ref(), Duration::from_secs(300));
    if timeout < Duration::from_secs(1) {
        c.problem("smtp.timeout", "must be at least 1s");
    }
    let min_data_rate = r.min_data_rate.unwrap_or(500);
    let tls_reload_interval = c.duration(
        "smtp.tls_reload_interval",
        r.tls_reload_interval.as_ref(),
        Duration::from_secs(10),
    );
    let mut users = BTreeMap::new();
    for (name, hash) in r.users.iter().flatten() {
        if argon2::PasswordHash::new(hash).is_err() {
            c.problem(
                format!("smtp.users.{name}"),
                "is not a password hash; make one with `skeind hash-password`",
            );
        } else {
            users.insert(name.clone(), hash.clone());
        }
    }
    if !submission_listen.is_empty() && tls_cert.is_none() {
        c.problem(
            "smtp.submission_listen",
            "needs smtp.tls_cert and smtp.tls_key: AUTH is offered only under TLS",
        );
    }
    SmtpConfig {
        listen,
        submission_listen,
        hostname,
        max_message_size: max_message_size as usize,
        queue_minfree,
        max_recipients: max_recipients as usize,
        relay_networks,
        greet_pause_exceptions,
        connection_limit_exceptions,
        accept_domains,
        tls_cert,
        tls_key,
        max_connections: max_connections as usize,
        max_connections_per_ip: max_connections_per_ip as usize,
        greet_pause,
        timeout,
        min_data_rate,
        tls_reload_interval,
        users,
    }
}

fn check_cluster(c: &mut Checker, node_id: u64, r: &RawCluster) -> ClusterConfig {
    let listen = r
        .listen
        .as_deref()
        .and_then(|s| c.socket_addr("cluster.listen", s))
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 7100)));
    let mut peers = BTreeMap::new();
    for (k, addr) in r.peers.iter().flatten() {
        let key = format!("cluster.peers.{k}");
        match k.parse::<u64>() {
            Ok(id) if id > 0 => {
                c.host_port(&key, addr);
                peers.insert(id, addr.clone());
            }
            _ => c.problem(&key, "node ids are whole numbers from 1"),
        }
    }
    let advertise = match (&r.advertise, peers.get(&node_id)) {
        (Some(a), _) => {
            c.host_port("cluster.advertise", a);
            a.clone()
        }
        (None, Some(p)) => p.clone(),
        (None, None) => listen.to_string(),
    };
    if peers.is_empty() {
        peers.insert(node_id, advertise.clone());
    } else {
        match peers.get(&node_id) {
            // A node joining an existing cluster (`skeinctl cluster add-node`)
            // is not among the initial voters; it must say where it is.
            None if r.advertise.is_none() => c.problem(
                "cluster.advertise",
                format!("required for a node that is not in cluster.peers (node_id = {node_id} joins with cluster add-node)"),
            ),
            None => {}
            Some(p) if *p != advertise => c.problem(
                "cluster.advertise",
                format!("{advertise:?} differs from cluster.peers.{node_id} = {p:?}; peers must dial what this node advertises"),
            ),
            Some(_) => {}
        }
    }
    let secret = c
        .secret(
            "cluster.secret",
            r.secret.as_ref(),
            "cluster.secret_file",
            r.secret_file.as_ref(),
        )
        .and_then(|s| c.strong("cluster.secret", s));
    // A node alone makes its own secret; one that names others (peers, or
    // a seed to join) must share theirs.
    if secret.is_none() && !c.has_problem("cluster.secret") && peers.keys().any(|id| *id != node_id)
    {
        c.problem(
            "cluster.secret",
            "required when cluster.peers names other nodes (every node shares one; a node started alone keeps its own in <data_dir>/cluster.secret)",
        );
    }
    let tls = match (&r.tls_cert, &r.tls_key, &r.tls_ca) {
        (None, None, None) => None,
        (Some(cert), Some(key), Some(ca)) => Some(TlsFiles {
            cert: cert.into(),
            key: key.into(),
            ca: ca.into(),
        }),
        _ => {
            c.problem(
                "cluster.tls_cert",
                "tls_cert, tls_key and tls_ca go together: set all three or none",
            );
            None
        }
    };
    let commit_timeout = c.duration(
        "cluster.commit_timeout",
        r.commit_timeout.as_ref(),
        Duration::from_secs(10),
    );
    let heartbeat_interval = c.duration(
        "cluster.heartbeat_interval",
        r.heartbeat_interval.as_ref(),
        Duration::from_millis(100),
    );
    let election_timeout = c.duration(
        "cluster.election_timeout",
        r.election_timeout.as_ref(),
        Duration::from_millis(500),
    );
    if election_timeout <= heartbeat_interval * 2 {
        c.problem(
            "cluster.election_timeout",
            "must be more than twice cluster.heartbeat_interval",
        );
    }
    if commit_timeout < Duration::from_millis(100) {
        c.problem("cluster.commit_timeout", "must be at least 100ms");
    }
    let snapshot_every = r.snapshot_every.unwrap_or(10_000);
    if snapshot_every < 10 {
        c.problem("cluster.snapshot_every", "must be at least 10 entries");
    }
    let site = r.site.clone().unwrap_or_default();
    if site.len() > 64
        || !site
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch))
    {
        c.problem(
            "cluster.site",
            "at most 64 letters, digits, '-', '_' or '.'",
        );
    }
    ClusterConfig {
        listen,
        advertise,
        site,
        secret,
        tls,
        peers,
        commit_timeout,
        heartbeat_interval,
        election_timeout,
        snapshot_every,
    }
}

fn check_delivery(c: &mut Checker, r: &RawDelivery) -> DeliveryConfig {
    let nameservers = r.nameservers.as_ref().map(|list| {
        list.iter()
            .enumerate()
            .filter_map(|(i, s)| {
                // A bare IP means port 53.
                let with_port = if s.parse::<std::net::IpAddr>().is_ok() {
                    SocketAddr::new(s.parse().ok()?, 53).to_string()
                } else {
                    s.clone()
                };
                c.socket_addr(&format!("delivery.nameservers[{i}]"), &with_port)
            })
            .collect::<Vec<_>>()
    });
    let port = match r.port {
        None => 25,
        Some(p) if (1..=65535).contains(&p) => p as u16,
        Some(p) => {
            c.problem("delivery.port", format!("{p} is not a TCP port"));
            25
        }
    };
    let mta_sts_port = match r.mta_sts_port {
        None => 443,
        Some(p) if (1..=65535).contains(&p) => p as u16,
        Some(p) => {
            c.problem("delivery.mta_sts_port", format!("{p} is not a TCP port"));
            443
        }
    };
    let default_schedule = ["1m", "5m", "15m", "1h", "4h"];
    let retry_schedule: Vec<Duration> = match &r.retry_schedule {
        None => default_schedule
            .iter()
            .map(|s| humantime::parse_duration(s).unwrap())
            .collect(),
        Some(list) if list.is_empty() => {
            c.problem("delivery.retry_schedule", "needs at least one step");
            vec![]
        }
        Some(list) => list
            .iter()
            .enumerate()
            .map(|(i, s)| {
                c.duration(
                    &format!("delivery.retry_schedule[{i}]"),
                    Some(s),
                    Duration::from_secs(60),
                )
            })
            .collect(),
    };
    let max_queue_time = c.duration(
        "delivery.max_queue_time",
        r.max_queue_time.as_ref(),
        Duration::from_secs(5 * 86400),
    );
    let delay_warning = r
        .delay_warning
        .as_ref()
        .map(|v| {
            c.duration(
                "delivery.delay_warning",
                Some(v),
                Duration::from_secs(4 * 3600),
            )
        })
        .filter(|d| !d.is_zero());
    let lease = c.duration("delivery.lease", r.lease.as_ref(), Duration::from_secs(30));
    if lease < Duration::from_millis(500) {
        c.problem("delivery.lease", "must be at least 500ms");
    }
    let claim_interval = c.duration(
        "delivery.claim_interval",
        r.claim_interval.as_ref(),
        Duration::from_secs(1),
    );
    if claim_interval.is_zero() {
        c.problem("delivery.claim_interval", "must be more than zero");
    }
    let concurrency_per_domain = r.concurrency_per_domain.unwrap_or(20);
    if concurrency_per_domain == 0 {
        c.problem("delivery.concurrency_per_domain", "must be 1 or more");
    }
    let max_concurrency = r.max_concurrency.unwrap_or(200);
    if max_concurrency == 0 {
        c.problem("delivery.max_concurrency", "must be 1 or more");
    }
    let connect_timeout = c.duration(
        "delivery.connect_timeout",
        r.connect_timeout.as_ref(),
        Duration::from_secs(30),
    );
    let command_timeout = r.command_timeout.as_ref().map(|s| {
        c.duration(
            "delivery.command_timeout",
            Some(s),
            Duration::from_secs(300),
        )
    });
    let tls = tls_policy(c, "delivery.tls", r.tls.as_ref());
    let tls_ca_file = c.path("delivery.tls_ca_file", r.tls_ca_file.as_ref());
    let connection_reuse = c.duration(
        "delivery.connection_reuse",
        r.connection_reuse.as_ref(),
        Duration::from_secs(5),
    );
    // Notices stay small whatever RET= asked: at most 16 MiB returned.
    let bounce_size_limit = r.bounce_size_limit.unwrap_or(50_000);
    if bounce_size_limit > 16 << 20 {
        c.problem(
            "delivery.bounce_size_limit",
            "must be at most 16777216 (16 MiB)",
        );
    }
    DeliveryConfig {
        tls,
        tls_ca_file,
        connection_reuse,
        bounce_size_limit: bounce_size_limit as usize,
        mta_sts: r.mta_sts.unwrap_or(true),
        mta_sts_port,
        dane: r.dane.unwrap_or(true),
        dnssec_trust_anchors: c.path(
            "delivery.dnssec_trust_anchors",
            r.dnssec_trust_anchors.as_ref(),
        ),
        tls_reports: r.tls_reports.unwrap_or(false),
        tls_report_interval: c.duration(
            "delivery.tls_report_interval",
            r.tls_report_interval.as_ref(),
            Duration::from_secs(86400),
        ),
        nameservers,
        port,
        retry_schedule,
        max_queue_time,
        delay_warning,
        lease,
        claim_interval,
        deliver_as_learner: r.deliver_as_learner.unwrap_or(false),
        concurrency_per_domain: concurrency_per_domain as usize,
        max_concurrency: max_concurrency as usize,
        connect_timeout,
        command_timeout,
    }
}

fn check_dkim(c: &mut Checker, i: usize, r: &RawDkim) -> Option<DkimConfig> {
    let key = |k: &str| format!("dkim[{i}].{k}");
    let domain = match &r.domain {
        Some(d)
            if matches!(
                skein_smtp::Domain::parse_ascii(d),
                Ok(skein_smtp::Domain::Name(_))
            ) =>
        {
            d.trim_end_matches('.').to_ascii_lowercase()
        }
        Some(d) => {
            c.problem(key("domain"), format!("{d:?} is not a domain name"));
            return None;
        }
        None => {
            c.problem(key("domain"), "missing");
            return None;
        }
    };
    // A selector is one or more DNS labels (RFC 6376 3.1).
    let selector = match &r.selector {
        Some(s)
            if !s.is_empty()
                && s.len() <= 63 * 4
                && s.split('.').all(|l| {
                    !l.is_empty()
                        && l.len() <= 63
                        && l.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                }) =>
        {
            s.clone()
        }
        Some(s) => {
            c.problem(
                key("selector"),
                format!("{s:?} is not a DNS label (letters, digits, '-', '_', dots between)"),
            );
            return None;
        }
        None => {
            c.problem(key("selector"), "missing");
            return None;
        }
    };
    let Some(key_file) = r.key_file.as_ref().map(PathBuf::from) else {
        c.problem(key("key_file"), "missing");
        return None;
    };
    if c.check_files {
        match crate::dkim::load_key(&key_file) {
            Ok(_) => c.secrets.files.push(key_file.clone()),
            Err(e) => c.problem(key("key_file"), format!("{e:#}")),
        }
    }
    let headers = match &r.headers {
        None => crate::dkim::DEFAULT_HEADERS
            .iter()
            .map(|h| h.to_string())
            .collect(),
        Some(h) if !h.iter().any(|h| h.eq_ignore_ascii_case("from")) => {
            c.problem(key("headers"), "must include From (RFC 6376 5.4)");
            return None;
        }
        Some(h) => match h
            .iter()
            .find(|h| h.is_empty() || !h.bytes().all(|b| b.is_ascii_graphic() && b != b':'))
        {
            Some(bad) => {
                c.problem(
                    key("headers"),
                    format!("{bad:?} is not a header field name"),
                );
                return None;
            }
            None => h.clone(),
        },
    };
    let canon = |s: &str| match s {
        "simple" => Some(Canon::Simple),
        "relaxed" => Some(Canon::Relaxed),
        _ => None,
    };
    let c_value = r.canonicalization.as_deref().unwrap_or("relaxed/relaxed");
    // "header/body"; one word alone is the header's, the body then simple.
    let (header_canon, body_canon) = match c_value.split_once('/') {
        Some((h, b)) => (canon(h), canon(b)),
        None => (canon(c_value), Some(Canon::Simple)),
    };
    let (Some(header_canon), Some(body_canon)) = (header_canon, body_canon) else {
        c.problem(
            key("canonicalization"),
            format!("{c_value:?} is not HEADER/BODY with each simple or relaxed"),
        );
        return None;
    };
    let expire = r
        .expire
        .as_ref()
        .map(|e| c.duration(&key("expire"), Some(e), Duration::ZERO));
    if expire == Some(Duration::ZERO) {
        c.problem(key("expire"), "must be more than zero");
    }
    Some(DkimConfig {
        domain,
        selector,
        key_file,
        headers,
        header_canon,
        body_canon,
        expire,
    })
}

fn check_route(c: &mut Checker, i: usize, r: &RawRoute) -> Option<Route> {
    let key = |k: &str| format!("route[{i}].{k}");
    let domain = match &r.domain {
        Some(d) if d == "*" || is_domain(d) => d.to_ascii_lowercase(),
        Some(d) => {
            c.problem(
                key("domain"),
                format!("{d:?} is neither a domain name nor \"*\""),
            );
            return None;
        }
        None => {
            c.problem(key("domain"), "missing");
            return None;
        }
    };
    let Some(relay) = &r.relay else {
        c.problem(key("relay"), "missing");
        return None;
    };
    let parsed = relay.split_once("://").and_then(|(scheme, rest)| {
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) => (h, p.parse::<u16>().ok()?),
            None => (rest, if scheme == "lmtp" { 24 } else { 25 }),
        };
        if !is_domain(host.trim_matches(['[', ']'])) {
            return None;
        }
        let host = host.to_string();
        match scheme {
            "smtp" => Some(Relay::Smtp { host, port }),
            "lmtp" => Some(Relay::Lmtp { host, port }),
            _ => None,
        }
    });
    let Some(relay) = parsed else {
        c.problem(
            key("relay"),
            format!("{relay:?} is not smtp://host[:port] or lmtp://host[:port]"),
        );
        return None;
    };
    let password = c.secret(
        &key("auth_password"),
        r.auth_password.as_ref(),
        &key("auth_password_file"),
        r.auth_password_file.as_ref(),
    );
    let auth = match (&r.auth_user, password) {
        (Some(user), Some(password)) => Some(Credentials {
            user: user.clone(),
            password,
        }),
        (None, None) => None,
        (Some(_), None) => {
            c.problem(
                key("auth_user"),
                "needs auth_password or auth_password_file",
            );
            None
        }
        (None, Some(_)) => {
            c.problem(key("auth_password"), "needs auth_user");
            None
        }
    };
    // Credentials go only to a verified peer by default: a route with AUTH
    // verifies the relay's certificate unless the operator says otherwise
    // ("encrypt" for a relay with a self-signed certificate, "none" for a
    // relay on localhost).
    let default_tls = if auth.is_some() {
        TlsPolicy::Verify
    } else {
        TlsPolicy::May
    };
    let tls = match &r.tls {
        None => default_tls,
        Some(_) => tls_policy(c, &key("tls"), r.tls.as_ref()),
    };
    if auth.is_some() && tls == TlsPolicy::May {
        c.problem(
            key("tls"),
            "\"may\" could send the AUTH password in plaintext: use \"encrypt\" or \"verify\" (or \"none\" for a relay on a trusted link)",
        );
    }
    Some(Route {
        domain,
        relay,
        tls,
        auth,
    })
}

fn tls_policy(c: &mut Checker, key: &str, v: Option<&String>) -> TlsPolicy {
    match v.map(|s| s.parse::<TlsPolicy>()) {
        None => TlsPolicy::May,
        Some(Ok(p)) => p,
        Some(Err(e)) => {
            c.problem(key, e);
            TlsPolicy::May
        }
    }
}

/// A list of networks (`"10.0.0.0/8"`, or a single address), each bad one
/// reported with its index; `None` when the key is not set.
fn networks(c: &mut Checker, key: &str, list: Option<&Vec<String>>) -> Option<Vec<IpNet>> {
    let list = list?;
    Some(
        list.iter()
            .enumerate()
            .filter_map(|(i, s)| match parse_net(s) {
                Some(n) => Some(n),
                None => {
                    c.problem(
                        format!("{key}[{i}]"),
                        format!("{s:?} is not a network such as \"10.0.0.0/8\""),
                    );
                    None
                }
            })
            .collect(),
    )
}

fn parse_net(s: &str) -> Option<IpNet> {
    s.parse::<IpNet>()
        .ok()
        .or_else(|| s.parse::<std::net::IpAddr>().ok().map(IpNet::from))
}

/// A DNS name of letters, digits and hyphens (or an IP address, for hostnames
/// given as literals in tests).
/// A host or domain name as a config may give it: an IP address, or an
/// ASCII domain name by the SMTP grammar's own rules (`skein_smtp::Domain`).
pub(crate) fn is_domain(s: &str) -> bool {
    s.parse::<std::net::IpAddr>().is_ok()
        || matches!(
            skein_smtp::Domain::parse_ascii(s),
            Ok(skein_smtp::Domain::Name(_))
        )
}

fn system_hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        if let Ok(s) = std::str::from_utf8(&buf[..end]) {
            if is_domain(s) {
                return s.to_ascii_lowercase();
            }
        }
    }
    "localhost".into()
}
