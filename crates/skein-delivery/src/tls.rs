//! Outbound TLS: the per-route policy and the rustls client configurations
//! behind it.
//!
//! | policy    | STARTTLS when offered | required | certificate checked |
//! |-----------|-----------------------|----------|---------------------|
//! | `none`    | no                    | no       | –                   |
//! | `may`     | yes                   | no       | no (RFC 7435)       |
//! | `encrypt` | yes                   | yes      | no                  |
//! | `verify`  | yes                   | yes      | chain and host name |
//!
//! Under `may` a failed handshake is retried once in plaintext on a new
//! connection, as Postfix does: opportunistic TLS must never make mail
//! undeliverable. Unverified sessions still check the handshake signatures;
//! they only skip the certificate chain, which MX hosts on the internet
//! mostly cannot offer for the name the MX record gives.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_rustls::TlsConnector;

/// How a route (or MX delivery) uses TLS.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum TlsPolicy {
    /// Never STARTTLS.
    None,
    /// STARTTLS when offered; plaintext otherwise or if the handshake fails.
    #[default]
    May,
    /// STARTTLS required; any certificate.
    Encrypt,
    /// STARTTLS required; the certificate must chain to a trusted root and
    /// name the host.
    Verify,
}

impl TlsPolicy {
    /// Whether the session must not go on without TLS.
    pub fn required(self) -> bool {
        matches!(self, TlsPolicy::Encrypt | TlsPolicy::Verify)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TlsPolicy::None => "none",
            TlsPolicy::May => "may",
            TlsPolicy::Encrypt => "encrypt",
            TlsPolicy::Verify => "verify",
        }
    }
}

impl fmt::Display for TlsPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TlsPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(TlsPolicy::None),
            "may" => Ok(TlsPolicy::May),
            "encrypt" => Ok(TlsPolicy::Encrypt),
            "verify" => Ok(TlsPolicy::Verify),
            _ => Err(format!(
                "{s:?} is not a TLS policy (none, may, encrypt or verify)"
            )),
        }
    }
}

/// The two client configurations every delivery shares.
#[derive(Clone)]
pub(crate) struct TlsClients {
    provider: Arc<CryptoProvider>,
    unverified: TlsConnector,
    verified: TlsConnector,
    /// Verified, speaking HTTP/1.1: MTA-STS policy fetches.
    pub https: TlsConnector,
    /// For the resolver, which would otherwise build its own from the
    /// system's CA store (absent from a minimal image) even for plain DNS.
    pub dns: ClientConfig,
}

impl TlsClients {
    /// `extra_roots` are trusted in addition to the Mozilla roots of
    /// `webpki-roots` (a private CA for a smarthost, or tests).
    pub fn new(extra_roots: &[CertificateDer<'static>]) -> Result<Self, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        for c in extra_roots {
            roots
                .add(c.clone())
                .map_err(|e| format!("an extra CA certificate is unusable: {e}"))?;
        }
        let verified = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let unverified = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider.clone())))
            .with_no_client_auth();
        let dns = verified.clone();
        let mut https = verified.clone();
        https.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(TlsClients {
            provider,
            unverified: TlsConnector::from(Arc::new(unverified)),
            verified: TlsConnector::from(Arc::new(verified)),
            https: TlsConnector::from(Arc::new(https)),
            dns,
        })
    }

    /// A connector accepting only certificates that match `records`
    /// (DANE); DANE-TA chains must carry one of `names`.
    pub fn dane(
        &self,
        records: Arc<[crate::dane::Tlsa]>,
        names: &[&str],
    ) -> Result<TlsConnector, String> {
        let names = names
            .iter()
            .filter_map(|n| ServerName::try_from(n.trim_end_matches('.').to_string()).ok())
            .collect();
        let verifier = crate::dane::DaneVerifier {
            records,
            names,
            signatures: AnyCertificate(self.provider.clone()),
        };
        let config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        Ok(TlsConnector::from(Arc::new(config)))
    }

    /// The connector for a policy; `None` for [`TlsPolicy::None`].
    pub fn for_policy(&self, policy: TlsPolicy) -> Option<&TlsConnector> {
        match policy {
            TlsPolicy::None => None,
            TlsPolicy::May | TlsPolicy::Encrypt => Some(&self.unverified),
            TlsPolicy::Verify => Some(&self.verified),
        }
    }
}

/// The name to present (SNI) and, under `verify`, to check: the MX or relay
/// host name, or the address for a literal.
pub(crate) fn server_name(host: &str, ip: std::net::IpAddr) -> ServerName<'static> {
    let name = host.trim_end_matches('.');
    match ServerName::try_from(name.to_string()) {
        Ok(n) if !host.starts_with('[') => n,
        _ => ServerName::IpAddress(ip.into()),
    }
}

/// Accepts any certificate chain but still verifies the handshake
/// signatures with the provider's algorithms.
#[derive(Debug)]
pub(crate) struct AnyCertificate(pub Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
