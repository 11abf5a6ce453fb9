//! Test certificates (rcgen) and a TLS client that trusts them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// A self-signed certificate for `localhost`, written as PEM files.
pub struct TestCert {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub der: CertificateDer<'static>,
}

impl TestCert {
    pub fn write(dir: &Path, name: &str) -> TestCert {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let cert = dir.join(format!("{name}.pem"));
        let key = dir.join(format!("{name}.key"));
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
        TestCert {
            cert,
            key,
            der: ck.cert.der().clone(),
        }
    }
}

/// A certificate authority of a test's own, written as a PEM file.
pub struct TestCa {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    pub pem: PathBuf,
}

impl TestCa {
    pub fn new(dir: &Path, name: &str) -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} test CA"));
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        let issuer = rcgen::CertifiedIssuer::self_signed(params, key).unwrap();
        let pem = dir.join(format!("{name}.pem"));
        std::fs::write(&pem, issuer.pem()).unwrap();
        TestCa { issuer, pem }
    }

    pub fn der(&self) -> &CertificateDer<'static> {
        self.issuer.der()
    }

    /// A node certificate naming `ips`, good for serving and for
    /// connecting, written as `<name>.pem` and `<name>.key` in `dir`.
    pub fn issue(&self, dir: &Path, name: &str, ips: &[std::net::IpAddr]) -> TestCert {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.subject_alt_names = ips
            .iter()
            .map(|ip| rcgen::SanType::IpAddress(*ip))
            .collect();
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (cert_path, key_path) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        );
        // Written whole and renamed into place, as an operator's tooling
        // would: a reader never sees half a file.
        for (path, text) in [(&key_path, key.serialize_pem()), (&cert_path, cert.pem())] {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, path).unwrap();
        }
        TestCert {
            cert: cert_path,
            key: key_path,
            der: cert.der().clone(),
        }
    }
}

/// TLS over `stream`, trusting only `trusted`; the certificate the server
/// presented comes back too.
pub async fn connect(
    stream: TcpStream,
    trusted: &[&CertificateDer<'static>],
) -> std::io::Result<(TlsStream<TcpStream>, CertificateDer<'static>)> {
    connect_as(stream, trusted, "localhost").await
}

/// [`connect`] to a server that must be named `name` (a DNS name or an IP).
pub async fn connect_as(
    stream: TcpStream,
    trusted: &[&CertificateDer<'static>],
    name: &str,
) -> std::io::Result<(TlsStream<TcpStream>, CertificateDer<'static>)> {
    let mut roots = rustls::RootCertStore::empty();
    for c in trusted {
        roots.add((*c).clone()).map_err(std::io::Error::other)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(std::io::Error::other)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            ServerName::try_from(name.to_string()).map_err(std::io::Error::other)?,
            stream,
        )
        .await?;
    let presented = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .cloned()
        .expect("a server certificate");
    Ok((tls, presented))
}

/// A Raft-service client to `addr` that trusts `ca` and presents
/// `identity`, if any, with the cluster secret on every call.
pub async fn raft_client(
    addr: SocketAddr,
    ca: &std::path::Path,
    identity: Option<&TestCert>,
) -> anyhow::Result<skein_proto::v1::raft_client::RaftClient<tonic::transport::Channel>> {
    let mut tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(std::fs::read(ca)?))
        .domain_name(addr.ip().to_string());
    if let Some(id) = identity {
        tls = tls.identity(tonic::transport::Identity::from_pem(
            std::fs::read(&id.cert)?,
            std::fs::read(&id.key)?,
        ));
    }
    let ch = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
        .connect()
        .await?;
    Ok(skein_proto::v1::raft_client::RaftClient::new(ch))
}

/// `msg` with the test cluster's secret, as a peer sends it.
pub fn with_secret<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert(skein_proto::SECRET_HEADER, crate::SECRET.parse().unwrap());
    r
}
