//! TLS material from PEM files, reloaded when the files change on disk so
//! certificates rotate without a restart: the SMTP server certificate and
//! the cluster's mutual-TLS identity and CA.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

use crate::config::TlsFiles;

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate in a PEM file (a CA bundle).
pub fn load_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("{} is not a PEM certificate file", path.display()))?;
    anyhow::ensure!(!certs.is_empty(), "{} holds no certificate", path.display());
    Ok(certs)
}

fn load_private_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path)
        .with_context(|| format!("cannot read a private key from {}", path.display()))
}

/// A certificate chain and key read from PEM files.
pub(crate) fn load_key(cert: &Path, key: &Path) -> anyhow::Result<CertifiedKey> {
    let chain = load_certs(cert)?;
    let signer = provider()
        .key_provider
        .load_private_key(load_private_key(key)?)
        .context("unsupported private key")?;
    let ck = CertifiedKey::new(chain, signer);
    ck.keys_match()
        .context("the private key does not match the certificate")?;
    Ok(ck)
}

fn mtimes(paths: &[PathBuf]) -> Vec<Option<SystemTime>> {
    paths
        .iter()
        .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .collect()
}

/// How a [`Reloading`] value is made from its files.
type Build<T> = Box<dyn Fn(&[PathBuf]) -> anyhow::Result<T> + Send + Sync>;

/// Something built from files, rebuilt when any of them changes.
pub struct Reloading<T> {
    paths: Vec<PathBuf>,
    build: Build<T>,
    current: RwLock<Arc<T>>,
    seen: Mutex<Vec<Option<SystemTime>>>,
}

impl<T> fmt::Debug for Reloading<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reloading")
            .field("paths", &self.paths)
            .finish()
    }
}

impl<T: Send + Sync + 'static> Reloading<T> {
    pub(crate) fn load(
        paths: Vec<PathBuf>,
        build: impl Fn(&[PathBuf]) -> anyhow::Result<T> + Send + Sync + 'static,
    ) -> anyhow::Result<Arc<Self>> {
        let seen = mtimes(&paths);
        let value = build(&paths)?;
        Ok(Arc::new(Reloading {
            paths,
            build: Box::new(build),
            current: RwLock::new(Arc::new(value)),
            seen: Mutex::new(seen),
        }))
    }

    /// What the files held at the last successful load.
    pub fn current(&self) -> Arc<T> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Rebuild if a file changed since the last look. Files caught
    /// half-written (or a bad new set) keep the old value in use; the next
    /// look tries again.
    pub fn reload_if_changed(&self) -> anyhow::Result<bool> {
        let now = mtimes(&self.paths);
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if *seen == now {
            return Ok(false);
        }
        let value = (self.build)(&self.paths)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(value);
        *seen = now;
        Ok(true)
    }

    /// Look for new files every `every` until the returned task is aborted.
    pub fn watch(
        self: &Arc<Self>,
        every: Duration,
        what: &'static str,
    ) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let file = me.paths[0].display();
                match me.reload_if_changed() {
                    Ok(true) => tracing::info!(file = %file, "{what} reloaded"),
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(file = %file, error = %format!("{e:#}"), "{what} not reloaded; keeping the old one")
                    }
                }
            }
        })
    }
}

/// The SMTP server certificate, swapped in place when its files change.
pub type ReloadingCert = Reloading<CertifiedKey>;

impl Reloading<CertifiedKey> {
    pub fn load_pair(cert: &Path, key: &Path) -> anyhow::Result<Arc<Self>> {
        Reloading::load(vec![cert.to_owned(), key.to_owned()], |p| {
            load_key(&p[0], &p[1])
        })
    }
}

impl ResolvesServerCert for Reloading<CertifiedKey> {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// A TLS acceptor serving whatever certificate `cert` holds at the time.
pub fn server_acceptor(cert: Arc<ReloadingCert>) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// gRPC rides on HTTP/2; both ends say so in ALPN.
const ALPN_H2: &[u8] = b"h2";

/// The cluster port's mutual TLS: this node's certificate (presented to
/// peers as server and as client) and the CA peers must chain to.
pub struct ClusterTls {
    server: Arc<rustls::ServerConfig>,
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    ca_pem: Vec<u8>,
}

impl ClusterTls {
    /// Load `[cluster] tls_cert / tls_key / tls_ca`, reloaded on change.
    pub fn load(files: &TlsFiles) -> anyhow::Result<Arc<Reloading<ClusterTls>>> {
        let paths = vec![files.cert.clone(), files.key.clone(), files.ca.clone()];
        Reloading::load(paths, |p| ClusterTls::build(&p[0], &p[1], &p[2]))
    }

