//! TLS-RPT (RFC 8460): what this node's deliveries met under MTA-STS
//! policies, reported to each policy domain's `rua` mailbox once per
//! `delivery.tls_report_interval` (a day) when `delivery.tls_reports` is on.
//!
//! Each node reports its own sessions, as each sending MTA of an
//! organisation does. A report is an ordinary message queued through the
//! cluster (null sender, so it never bounces back here): gzipped JSON in a
//! `multipart/report; report-type="tlsrpt"` message.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use skein_delivery::mta_sts::{Mode, PolicyStore};
use skein_delivery::Deliverer;
use skein_queue::NewRecipient;
use skein_smtp::{MailParams, Mailbox, RcptParams, ReversePath};
use tokio::sync::watch;

use crate::smtp::Acceptor;

/// Domains one report period keeps results for; later ones only count in
/// the metrics.
const MAX_DOMAINS: usize = 10_000;
/// Distinct (result, MX host) failure lines kept per domain.
const MAX_FAILURE_LINES: usize = 100;
/// MX hosts with a DANE policy kept per domain, and the bytes of TLSA
/// records (as presented) kept per host: the records are the receiving
/// domain's to choose, a whole certificate each if it likes.
const MAX_TLSA_HOSTS: usize = 20;
const MAX_TLSA_BYTES: usize = 1024;

/// Sessions under one policy: how many succeeded, and the failures by
/// result and MX host.
#[derive(Default)]
struct Counts {
    success: u64,
    failures: BTreeMap<(&'static str, String), u64>,
}

impl Counts {
    fn add(&mut self, result: &'static str, mx: &str) {
        if result == "success" {
            self.success += 1;
        } else if self.failures.len() < MAX_FAILURE_LINES
            || self.failures.contains_key(&(result, mx.to_string()))
        {
            *self.failures.entry((result, mx.to_string())).or_default() += 1;
        }
    }
}

/// One MX host's DANE sessions and the TLSA records they went by.
#[derive(Default)]
struct TlsaStats {
    records: BTreeSet<String>,
    /// Their length together.
    bytes: usize,
    counts: Counts,
}

/// A domain's sessions in one period: under its MTA-STS policy, and under
/// DANE per MX host (RFC 8460 reports each as a policy of its own).
#[derive(Default)]
struct DomainStats {
    /// The MTA-STS mode, when any session went by the domain's policy.
    mode: Option<&'static str>,
    sts: Counts,
    tlsa: BTreeMap<String, TlsaStats>,
}

struct Period {
    start: DateTime<Utc>,
    domains: BTreeMap<String, DomainStats>,
}

/// Results gathered since the last report.
pub struct TlsReports {
    period: Mutex<Period>,
}

impl Default for TlsReports {
    fn default() -> Self {
        TlsReports {
            period: Mutex::new(Period {
                start: Utc::now(),
                domains: BTreeMap::new(),
            }),
        }
    }
}

impl TlsReports {
    /// The statistics of `domain` this period, unless the period already
    /// keeps as many domains as it may.
    fn with_domain(&self, domain: &str, f: impl FnOnce(&mut DomainStats)) {
        let mut p = self.period.lock().unwrap_or_else(|e| e.into_inner());
        if p.domains.len() >= MAX_DOMAINS && !p.domains.contains_key(domain) {
            return;
        }
        f(p.domains.entry(domain.to_string()).or_default());
    }

    /// A session under the domain's MTA-STS policy.
    pub fn record(&self, domain: &str, mode: Mode, result: &'static str, mx: &str) {
        self.with_domain(domain, |d| {
            d.mode = Some(mode.as_str());
            d.sts.add(result, mx);
        });
    }

    /// A session with (or a skip of) MX host `mx` under DANE, which went by
    /// the TLSA records `tlsa` (empty when they could not be had).
    pub fn record_dane(&self, domain: &str, result: &'static str, mx: &str, tlsa: &[String]) {
        self.with_domain(domain, |d| {
            if d.tlsa.len() >= MAX_TLSA_HOSTS && !d.tlsa.contains_key(mx) {
                return;
            }
            let host = d.tlsa.entry(mx.to_string()).or_default();
            for r in tlsa {
                if host.bytes + r.len() <= MAX_TLSA_BYTES && host.records.insert(r.clone()) {
                    host.bytes += r.len();
                }
            }
            host.counts.add(result, mx);
        });
    }

