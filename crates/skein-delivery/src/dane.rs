//! DANE for SMTP (RFC 7672): TLSA records, proven by DNSSEC, say which
//! certificate an MX host presents; a host that publishes them is only ever
//! sent mail over TLS with a certificate that matches.
//!
//! The proof is checked here, not taken on a resolver's word: a second
//! resolver, asking the same name servers, validates every answer from a
//! trust anchor (the root's keys, or `delivery.dnssec_trust_anchors`), so an
//! attacker between Skein and its resolver cannot strip TLSA records.
//!
//! For each delivery to a domain's MX hosts:
//!
//! 1. the MX RRset must be secure, else DANE does not apply (its hosts could
//!    be anyone's);
//! 2. for each host, its address records must be secure, else DANE does
//!    not apply to that host (no TLSA lookup in unsigned zones, whose
//!    servers often mishandle the type);
//! 3. the TLSA RRset at `_PORT._tcp.HOST`:
//!    - proven absent: no DANE for the host, opportunistic TLS as configured;
//!    - usable records (DANE-TA 2 or DANE-EE 3; selector 0 or 1; matching
//!      0, 1 or 2): STARTTLS is required and the certificate must match one
//!      of them — else the next host, and in the end a deferral;
//!    - only unusable records (PKIX usages 0 and 1, unknown parameters):
//!      STARTTLS is required, the certificate is not checked;
//!    - the lookup fails or does not validate: the host is skipped, never
//!      sent mail in plaintext.
//!
//! DANE-EE matches the server's own certificate or public key and ignores
//! names and dates (RFC 7672 §3.1.1); DANE-TA matches a certificate of the
//! presented chain, which must then sign its way down to the server's
//! certificate, valid now and for the MX host (or the recipient domain).
//!
//! A domain whose lack of MX records is proven is its own MX host (the
//! implicit MX): steps 2 and 3 apply to it.
//!
//! An MX host that is a (secure) CNAME has its TLSA records looked for at
//! the expanded name first, then at its own (RFC 7672 §2.2.2); a DANE-TA
//! certificate may name either.

use std::cell::OnceCell;
use std::fmt;
use std::sync::Arc;

use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::dnssec::Proof;
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{RData, Record, RecordType};
use hickory_resolver::TokioResolver;
use ring::digest;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, OtherError, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::tls::AnyCertificate;

/// One TLSA record a delivery can use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Tlsa {
    /// 2 (DANE-TA) or 3 (DANE-EE).
    pub usage: u8,
    /// 0: the whole certificate; 1: its SubjectPublicKeyInfo.
    pub selector: u8,
    /// 0: the data itself; 1: its SHA-256; 2: its SHA-512.
    pub matching: u8,
    pub data: Vec<u8>,
}

impl Tlsa {
    /// The record in presentation format (`3 1 1 0123...`), as TLS reports
    /// name the policy applied (RFC 8460 §4.4).
    pub(crate) fn presentation(&self) -> String {
        let mut out = format!("{} {} {} ", self.usage, self.selector, self.matching);
        for b in &self.data {
            out.push_str(&format!("{b:02x}"));
        }
        out
    }

    /// The record if RFC 7672 lets SMTP use it.
    fn usable(usage: u8, selector: u8, matching: u8, data: &[u8]) -> Option<Tlsa> {
        let ok = matches!(usage, 2 | 3) && matches!(selector, 0 | 1) && matches!(matching, 0..=2);
        ok.then(|| Tlsa {
            usage,
            selector,
            matching,
            data: data.to_vec(),
        })
    }
}

/// A presented certificate as TLSA records select and hash it: parsed for
/// its key, and each digest made, at most once however many records ask.
struct Presented<'a> {
    cert: &'a [u8],
    /// Its SubjectPublicKeyInfo; `None` if it does not parse.
    spki: OnceCell<Option<&'a [u8]>>,
    /// By selector, then SHA-256 and SHA-512.
    digests: [[OnceCell<digest::Digest>; 2]; 2],
}

impl<'a> Presented<'a> {
    fn new(cert: &'a CertificateDer<'_>) -> Self {
        Presented {
            cert: cert.as_ref(),
            spki: OnceCell::new(),
            digests: Default::default(),
        }
    }

    fn selected(&self, selector: u8) -> Option<&'a [u8]> {
        if selector == 0 {
            return Some(self.cert);
        }
        *self.spki.get_or_init(|| {
            x509_parser::parse_x509_certificate(self.cert)
                .ok()
                .map(|(_, c)| c.tbs_certificate.subject_pki.raw)
        })
    }

    /// Whether `r` names this certificate (or its key).
    fn named_by(&self, r: &Tlsa) -> bool {
        let Some(selected) = self.selected(r.selector) else {
            return false;
        };
        let digest = |i: usize, alg| {
            self.digests[usize::from(r.selector)][i].get_or_init(|| digest::digest(alg, selected))
        };
        match r.matching {
            0 => selected == r.data.as_slice(),
            1 => digest(0, &digest::SHA256).as_ref() == r.data.as_slice(),
            _ => digest(1, &digest::SHA512).as_ref() == r.data.as_slice(),
        }
    }
}

