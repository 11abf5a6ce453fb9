//! Node configs with test timings, written as the TOML an operator would.

use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::PathBuf;

/// The admin token every test node uses.
pub const TOKEN: &str = "test-admin-token-0123";
/// The cluster secret every test node shares.
pub const SECRET: &str = "test-cluster-secret-0123";

/// A port on 127.0.0.1 that was free a moment ago (for nodes run as
/// processes, whose addresses must be known before they start).
pub fn free_port() -> u16 {
    free_addr([127, 0, 0, 1].into()).port()
}

/// An address on `ip` with a port that was free a moment ago, and that no
/// earlier call in this process handed out: the kernel may give a port it
/// just gave (and that was closed again) to the next `bind` to port 0, and
/// two nodes planned on it — in one test or two running side by side —
/// would then fight over it ("Address already in use" at start).
pub fn free_addr(ip: IpAddr) -> SocketAddr {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    loop {
        let addr = TcpListener::bind((ip, 0)).unwrap().local_addr().unwrap();
        let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
        if given.insert(addr.port()) {
            return addr;
        }
    }
}

#[derive(Debug, Clone)]
pub struct TestConfig {
    pub node_id: u64,
    pub data_dir: PathBuf,
    pub smtp: SocketAddr,
    pub cluster: SocketAddr,
    pub metrics: SocketAddr,
    /// What peers dial, when not the cluster listener itself.
    pub advertise: Option<SocketAddr>,
    /// `cluster.site`, if any.
    pub site: Option<String>,
    /// The initial voters' advertised addresses; empty for one node.
    pub peers: Vec<(u64, SocketAddr)>,
    pub dns: SocketAddr,
    pub delivery_port: u16,
    pub retry_schedule: Vec<String>,
    pub lease: String,
    pub claim_interval: String,
    pub commit_timeout: String,
    /// `cluster.heartbeat_interval` and `election_timeout`: quick in tests;
    /// `None` leaves both at their defaults.
    pub raft_timings: Option<(String, String)>,
    pub snapshot_every: u64,
    /// Extra lines for the `[delivery]` table.
    pub delivery_extra: String,
    /// Extra lines for the `[smtp]` table.
    pub smtp_extra: String,
    /// `smtp.greet_pause`: off by default in tests, which open many sessions.
    pub greet_pause: String,
    /// `cluster.tls_cert`, `tls_key` and `tls_ca`: mutual TLS between nodes.
    pub cluster_tls: Option<[PathBuf; 3]>,
    /// How the node gets its cluster secret.
    pub secret: SecretConf,
    /// Tables appended at the end of the file, such as `[[dkim]]`.
    pub tail: String,
}

/// Where a test node's cluster secret comes from.
#[derive(Debug, Clone)]
pub enum SecretConf {
    /// `cluster.secret = "..."`.
    Inline(String),
    /// `cluster.secret_file = "..."`.
    File(PathBuf),
    /// Neither: a node alone makes its own.
    Made,
}

impl TestConfig {
    /// One node on random ports (port 0: only for nodes run in process).
    pub fn new(node_id: u64, data_dir: PathBuf, dns: SocketAddr, delivery_port: u16) -> Self {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        TestConfig {
            node_id,
            data_dir,
            smtp: any,
            cluster: any,
            metrics: any,
            advertise: None,
            site: None,
            peers: Vec::new(),
            dns,
            delivery_port,
            retry_schedule: vec!["1s".into()],
            lease: "5s".into(),
            claim_interval: "200ms".into(),
            commit_timeout: "5s".into(),
            raft_timings: Some(("50ms".into(), "300ms".into())),
            snapshot_every: 10_000,
            delivery_extra: String::new(),
            smtp_extra: String::new(),
            greet_pause: "0s".into(),
            cluster_tls: None,
            secret: SecretConf::Inline(SECRET.into()),
            tail: String::new(),
        }
    }

    /// Fixed free ports, for a node that runs as a process and restarts.
    pub fn with_fixed_ports(mut self) -> Self {
        let ip: IpAddr = [127, 0, 0, 1].into();
        self.smtp = free_addr(ip);
        self.cluster = free_addr(ip);
        self.metrics = free_addr(ip);
        self
    }

    /// Where the admin API of this node answers.
    pub fn admin_addr(&self) -> SocketAddr {
        self.advertise.unwrap_or(self.cluster)
    }

    pub fn toml(&self) -> String {
        let schedule: Vec<String> = self
            .retry_schedule
            .iter()
            .map(|s| format!("{s:?}"))
            .collect();
        let advertise = self
            .advertise
            .map(|a| format!("advertise = \"{a}\""))
            .unwrap_or_default();
        let raft_timings = self
            .raft_timings
            .as_ref()
            .map(|(hb, el)| format!("heartbeat_interval = \"{hb}\"\nelection_timeout = \"{el}\""))
            .unwrap_or_default();
        let cluster_tls = self
            .cluster_tls
            .as_ref()
            .map(|[cert, key, ca]| {
                format!("tls_cert = {cert:?}\ntls_key = {key:?}\ntls_ca = {ca:?}")
            })
            .unwrap_or_default();
        let mut t = format!(
            r#"node_id = {id}
data_dir = {dir:?}

[smtp]
listen = ["{smtp}"]
hostname = "node{id}.skein.test"
accept_domains = ["example.org"]
greet_pause = "{greet_pause}"
{smtp_extra}

[cluster]
listen = "{cluster}"
{advertise}
{site}
commit_timeout = "{commit}"
{raft_timings}
{secret}
snapshot_every = {snapshot_every}
{cluster_tls}

[admin]
token = "{token}"

[delivery]
nameservers = ["{dns}"]
port = {port}
retry_schedule = [{schedule}]
lease = "{lease}"
claim_interval = "{claim}"
command_timeout = "10s"
connect_timeout = "2s"
{extra}

[metrics]
listen = "{metrics}"
"#,
            id = self.node_id,
            dir = self.data_dir.display().to_string(),
            smtp = self.smtp,
            cluster = self.cluster,
            commit = self.commit_timeout,
            raft_timings = raft_timings,
            site = self
                .site
                .as_ref()
                .map(|s| format!("site = {s:?}"))
                .unwrap_or_default(),
            snapshot_every = self.snapshot_every,
            token = TOKEN,
            secret = match &self.secret {
                SecretConf::Inline(s) => format!("secret = {s:?}"),
                SecretConf::File(p) => format!("secret_file = {:?}", p.display().to_string()),
                SecretConf::Made => String::new(),
            },
            dns = self.dns,
            port = self.delivery_port,
            schedule = schedule.join(", "),
            lease = self.lease,
            claim = self.claim_interval,
            extra = self.delivery_extra,
            smtp_extra = self.smtp_extra,
            greet_pause = self.greet_pause,
            cluster_tls = cluster_tls,
            metrics = self.metrics,
        );
        if !self.peers.is_empty() {
            t.push_str("\n[cluster.peers]\n");
            for (id, addr) in &self.peers {
                t.push_str(&format!("{id} = \"{addr}\"\n"));
            }
        }
        t.push('\n');
        t.push_str(&self.tail);
        t
    }

    pub fn config(&self) -> skein_node::Config {
        skein_node::Config::parse(&self.toml())
            .unwrap_or_else(|p| panic!("test config invalid: {p:?}"))
    }
}
