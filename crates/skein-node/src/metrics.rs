//! Prometheus metrics and the health endpoints, on `metrics.listen`:
//! `GET /metrics`, `/healthz` (200 while the process serves) and `/readyz`
//! (200 only while this node can commit: it knows a leader and is in the
//! majority), so a load balancer takes a cut-off node out of rotation.
//!
//! Each node owns its registry: several nodes can run in one process.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::clock::now_ms;
use crate::cluster::Cluster;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

/// The class of a deferral, for `skein_delivery_deferrals_total{reason}`:
/// what an operator looks at first when mail piles up.
pub fn deferral_reason(text: &str) -> &'static str {
    if text.contains("TLS") || text.contains("STARTTLS") {
        "tls"
    } else if text.contains("DNS") || text.starts_with("451 4.4.3") {
        "dns"
    } else if text.contains("connect to") {
        "connect"
    } else if text.contains("timed out") {
        "timeout"
    } else if text.contains("connection closed") || text.contains("connection reset") {
        "connection_lost"
    } else if text.starts_with('4') {
        "reply_4xx"
    } else {
        "other"
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StsLabel {
    pub domain: String,
    pub mode: &'static str,
    pub result: &'static str,
}

/// Recipient domains that get a label of their own in the MTA-STS and
/// DANE metrics; later ones count under [`OTHER_DOMAINS`]. Any domain can
/// publish a policy or TLSA records, so without a bound a sender could grow
/// the metrics without end.
const MAX_DOMAIN_LABELS: usize = 1000;
const OTHER_DOMAINS: &str = "_other";

/// Counts what the delivery engine saw under MTA-STS policies and DANE
/// (TLS-RPT's per-domain results, RFC 8460), and gathers them for the
/// reports when reports are sent.
pub struct StsSessions {
    pub metrics: Arc<Metrics>,
    /// `None` unless `delivery.tls_reports`: nothing would take them.
    pub reports: Option<Arc<crate::tlsrpt::TlsReports>>,
    /// Domains labelled so far.
    labelled: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl StsSessions {
    pub fn new(metrics: Arc<Metrics>, reports: Option<Arc<crate::tlsrpt::TlsReports>>) -> Self {
        StsSessions {
            metrics,
            reports,
            labelled: Default::default(),
        }
    }

    /// `domain`'s label: itself, or [`OTHER_DOMAINS`] once
    /// [`MAX_DOMAIN_LABELS`] others have one.
    fn label(&self, domain: &str) -> String {
        let mut seen = self.labelled.lock().unwrap_or_else(|p| p.into_inner());
        if seen.contains(domain) {
            return domain.to_string();
        }
        if seen.len() < MAX_DOMAIN_LABELS {
            seen.insert(domain.to_string());
            return domain.to_string();
        }
        OTHER_DOMAINS.to_string()
    }
}

impl skein_delivery::mta_sts::StsObserver for StsSessions {
    fn session(
        &self,
        domain: &str,
        mode: skein_delivery::mta_sts::Mode,
        result: &'static str,
        mx: &str,
    ) {
        if let Some(r) = &self.reports {
            r.record(domain, mode, result, mx);
        }
        self.metrics
            .mta_sts_sessions
            .get_or_create(&StsLabel {
                domain: self.label(domain),
                mode: mode.as_str(),
                result,
            })
            .inc();
    }

    fn dane(&self, domain: &str, result: &'static str, mx: &str, tlsa: &[String]) {
        if let Some(r) = &self.reports {
            r.record_dane(domain, result, mx, tlsa);
        }
        self.metrics
            .dane_sessions
            .get_or_create(&DaneLabel {
                domain: self.label(domain),
                result,
            })
            .inc();
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DaneLabel {
    pub domain: String,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// failure, delay or success.
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabel {
    pub peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertificateLabel {
    /// smtp, cluster, cluster_ca or delivery_ca.
    pub certificate: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub messages_accepted: Counter,
    pub messages_delivered: Counter,
    pub messages_failed: Counter,
    pub delivery_attempts: Family<ResultLabel, Counter>,
    pub delivery_deferrals: Family<ReasonLabel, Counter>,
    pub messages_bounced: Counter,
    pub notices: Family<KindLabel, Counter>,
    pub recipients_failed: Counter,
    pub queue_messages: Family<StateLabel, Gauge>,
    pub raft_term: Gauge,
    pub raft_is_leader: Gauge,
    pub raft_replication_lag: Family<PeerLabel, Gauge>,
    pub raft_last_applied: Gauge,
    pub smtp_sessions_active: Gauge,
    pub accept_latency: Histogram,
    pub delivery_latency: Histogram,
    pub data_dir_bytes: Gauge,
    pub data_dir_free_bytes: Gauge,
    pub commit_failures: Counter,
    pub dkim_signatures: Family<ResultLabel, Counter>,
    pub mta_sts_sessions: Family<StsLabel, Counter>,
    pub dane_sessions: Family<DaneLabel, Counter>,
    pub leader_contact: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub draining: Gauge,
    pub takeovers: Counter,
    pub leader_changes: Counter,
    pub certificate_expiry: Family<CertificateLabel, Gauge>,
    /// The configured certificate files, by label.
    certificates: std::sync::Mutex<Vec<(&'static str, std::path::PathBuf)>>,
    log_flushes: Counter,
    log_flushed_appends: Counter,
    log_flush_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    /// The store's totals at the last render, to turn them into increments.
    store_seen: std::sync::Mutex<(u64, u64, u64)>,
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::default();
        let m = Metrics {
            messages_accepted: Counter::default(),
            messages_delivered: Counter::default(),
            messages_failed: Counter::default(),
            delivery_attempts: Family::default(),
            delivery_deferrals: Family::default(),
            messages_bounced: Counter::default(),
            notices: Family::default(),
            recipients_failed: Counter::default(),
            queue_messages: Family::default(),
            raft_term: Gauge::default(),
            raft_is_leader: Gauge::default(),
            raft_replication_lag: Family::default(),
            raft_last_applied: Gauge::default(),
            smtp_sessions_active: Gauge::default(),
            accept_latency: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            delivery_latency: Histogram::new(exponential_buckets(0.005, 2.0, 16)),
            data_dir_bytes: Gauge::default(),
            data_dir_free_bytes: Gauge::default(),
            commit_failures: Counter::default(),
            dkim_signatures: Family::default(),
            mta_sts_sessions: Family::default(),
            dane_sessions: Family::default(),
            leader_contact: Gauge::default(),
            draining: Gauge::default(),
            takeovers: Counter::default(),
            leader_changes: Counter::default(),
            certificate_expiry: Family::default(),
            certificates: std::sync::Mutex::new(Vec::new()),
            log_flushes: Counter::default(),
            log_flushed_appends: Counter::default(),
            log_flush_seconds: Counter::default(),
            store_seen: std::sync::Mutex::new((0, 0, 0)),
            registry: Registry::default(),
        };
        r.register(
            "skein_messages_accepted",
            "Messages answered 250 after a majority commit",
            m.messages_accepted.clone(),
        );
        r.register(
            "skein_messages_delivered",
            "Messages finished with every recipient delivered",
            m.messages_delivered.clone(),
        );
        r.register(
            "skein_messages_failed",
            "Messages finished with at least one recipient failed",
            m.messages_failed.clone(),
        );
        r.register(
            "skein_delivery_attempts",
            "Recipients tried (one count per recipient per attempt), by result",
            m.delivery_attempts.clone(),
        );
        r.register(
            "skein_delivery_deferrals",
            "Deferred recipient deliveries, by reason: dns, connect, tls, timeout, connection_lost, reply_4xx, other",
            m.delivery_deferrals.clone(),
        );
        r.register(
            "skein_messages_bounced",
            "Failure notices (bounces) queued",
            m.messages_bounced.clone(),
        );
        r.register(
            "skein_dkim_signatures",
            "DKIM signatures made on accepted mail, by result: signed, failed (the message went out unsigned)",
            m.dkim_signatures.clone(),
        );
        r.register(
            "skein_mta_sts_sessions",
            "Deliveries to domains with an MTA-STS policy, by domain, mode (enforce, testing) and TLS-RPT result: success, mx-mismatch, starttls-not-supported, validation-failure, sts-policy-fetch-error",
            m.mta_sts_sessions.clone(),
        );
        r.register(
            "skein_dane_sessions",
            "Deliveries to MX hosts with DNSSEC-proven TLSA records (DANE), by domain and TLS-RPT result: success, tlsa-invalid, starttls-not-supported, dnssec-invalid",
            m.dane_sessions.clone(),
        );
        r.register(
            "skein_notices",
            "Delivery status notifications queued, by kind: failure, delay, success",
            m.notices.clone(),
        );
        r.register(
            "skein_recipients_failed",
            "Recipients that failed permanently",
            m.recipients_failed.clone(),
        );
        r.register(
            "skein_queue_messages",
            "Messages in the queue, by state",
            m.queue_messages.clone(),
        );
        r.register("skein_raft_term", "Current Raft term", m.raft_term.clone());
        r.register(
            "skein_raft_is_leader",
            "1 when this node is the Raft leader",
            m.raft_is_leader.clone(),
        );
        r.register(
            "skein_raft_replication_lag",
            "Entries a follower is behind the leader (on the leader)",
            m.raft_replication_lag.clone(),
        );
        r.register(
            "skein_raft_last_applied",
            "Index of the last entry applied on this node",
            m.raft_last_applied.clone(),
        );
        r.register(
            "skein_smtp_sessions_active",
            "Open SMTP sessions",
            m.smtp_sessions_active.clone(),
        );
        r.register(
            "skein_accept_latency_seconds",
            "End of DATA to the 250 reply",
            m.accept_latency.clone(),
        );
        r.register(
            "skein_delivery_latency_seconds",
            "One delivery attempt of one message",
            m.delivery_latency.clone(),
        );
        r.register(
            "skein_data_dir_bytes",
            "Bytes the node's database occupies on disk",
            m.data_dir_bytes.clone(),
        );
        r.register(
            "skein_data_dir_free_bytes",
            "Bytes free for this node on the file system of its data directory (new mail is refused below smtp.queue_minfree)",
            m.data_dir_free_bytes.clone(),
        );
        r.register(
            "skein_log_flushes",
            "Group commits of the Raft log: one sync of the segments each",
            m.log_flushes.clone(),
        );
        r.register(
            "skein_log_flushed_appends",
            "Log appends made durable by the group commits (appends per flush is the batching)",
            m.log_flushed_appends.clone(),
        );
        r.register(
            "skein_log_flush_seconds",
            "Time spent syncing bodies and flushing the log",
            m.log_flush_seconds.clone(),
        );
        r.register(
            "skein_commit_failures",
            "Proposals that did not commit in time",
            m.commit_failures.clone(),
        );
        r.register(
            "skein_raft_leader_contact_seconds",
            "Seconds since this node last heard from a leader (0 on the leader, -1 never)",
            m.leader_contact.clone(),
        );
        r.register(
            "skein_node_draining",
            "1 while this node is drained",
            m.draining.clone(),
        );
        r.register(
            "skein_takeovers",
            "Messages this node took over from a node whose lease had lapsed",
            m.takeovers.clone(),
        );
        r.register(
            "skein_leader_changes",
            "Times this node saw a new leader",
            m.leader_changes.clone(),
        );
        r.register(
            "skein_tls_certificate_expiry_timestamp_seconds",
            "When each configured certificate (the first to expire in its file) stops being valid, Unix time",
            m.certificate_expiry.clone(),
        );
        Metrics { registry: r, ..m }
    }

    pub fn accepted(&self, latency: Duration) {
        self.messages_accepted.inc();
        self.accept_latency.observe(latency.as_secs_f64());
    }

    /// A notice the cluster queued: failures also count as bounces.
    pub fn notice(&self, kind: skein_queue::NoticeKind) {
        if kind == skein_queue::NoticeKind::Failure {
            self.messages_bounced.inc();
        }
        self.notices
            .get_or_create(&KindLabel {
                kind: kind.as_str(),
            })
            .inc();
    }

    pub fn attempt(&self, result: &'static str) {
        self.delivery_attempts
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    pub fn deferral(&self, text: &str) {
        self.delivery_deferrals
            .get_or_create(&ReasonLabel {
                reason: deferral_reason(text),
            })
            .inc();
    }

    /// Watch the expiry of a configured certificate file.
    pub fn certificate(&self, certificate: &'static str, path: std::path::PathBuf) {
        self.certificates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((certificate, path));
    }

    /// Refresh the gauges that are read off the cluster, then encode.
    pub fn render(&self, cluster: &Cluster) -> String {
        let m = cluster.raft().metrics().borrow().clone();
        self.raft_term.set(m.current_term as i64);
        let leading = m.current_leader == Some(cluster.id());
        self.raft_is_leader.set(i64::from(leading));
        self.raft_last_applied
            .set(m.last_applied.map(|l| l.index as i64).unwrap_or(0));
        // Only the leader knows how far behind the others are, and only of
        // the current members: anything else is stale and would fire alerts.
        self.raft_replication_lag.clear();
        if let (Some(repl), true) = (&m.replication, leading) {
            let last = m.last_log_index.unwrap_or(0);
            for (peer, matched) in repl.iter() {
                let lag = last.saturating_sub(matched.map(|l| l.index).unwrap_or(0));
                self.raft_replication_lag
                    .get_or_create(&PeerLabel {
                        peer: peer.to_string(),
                    })
                    .set(lag as i64);
            }
        }
        for (certificate, path) in self
            .certificates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            if let Some(t) = earliest_expiry(path) {
                self.certificate_expiry
                    .get_or_create(&CertificateLabel { certificate })
                    .set(t);
            }
        }
        let counts = cluster.reader().read().counts(now_ms());
        for (state, n) in [
            ("ready", counts.ready),
            ("leased", counts.leased),
            ("deferred", counts.deferred),
            ("held", counts.held),
        ] {
            self.queue_messages
                .get_or_create(&StateLabel { state })
                .set(n as i64);
        }
        self.data_dir_bytes.set(cluster.reader().disk_size() as i64);
        if let Some(free) = crate::disk::free_bytes(cluster.reader().data_dir()) {
            self.data_dir_free_bytes
                .set(free.min(i64::MAX as u64) as i64);
        }
        {
            use std::sync::atomic::Ordering::Relaxed;
            let st = cluster.reader().stats();
            let now = (
                st.flushes.load(Relaxed),
                st.appends.load(Relaxed),
                st.flush_micros.load(Relaxed),
            );
            let mut seen = self.store_seen.lock().unwrap_or_else(|p| p.into_inner());
            self.log_flushes.inc_by(now.0.saturating_sub(seen.0));
            self.log_flushed_appends
                .inc_by(now.1.saturating_sub(seen.1));
            self.log_flush_seconds
                .inc_by(now.2.saturating_sub(seen.2) as f64 / 1e6);
            *seen = now;
        }
        self.leader_contact
            .set(cluster.since_leader_contact().unwrap_or(-1.0));
        self.draining.set(i64::from(cluster.is_draining()));
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// When the first certificate in a PEM file expires, Unix time.
fn earliest_expiry(path: &std::path::Path) -> Option<i64> {
    let certs = crate::tls::load_certs(path).ok()?;
    certs
        .iter()
        .filter_map(|c| x509_parser::parse_x509_certificate(c).ok())
        .map(|(_, c)| c.validity().not_after.timestamp())
        .min()
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Clone)]
struct HttpState {
    metrics: Arc<Metrics>,
    cluster: Cluster,
}

pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, cluster: Cluster) {
    let app = Router::new()
        .route("/metrics", get(render))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(HttpState { metrics, cluster });
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "metrics server stopped");
    }
}

async fn render(State(s): State<HttpState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.render(&s.cluster),
    )
}

async fn ready(State(s): State<HttpState>) -> impl IntoResponse {
    if s.cluster.can_commit() {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: no leader or not in the majority\n",
        )
    }
}

#[cfg(test)]
mod deferral_tests {
    use super::deferral_reason;

    #[test]
    fn deferral_texts_fall_into_reasons() {
        for (text, reason) in [
            ("451 4.4.3 DNS lookup of MX for x.example failed: timeout", "dns"),
            ("connect to mx.example[192.0.2.1]:25: connection refused", "connect"),
            ("mx.example[192.0.2.1]: TLS handshake: bad certificate", "tls"),
            ("451 4.7.4 mx.example[192.0.2.1] does not offer STARTTLS, which TLS policy encrypt requires", "tls"),
            ("mx.example[192.0.2.1]: timed out after 300s at end of data", "timeout"),
            ("mx.example[192.0.2.1]: connection closed by peer at RCPT TO", "connection_lost"),
            ("450 4.2.0 greylisted (mx.example[192.0.2.1])", "reply_4xx"),
        ] {
            assert_eq!(deferral_reason(text), reason, "{text}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains_past_the_bound_share_one_label() {
        let s = StsSessions::new(Arc::new(Metrics::new()), Default::default());
        for i in 0..MAX_DOMAIN_LABELS {
            assert_eq!(s.label(&format!("d{i}.test")), format!("d{i}.test"));
        }
        assert_eq!(s.label("late.test"), OTHER_DOMAINS);
        assert_eq!(s.label("d7.test"), "d7.test", "a labelled domain keeps it");
    }
}