/// What DANE asks of the sessions to one MX host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum HostDane {
    /// DANE does not apply: TLS as the delivery's policy says.
    None,
    /// TLS required, the certificate matching one of these, found at
    /// `_PORT._tcp.` the name given (the host, or where its CNAMEs lead).
    Verify(Arc<[Tlsa]>, String),
    /// A secure TLSA RRset of only unusable records: TLS required, any
    /// certificate (RFC 7672 §2.2).
    Encrypt,
    /// The host's TLSA records could not be had or proven: skip it. The
    /// text is the deferral reason.
    Unusable(String),
}

/// Lookups on the validating resolver.
pub(crate) struct Dane {
    resolver: TokioResolver,
}

impl Dane {
    pub fn new(resolver: TokioResolver) -> Self {
        Dane { resolver }
    }

    /// Whether `domain`'s MX RRset is proven by DNSSEC — or its absence is,
    /// so that mail goes to the domain's own addresses (the implicit MX).
    pub async fn mx_secure(&self, domain: &str) -> bool {
        let Some(name) = crate::route::fqdn(domain) else {
            return false;
        };
        match self.resolver.lookup(name, RecordType::MX).await {
            Ok(lookup) => all_secure(lookup.answers(), RecordType::MX),
            Err(NetError::Dns(DnsError::NoRecordsFound(nr)))
                if nr.response_code == ResponseCode::NoError =>
            {
                // NODATA: proven when the denial (SOA, NSEC and their
                // signatures) validated.
                nr.authorities.as_deref().is_some_and(|a| {
                    a.iter().any(|r| r.record_type() == RecordType::SOA)
                        && a.iter().all(|r| r.proof == Proof::Secure)
                })
            }
            Err(e) => {
                tracing::debug!(domain, error = %e, "MX not proven; no DANE");
                false
            }
        }
    }

    /// DANE for `host` (a name from a secure MX RRset) on `port`.
    pub async fn host(&self, host: &str, port: u16) -> HostDane {
        let Some(name) = crate::route::fqdn(host) else {
            return HostDane::None;
        };
        // The name the address records are at: the host, or where its
        // CNAMEs lead.
        let mut expanded = None;
        for kind in [RecordType::A, RecordType::AAAA] {
            if let Ok(l) = self.resolver.lookup(name.clone(), kind).await {
                if all_secure(l.answers(), kind) {
                    expanded = l
                        .answers()
                        .iter()
                        .find(|r| r.record_type() == kind)
                        .map(|r| r.name.to_ascii().trim_end_matches('.').to_ascii_lowercase());
                    break;
                }
            }
        }
        let Some(expanded) = expanded else {
            tracing::debug!(host, "addresses not proven; no DANE for this host");
            return HostDane::None;
        };
        // RFC 7672 §2.2.2: the CNAME-expanded name first, then the host's.
        let mut bases = vec![expanded];
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        if bases[0] != host {
            bases.push(host);
        }
        for base in &bases {
            match self.tlsa_at(base, port).await {
                Ok(None) => continue,
                Ok(Some(records)) if records.is_empty() => return HostDane::Encrypt,
                Ok(Some(records)) => {
                    return HostDane::Verify(records.into(), base.clone());
                }
                Err(reason) => return HostDane::Unusable(reason),
            }
        }
        HostDane::None
    }

    /// The usable TLSA records at `_PORT._tcp.BASE`: `None` when there are
    /// none (or none proven), an empty list when all are unusable.
    async fn tlsa_at(&self, base: &str, port: u16) -> Result<Option<Vec<Tlsa>>, String> {
        let Some(tlsa_name) = crate::route::fqdn(&format!("_{port}._tcp.{base}")) else {
            return Ok(None);
        };
        let lookup = match self.resolver.lookup(tlsa_name, RecordType::TLSA).await {
            Ok(lookup) => lookup,
            Err(NetError::Dns(DnsError::NoRecordsFound(nr)))
                if matches!(nr.response_code, ResponseCode::NoError | ResponseCode::NXDomain) =>
            {
                return Ok(None)
            }
            Err(e) => {
                return Err(format!(
                    "451 4.7.5 the TLSA records of {base} could not be looked up and proven ({e}); DANE forbids sending without them"
                ))
            }
        };
        let answers = lookup.answers();
        if !all_secure(answers, RecordType::TLSA) {
            return Ok(None);
        }
        Ok(Some(
            answers
                .iter()
                .filter_map(|r| match &r.data {
                    RData::TLSA(t) => Tlsa::usable(
                        t.cert_usage.into(),
                        t.selector.into(),
                        t.matching.into(),
                        &t.cert_data,
                    ),
                    _ => None,
                })
                .collect(),
        ))
    }
}

