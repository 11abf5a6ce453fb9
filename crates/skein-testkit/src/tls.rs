//! [`self_signed`]: a certificate for one name (rcgen) and a rustls server
//! configuration presenting it, for the testkit's servers and any test's.

use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

pub struct SelfSigned {
    /// A server configuration presenting the certificate (ring provider).
    pub config: Arc<rustls::ServerConfig>,
    pub der: CertificateDer<'static>,
    pub pem: String,
}

/// A self-signed certificate for `name`.
pub fn self_signed(name: &str) -> SelfSigned {
    let ck = rcgen::generate_simple_self_signed(vec![name.to_string()])
        .expect("rcgen makes a certificate");
    let der = ck.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("default protocol versions")
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], key)
        .expect("the certificate and its key match");
    SelfSigned {
        config: Arc::new(config),
        der,
        pem: ck.cert.pem(),
    }
}
