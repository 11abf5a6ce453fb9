//! [`Deliverer`]: pick the destination (a route's relay or the domain's
//! MX hosts), take a slot within its concurrency limit, reuse an idle
//! connection or try each host and address in order until one session
//! gives every recipient a result.

use skein_smtp::Escaped;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Weak};
use std::time::Duration;

use hickory_resolver::config::{
    ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::TokioResolver;
use tokio::net::TcpStream;
use tracing::Instrument as _;

use crate::config::{Credentials, DeliveryConfig, Route as RouteConfig};
use crate::conn::{Conn, Pool};
use crate::dane::{Dane, HostDane};
use crate::error::DeliveryError;
use crate::job::{Job, RcptResult};
use crate::mta_sts::{MemoryStore, Mode, Policy, PolicyStore, Sts, StsObserver};
use crate::route::{host_addrs, route, Host, Route};
use crate::tls::{TlsClients, TlsPolicy};
use crate::transaction::{open, transact, After, Dial, HostOutcome, OpenError};

/// Responses kept by the resolver's cache. Small: MX answers are cheap to
/// ask again, and TTLs are honoured anyway.
const DNS_CACHE: u64 = 1024;

/// Delivers jobs. Cheap to clone: clones share one resolver, one TLS
/// configuration and one connection pool.
#[derive(Clone)]
pub struct Deliverer {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: DeliveryConfig,
    resolver: TokioResolver,
    tls: TlsClients,
    pool: Pool,
    /// MTA-STS, unless `cfg.mta_sts` is off.
    sts: Option<Sts>,
    /// DANE's validating lookups, unless `cfg.dane` is off.
    dane: Option<Dane>,
    /// Told how sessions under DANE went.
    observer: Option<Arc<dyn StsObserver>>,
}

impl std::fmt::Debug for Deliverer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deliverer")
            .field("cfg", &self.inner.cfg)
            .finish_non_exhaustive()
    }
}

/// Where one job goes.
struct Destination<'a> {
    /// The pool and concurrency key: `mx:DOMAIN` or the relay URL.
    key: String,
    relay: Option<&'a RouteConfig>,
    policy: TlsPolicy,
    auth: Option<&'a Credentials>,
    lmtp: bool,
    port: u16,
    /// The mode of the domain's MTA-STS policy, when one is in force.
    sts: Option<Mode>,
    /// The domain's MX RRset is DNSSEC-proven: its hosts' TLSA records
    /// count.
    dane: bool,
}

impl Deliverer {
    /// Builds the resolver and TLS configurations. Inside a tokio runtime it
    /// also starts the task that closes idle connections.
    pub fn new(cfg: DeliveryConfig) -> Result<Self, DeliveryError> {
        Self::with_sts(cfg, Arc::new(MemoryStore::default()), None)
    }

