//! MTA-STS (RFC 8461): a domain's published promise that its MX hosts take
//! mail over TLS with certificates that verify.
//!
//! Before delivering to a domain's MX hosts the deliverer asks [`Sts`] for
//! the domain's policy: the `_mta-sts.DOMAIN` TXT record names the current
//! policy id; a policy not cached under that id is fetched from
//! `https://mta-sts.DOMAIN/.well-known/mta-sts.txt` (certificate verified,
//! no redirects, at most 64 KiB, within 10 s) and kept for its `max_age`.
//! Under `enforce` only MX hosts the policy names are used, each over
//! verified TLS, or the mail waits; under `testing` delivery goes on as
//! without a policy and what would have failed is reported. A domain
//! without a policy, or whose policy cannot be had and none is cached, is
//! delivered to as before.
//!
//! Where policies are kept is a [`PolicyStore`]: each node's memory unless
//! the node shares them through the cluster.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::TokioResolver;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::route::host_addrs;

/// A policy larger than this is refused (RFC 8461 3.3 suggests 64 KiB).
pub const MAX_POLICY_BYTES: usize = 64 * 1024;
/// How long one fetch may take, connection and all.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// `max_age` is at most a year (RFC 8461 3.2).
const MAX_AGE_LIMIT: u64 = 31_557_600;
/// MX patterns kept from one policy.
const MAX_MX_PATTERNS: usize = 64;
/// Policies one node keeps in memory.
const MAX_CACHED: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    Enforce,
    Testing,
    /// The domain withdrew its policy: deliver as without one.
    None,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Testing => "testing",
            Mode::None => "none",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub mode: Mode,
    /// Lowercase MX host names; `*.example.net` stands for one label.
    pub mx: Vec<String>,
    /// Seconds the policy may be cached.
    pub max_age: u64,
}

impl Policy {
    /// Parse a policy file (RFC 8461 3.2): `key: value` lines, CRLF or LF.
    pub fn parse(text: &str) -> Result<Policy, String> {
        let (mut version, mut mode, mut max_age) = (None, None, None);
        let mut mx = Vec::new();
        for line in text.lines() {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() {
                continue;
            }
            let Some((key, value)) = line.split_once(':') else {
                return Err(format!("not a key: value line: {:?}", clip(line)));
            };
            let value = value.trim();
            match key.trim() {
                "version" => version = Some(value),
                "mode" => {
                    mode = Some(match value {
                        "enforce" => Mode::Enforce,
                        "testing" => Mode::Testing,
                        "none" => Mode::None,
                        other => return Err(format!("unknown mode {:?}", clip(other))),
                    })
                }
                "max_age" => {
                    let age = value
                        .parse::<u64>()
                        .ok()
                        .filter(|a| value.len() <= 10 && *a <= MAX_AGE_LIMIT)
                        .ok_or_else(|| {
                            format!("max_age {:?} is not 0..{MAX_AGE_LIMIT}", clip(value))
                        })?;
                    max_age = Some(age);
                }
                "mx" => {
                    let p = value.trim_end_matches('.').to_ascii_lowercase();
                    let host = p.strip_prefix("*.").unwrap_or(&p);
                    if host.is_empty()
                        || host.len() > 253
                        || !host.split('.').all(|l| {
                            !l.is_empty()
                                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                        })
                    {
                        return Err(format!("mx {:?} is not a host name pattern", clip(value)));
                    }
                    if mx.len() < MAX_MX_PATTERNS {
                        mx.push(p);
                    }
                }
                // Extensions are ignored (RFC 8461 3.2).
                _ => {}
            }
        }
        if version != Some("STSv1") {
            return Err("no \"version: STSv1\"".into());
        }
        let mode = mode.ok_or("no mode")?;
        let max_age = max_age.ok_or("no max_age")?;
        if mx.is_empty() && mode != Mode::None {
            return Err("no mx".into());
        }
        Ok(Policy { mode, mx, max_age })
    }

    /// Whether `host` (an MX name) is one the policy names.
    pub fn allows(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.mx.iter().any(|p| match p.strip_prefix("*.") {
            // The wildcard stands for exactly one leftmost label.
            Some(parent) => host
                .strip_suffix(parent)
                .and_then(|h| h.strip_suffix('.'))
                .is_some_and(|label| !label.is_empty() && !label.contains('.')),
            None => *p == host,
        })
    }
}

fn clip(s: &str) -> String {
    s.chars().take(64).collect()
}

