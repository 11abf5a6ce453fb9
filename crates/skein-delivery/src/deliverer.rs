//! [`Deliverer`]: resolve the route, then try each host and address in
//! order until one session gives every recipient a result.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use hickory_resolver::config::{
    ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::TokioResolver;
use tokio::net::TcpStream;
use tracing::Instrument as _;

use crate::config::DeliveryConfig;
use crate::error::DeliveryError;
use crate::job::{Job, RcptResult};
use crate::route::{host_addrs, route, Route};
use crate::session::Session;
use crate::transaction::{deliver_on, HostOutcome};

/// Responses kept by the resolver's cache. Small: MX answers are cheap to
/// ask again, and TTLs are honoured anyway.
const DNS_CACHE: u64 = 1024;

/// Delivers jobs. Cheap to clone: clones share one resolver.
#[derive(Clone)]
pub struct Deliverer {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: DeliveryConfig,
    resolver: TokioResolver,
}

impl std::fmt::Debug for Deliverer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deliverer")
            .field("cfg", &self.inner.cfg)
            .finish_non_exhaustive()
    }
}

impl Deliverer {
    pub fn new(cfg: DeliveryConfig) -> Result<Self, DeliveryError> {
        let resolver = build_resolver(&cfg)?;
        Ok(Deliverer {
            inner: Arc::new(Inner { cfg, resolver }),
        })
    }

    pub fn config(&self) -> &DeliveryConfig {
        &self.inner.cfg
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
        self.run(job).instrument(span).await
    }

    async fn run(&self, job: &Job) -> Vec<RcptResult> {
        if job.recipients.is_empty() {
            return Vec::new();
        }
        let all = |r: RcptResult| vec![r; job.recipients.len()];
        let hosts = match route(&self.inner.resolver, &job.domain).await {
            Route::Hosts(hosts) => hosts,
            Route::Fail(reply) => {
                tracing::info!(%reply, "no route, failing");
                return all(RcptResult::Failed { reply });
            }
            Route::Defer(reply) => {
                tracing::info!(%reply, "no route for now, deferring");
                return all(RcptResult::Deferred { reply });
            }
        };
        let mut last = format!("no mail exchanger for {} could be reached", job.domain);
        for host in &hosts {
            let addrs = match &host.addrs {
                Some(addrs) => addrs.clone(),
                None => match host_addrs(&self.inner.resolver, &host.name).await {
                    Ok(addrs) => addrs,
                    Err(e) => {
                        tracing::info!(host = %host.name, reason = e.text(), "skipping MX host");
                        last = format!("451 4.4.3 {}", e.text());
                        continue;
                    }
                },
            };
            for ip in addrs {
                let peer = peer_name(&host.name, ip);
                let span = tracing::info_span!("smtp", host = %host.name, %ip);
                match self.attempt(job, &peer, ip).instrument(span).await {
                    HostOutcome::Done(results) => return results,
                    HostOutcome::NextHost(reason) => {
                        tracing::info!(%peer, %reason, "trying next host");
                        last = reason;
                    }
                }
            }
        }
        all(RcptResult::Deferred { reply: last })
    }

    async fn attempt(&self, job: &Job, peer: &str, ip: IpAddr) -> HostOutcome {
        let cfg = &self.inner.cfg;
        let addr = SocketAddr::new(ip, cfg.port);
        let connect = tokio::time::timeout(cfg.timeouts.connect, TcpStream::connect(addr)).await;
        let stream = match connect {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                return HostOutcome::NextHost(format!(
                    "connect to {peer}:{}: {}",
                    cfg.port,
                    io_text(&e)
                ))
            }
            Err(_) => {
                return HostOutcome::NextHost(format!(
                    "connect to {peer}:{}: timed out after {:?}",
                    cfg.port, cfg.timeouts.connect
                ))
            }
        };
        let mut session = Session::new(stream);
        deliver_on(&mut session, job, cfg, peer).await
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

fn build_resolver(cfg: &DeliveryConfig) -> Result<TokioResolver, DeliveryError> {
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
    builder
        .build()
        .map_err(|e| DeliveryError::Resolver(e.to_string()))
}