    /// Like [`Deliverer::new`], keeping MTA-STS policies in `store` and
    /// telling `observer` how sessions under a policy went.
    pub fn with_sts(
        cfg: DeliveryConfig,
        store: Arc<dyn PolicyStore>,
        observer: Option<Arc<dyn StsObserver>>,
    ) -> Result<Self, DeliveryError> {
        let tls = TlsClients::new(&cfg.extra_roots).map_err(DeliveryError::Tls)?;
        let resolver = build_resolver(&cfg, tls.dns.clone(), None)?;
        let dane = if cfg.dane {
            let anchors = match &cfg.dnssec_trust_anchors {
                Some(path) => {
                    crate::dane::load_trust_anchors(path).map_err(DeliveryError::TrustAnchors)?
                }
                None => hickory_resolver::proto::dnssec::TrustAnchors::default(),
            };
            let validating = build_resolver(&cfg, tls.dns.clone(), Some(anchors))?;
            Some(Dane::new(validating))
        } else {
            None
        };
        let pool = Pool::new(cfg.concurrency_per_destination, cfg.connection_reuse);
        let sts = cfg
            .mta_sts
            .then(|| Sts::new(store, observer.clone(), tls.https.clone(), cfg.mta_sts_port));
        let inner = Arc::new(Inner {
            cfg,
            resolver,
            tls,
            pool,
            sts,
            dane,
            observer,
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(sweep(Arc::downgrade(&inner)));
        }
        Ok(Deliverer { inner })
    }

    pub fn config(&self) -> &DeliveryConfig {
        &self.inner.cfg
    }

    /// Idle connections kept for reuse right now.
    pub fn idle_connections(&self) -> usize {
        self.inner.pool.idle_count()
    }

    /// Delivers one message to the recipients of one domain. Never panics;
    /// every recipient gets a result, in input order.
    pub async fn deliver(&self, job: &Job) -> Vec<RcptResult> {
        let span = tracing::info_span!(
            "delivery",
            queue_id = %job.id,
            domain = %job.domain,
            recipients = job.recipients.len(),
        );
        let results = self.run(job).instrument(span).await;
        results.into_iter().map(RcptResult::bounded).collect()
    }

    fn destination<'a>(&'a self, domain: &str) -> Destination<'a> {
        let cfg = &self.inner.cfg;
        match cfg.route_for(domain) {
            Some(r) => Destination {
                key: r.relay.to_string(),
                relay: Some(r),
                policy: r.tls,
                auth: r.auth.as_ref(),
                lmtp: r.relay.is_lmtp(),
                port: r.relay.port(),
                sts: None,
                dane: false,
            },
            None => Destination {
                key: format!("mx:{domain}"),
                relay: None,
                policy: cfg.tls,
                auth: None,
                lmtp: false,
                port: cfg.port,
                sts: None,
                dane: false,
            },
        }
    }

    async fn run(&self, job: &Job) -> Vec<RcptResult> {
        if job.recipients.is_empty() {
            return Vec::new();
        }
        if job.domain.eq_ignore_ascii_case(crate::canary::DOMAIN) {
            // A drill's canary: never leaves the cluster.
            tokio::time::sleep(crate::canary::DELIVERY_TIME).await;
            let done = RcptResult::Delivered {
                reply: crate::canary::REPLY.into(),
                host: "skein-drill".into(),
                tls: false,
                dsn: true,
                lmtp: false,
            };
            return vec![done; job.recipients.len()];
        }
        let mut dest = self.destination(&job.domain);
        let (policy, dane) = tokio::join!(
            self.sts_policy(&dest, &job.domain),
            self.dane_mx(&dest, &job.domain)
        );
        if dane {
            // Sessions verified by TLSA records are kept apart.
            dest.dane = true;
            dest.key.push_str("|dane");
        }
        if let Some(p) = &policy {
            // Verified TLS to the hosts the policy names; under `testing`
            // what fails is reported and delivery goes on as before.
            dest.sts = Some(p.mode);
            dest.policy = TlsPolicy::Verify;
            dest.key.push_str(if p.mode == Mode::Enforce {
                "|sts"
            } else {
                "|sts-testing"
            });
        }
        let _slot = self.inner.pool.slot(&dest.key).await;
        while let Some(conn) = self.inner.pool.take(&dest.key) {
            let span = tracing::info_span!("smtp", peer = %conn.peer, reused = conn.uses);
            match self.carry(conn, job, &dest, true).instrument(span).await {
                HostOutcome::Done(results) => return results,
                // Dead or confused: the next pooled one, or a new one.
                HostOutcome::Stale => continue,
                HostOutcome::NextHost(_) => break,
            }
        }
        let all = |r: RcptResult| vec![r; job.recipients.len()];
        let mut hosts = match dest.relay {
            Some(r) => vec![relay_host(r.relay.host())],
            None => match route(&self.inner.resolver, &job.domain).await {
                Route::Hosts(hosts) => hosts,
                Route::Fail(reply) => {
                    tracing::info!(%reply, "no route, failing");
                    return all(RcptResult::Failed { reply });
                }
                Route::Defer(reply) => {
                    tracing::info!(%reply, "no route for now, deferring");
                    return all(RcptResult::Deferred { reply });
                }
            },
        };
        if let (Some(p), Some(sts)) = (&policy, &self.inner.sts) {
            if !hosts.iter().any(|h| p.allows(&h.name)) {
                let first = hosts.first().map_or("", |h| h.name.as_str());
                sts.observe(&job.domain, p.mode, "mx-mismatch", first);
                if p.mode == Mode::Enforce {
                    let reply = format!(
                        "451 4.7.5 the MTA-STS policy of {} names none of its MX hosts",
                        job.domain
                    );
                    tracing::info!(%reply, "deferring");
                    return all(RcptResult::Deferred { reply });
                }
            } else if p.mode == Mode::Enforce {
                hosts.retain(|h| p.allows(&h.name));
            }
        }
        let mut last = match dest.relay {
            Some(r) => format!("relay {} could not be reached", r.relay),
            None => format!("no mail exchanger for {} could be reached", job.domain),
        };
        // One preference at a time: every host of a preference has its
        // addresses looked up before any is tried, so that where this
        // cluster itself is among them the list ends there (RFC 5321 §5.1:
        // a backup MX hands mail only to better ones, never to itself).
        let mut better_tried = false;
        for group in hosts.chunk_by(|a, b| a.pref == b.pref) {
            let mut resolved = Vec::with_capacity(group.len());
            for host in group {
                let addrs = match &host.addrs {
                    Some(addrs) => Ok(addrs.clone()),
                    None => host_addrs(&self.inner.resolver, &host.name).await,
                };
                resolved.push((host, addrs));
            }
            let own = &self.inner.cfg.own;
            let is_self = resolved.iter().any(|(_, addrs)| {
                addrs.as_ref().is_ok_and(|a| {
                    a.iter()
                        .any(|ip| own.contains(SocketAddr::new(*ip, dest.port)))
                })
            });
            if is_self {
                if better_tried {
                    tracing::info!(preference = group[0].pref, last = %Escaped(&last), "this cluster is the best MX left; deferring");
                    break;
                }
                let reply = format!("554 5.4.6 mail for {} loops back to myself", job.domain);
                tracing::warn!(%reply, "failing");
                return all(RcptResult::Failed { reply });
            }
            for (host, addrs) in resolved {
                let addrs = match addrs {
                    Ok(addrs) => addrs,
                    Err(e) => {
                        tracing::info!(host = %host.name, reason = e.text(), "skipping host");
                        last = format!("451 4.4.3 {}", e.text());
                        continue;
                    }
                };
                let host_dane = match &self.inner.dane {
                    Some(d) if dest.dane => d.host(&host.name, dest.port).await,
                    _ => HostDane::None,
                };
                if let HostDane::Unusable(reason) = &host_dane {
                    tracing::info!(host = %host.name, reason = %Escaped(reason), "skipping host");
                    self.observe_dane(&job.domain, "dnssec-invalid", &host.name, &HostDane::None);
                    last = reason.clone();
                    continue;
                }
                for ip in addrs {
                    let peer = peer_name(&host.name, ip);
                    let span = tracing::info_span!("smtp", host = %host.name, %ip);
                    match self
                        .attempt(job, &dest, &host.name, &peer, ip, &host_dane)
                        .instrument(span)
                        .await
                    {
                        HostOutcome::Done(results) => return results,
                        HostOutcome::NextHost(reason) => {
                            tracing::info!(%peer, reason = %Escaped(&reason), "trying next host");
                            last = reason;
                        }
                        // A new connection is never probed.
                        HostOutcome::Stale => {}
                    }
                }
            }
            better_tried = true;
        }
        all(RcptResult::Deferred { reply: last })
    }

    /// The TXT records at `name` (each one's strings joined); none on any
    /// error. For TLS-RPT's `_smtp._tls` records.
    pub async fn txt(&self, name: &str) -> Vec<String> {
        crate::mta_sts::txt_records(&self.inner.resolver, name).await
    }

    /// The MTA-STS policy in force for a delivery to the domain's MX hosts
    /// (never for a relay, nor for a domain that withdrew its policy).
    async fn sts_policy(&self, dest: &Destination<'_>, domain: &str) -> Option<Policy> {
        let sts = self.inner.sts.as_ref()?;
        if dest.relay.is_some() || domain.starts_with('[') {
            return None;
        }
        sts.policy(&self.inner.resolver, domain)
            .await
            .filter(|p| p.mode != Mode::None)
    }

    /// Whether DANE applies to this delivery: MX hosts (not a relay) of a
    /// domain whose MX RRset is DNSSEC-proven.
    async fn dane_mx(&self, dest: &Destination<'_>, domain: &str) -> bool {
        match &self.inner.dane {
            Some(d) if dest.relay.is_none() && !domain.starts_with('[') => {
                d.mx_secure(domain).await
            }
            _ => false,
        }
    }

    fn observe_dane(&self, domain: &str, result: &'static str, mx: &str, host: &HostDane) {
        if let Some(o) = &self.inner.observer {
            let tlsa: Vec<String> = match host {
                HostDane::Verify(records, _) => records.iter().map(|r| r.presentation()).collect(),
                _ => Vec::new(),
            };
            o.dane(domain, result, mx, &tlsa);
        }
    }

    /// Runs `job` on `conn`, then keeps the connection for the next message
    /// or closes it.
    async fn carry(
        &self,
        mut conn: Conn,
        job: &Job,
        dest: &Destination<'_>,
        reused: bool,
    ) -> HostOutcome {
        let (outcome, after) = transact(&mut conn, job, &self.inner.cfg, reused).await;
        match after {
            After::Clean if matches!(outcome, HostOutcome::Done(_)) => {
                self.inner.pool.put(&dest.key, conn)
            }
            After::Clean | After::Quit => crate::transaction::quit(&mut conn.session).await,
            After::Closed => {}
        }
        outcome
    }

    async fn attempt(
        &self,
        job: &Job,
        dest: &Destination<'_>,
        host: &str,
        peer: &str,
        ip: IpAddr,
        host_dane: &HostDane,
    ) -> HostOutcome {
        let cfg = &self.inner.cfg;
        let addr = SocketAddr::new(ip, dest.port);
        // DANE, where it applies, takes the place of the route's policy and
        // of MTA-STS (RFC 8461 §2).
        let (mut policy, dane) = match host_dane {
            HostDane::Verify(records, base) => {
                match self
                    .inner
                    .tls
                    .dane(records.clone(), &[host, base, &job.domain])
                {
                    Ok(c) => (TlsPolicy::Verify, Some(c)),
                    Err(e) => return HostOutcome::NextHost(format!("451 4.7.5 DANE: {e}")),
                }
            }
            HostDane::Encrypt => (TlsPolicy::Encrypt, None),
            HostDane::None | HostDane::Unusable(_) => (dest.policy, None),
        };
        let sts_mode = if matches!(host_dane, HostDane::None) {
            dest.sts
        } else {
            None
        };
        loop {
            let connect =
                tokio::time::timeout(cfg.timeouts.connect, TcpStream::connect(addr)).await;
            let tcp = match connect {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    return HostOutcome::NextHost(format!(
                        "connect to {peer}:{}: {}",
                        dest.port,
                        io_text(&e)
                    ))
                }
                Err(_) => {
                    return HostOutcome::NextHost(format!(
                        "connect to {peer}:{}: timed out after {:?}",
                        dest.port, cfg.timeouts.connect
                    ))
                }
            };
            let _ = tcp.set_nodelay(true);
            let dial = Dial {
                cfg,
                tls: &self.inner.tls,
                policy,
                dane: dane.as_ref(),
                auth: dest.auth,
                lmtp: dest.lmtp,
                host,
                tls_name: match host_dane {
                    HostDane::Verify(_, base) if dane.is_some() => Some(base.as_str()),
                    _ => None,
                },
                ip,
                peer,
            };
            match open(tcp, &dial).await {
                Ok(conn) => {
                    if dane.is_some() {
                        self.observe_dane(&job.domain, "success", host, host_dane);
                    } else if let (Some(mode), Some(sts), TlsPolicy::Verify) =
                        (sts_mode, &self.inner.sts, policy)
                    {
                        sts.observe(&job.domain, mode, "success", host);
                    }
                    return self.carry(conn, job, dest, false).await;
                }
                Err(OpenError::NextHost(reason)) => return HostOutcome::NextHost(reason),
                Err(OpenError::Tls { reason, kind }) if dane.is_some() => {
                    let result = match kind {
                        "validation-failure" => "tlsa-invalid",
                        other => other,
                    };
                    self.observe_dane(&job.domain, result, host, host_dane);
                    let code = if reason.starts_with(|c: char| c.is_ascii_digit()) {
                        ""
                    } else {
                        "451 4.7.5 "
                    };
                    return HostOutcome::NextHost(format!("{code}{reason} (DANE)"));
                }
                Err(OpenError::Tls { reason, kind }) => {
                    let Some(mode) = sts_mode else {
                        return HostOutcome::NextHost(reason);
                    };
                    if let Some(sts) = &self.inner.sts {
                        sts.observe(&job.domain, mode, kind, host);
                    }
                    if mode == Mode::Enforce {
                        return HostOutcome::NextHost(format!(
                            "{reason} (MTA-STS policy of {} enforced)",
                            job.domain
                        ));
                    }
                    if self.inner.cfg.tls == TlsPolicy::Verify {
                        return HostOutcome::NextHost(reason);
                    }
                    tracing::info!(%peer, reason = %Escaped(&reason), "MTA-STS testing: would have failed; delivering as without a policy");
                    policy = self.inner.cfg.tls;
                }
                Err(OpenError::RetryPlain(reason)) => {
                    tracing::info!(%peer, reason = %Escaped(&reason), "TLS failed under policy may; trying plaintext");
                    policy = TlsPolicy::None;
                }
            }
        }
    }
}