/// A policy as kept: with the TXT id it came under and when it expires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cached {
    pub id: String,
    pub policy: Policy,
    /// Unix seconds.
    pub expires: u64,
}

/// Where fetched policies are kept.
pub trait PolicyStore: Send + Sync {
    fn get(&self, domain: &str) -> Option<Cached>;
    fn put(&self, domain: &str, cached: Cached);
}

/// Policies in this process's memory, at most 10,000 domains: when full,
/// the expired go first, then the one expiring soonest.
#[derive(Default)]
pub struct MemoryStore {
    map: Mutex<HashMap<String, Cached>>,
}

impl PolicyStore for MemoryStore {
    fn get(&self, domain: &str) -> Option<Cached> {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(domain)
            .cloned()
    }

    fn put(&self, domain: &str, cached: Cached) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_CACHED && !map.contains_key(domain) {
            let now = unix_now();
            map.retain(|_, c| c.expires > now);
            if map.len() >= MAX_CACHED {
                if let Some(k) = map
                    .iter()
                    .min_by_key(|(_, c)| c.expires)
                    .map(|(k, _)| k.clone())
                {
                    map.remove(&k);
                }
            }
        }
        map.insert(domain.to_string(), cached);
    }
}

/// What a delivery under a policy found, for TLS reporting (RFC 8460).
pub trait StsObserver: Send + Sync {
    /// `result`: `success`, or the failure: `mx-mismatch` (no MX the policy
    /// names), `starttls-not-supported`, `validation-failure` (the
    /// certificate did not verify for the MX name), `sts-policy-fetch-error`.
    /// `mx`: the receiving MX host, empty when none was reached.
    fn session(&self, domain: &str, mode: Mode, result: &'static str, mx: &str);

    /// A session (or a host skipped) under DANE (RFC 7672). `result`:
    /// `success`, `tlsa-invalid` (no TLSA record matched the certificate),
    /// `starttls-not-supported`, `dnssec-invalid` (the TLSA records could
    /// not be looked up and proven). `tlsa`: the MX host's usable TLSA
    /// records in presentation format, empty when none were had.
    fn dane(&self, _domain: &str, _result: &'static str, _mx: &str, _tlsa: &[String]) {}
}

/// One fetch of a domain's policy under one id, shared by every delivery
/// that needs it meanwhile.
type Flight = Arc<tokio::sync::OnceCell<Result<Policy, String>>>;

type InFlight = Mutex<HashMap<(String, String), Flight>>;

/// A delivery's place on a fetch: joins the one under way for its domain
/// and id (or starts it), and takes it off the list when done — or when the
/// delivery is dropped while waiting — so the list holds fetches under way
/// only.
struct Landing<'a> {
    list: &'a InFlight,
    key: (String, String),
    flight: Flight,
}

impl<'a> Landing<'a> {
    fn board(list: &'a InFlight, key: (String, String)) -> Self {
        let flight = list
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default()
            .clone();
        Landing { list, key, flight }
    }
}

impl Drop for Landing<'_> {
    fn drop(&mut self) {
        let mut list = self.list.lock().unwrap_or_else(|p| p.into_inner());
        if list
            .get(&self.key)
            .is_some_and(|f| Arc::ptr_eq(f, &self.flight))
        {
            list.remove(&self.key);
        }
    }
}

/// Looks policies up and fetches them.
pub struct Sts {
    store: Arc<dyn PolicyStore>,
    observer: Option<Arc<dyn StsObserver>>,
    https: TlsConnector,
    port: u16,
    /// Fetches under way, by (domain, id): concurrent first deliveries to a
    /// domain fetch its policy once. At most one per delivery running.
    in_flight: InFlight,
}

