//! MTA-STS (RFC 8461) against real peers: the policy published in the
//! testkit's DNS server and served over HTTPS (rustls, a certificate the
//! deliverer trusts through `extra_roots`), receivers with certificates that
//! verify or do not.

use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rustls_pki_types::CertificateDer;
use skein_delivery::mta_sts::{MemoryStore, Mode, StsObserver};
use skein_delivery::{Deliverer, DeliveryConfig, Job, RcptResult, Timeouts};
use skein_smtp::{MailParams, Mailbox, RcptParams, ReversePath};
use skein_testkit::{DnsServer, SinkMta, StaticHttps};

/// A self-signed certificate for `name` and a server config presenting it.
fn server_tls(name: &str) -> (Arc<rustls::ServerConfig>, CertificateDer<'static>) {
    let s = skein_testkit::self_signed(name);
    (s.config, s.der)
}

/// An HTTPS server for mta-sts.example.org answering every request with
/// `status`, `content_type` and `body`, and its certificate.
async fn policy_server(
    status: &str,
    content_type: &str,
    body: &str,
) -> (StaticHttps, CertificateDer<'static>) {
    let (config, der) = server_tls("mta-sts.example.org");
    let server = StaticHttps::start(config, status, content_type, body)
        .await
        .unwrap();
    (server, der)
}

/// example.org's MX is mx1.example.org on 127.0.0.1, with an MTA-STS record.
async fn dns() -> DnsServer {
    DnsServer::builder()
        .mx("example.org", 10, "mx1.example.org")
        .a("mx1.example.org", Ipv4Addr::LOCALHOST)
        .a("mta-sts.example.org", Ipv4Addr::LOCALHOST)
        .txt("_mta-sts.example.org", "v=STSv1; id=20261130;")
        .start()
        .await
        .unwrap()
}

fn job() -> Job {
    Job {
        id: "Q1".into(),
        domain: "example.org".into(),
        sender: ReversePath::Mailbox(Mailbox::parse("sender@origin.test").unwrap()),
        params: MailParams::default(),
        recipients: vec![(
            Mailbox::parse("a@example.org").unwrap(),
            RcptParams::default(),
        )],
        body: Bytes::from_static(b"Subject: sts\r\n\r\nx\r\n"),
    }
}