/// A relay host: an IP address as is, a name looked up when its turn comes.
fn relay_host(host: &str) -> Host {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    match bare.parse::<IpAddr>() {
        Ok(ip) => Host {
            name: format!("[{ip}]"),
            pref: 0,
            addrs: Some(vec![ip]),
        },
        Err(_) => Host {
            name: host.to_string(),
            pref: 0,
            addrs: None,
        },
    }
}

/// Closes idle connections past their keep time, while the deliverer lives.
async fn sweep(inner: Weak<Inner>) {
    let every = match inner.upgrade() {
        Some(i) => {
            (i.cfg.connection_reuse / 2).clamp(Duration::from_millis(100), Duration::from_secs(1))
        }
        None => return,
    };
    loop {
        tokio::time::sleep(every).await;
        match inner.upgrade() {
            Some(i) => i.pool.sweep(),
            None => return,
        }
    }
}

/// `mx1.example.org[192.0.2.1]`, or `[192.0.2.1]` for an address literal.
fn peer_name(host: &str, ip: IpAddr) -> String {
    if host.starts_with('[') {
        format!("[{ip}]")
    } else {
        format!("{host}[{ip}]")
    }
}

/// io errors in the words operators expect, without "(os error 111)".
fn io_text(e: &io::Error) -> String {
    use io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused => "connection refused".into(),
        ConnectionReset => "connection reset".into(),
        TimedOut => "timed out".into(),
        HostUnreachable => "host unreachable".into(),
        NetworkUnreachable => "network unreachable".into(),
        AddrNotAvailable => "address not available".into(),
        _ => e.to_string(),
    }
}