    fn take(&self) -> (DateTime<Utc>, DateTime<Utc>, BTreeMap<String, DomainStats>) {
        let mut p = self.period.lock().unwrap_or_else(|e| e.into_inner());
        let end = Utc::now();
        let start = std::mem::replace(&mut p.start, end);
        (start, end, std::mem::take(&mut p.domains))
    }
}

/// The `mailto:` addresses of `_smtp._tls.DOMAIN` (`v=TLSRPTv1; rua=...`).
fn mailto_rua(records: &[String]) -> Vec<Mailbox> {
    let [record] = records
        .iter()
        .filter(|r| r.starts_with("v=TLSRPTv1"))
        .collect::<Vec<_>>()[..]
    else {
        return Vec::new();
    };
    record
        .split(';')
        .filter_map(|f| f.trim().strip_prefix("rua="))
        .flat_map(|v| v.split(','))
        .filter_map(|u| u.trim().strip_prefix("mailto:"))
        // A URI is ASCII: anything else is not an address to write into
        // a header.
        .filter(|a| a.is_ascii())
        .filter_map(|a| Mailbox::parse(a).ok())
        .take(4)
        .collect()
}

/// One policy's summary and failure details (RFC 8460 §4.4).
fn policy_json(policy: serde_json::Value, counts: &Counts) -> serde_json::Value {
    let failures: Vec<serde_json::Value> = counts
        .failures
        .iter()
        .map(|((result, host), n)| {
            let mut f = serde_json::json!({
                "result-type": result,
                "failed-session-count": n,
            });
            if !host.is_empty() {
                f["receiving-mx-hostname"] = host.clone().into();
            }
            f
        })
        .collect();
    let failed: u64 = counts.failures.values().sum();
    serde_json::json!({
        "policy": policy,
        "summary": {
            "total-successful-session-count": counts.success,
            "total-failure-session-count": failed,
        },
        "failure-details": failures,
    })
}

/// The report (RFC 8460 4.4) for one domain: its MTA-STS policy, if any
/// session went by it, and a `tlsa` policy for each MX host DANE applied to.
fn report_json(
    submitter: &str,
    report_id: &str,
    (start, end): (DateTime<Utc>, DateTime<Utc>),
    domain: &str,
    stats: &DomainStats,
    policy: Option<&skein_delivery::mta_sts::Policy>,
) -> serde_json::Value {
    let mut policies = Vec::new();
    if let Some(mode) = stats.mode {
        let mut lines = vec!["version: STSv1".to_string(), format!("mode: {mode}")];
        let mut mx = Vec::new();
        if let Some(p) = policy {
            lines.extend(p.mx.iter().map(|m| format!("mx: {m}")));
            lines.push(format!("max_age: {}", p.max_age));
            mx = p.mx.clone();
        }
        policies.push(policy_json(
            serde_json::json!({
                "policy-type": "sts",
                "policy-string": lines,
                "policy-domain": domain,
                "mx-host": mx,
            }),
            &stats.sts,
        ));
    }
    for (host, t) in &stats.tlsa {
        policies.push(policy_json(
            serde_json::json!({
                "policy-type": "tlsa",
                "policy-string": t.records.iter().collect::<Vec<_>>(),
                "policy-domain": domain,
                "mx-host": [host],
            }),
            &t.counts,
        ));
    }
    serde_json::json!({
        "organization-name": submitter,
        "date-range": {
            "start-datetime": start.to_rfc3339_opts(SecondsFormat::Secs, true),
            "end-datetime": end.to_rfc3339_opts(SecondsFormat::Secs, true),
        },
        "contact-info": format!("postmaster@{submitter}"),
        "report-id": report_id,
        "policies": policies,
    })
}

/// The message carrying a report: text, then the gzipped JSON (RFC 8460 5.3).
fn report_message(
    submitter: &str,
    report_id: &str,
    (start, end): (DateTime<Utc>, DateTime<Utc>),
    domain: &str,
    to: &Mailbox,
    json: &serde_json::Value,
) -> std::io::Result<Vec<u8>> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(json.to_string().as_bytes())?;
    let gz = gz.finish()?;
    let b64 = base64::engine::general_purpose::STANDARD.encode(gz);
    let attachment: String = b64
        .as_bytes()
        .chunks(76)
        .map(|c| format!("{}\r\n", String::from_utf8_lossy(c)))
        .collect();
    let file = format!(
        "{submitter}!{domain}!{}!{}!{report_id}.json.gz",
        start.timestamp(),
        end.timestamp()
    );
    let boundary = format!("tlsrpt-{report_id}");
    let date = Utc::now().to_rfc2822();
    Ok(format!(
        "From: TLS reporting <postmaster@{submitter}>\r\n\
         To: <{to}>\r\n\
         Subject: Report Domain: {domain} Submitter: {submitter} Report-ID: <{report_id}>\r\n\
         Date: {date}\r\n\
         Message-ID: <{report_id}@{submitter}>\r\n\
         TLS-Report-Domain: {domain}\r\n\
         TLS-Report-Submitter: {submitter}\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: multipart/report; report-type=\"tlsrpt\"; boundary=\"{boundary}\"\r\n\
         \r\n\
         --{boundary}\r\n\
         Content-Type: text/plain; charset=us-ascii\r\n\
         \r\n\
         This is an aggregate TLS report (RFC 8460) from {submitter} for {domain}.\r\n\
         \r\n\
         --{boundary}\r\n\
         Content-Type: application/tlsrpt+gzip\r\n\
         Content-Transfer-Encoding: base64\r\n\
         Content-Disposition: attachment; filename=\"{file}\"\r\n\
         \r\n\
         {attachment}\
         --{boundary}--\r\n"
    )
    .into_bytes())
}

