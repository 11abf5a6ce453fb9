use super::*;

#[test]
fn empty_config_gives_the_contract_defaults() {
    let c = Config::defaults();
    assert_eq!(c.node_id, 1);
    assert_eq!(
        c.smtp.listen,
        vec!["127.0.0.1:2525".parse::<SocketAddr>().unwrap()]
    );
    assert_eq!(
        c.cluster.listen,
        "127.0.0.1:7100".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(
        c.metrics.listen,
        "127.0.0.1:9100".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(c.data_dir, PathBuf::from("./skein-data"));
    assert!(c.delivery.nameservers.is_none());
    assert_eq!(c.delivery.port, 25);
    assert_eq!(c.delivery.lease, Duration::from_secs(30));
    assert_eq!(c.delivery.retry_schedule.len(), 5);
    assert_eq!(c.cluster.peers.len(), 1);
    assert_eq!(c.cluster.peers[&1], "127.0.0.1:7100");
    assert!(c.is_single_node());
}

#[test]
fn the_contract_example_parses() {
    let text = r#"
node_id = 1
data_dir = "/var/lib/skein"

[smtp]
listen = ["0.0.0.0:25"]
submission_listen = ["0.0.0.0:587"]
hostname = "mx1.example.com"
max_message_size = 26214400
max_recipients = 1000
relay_networks = ["127.0.0.0/8"]
accept_domains = ["example.org"]
tls_cert = "/etc/skein/cert.pem"
tls_key = "/etc/skein/key.pem"

[cluster]
listen = "0.0.0.0:7100"
advertise = "10.0.0.1:7100"
secret = "change-me-0123456789"
tls_cert = "/etc/skein/node.pem"
tls_key = "/etc/skein/node.key"
tls_ca = "/etc/skein/ca.pem"
[cluster.peers]
1 = "10.0.0.1:7100"
2 = "10.0.0.2:7100"
3 = "10.0.0.3:7100"

[admin]
token = "change-me-too-0123456"

[delivery]
nameservers = ["127.0.0.1:53"]
port = 25
retry_schedule = ["1m", "5m", "15m", "1h", "4h"]
max_queue_time = "5d"
lease = "30s"
concurrency_per_domain = 20

[[route]]
domain = "corp.example"
relay = "smtp://10.0.0.5:25"

[[route]]
domain = "*"
relay = "lmtp://10.0.0.6:24"

[metrics]
listen = "127.0.0.1:9100"
"#;
    let c = Config::parse(text).unwrap();
    assert_eq!(c.cluster.peers.len(), 3);
    assert!(!c.is_single_node());
    assert_eq!(c.smtp.accept_domains, vec!["example.org"]);
    assert_eq!(c.delivery.max_queue_time, Duration::from_secs(5 * 86400));
    assert_eq!(
        c.routes[1],
        Route {
            domain: "*".into(),
            relay: Relay::Lmtp {
                host: "10.0.0.6".into(),
                port: 24
            },
            tls: TlsPolicy::May,
            auth: None,
        }
    );
    assert_eq!(
        c.admin.token.as_ref().map(|t| t.expose()),
        Some("change-me-too-0123456")
    );
}

#[test]
fn every_problem_is_reported_with_its_key() {
    let text = r#"
node_id = 0
colour = "blue"
[smtp]
listen = ["nowhere"]
relay_networks = ["10.0.0.0/99"]
tls_cert = "/x"
[cluster.peers]
2 = "10.0.0.2:7100"
[delivery]
lease = "soon"
retry_schedule = []
[[route]]
domain = "x.example"
relay = "ftp://host"
"#;
    let problems = Config::parse(text).unwrap_err();
    let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
    for k in [
        "colour",
        "node_id",
        "smtp.listen[0]",
        "smtp.relay_networks[0]",
        "smtp.tls_cert",
        "cluster.advertise",
        "delivery.lease",
        "delivery.retry_schedule",
        "route[0].relay",
    ] {
        assert!(keys.contains(&k), "{k} missing from {keys:?}");
    }
}

#[test]
fn a_multi_node_cluster_needs_a_secret() {
    let text = r#"
[cluster.peers]
1 = "127.0.0.1:7100"
2 = "127.0.0.2:7100"
"#;
    let problems = Config::parse(text).unwrap_err();
    assert_eq!(problems[0].key, "cluster.secret");
}

#[test]
fn toml_syntax_errors_are_reported() {
    let problems = Config::parse("node_id = = 1").unwrap_err();
    assert_eq!(problems.len(), 1);
    assert!(
        problems[0].message.contains("line 1"),
        "{}",
        problems[0].message
    );
    let problems = Config::parse("node_id = \"one\"").unwrap_err();
    assert_eq!(problems[0].key, "node_id", "{problems:?}");
}

#[test]
fn routes_carry_tls_and_auth_and_refuse_plaintext_passwords() {
    let text = r#"
[delivery]
tls = "verify"
connection_reuse = "2s"
[[route]]
domain = "corp.example"
relay = "smtp://smarthost.corp.example:587"
auth_user = "skein"
auth_password = "pw"
[[route]]
domain = "*"
relay = "lmtp://127.0.0.1"
tls = "none"
"#;
    let c = Config::parse(text).unwrap();
    assert_eq!(c.delivery.tls, TlsPolicy::Verify);
    assert_eq!(c.delivery.connection_reuse, Duration::from_secs(2));
    assert_eq!(c.routes[0].tls, TlsPolicy::Verify, "AUTH implies verify");
    assert_eq!(
        c.routes[0].auth.as_ref().map(|a| a.user.as_str()),
        Some("skein")
    );
    assert_eq!(c.routes[1].relay.port(), 24);
    assert_eq!(c.routes[1].tls, TlsPolicy::None);

    let text = r#"
[delivery]
tls = "sometimes"
[[route]]
domain = "a.example"
relay = "smtp://10.0.0.5"
auth_user = "skein"
auth_password = "pw"
tls = "may"
[[route]]
domain = "b.example"
relay = "smtp://10.0.0.6"
auth_user = "skein"
"#;
    let problems = Config::parse(text).unwrap_err();
    let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
    for k in ["delivery.tls", "route[0].tls", "route[1].auth_user"] {
        assert!(keys.contains(&k), "{k} missing from {keys:?}");
    }
}

#[test]
fn trusted_clients_are_exempt_from_the_pause_and_the_per_address_limit_by_default() {
    let c = Config::parse("[smtp]\nrelay_networks = [\"10.0.0.0/8\"]\n").unwrap();
    let ten: ipnet::IpNet = "10.0.0.0/8".parse().unwrap();
    assert_eq!(c.smtp.greet_pause_exceptions, vec![ten]);
    assert_eq!(c.smtp.connection_limit_exceptions, vec![ten]);
    let c = Config::parse(
        "[smtp]\ngreet_pause_exceptions = []\nclient_connection_limit_exceptions = [\"192.0.2.7\"]\n",
    )
    .unwrap();
    assert!(c.smtp.greet_pause_exceptions.is_empty());
    assert_eq!(
        c.smtp.connection_limit_exceptions,
        vec!["192.0.2.7/32".parse::<ipnet::IpNet>().unwrap()]
    );
    let problems = Config::parse("[smtp]\ngreet_pause_exceptions = [\"nope\"]\n").unwrap_err();
    assert_eq!(problems[0].key, "smtp.greet_pause_exceptions[0]");
}

#[test]
fn every_type_error_is_reported_with_its_key_in_one_run() {
    let text = r#"
node_id = "one"
[smtp]
max_message_size = "big"
max_recipients = 100
listen = ["127.0.0.1:2525", 7]
[delivery]
port = "2526"
lease = "forever"
[[route]]
domain = "x.example"
relay = 5
"#;
    let problems = Config::parse(text).unwrap_err();
    let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
    for k in [
        "node_id",
        "smtp.max_message_size",
        "smtp.listen[1]",
        "delivery.port",
        "delivery.lease",
        "route[0].relay",
    ] {
        assert!(keys.contains(&k), "{k} missing from {problems:?}");
    }
    let port = problems.iter().find(|p| p.key == "delivery.port").unwrap();
    assert_eq!(
        port.message,
        "expected a whole number, found string \"2526\""
    );
    assert_eq!(
        keys.iter().filter(|k| **k == "route[0].relay").count(),
        1,
        "a wrong type is not also reported missing"
    );
}

/// `text` written to `dir/name`; its path.
fn write_file(dir: &std::path::Path, name: &str, text: String) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

/// The problems `Config::load` finds in `text`, written to `path`.
fn load_problems(path: &std::path::Path, text: &str) -> Vec<Problem> {
    std::fs::write(path, text).unwrap();
    let Err(ConfigError::Invalid(problems)) = Config::load(path) else {
        panic!("invalid expected")
    };
    problems
}

/// One of `problems` is about `key` and says `text`.
fn says(problems: &[Problem], key: &str, text: &str) {
    let p = problems
        .iter()
        .find(|p| p.key == key)
        .unwrap_or_else(|| panic!("no problem with {key}: {problems:?}"));
    assert!(p.message.contains(text), "{key}: {}", p.message);
}

#[test]
fn certificate_key_and_ca_files_are_checked_when_loading_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: String| write_file(dir.path(), name, text);
    let a = rcgen::generate_simple_self_signed(vec!["mx.example".into()]).unwrap();
    let b = rcgen::generate_simple_self_signed(vec!["other.example".into()]).unwrap();
    let cert = write("cert.pem", a.cert.pem());
    let wrong_key = write("b.key", b.signing_key.serialize_pem());
    // The cluster: a CA, and a node certificate for another host.
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let node_key = rcgen::KeyPair::generate().unwrap();
    let node = rcgen::CertificateParams::new(vec!["10.0.0.9".into()])
        .unwrap()
        .signed_by(&node_key, &issuer)
        .unwrap();
    let ca = write("ca.pem", ca_cert.pem());
    let node_cert = write("node.pem", node.pem());
    let node_key = write("node.key", node_key.serialize_pem());
    let text = format!(
        r#"
[smtp]
tls_cert = {cert:?}
tls_key = {wrong_key:?}
[cluster]
listen = "10.0.0.1:7100"
tls_cert = {node_cert:?}
tls_key = {node_key:?}
tls_ca = {ca:?}
[delivery]
tls_ca_file = "/nonexistent/ca.pem"
dnssec_trust_anchors = "/nonexistent/anchors"
"#
    );
    let path = dir.path().join("skein.toml");
    let problems = load_problems(&path, &text);
    let says = |key: &str, text: &str| says(&problems, key, text);
    says("smtp.tls_cert", "does not match");
    says("cluster.tls_cert", "not valid for 10.0.0.1");
    says("delivery.tls_ca_file", "cannot read /nonexistent/ca.pem");
    says("delivery.dnssec_trust_anchors", "/nonexistent/anchors");
    // Parsing a text alone does not read files.
    assert!(Config::parse(&text).is_ok());
}

#[test]
fn dkim_tables_are_checked_and_their_keys_read_when_loading_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: String| write_file(dir.path(), name, text);
    let ed = write(
        "ed.pem",
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)
            .unwrap()
            .serialize_pem(),
    );
    // rcgen's default key is ECDSA P-256: not a DKIM algorithm.
    let ec = write(
        "ec.pem",
        rcgen::KeyPair::generate().unwrap().serialize_pem(),
    );
    let text = format!(
        r#"
[[dkim]]
domain = "Example.COM"
selector = "ed2026"
key_file = {ed:?}
expire = "7d"

[[dkim]]
domain = "example.com"
selector = "ec"
key_file = {ec:?}

[[dkim]]
domain = "example.com"
selector = "gone"
key_file = "/nonexistent/dkim.pem"
canonicalization = "simple"

[[dkim]]
domain = "not a domain"
selector = "bad selector"
key_file = {ed:?}

[[dkim]]
domain = "example.net"
selector = "s1"
key_file = {ed:?}
headers = ["Subject", "To"]

[[dkim]]
domain = "example.net"
selector = "s2"
key_file = {ed:?}
canonicalization = "relaxed/loose"
"#
    );
    let path = dir.path().join("skein.toml");
    let problems = load_problems(&path, &text);
    let says = |key: &str, text: &str| says(&problems, key, text);
    assert!(
        !problems.iter().any(|p| p.key.starts_with("dkim[0]")),
        "{problems:?}"
    );
    says("dkim[1].key_file", "neither an RSA nor an Ed25519 key");
    says("dkim[2].key_file", "/nonexistent/dkim.pem");
    says("dkim[3].domain", "not a domain name");
    says("dkim[4].headers", "must include From");
    says("dkim[5].canonicalization", "relaxed/loose");

    // The first table as the node reads it: lowercase domain, the default
    // headers and canonicalization, the expiry.
    let good = format!(
        "[[dkim]]\ndomain = \"Example.COM\"\nselector = \"ed2026\"\nkey_file = {ed:?}\nexpire = \"7d\"\n"
    );
    std::fs::write(&path, &good).unwrap();
    let c = Config::load(&path).unwrap();
    let t = &c.dkim[0];
    assert_eq!(t.domain, "example.com");
    assert_eq!(
        (t.header_canon, t.body_canon),
        (Canon::Relaxed, Canon::Relaxed)
    );
    assert_eq!(t.expire, Some(Duration::from_secs(7 * 86400)));
    assert_eq!(t.headers[0], "From");
    assert!(c
        .secrets
        .files
        .iter()
        .any(|f| f.display().to_string() == ed));
}
