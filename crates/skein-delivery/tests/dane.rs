//! DANE (RFC 7672) against real peers: a DNSSEC-signed zone served by the
//! testkit's signed DNS server (hickory-server), validated by the
//! deliverer from that zone's key as its only trust anchor; receivers
//! presenting certificates the TLSA records name, or not.

use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use ring::digest;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use skein_delivery::mta_sts::{Mode, StsObserver};
use skein_delivery::{Deliverer, DeliveryConfig, Job, RcptResult, Timeouts};
use skein_smtp::{MailParams, Mailbox, RcptParams, ReversePath};
use skein_testkit::{SignedDns, SignedDnsBuilder, SinkMta};

const MX: &str = "mx.dane.test";

fn job(domain: &str) -> Job {
    Job {
        id: "Q1".into(),
        domain: domain.into(),
        sender: ReversePath::Mailbox(Mailbox::parse("sender@origin.test").unwrap()),
        params: MailParams::default(),
        recipients: vec![(
            Mailbox::parse(&format!("a@{domain}")).unwrap(),
            RcptParams::default(),
        )],
        body: Bytes::from_static(b"Subject: dane\r\n\r\nx\r\n"),
    }
}

/// Results of DANE sessions, as the node's metrics would count them, and
/// the TLSA records each named (for TLS reports).
#[derive(Default)]
struct Seen(Mutex<Vec<&'static str>>, Mutex<Vec<Vec<String>>>);

impl StsObserver for Seen {
    fn session(&self, _: &str, _: Mode, _: &'static str, _: &str) {}

    fn dane(&self, _domain: &str, result: &'static str, _mx: &str, tlsa: &[String]) {
        self.0.lock().unwrap().push(result);
        self.1.lock().unwrap().push(tlsa.to_vec());
    }
}

/// dane.test, signed: its MX is mx.dane.test on 127.0.0.1.
fn zone() -> SignedDnsBuilder {
    SignedDns::builder("dane.test")
        .mx("dane.test", 10, MX)
        .a(MX, Ipv4Addr::LOCALHOST)
}

fn tlsa_name(port: u16) -> String {
    format!("_{port}._tcp.{MX}")
}

struct Setup {
    deliverer: Deliverer,
    seen: Arc<Seen>,
    _dns: SignedDns,
    _anchors: tempfile::TempDir,
}

/// A deliverer trusting only the zone's key, dialling `port` on MX hosts.
async fn setup(dns: SignedDnsBuilder, port: u16) -> Setup {
    let dns = dns.start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let anchors = dir.path().join("anchors");
    std::fs::write(&anchors, format!("{}\n", dns.trust_anchor())).unwrap();
    let seen = Arc::new(Seen::default());
    let deliverer = Deliverer::with_sts(
        DeliveryConfig {
            port,
            nameservers: Some(vec![dns.addr()]),
            timeouts: Timeouts::uniform(Duration::from_secs(3)),
            dnssec_trust_anchors: Some(anchors),
            ..DeliveryConfig::new("skein.test")
        },
        Arc::new(skein_delivery::mta_sts::MemoryStore::default()),
        Some(seen.clone()),
    )
    .unwrap();
    Setup {
        deliverer,
        seen,
        _dns: dns,
        _anchors: dir,
    }
}

fn spki_sha256(cert: &CertificateDer<'_>) -> Vec<u8> {
    let (_, c) = x509_parser::parse_x509_certificate(cert.as_ref()).unwrap();
    digest::digest(&digest::SHA256, c.tbs_certificate.subject_pki.raw)
        .as_ref()
        .to_vec()
}

fn sha256(b: &[u8]) -> Vec<u8> {
    digest::digest(&digest::SHA256, b).as_ref().to_vec()
}

/// A sink speaking STARTTLS with a self-signed certificate for `name`.
async fn tls_sink(name: &str) -> (SinkMta, CertificateDer<'static>) {
    let s = skein_testkit::self_signed(name);
    let sink = SinkMta::builder().tls(s.config).start().await.unwrap();
    (sink, s.der)
}

#[tokio::test]
async fn a_matching_dane_ee_record_delivers_over_tls() {
    // The certificate names some other host: DANE-EE ignores names.
    let (sink, cert) = tls_sink("not-the-mx.example").await;
    let dns = zone().tlsa(&tlsa_name(sink.port()), 3, 1, 1, &spki_sha256(&cert));
    let s = setup(dns, sink.port()).await;
    let r = s.deliverer.deliver(&job("dane.test")).await;
    assert!(
        matches!(r[0], RcptResult::Delivered { tls: true, .. }),
        "{r:?}"
    );
    assert_eq!(sink.messages().len(), 1);
    assert_eq!(*s.seen.0.lock().unwrap(), ["success"]);
    let hex: String = spki_sha256(&cert)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(*s.seen.1.lock().unwrap(), [vec![format!("3 1 1 {hex}")]]);
}

#[tokio::test]
async fn a_tlsa_mismatch_defers_and_sends_nothing() {
    let (sink, _) = tls_sink(MX).await;
    let other = skein_testkit::self_signed(MX).der;
    let dns = zone().tlsa(&tlsa_name(sink.port()), 3, 1, 1, &spki_sha256(&other));
    let s = setup(dns, sink.port()).await;
    let r = s.deliverer.deliver(&job("dane.test")).await;
    let RcptResult::Deferred { reply } = &r[0] else {
        panic!("{r:?}")
    };
    assert!(reply.starts_with('4'), "{reply}");
    assert!(reply.contains("TLSA"), "{reply}");
    assert!(sink.messages().is_empty(), "not even in plaintext");
    assert_eq!(*s.seen.0.lock().unwrap(), ["tlsa-invalid"]);
}

#[tokio::test]
async fn a_dane_host_without_starttls_is_never_sent_plaintext() {
    let sink = SinkMta::builder().start().await.unwrap();
    let cert = skein_testkit::self_signed(MX).der;
    let dns = zone().tlsa(&tlsa_name(sink.port()), 3, 0, 1, &sha256(cert.as_ref()));
    let s = setup(dns, sink.port()).await;
    let r = s.deliverer.deliver(&job("dane.test")).await;
    let RcptResult::Deferred { reply } = &r[0] else {
        panic!("{r:?}")
    };
    assert!(
        reply.starts_with("451 4.7.4") && reply.contains("STARTTLS") && reply.contains("DANE"),
        "{reply}"
    );
    assert!(sink.messages().is_empty());
    assert_eq!(*s.seen.0.lock().unwrap(), ["starttls-not-supported"]);
}

/// A CA and a server configuration presenting `[leaf for name, CA]`.
fn chain(name: &str) -> (Arc<rustls::ServerConfig>, CertificateDer<'static>) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Test DANE CA");
    let ca = ca_params.clone().self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec![name.to_string()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone(), ca.der().clone()], key)
        .unwrap();
    (Arc::new(config), ca.der().clone())
}

#[tokio::test]
async fn a_dane_ta_record_verifies_the_chain_and_the_host_name() {
    // The CA named by the TLSA record signed a certificate for the MX.
    let (config, ca) = chain(MX);
    let sink = SinkMta::builder().tls(config).start().await.unwrap();
    let dns = zone().tlsa(&tlsa_name(sink.port()), 2, 0, 1, &sha256(ca.as_ref()));
    let s = setup(dns, sink.port()).await;
    let r = s.deliverer.deliver(&job("dane.test")).await;
    assert!(
        matches!(r[0], RcptResult::Delivered { tls: true, .. }),
        "{r:?}"
    );

    // The same CA, a certificate for another name: not this MX.
    let (config, ca) = chain("elsewhere.example");
    let sink = SinkMta::builder().tls(config).start().await.unwrap();
    let dns = zone().tlsa(&tlsa_name(sink.port()), 2, 0, 1, &sha256(ca.as_ref()));
    let s = setup(dns, sink.port()).await;
    let r = s.deliverer.deliver(&job("dane.test")).await;
    assert!(matches!(r[0], RcptResult::Deferred { .. }), "{r:?}");
    assert!(sink.messages().is_empty());
}

#[tokio::test]
async fn without_tlsa_records_delivery_is_opportunistic() {
    // Proven absent (NSEC): plaintext to a host without STARTTLS is fine.
    let sink = SinkMta::builder().start().await.unwrap();
    let s = setup(zone(), sink.port()).await;
    let r = s.deliverer.deliver(&job("dane.test")).await;
    assert!(
        matches!(r[0], RcptResult::Delivered { tls: false, .. }),
        "{r:?}"
    );
    assert!(s.seen.0.lock().unwrap().is_empty());
}

#[tokio::test]
async fn only_unusable_tlsa_records_require_tls_but_check_no_certificate() {
    // PKIX-EE (usage 1) is not for SMTP (RFC 7672 §3.1.3).
    let (sink, _) = tls_sink("anything.example").await;
    let dns = zone().tlsa(&tlsa_name(sink.port()), 1, 1, 1, &[7; 32]);
    let s = setup(dns, sink.port()).await;
    let r = s.deliverer.deliver(&job("dane.test")).await;
    assert!(
        matches!(r[0], RcptResult::Delivered { tls: true, .. }),
        "{r:?}"
    );

    let plain = SinkMta::builder().start().await.unwrap();
    let dns = zone().tlsa(&tlsa_name(plain.port()), 1, 1, 1, &[7; 32]);
    let s = setup(dns, plain.port()).await;
    let r = s.deliverer.deliver(&job("dane.test")).await;
    assert!(matches!(r[0], RcptResult::Deferred { .. }), "{r:?}");
    assert!(plain.messages().is_empty());
}

#[tokio::test]
async fn tlsa_records_in_an_unsigned_zone_are_not_dane() {
    // Nothing proves them: an attacker could have written them, so they
    // neither bind nor block — whether the MX records are unsigned too
    // (plain.test), signed but naming a host in the unsigned zone
    // (dane.test), or absent without proof (mx.plain.test, its own host).
    for domain in ["plain.test", "dane.test", "mx.plain.test"] {
        let sink = SinkMta::builder().start().await.unwrap();
        let mut dns = SignedDns::builder("dane.test").unsigned_zone("plain.test");
        if domain != "mx.plain.test" {
            dns = dns.mx(domain, 10, "mx.plain.test");
        }
        let dns = dns.a("mx.plain.test", Ipv4Addr::LOCALHOST).tlsa(
            &format!("_{}._tcp.mx.plain.test", sink.port()),
            3,
            1,
            1,
            &[7; 32],
        );
        let s = setup(dns, sink.port()).await;
        let r = s.deliverer.deliver(&job(domain)).await;
        assert!(
            matches!(r[0], RcptResult::Delivered { tls: false, .. }),
            "{domain}: {r:?}"
        );
        assert!(s.seen.0.lock().unwrap().is_empty());
    }
}

#[tokio::test]
async fn a_domain_proven_to_have_no_mx_is_its_own_dane_host() {
    // No MX records, proven (NSEC): mail goes to the domain's address, and
    // the domain's own TLSA records bind it.
    let (sink, _) = tls_sink("implicit.dane.test").await;
    let other = skein_testkit::self_signed("implicit.dane.test").der;
    let dns = SignedDns::builder("dane.test")
        .a("implicit.dane.test", Ipv4Addr::LOCALHOST)
        .tlsa(
            &format!("_{}._tcp.implicit.dane.test", sink.port()),
            3,
            1,
            1,
            &spki_sha256(&other),
        );
    let s = setup(dns, sink.port()).await;
    let r = s.deliverer.deliver(&job("implicit.dane.test")).await;
    assert!(matches!(r[0], RcptResult::Deferred { .. }), "{r:?}");
    assert!(sink.messages().is_empty());
    assert_eq!(*s.seen.0.lock().unwrap(), ["tlsa-invalid"]);
}

#[tokio::test]
async fn a_cname_mx_host_is_bound_at_the_expanded_name_first_then_its_own() {
    // mx.dane.test is a CNAME for box.dane.test. Records at the expanded
    // name win; where it has none, the MX name's own count.
    let (sink, cert) = tls_sink("box.dane.test").await;
    let wrong = spki_sha256(&skein_testkit::self_signed("x").der);
    let cases = [
        (Some(spki_sha256(&cert)), Some(wrong.clone()), true),
        (Some(wrong.clone()), Some(spki_sha256(&cert)), false),
        (None, Some(spki_sha256(&cert)), true),
        (None, Some(wrong), false),
    ];
    for (at_box, at_mx, delivers) in cases {
        let mut dns = SignedDns::builder("dane.test")
            .mx("dane.test", 10, MX)
            .cname(MX, "box.dane.test")
            .a("box.dane.test", Ipv4Addr::LOCALHOST);
        if let Some(d) = &at_box {
            dns = dns.tlsa(&format!("_{}._tcp.box.dane.test", sink.port()), 3, 1, 1, d);
        }
        if let Some(d) = &at_mx {
            dns = dns.tlsa(&tlsa_name(sink.port()), 3, 1, 1, d);
        }
        let s = setup(dns, sink.port()).await;
        let r = s.deliverer.deliver(&job("dane.test")).await;
        let ok = matches!(r[0], RcptResult::Delivered { tls: true, .. });
        assert_eq!(ok, delivers, "box {at_box:?} mx {at_mx:?}: {r:?}");
        if delivers {
            // The name presented (SNI) is where the records were found
            // (RFC 7672 §8.1).
            let base = if at_box.is_some() {
                "box.dane.test"
            } else {
                MX
            };
            let last = sink.messages().pop().unwrap();
            assert_eq!(last.sni.as_deref(), Some(base), "box {at_box:?}");
        }
    }
}

#[test]
fn a_trust_anchor_file_that_is_not_dnskey_records_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("anchors");
    std::fs::write(&path, "this is not a zone file\n").unwrap();
    let err = Deliverer::new(DeliveryConfig {
        dnssec_trust_anchors: Some(path),
        nameservers: Some(vec!["127.0.0.1:53".parse().unwrap()]),
        ..DeliveryConfig::new("skein.test")
    })
    .unwrap_err();
    assert!(err.to_string().contains("trust"), "{err}");
}