    fn build(cert: &Path, key: &Path, ca: &Path) -> anyhow::Result<ClusterTls> {
        let read =
            |p: &Path| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
        let mut roots = RootCertStore::empty();
        for c in load_certs(ca)? {
            roots
                .add(c)
                .with_context(|| format!("{}: not a usable CA certificate", ca.display()))?;
        }
        let roots = Arc::new(roots);
        let ck = load_key(cert, key)?;
        // Peers must present a certificate from the CA; clients without one
        // (skeinctl, which presents the admin token instead) are let in,
        // and the Raft service refuses them.
        let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
            .allow_unauthenticated()
            .build()
            .context("cannot build the peer certificate verifier")?;
        let mut server = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(ck.cert.clone(), load_private_key(key)?)
            .context("the cluster certificate and key do not go together")?;
        server.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(ClusterTls {
            server: Arc::new(server),
            cert_pem: read(cert)?,
            key_pem: read(key)?,
            ca_pem: read(ca)?,
        })
    }

    /// How this node dials the peer at `host`: the peer's certificate must
    /// chain to the CA and name `host`; ours goes the other way.
    pub fn client_config(&self, host: &str) -> tonic::transport::ClientTlsConfig {
        tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&self.ca_pem))
            .identity(tonic::transport::Identity::from_pem(
                &self.cert_pem,
                &self.key_pem,
            ))
            .domain_name(host)
    }
}

/// The host part of `host:port` (an IPv6 literal without its brackets).
pub fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// Whether `cert` (a peer's end-entity certificate) names `host`, as a DNS
/// name or an IP address.
pub fn cert_names(cert: &CertificateDer<'_>, host: &str) -> bool {
    let Ok(name) = ServerName::try_from(host) else {
        return false;
    };
    webpki::EndEntityCert::try_from(cert)
        .and_then(|ee| ee.verify_is_valid_for_subject_name(&name))
        .is_ok()
}

/// How long a peer may take over its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The cluster listener's connections after their TLS handshake, each
/// with whatever certificate and CA the files hold when it arrives.
/// Handshakes run side by side, so a slow one holds up nobody.
pub fn tls_incoming(
    listener: TcpListener,
    tls: Arc<Reloading<ClusterTls>>,
) -> ReceiverStream<std::io::Result<TlsStream<TcpStream>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (conn, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "cluster accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = tx.closed() => return,
            };
            let _ = conn.set_nodelay(true);
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.current().server.clone());
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(conn)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    // Closed before a word: a peer checking the port is
                    // open (see cluster::succession), or a port scan.
                    Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                        tracing::debug!(%peer, "cluster connection closed before TLS")
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(%peer, error = %e, "cluster TLS handshake refused")
                    }
                    Err(_) => tracing::warn!(%peer, "cluster TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Whether a node's cluster certificate would be taken by its peers: its
/// key matches it, it chains to the CA, and it names `host` (the host of
/// `cluster.advertise`, which peers verify).
pub fn check_cluster_files(cert: &Path, key: &Path, ca: &Path, host: &str) -> anyhow::Result<()> {
    let ck = load_key(cert, key)?;
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(ca)? {
        roots
            .add(c)
            .with_context(|| format!("{} is not a usable CA certificate", ca.display()))?;
    }
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .context("the cluster CA")?;
    let name = ServerName::try_from(host.to_string())
        .map_err(|_| anyhow::anyhow!("{host:?} is not a host name or address"))?;
    let (ee, rest) = ck
        .cert
        .split_first()
        .ok_or_else(|| anyhow::anyhow!("{} holds no certificate", cert.display()))?;
    use rustls::client::danger::ServerCertVerifier;
    verifier
        .verify_server_cert(ee, rest, &name, &[], rustls_pki_types::UnixTime::now())
        .map_err(|e| {
            anyhow::anyhow!(
                "{} is not valid for {host} under the CA {}: {e}",
                cert.display(),
                ca.display()
            )
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_of_strips_port_and_brackets() {
        assert_eq!(host_of("10.0.0.1:7001"), "10.0.0.1");
        assert_eq!(host_of("[2001:db8::1]:7001"), "2001:db8::1");
        assert_eq!(host_of("node1.example.com:7001"), "node1.example.com");
    }

    #[test]
    fn cert_names_checks_dns_and_ip_names() {
        let mut params =
            rcgen::CertificateParams::new(vec!["node1.example.com".to_string()]).unwrap();
        params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress("10.0.0.1".parse().unwrap()));
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let der = cert.der();
        assert!(cert_names(der, "node1.example.com"));
        assert!(cert_names(der, "10.0.0.1"));
        assert!(!cert_names(der, "node2.example.com"));
        assert!(!cert_names(der, "10.0.0.2"));
    }
}