impl Sts {
    pub(crate) fn new(
        store: Arc<dyn PolicyStore>,
        observer: Option<Arc<dyn StsObserver>>,
        https: TlsConnector,
        port: u16,
    ) -> Self {
        Sts {
            store,
            observer,
            https,
            port,
            in_flight: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn observe(&self, domain: &str, mode: Mode, result: &'static str, mx: &str) {
        if let Some(o) = &self.observer {
            o.session(domain, mode, result, mx);
        }
    }

    /// The policy in force for `domain`, if any (RFC 8461 5.1). Never an
    /// error: without a usable policy, delivery goes on as without one.
    pub(crate) async fn policy(&self, resolver: &TokioResolver, domain: &str) -> Option<Policy> {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        let now = unix_now();
        let cached = self.store.get(&domain).filter(|c| c.expires > now);
        let Some(id) = txt_id(resolver, &domain).await else {
            // No record (or DNS trouble): a policy still cached holds.
            return cached.map(|c| c.policy);
        };
        if let Some(c) = &cached {
            if c.id == id {
                return Some(c.policy.clone());
            }
        }
        let landing = Landing::board(&self.in_flight, (domain.clone(), id.clone()));
        let flight = landing.flight.clone();
        let mut fetcher = false;
        let fetched = flight
            .get_or_init(|| {
                fetcher = true;
                async {
                    let fetched =
                        tokio::time::timeout(FETCH_TIMEOUT, self.fetch(resolver, &domain))
                            .await
                            .unwrap_or_else(|_| Err(format!("timed out after {FETCH_TIMEOUT:?}")));
                    if let Ok(policy) = &fetched {
                        self.store.put(
                            &domain,
                            Cached {
                                id: id.clone(),
                                policy: policy.clone(),
                                expires: now.saturating_add(policy.max_age),
                            },
                        );
                    }
                    fetched
                }
            })
            .await
            .clone();
        drop(landing);
        match fetched {
            Ok(policy) => {
                if fetcher {
                    tracing::info!(%domain, id = %id, mode = policy.mode.as_str(), max_age = policy.max_age, "MTA-STS policy fetched");
                }
                Some(policy)
            }
            Err(e) => {
                if fetcher {
                    tracing::info!(%domain, error = %e, "MTA-STS policy not fetched");
                }
                self.observe(
                    &domain,
                    cached.as_ref().map_or(Mode::None, |c| c.policy.mode),
                    "sts-policy-fetch-error",
                    "",
                );
                cached.map(|c| c.policy)
            }
        }
    }

    async fn fetch(&self, resolver: &TokioResolver, domain: &str) -> Result<Policy, String> {
        let host = format!("mta-sts.{domain}");
        let addrs = host_addrs(resolver, &host)
            .await
            .map_err(|e| e.text().to_string())?;
        let mut last = format!("{host}: no address");
        for ip in addrs {
            match self.fetch_from(&host, SocketAddr::new(ip, self.port)).await {
                Ok(p) => return Ok(p),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    async fn fetch_from(&self, host: &str, addr: SocketAddr) -> Result<Policy, String> {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("{host}[{}]: {e}", addr.ip()))?;
        let name = rustls_pki_types::ServerName::try_from(host.to_string())
            .map_err(|e| format!("{host}: {e}"))?;
        let tls = self
            .https
            .connect(name, tcp)
            .await
            .map_err(|e| format!("{host}: TLS: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| format!("{host}: HTTP: {e}"))?;
        let conn = tokio::spawn(conn);
        let request = hyper::Request::get("/.well-known/mta-sts.txt")
            .header(hyper::header::HOST, host)
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("{host}: HTTP: {e}"))?;
        // No redirects (RFC 8461 3.3): only a 200 is a policy.
        if response.status() != hyper::StatusCode::OK {
            conn.abort();
            return Err(format!("{host}: HTTP status {}", response.status()));
        }
        let plain = response
            .headers()
            .get(hyper::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .eq_ignore_ascii_case("text/plain")
            });
        if !plain {
            conn.abort();
            return Err(format!("{host}: the policy is not text/plain"));
        }
        let body = Limited::new(response.into_body(), MAX_POLICY_BYTES)
            .collect()
            .await
            .map_err(|e| format!("{host}: policy body: {e}"))?
            .to_bytes();
        conn.abort();
        let text =
            std::str::from_utf8(&body).map_err(|_| format!("{host}: the policy is not UTF-8"))?;
        Policy::parse(text).map_err(|e| format!("{host}: invalid policy: {e}"))
    }
}

/// The id of the one `v=STSv1` record at `_mta-sts.DOMAIN` (RFC 8461 3.1);
/// `None` without exactly one valid record.
async fn txt_id(resolver: &TokioResolver, domain: &str) -> Option<String> {
    let records: Vec<String> = txt_records(resolver, &format!("_mta-sts.{domain}"))
        .await
        .into_iter()
        .filter(|t| t.starts_with("v=STSv1"))
        .collect();
    let [record] = records.as_slice() else {
        return None;
    };
    parse_txt(record)
}

/// The TXT records at `name`, each one's character-strings joined; none on
/// any error.
pub(crate) async fn txt_records(resolver: &TokioResolver, name: &str) -> Vec<String> {
    let Ok(mut fqdn) = hickory_resolver::proto::rr::Name::from_utf8(name) else {
        return Vec::new();
    };
    fqdn.set_fqdn(true);
    let Ok(lookup) = resolver
        .lookup(fqdn, hickory_resolver::proto::rr::RecordType::TXT)
        .await
    else {
        return Vec::new();
    };
    lookup
        .answers()
        .iter()
        .filter_map(|r| match &r.data {
            RData::TXT(t) => Some(
                t.txt_data
                    .iter()
                    .map(|c| String::from_utf8_lossy(c).into_owned())
                    .collect::<String>(),
            ),
            _ => None,
        })
        .collect()
}

/// `v=STSv1; id=20190429T010101;`: the id, 1 to 32 letters and digits.
fn parse_txt(record: &str) -> Option<String> {
    let mut fields = record.split(';').map(str::trim).filter(|f| !f.is_empty());
    if fields.next()? != "v=STSv1" {
        return None;
    }
    fields
        .filter_map(|f| f.split_once('='))
        .find(|(k, _)| k.trim() == "id")
        .map(|(_, v)| v.trim().to_string())
        .filter(|id| (1..=32).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric()))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_policy_parses_with_crlf_or_lf_and_ignores_extensions() {
        let p = Policy::parse(
            "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.Example.NET.\r\nmax_age: 604800\r\nx-ext: 1\r\n",
        )
        .unwrap();
        assert_eq!(p.mode, Mode::Enforce);
        assert_eq!(p.mx, vec!["mail.example.com", "*.example.net"]);
        assert_eq!(p.max_age, 604800);
        let lf = Policy::parse("version: STSv1\nmode: testing\nmx: a.b\nmax_age: 1\n").unwrap();
        assert_eq!(lf.mode, Mode::Testing);
        assert!(Policy::parse("version: STSv1\nmode: none\nmax_age: 0\n").is_ok());
    }

    #[test]
    fn a_bad_policy_is_refused_with_the_reason() {
        let bad = [
            ("mode: enforce\nmx: a.b\nmax_age: 1\n", "STSv1"),
            (
                "version: STSv1\nmode: strict\nmx: a.b\nmax_age: 1\n",
                "unknown mode",
            ),
            (
                "version: STSv1\nmode: enforce\nmx: a.b\nmax_age: 99999999999\n",
                "max_age",
            ),
            ("version: STSv1\nmode: enforce\nmax_age: 1\n", "no mx"),
            (
                "version: STSv1\nmode: enforce\nmx: a..b\nmax_age: 1\n",
                "not a host name",
            ),
            ("version: STSv1\nmode: enforce\nmx: a.b\n", "no max_age"),
            ("<html>\n", "key: value"),
        ];
        for (text, why) in bad {
            let e = Policy::parse(text).unwrap_err();
            assert!(e.contains(why), "{text:?}: {e}");
        }
    }

    #[test]
    fn a_wildcard_stands_for_one_leftmost_label() {
        let p = Policy::parse(
            "version: STSv1\nmode: enforce\nmx: mail.example.com\nmx: *.example.net\nmax_age: 1\n",
        )
        .unwrap();
        assert!(p.allows("mail.example.com"));
        assert!(p.allows("MAIL.example.com."));
        assert!(p.allows("mx1.example.net"));
        assert!(!p.allows("example.net"));
        assert!(!p.allows("a.mx1.example.net"));
        assert!(!p.allows("mx1example.net"));
        assert!(!p.allows("other.example.com"));
    }

    #[test]
    fn the_txt_record_gives_the_policy_id() {
        assert_eq!(
            parse_txt("v=STSv1; id=20160831085700Z;").as_deref(),
            Some("20160831085700Z")
        );
        assert_eq!(parse_txt("v=STSv1;id=abc").as_deref(), Some("abc"));
        assert_eq!(parse_txt("v=STSv1; id=not-alnum;"), None);
        assert_eq!(parse_txt("v=STSv1;"), None);
        assert_eq!(parse_txt("v=spf1 -all"), None);
    }

    #[test]
    fn the_memory_store_keeps_the_latest_per_domain() {
        let s = MemoryStore::default();
        let c = |id: &str| Cached {
            id: id.into(),
            policy: Policy {
                mode: Mode::Testing,
                mx: vec!["a.b".into()],
                max_age: 60,
            },
            expires: unix_now() + 60,
        };
        s.put("example.com", c("1"));
        s.put("example.com", c("2"));
        assert_eq!(s.get("example.com").unwrap().id, "2");
        assert!(s.get("example.org").is_none());
    }
}
