//! [`DnsServer`]: a real authoritative DNS server (hickory-server) on
//! 127.0.0.1, UDP and TCP on the same random port.
//!
//! Answer rules: a name never configured is NXDOMAIN; a configured name with
//! no record of the asked type is NODATA (NOERROR, no answers); a name marked
//! with [`DnsServerBuilder::servfail`] is SERVFAIL for every type. Records
//! carry TTL 0, so a resolver's cache never hides a change made while running.

mod handler;
mod signed;
mod zone;

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use hickory_server::Server;
use tokio::net::{TcpListener, UdpSocket};

use handler::Handler;
pub use signed::{SignedDns, SignedDnsBuilder};
pub use zone::Kind as RecordKind;
use zone::{Rec, Zone};

/// How long the TCP side waits for a query on an idle connection.
const TCP_IDLE: Duration = Duration::from_secs(10);

/// Builds a [`DnsServer`]; every method adds to the zone.
#[derive(Debug, Default)]
#[must_use]
pub struct DnsServerBuilder {
    zone: Zone,
}

impl DnsServerBuilder {
    /// An MX record at `name` pointing at `exchange`.
    pub fn mx(mut self, name: &str, preference: u16, exchange: &str) -> Self {
        self.zone.add(name, mx(preference, exchange));
        self
    }

    /// A null MX (RFC 7505): a single `MX 0 .`.
    pub fn null_mx(self, name: &str) -> Self {
        self.mx(name, 0, ".")
    }

    pub fn a(mut self, name: &str, ip: Ipv4Addr) -> Self {
        self.zone.add(name, Rec::A(ip));
        self
    }

    pub fn aaaa(mut self, name: &str, ip: Ipv6Addr) -> Self {
        self.zone.add(name, Rec::Aaaa(ip));
        self
    }

    pub fn txt(mut self, name: &str, text: &str) -> Self {
        self.zone.add(name, Rec::Txt(text.to_string()));
        self
    }

    pub fn cname(mut self, name: &str, target: &str) -> Self {
        self.zone.add(name, Rec::Cname(target.to_string()));
        self
    }

    /// Makes `name` exist with no records: every query for it is NODATA.
    pub fn empty(mut self, name: &str) -> Self {
        self.zone.touch(name);
        self
    }

    /// Answers SERVFAIL for every query about `name`.
    pub fn servfail(mut self, name: &str) -> Self {
        self.zone.set_servfail(name, true);
        self
    }

    /// Binds UDP and TCP on one random 127.0.0.1 port and starts serving.
    pub async fn start(self) -> anyhow::Result<DnsServer> {
        let zone = Arc::new(RwLock::new(self.zone));
        let queries = Arc::new(AtomicUsize::new(0));
        let (addr, server) = serve(Handler {
            zone: zone.clone(),
            queries: queries.clone(),
        })
        .await?;
        Ok(DnsServer {
            addr,
            zone,
            queries,
            _server: server,
        })
    }
}

/// A running DNS server. Dropping it stops it (its tasks are aborted).
pub struct DnsServer {
    addr: SocketAddr,
    zone: Arc<RwLock<Zone>>,
    queries: Arc<AtomicUsize>,
    _server: Server<Handler>,
}

impl DnsServer {
    pub fn builder() -> DnsServerBuilder {
        DnsServerBuilder::default()
    }

    /// The address, the same port on UDP and TCP.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Questions answered so far, over both transports.
    pub fn queries(&self) -> usize {
        self.queries.load(Ordering::Relaxed)
    }

    fn edit(&self, f: impl FnOnce(&mut Zone)) {
        f(&mut self.zone.write().unwrap_or_else(|e| e.into_inner()));
    }

    pub fn add_mx(&self, name: &str, preference: u16, exchange: &str) {
        self.edit(|z| z.add(name, mx(preference, exchange)));
    }

    pub fn add_a(&self, name: &str, ip: Ipv4Addr) {
        self.edit(|z| z.add(name, Rec::A(ip)));
    }

    pub fn add_aaaa(&self, name: &str, ip: Ipv6Addr) {
        self.edit(|z| z.add(name, Rec::Aaaa(ip)));
    }

    /// Replaces every A record of `name` with `ips`.
    pub fn set_a(&self, name: &str, ips: &[Ipv4Addr]) {
        self.edit(|z| {
            z.clear(name, RecordKind::A);
            for ip in ips {
                z.add(name, Rec::A(*ip));
            }
        });
    }

    /// Drops the records of one type at `name`; the name stays (NODATA).
    pub fn clear(&self, name: &str, kind: RecordKind) {
        self.edit(|z| z.clear(name, kind));
    }

    /// Turns SERVFAIL for `name` on or off.
    pub fn set_servfail(&self, name: &str, on: bool) {
        self.edit(|z| z.set_servfail(name, on));
    }

    /// Forgets `name`: NXDOMAIN from now on.
    pub fn remove(&self, name: &str) {
        self.edit(|z| z.remove(name));
    }
}

fn mx(preference: u16, exchange: &str) -> Rec {
    Rec::Mx {
        preference,
        exchange: exchange.to_string(),
    }
}

/// UDP first on port 0, then TCP on the port the kernel picked; another
/// process may hold that TCP port, so retry with a fresh UDP port.
/// Serves `handler` on UDP and TCP on one random 127.0.0.1 port.
async fn serve<H: hickory_server::server::RequestHandler>(
    handler: H,
) -> anyhow::Result<(SocketAddr, Server<H>)> {
    let (udp, tcp) = bind_pair().await?;
    let addr = udp.local_addr()?;
    let mut server = Server::new(handler);
    server.register_socket(udp);
    server.register_listener(tcp, TCP_IDLE, 64);
    tracing::debug!(%addr, "test dns server listening");
    Ok((addr, server))
}

async fn bind_pair() -> anyhow::Result<(UdpSocket, TcpListener)> {
    let mut last = None;
    for _ in 0..20 {
        let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .context("bind udp")?;
        let port = udp.local_addr()?.port();
        match TcpListener::bind((Ipv4Addr::LOCALHOST, port)).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) => last = Some(e),
        }
    }
    Err(last.map_or_else(
        || anyhow::anyhow!("no port"),
        |e| anyhow::Error::new(e).context("bind tcp on the udp port"),
    ))
}