#[derive(Default)]
struct Seen(Mutex<Vec<(String, Mode, &'static str)>>);

impl StsObserver for Seen {
    fn session(&self, domain: &str, mode: Mode, result: &'static str, _mx: &str) {
        self.0
            .lock()
            .unwrap()
            .push((domain.to_string(), mode, result));
    }
}

impl Seen {
    fn results(&self) -> Vec<&'static str> {
        self.0.lock().unwrap().iter().map(|(_, _, r)| *r).collect()
    }
}

/// A deliverer dialling the sink's port for SMTP and `sts_port` for
/// policies, trusting `roots`.
fn deliverer(
    dns: &DnsServer,
    smtp_port: u16,
    sts_port: u16,
    roots: Vec<CertificateDer<'static>>,
) -> (Deliverer, Arc<Seen>) {
    let seen = Arc::new(Seen::default());
    let d = Deliverer::with_sts(
        DeliveryConfig {
            port: smtp_port,
            nameservers: Some(vec![dns.addr()]),
            timeouts: Timeouts::uniform(Duration::from_secs(3)),
            extra_roots: roots,
            mta_sts_port: sts_port,
            ..DeliveryConfig::new("skein.test")
        },
        Arc::new(MemoryStore::default()),
        Some(seen.clone()),
    )
    .unwrap();
    (d, seen)
}

const ENFORCE: &str =
    "version: STSv1\r\nmode: enforce\r\nmx: mx1.example.org\r\nmax_age: 86400\r\n";
const TESTING: &str = "version: STSv1\r\nmode: testing\r\nmx: *.example.org\r\nmax_age: 86400\r\n";

#[tokio::test]
async fn enforce_delivers_over_verified_tls_to_the_named_mx_and_fetches_once() {
    let dns = dns().await;
    let (policy, policy_cert) = policy_server("200 OK", "text/plain", ENFORCE).await;
    let (tls, mx_cert) = server_tls("mx1.example.org");
    let sink = SinkMta::builder().tls(tls).start().await.unwrap();
    let (d, seen) = deliverer(&dns, sink.port(), policy.port(), vec![policy_cert, mx_cert]);
    for _ in 0..2 {
        let r = d.deliver(&job()).await;
        assert!(
            matches!(r[0], RcptResult::Delivered { tls: true, .. }),
            "{r:?}"
        );
    }
    assert_eq!(sink.messages().len(), 2);
    assert_eq!(policy.served(), 1, "the policy is cached for max_age");
    assert_eq!(seen.results()[0], "success");
}

#[tokio::test]
async fn concurrent_first_deliveries_to_a_domain_fetch_its_policy_once() {
    let dns = dns().await;
    let (policy, policy_cert) = policy_server("200 OK", "text/plain", ENFORCE).await;
    let (tls, mx_cert) = server_tls("mx1.example.org");
    let sink = SinkMta::builder().tls(tls).start().await.unwrap();
    let (d, _) = deliverer(&dns, sink.port(), policy.port(), vec![policy_cert, mx_cert]);
    let jobs: Vec<Job> = (0..8).map(|_| job()).collect();
    let results = futures::future::join_all(jobs.iter().map(|j| d.deliver(j))).await;
    for r in &results {
        assert!(
            matches!(r[0], RcptResult::Delivered { tls: true, .. }),
            "{r:?}"
        );
    }
    assert_eq!(policy.served(), 1, "one fetch shared by all eight");
}

#[tokio::test]
async fn enforce_with_a_certificate_that_does_not_verify_defers_and_sends_nothing() {
    let dns = dns().await;
    let (policy, policy_cert) = policy_server("200 OK", "text/plain", ENFORCE).await;
    // Trusted, but for another name.
    let (tls, wrong_cert) = server_tls("other.example.net");
    let sink = SinkMta::builder().tls(tls).start().await.unwrap();
    let (d, seen) = deliverer(
        &dns,
        sink.port(),
        policy.port(),
        vec![policy_cert, wrong_cert],
    );
    let r = d.deliver(&job()).await;
    let RcptResult::Deferred { reply } = &r[0] else {
        panic!("deferred expected: {r:?}")
    };
    assert!(
        reply.contains("MTA-STS policy of example.org enforced"),
        "{reply}"
    );
    assert!(sink.messages().is_empty());
    assert_eq!(seen.results(), vec!["validation-failure"]);

    // A receiver without STARTTLS is never sent to in plaintext either.
    let plain = SinkMta::builder().start().await.unwrap();
    let (policy, policy_cert) = policy_server("200 OK", "text/plain", ENFORCE).await;
    let (d, seen) = deliverer(&dns, plain.port(), policy.port(), vec![policy_cert]);
    let r = d.deliver(&job()).await;
    assert!(matches!(r[0], RcptResult::Deferred { .. }), "{r:?}");
    assert!(plain.messages().is_empty());
    assert_eq!(seen.results(), vec!["starttls-not-supported"]);
}

#[tokio::test]
async fn testing_delivers_what_enforce_would_refuse_and_reports_it() {
    let dns = dns().await;
    let (policy, policy_cert) = policy_server("200 OK", "text/plain", TESTING).await;
    let (tls, wrong_cert) = server_tls("other.example.net");
    let sink = SinkMta::builder().tls(tls).start().await.unwrap();
    let (d, seen) = deliverer(
        &dns,
        sink.port(),
        policy.port(),
        vec![policy_cert, wrong_cert],
    );
    let r = d.deliver(&job()).await;
    assert!(
        matches!(r[0], RcptResult::Delivered { tls: true, .. }),
        "{r:?}"
    );
    assert_eq!(sink.messages().len(), 1);
    assert_eq!(seen.results(), vec!["validation-failure"]);
}

#[tokio::test]
async fn an_mx_the_enforced_policy_does_not_name_is_not_used() {
    let dns = dns().await;
    const OTHER_MX: &str = "version: STSv1\nmode: enforce\nmx: mail.example.org\nmax_age: 600\n";
    let (policy, policy_cert) = policy_server("200 OK", "text/plain", OTHER_MX).await;
    let (tls, mx_cert) = server_tls("mx1.example.org");
    let sink = SinkMta::builder().tls(tls).start().await.unwrap();
    let (d, seen) = deliverer(&dns, sink.port(), policy.port(), vec![policy_cert, mx_cert]);
    let r = d.deliver(&job()).await;
    let RcptResult::Deferred { reply } = &r[0] else {
        panic!("deferred expected: {r:?}")
    };
    assert!(reply.starts_with("451 4.7.5 "), "{reply}");
    assert!(sink.messages().is_empty());
    assert_eq!(seen.results(), vec!["mx-mismatch"]);
}

#[tokio::test]
async fn a_policy_that_cannot_be_had_leaves_delivery_as_before() {
    let dns = dns().await;
    let plain = SinkMta::builder().start().await.unwrap();
    // A redirect is not followed, HTML is not a policy, and an untrusted
    // certificate is not believed: each is a fetch error, and with nothing
    // cached the mail goes as if the domain had no policy.
    for (status, ctype, body, trust) in [
        ("301 Moved Permanently", "text/plain", ENFORCE, true),
        ("200 OK", "text/html", ENFORCE, true),
        ("200 OK", "text/plain", "<html>enforce</html>", true),
        ("200 OK", "text/plain", ENFORCE, false),
    ] {
        let (policy, policy_cert) = policy_server(status, ctype, body).await;
        let roots = if trust { vec![policy_cert] } else { Vec::new() };
        let (d, seen) = deliverer(&dns, plain.port(), policy.port(), roots);
        let r = d.deliver(&job()).await;
        assert!(
            matches!(r[0], RcptResult::Delivered { .. }),
            "{status} {ctype}: {r:?}"
        );
        assert_eq!(
            seen.results(),
            vec!["sts-policy-fetch-error"],
            "{status} {ctype}"
        );
    }
    assert_eq!(plain.messages().len(), 4);
}
