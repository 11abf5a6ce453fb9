//! The config file as written: every key optional, every value as TOML gives
//! it. `super::validate` turns this into a checked [`super::Config`].

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
pub struct RawConfig {
    pub node_id: Option<u64>,
    pub data_dir: Option<String>,
    pub log_format: Option<String>,
    pub log_level: Option<String>,
    #[serde(default)]
    pub smtp: RawSmtp,
    #[serde(default)]
    pub cluster: RawCluster,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub delivery: RawDelivery,
    #[serde(default)]
    pub route: Vec<RawRoute>,
    #[serde(default)]
    pub dkim: Vec<RawDkim>,
    #[serde(default)]
    pub metrics: RawMetrics,
    #[serde(default)]
    pub trace: RawTrace,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawTrace {
    pub retention: Option<String>,
    pub max_events: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawSmtp {
    pub listen: Option<Vec<String>>,
    pub submission_listen: Option<Vec<String>>,
    pub hostname: Option<String>,
    pub max_message_size: Option<u64>,
    pub queue_minfree: Option<u64>,
    pub max_recipients: Option<u64>,
    pub relay_networks: Option<Vec<String>>,
    pub greet_pause_exceptions: Option<Vec<String>>,
    pub client_connection_limit_exceptions: Option<Vec<String>>,
    pub accept_domains: Option<Vec<String>>,
    pub tls_cert: Option<String>,
    pub tls_key: Option<String>,
    pub max_connections: Option<u64>,
    pub max_connections_per_ip: Option<u64>,
    pub greet_pause: Option<String>,
    pub timeout: Option<String>,
    pub min_data_rate: Option<u64>,
    pub tls_reload_interval: Option<String>,
    pub users: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawCluster {
    pub listen: Option<String>,
    pub advertise: Option<String>,
    pub site: Option<String>,
    pub secret: Option<String>,
    pub secret_file: Option<String>,
    pub tls_cert: Option<String>,
    pub tls_key: Option<String>,
    pub tls_ca: Option<String>,
    pub peers: Option<BTreeMap<String, String>>,
    pub commit_timeout: Option<String>,
    pub heartbeat_interval: Option<String>,
    pub election_timeout: Option<String>,
    pub snapshot_every: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawAdmin {
    pub token: Option<String>,
    pub token_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawDelivery {
    pub nameservers: Option<Vec<String>>,
    pub port: Option<u64>,
    pub retry_schedule: Option<Vec<String>>,
    pub max_queue_time: Option<String>,
    pub delay_warning: Option<String>,
    pub lease: Option<String>,
    pub claim_interval: Option<String>,
    pub deliver_as_learner: Option<bool>,
    pub concurrency_per_domain: Option<u64>,
    pub max_concurrency: Option<u64>,
    pub connect_timeout: Option<String>,
    pub command_timeout: Option<String>,
    pub tls: Option<String>,
    pub tls_ca_file: Option<String>,
    pub connection_reuse: Option<String>,
    pub bounce_size_limit: Option<u64>,
    pub mta_sts: Option<bool>,
    pub mta_sts_port: Option<u64>,
    pub dane: Option<bool>,
    pub dnssec_trust_anchors: Option<String>,
    pub tls_reports: Option<bool>,
    pub tls_report_interval: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawRoute {
    pub domain: Option<String>,
    pub relay: Option<String>,
    pub tls: Option<String>,
    pub auth_user: Option<String>,
    pub auth_password: Option<String>,
    pub auth_password_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawDkim {
    pub domain: Option<String>,
    pub selector: Option<String>,
    pub key_file: Option<String>,
    pub headers: Option<Vec<String>>,
    pub canonicalization: Option<String>,
    pub expire: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawMetrics {
    pub listen: Option<String>,
}