/// Whether `answers` hold records of `kind` and every answer (CNAMEs on the
/// way included) is proven secure.
fn all_secure(answers: &[Record], kind: RecordType) -> bool {
    answers.iter().any(|r| r.record_type() == kind)
        && answers.iter().all(|r| r.proof == Proof::Secure)
}

/// The certificate matched no TLSA record: TLS-RPT's `tlsa-invalid`.
#[derive(Debug)]
pub(crate) struct NoTlsaMatch;

impl fmt::Display for NoTlsaMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the certificate matches none of the host's DANE TLSA records")
    }
}

impl std::error::Error for NoTlsaMatch {}

/// Checks a server's certificate against TLSA records.
#[derive(Debug)]
pub(crate) struct DaneVerifier {
    pub records: Arc<[Tlsa]>,
    /// Names a DANE-TA chain's certificate may carry: the MX host, the
    /// recipient domain.
    pub names: Vec<ServerName<'static>>,
    /// Checks the handshake's signatures (and knows the algorithms).
    pub signatures: AnyCertificate,
}

impl DaneVerifier {
    /// Whether the chain from `ee` through `intermediates` ends at `anchor`
    /// and names one of ours.
    fn chain_ok(
        &self,
        ee: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        anchor: &CertificateDer<'_>,
        now: UnixTime,
    ) -> bool {
        let Ok(anchor) = webpki::anchor_from_trusted_cert(anchor) else {
            return false;
        };
        let anchors = [anchor];
        let Ok(cert) = webpki::EndEntityCert::try_from(ee) else {
            return false;
        };
        let verified = cert.verify_for_usage(
            self.signatures.0.signature_verification_algorithms.all,
            &anchors,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        );
        verified.is_ok()
            && self
                .names
                .iter()
                .any(|n| cert.verify_is_valid_for_subject_name(n).is_ok())
    }
}

impl ServerCertVerifier for DaneVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented = Presented::new(end_entity);
        let mut ee = self.records.iter().filter(|r| r.usage == 3);
        if ee.any(|r| presented.named_by(r)) {
            return Ok(ServerCertVerified::assertion());
        }
        let ta: Vec<&Tlsa> = self.records.iter().filter(|r| r.usage == 2).collect();
        for (i, cert) in intermediates.iter().enumerate() {
            let presented = Presented::new(cert);
            if ta.iter().any(|r| presented.named_by(r))
                && self.chain_ok(end_entity, &intermediates[..i], cert, now)
            {
                return Ok(ServerCertVerified::assertion());
            }
        }
        Err(rustls::Error::InvalidCertificate(CertificateError::Other(
            OtherError(Arc::new(NoTlsaMatch)),
        )))
    }

    // The handshake's signatures are checked as for any session.
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.signatures.supported_verify_schemes()
    }
}

/// Checks a trust-anchor file (DNSKEY records in zone-file form) loads.
pub fn load_trust_anchors(
    path: &std::path::Path,
) -> Result<hickory_resolver::proto::dnssec::TrustAnchors, String> {
    hickory_resolver::proto::dnssec::TrustAnchors::from_file(path).map_err(|e| {
        format!(
            "{}: not a trust-anchor file of DNSKEY records: {e}",
            path.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert() -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate().unwrap();
        let c = rcgen::CertificateParams::new(vec!["mx.example".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        c.der().clone()
    }

    #[test]
    fn only_dane_ta_and_dane_ee_with_known_parameters_are_usable() {
        assert!(Tlsa::usable(3, 1, 1, b"x").is_some());
        assert!(Tlsa::usable(2, 0, 2, b"x").is_some());
        assert!(Tlsa::usable(3, 0, 0, b"x").is_some());
        for (u, s, m) in [(0, 0, 1), (1, 1, 1), (4, 1, 1), (3, 2, 1), (3, 1, 3)] {
            assert!(Tlsa::usable(u, s, m, b"x").is_none(), "{u} {s} {m}");
        }
    }

    #[test]
    fn records_match_the_certificate_or_its_key_by_each_matching_type() {
        let c = cert();
        let (_, parsed) = x509_parser::parse_x509_certificate(c.as_ref()).unwrap();
        let spki = parsed.tbs_certificate.subject_pki.raw.to_vec();
        let sha256 = |b: &[u8]| digest::digest(&digest::SHA256, b).as_ref().to_vec();
        let sha512 = |b: &[u8]| digest::digest(&digest::SHA512, b).as_ref().to_vec();
        let cases = [
            (0, 0, c.as_ref().to_vec()),
            (0, 1, sha256(c.as_ref())),
            (0, 2, sha512(c.as_ref())),
            (1, 0, spki.clone()),
            (1, 1, sha256(&spki)),
            (1, 2, sha512(&spki)),
        ];
        let other = cert();
        let (presented, another) = (Presented::new(&c), Presented::new(&other));
        for (selector, matching, data) in cases {
            let r = Tlsa::usable(3, selector, matching, &data).unwrap();
            assert!(presented.named_by(&r), "3 {selector} {matching}");
            assert!(
                !another.named_by(&r),
                "3 {selector} {matching} matched another"
            );
        }
    }
}