/// The resolver for `cfg`'s name servers; with `anchors`, one that
/// validates DNSSEC from them and marks each record's proof.
fn build_resolver(
    cfg: &DeliveryConfig,
    tls: rustls::ClientConfig,
    anchors: Option<hickory_resolver::proto::dnssec::TrustAnchors>,
) -> Result<TokioResolver, DeliveryError> {
    let mut builder = match &cfg.nameservers {
        None => TokioResolver::builder_tokio()
            .map_err(|e| DeliveryError::SystemResolver(e.to_string()))?,
        Some(list) if list.is_empty() => return Err(DeliveryError::NoNameservers),
        Some(list) => {
            let servers = list
                .iter()
                .map(|addr| {
                    let mut udp = ConnectionConfig::udp();
                    udp.port = addr.port();
                    let mut tcp = ConnectionConfig::tcp();
                    tcp.port = addr.port();
                    NameServerConfig::new(addr.ip(), true, vec![udp, tcp])
                })
                .collect();
            let config = ResolverConfig::from_name_servers(servers);
            let mut builder =
                TokioResolver::builder_with_config(config, TokioRuntimeProvider::default());
            // "Exactly these servers": /etc/hosts must not answer instead.
            builder.options_mut().use_hosts_file = ResolveHosts::Never;
            builder
        }
    };
    let opts = builder.options_mut();
    opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    opts.cache_size = DNS_CACHE;
    if let Some(anchors) = anchors {
        builder = builder.with_trust_anchor(Arc::new(anchors));
    }
    builder
        .with_tls_config(tls)
        .build()
        .map_err(|e| DeliveryError::Resolver(e.to_string()))
}