/// Every `interval`, send what the period gathered to each domain's `rua`.
pub async fn send_periodically(
    reports: Arc<TlsReports>,
    interval: Duration,
    deliverer: Deliverer,
    policies: Arc<dyn PolicyStore>,
    acceptor: Acceptor,
    submitter: String,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        let (start, end, domains) = reports.take();
        for (domain, stats) in domains {
            // Its name goes into header fields: only an ASCII (A-label) one.
            if !domain.is_ascii() {
                continue;
            }
            let rua = mailto_rua(&deliverer.txt(&format!("_smtp._tls.{domain}")).await);
            if rua.is_empty() {
                continue;
            }
            let id = acceptor.next_id();
            let report_id = format!("{}.{id}", end.format("%Y%m%d"));
            let policy = policies.get(&domain).map(|c| c.policy);
            let json = report_json(
                &submitter,
                &report_id,
                (start, end),
                &domain,
                &stats,
                policy.as_ref(),
            );
            for to in &rua {
                let body = match report_message(
                    &submitter,
                    &report_id,
                    (start, end),
                    &domain,
                    to,
                    &json,
                ) {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::warn!(%domain, error = %e, "TLS report not built");
                        continue;
                    }
                };
                let rcpt = NewRecipient {
                    address: to.clone(),
                    params: RcptParams::default(),
                };
                let id = acceptor.next_id();
                match acceptor
                    .accept(
                        id,
                        ReversePath::Null,
                        MailParams::default(),
                        vec![rcpt],
                        Bytes::from(body),
                    )
                    .await
                {
                    Ok(()) => {
                        tracing::info!(queue_id = %id, %domain, to = %to, "TLS report queued")
                    }
                    Err(e) => {
                        tracing::warn!(%domain, to = %to, error = %e, "TLS report not queued")
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_mailto_addresses_of_the_one_tlsrpt_record_count() {
        let r = |s: &[&str]| mailto_rua(&s.iter().map(|x| x.to_string()).collect::<Vec<_>>());
        let got =
            r(&["v=TLSRPTv1; rua=mailto:a@example.org,https://r.example/x,mailto:b@example.org"]);
        assert_eq!(got.len(), 2);
        assert!(r(&[
            "v=TLSRPTv1; rua=mailto:a@x.org",
            "v=TLSRPTv1; rua=mailto:b@x.org"
        ])
        .is_empty());
        assert!(r(&["v=spf1 -all"]).is_empty());
        assert!(r(&["v=TLSRPTv1; rua=mailto:r\u{e9}@example.org"]).is_empty());
    }

    #[test]
    fn a_period_counts_successes_and_failures_by_result_and_host() {
        let t = TlsReports::default();
        t.record("example.org", Mode::Enforce, "success", "mx.example.org");
        t.record(
            "example.org",
            Mode::Enforce,
            "validation-failure",
            "mx2.example.org",
        );
        t.record(
            "example.org",
            Mode::Enforce,
            "validation-failure",
            "mx2.example.org",
        );
        let (start, end, d) = t.take();
        let s = &d["example.org"];
        assert_eq!(s.sts.success, 1);
        let j = report_json("node1.test", "r1", (start, end), "example.org", s, None);
        assert_eq!(
            j["policies"][0]["summary"]["total-failure-session-count"],
            2
        );
        assert_eq!(
            j["policies"][0]["failure-details"][0]["receiving-mx-hostname"],
            "mx2.example.org"
        );
        assert!(t.take().2.is_empty(), "a new period starts empty");
    }

    #[test]
    fn dane_sessions_report_a_tlsa_policy_per_mx_host_beside_mta_sts() {
        let t = TlsReports::default();
        let rec = ["3 1 1 00ff".to_string()];
        t.record_dane("dane.example", "success", "mx1.dane.example", &rec);
        t.record_dane("dane.example", "tlsa-invalid", "mx1.dane.example", &rec);
        t.record_dane("dane.example", "dnssec-invalid", "mx2.dane.example", &[]);
        let (start, end, d) = t.take();
        let s = &d["dane.example"];
        let j = report_json("node1.test", "r2", (start, end), "dane.example", s, None);
        let p = j["policies"].as_array().unwrap();
        assert_eq!(
            p.len(),
            2,
            "no MTA-STS policy went by, one per DANE host: {j}"
        );
        assert_eq!(p[0]["policy"]["policy-type"], "tlsa");
        assert_eq!(p[0]["policy"]["policy-string"][0], "3 1 1 00ff");
        assert_eq!(p[0]["policy"]["mx-host"][0], "mx1.dane.example");
        assert_eq!(p[0]["summary"]["total-successful-session-count"], 1);
        assert_eq!(p[0]["failure-details"][0]["result-type"], "tlsa-invalid");
        assert_eq!(p[1]["policy"]["policy-string"].as_array().unwrap().len(), 0);
        assert_eq!(p[1]["failure-details"][0]["result-type"], "dnssec-invalid");

        // A domain with both: the MTA-STS policy first.
        t.record("both.example", Mode::Testing, "success", "mx.both.example");
        t.record_dane("both.example", "success", "mx.both.example", &rec);
        let (start, end, d) = t.take();
        let j = report_json(
            "node1.test",
            "r3",
            (start, end),
            "both.example",
            &d["both.example"],
            None,
        );
        assert_eq!(j["policies"][0]["policy"]["policy-type"], "sts");
        assert_eq!(j["policies"][1]["policy"]["policy-type"], "tlsa");

        // A domain's records are its own to choose: past the bound, a
        // host's are left out of the report, its sessions still counted.
        let huge = format!("3 0 0 {}", "ab".repeat(MAX_TLSA_BYTES));
        t.record_dane("big.example", "success", "mx.big.example", &[huge]);
        t.record_dane("big.example", "success", "mx.big.example", &rec);
        let (start, end, d) = t.take();
        let j = report_json(
            "n",
            "r4",
            (start, end),
            "big.example",
            &d["big.example"],
            None,
        );
        let p = &j["policies"][0];
        assert_eq!(
            p["policy"]["policy-string"],
            serde_json::json!(["3 1 1 00ff"])
        );
        assert_eq!(p["summary"]["total-successful-session-count"], 2);
    }
}
