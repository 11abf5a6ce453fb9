//! SMTP sessions run in memory (a duplex pipe instead of a socket) against a
//! real single-node cluster: every reply checked, and what got queued.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use skein_queue::{MessageId, NewMessage};
use skein_smtp::Reply;
use skein_testkit::{codes, converse};
use tokio::sync::{mpsc, watch};

use super::*;
use crate::cluster::{Cluster, PeerChannels};
use crate::config::Config;
use crate::delivery::Dispatcher;
use crate::metrics::Metrics;

struct Harness {
    ctx: SmtpContext,
    cluster: Cluster,
    queued: mpsc::UnboundedReceiver<NewMessage>,
    _dir: tempfile::TempDir,
}

const LOCAL: &str = "127.0.0.1:40000";
const STRANGER: &str = "192.0.2.1:40000";

/// A node's SMTP context; `cluster` is appended to its `[cluster]` table.
async fn harness(cluster: &str) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "data_dir = {:?}\n[smtp]\nhostname = \"mx.test\"\naccept_domains = [\"example.org\"]\nmax_message_size = 2000\nmax_recipients = 3\ngreet_pause = \"0s\"\n[cluster]\ncommit_timeout = \"1s\"\n{cluster}\n",
        dir.path().display().to_string()
    );
    let config = Config::parse(&text).unwrap();
    let cluster = start_cluster(&config).await;
    let (dispatcher, queued) = Dispatcher::channel();
    let metrics = Arc::new(Metrics::new());
    let (_tx, shutdown) = watch::channel(false);
    std::mem::forget(_tx);
    let ctx = SmtpContext {
        config: Arc::new(config.smtp.clone()),
        acceptor: Acceptor::new(
            cluster.clone(),
            Arc::new(skein_queue::IdGenerator::new(1)),
            30_000,
            false,
            dispatcher,
            metrics.clone(),
        ),
        require_auth: false,
        tls: None,
        auth: Arc::new(Authenticator::new(Default::default())),
        shutdown: shutdown.clone(),
        halt: shutdown,
        metrics,
        data_dir: dir.path().to_path_buf(),
        canary_key: crate::secrets::Secret::new("canary-key-0123456789"),
        dkim: crate::dkim::Signers::default(),
    };
    Harness {
        ctx,
        cluster,
        queued,
        _dir: dir,
    }
}

async fn start_cluster(config: &Config) -> Cluster {
    let stores = skein_queue::open(&config.data_dir).unwrap();
    let peers = PeerChannels::new("0123456789abcdef", 64 << 20, None, None).unwrap();
    let cluster = Cluster::start(config, stores, peers).await.unwrap();
    // A single voter elects itself at once.
    cluster
        .raft()
        .wait(Some(Duration::from_secs(10)))
        .metrics(|m| m.current_leader.is_some(), "leader")
        .await
        .ok();
    cluster
}

/// Run one session over an in-memory pipe: the script sent as a pipelining
/// client would, every reply back.
async fn session(h: &Harness, peer: &str, input: &[u8]) -> Vec<Reply> {
    let (client, server) = tokio::io::duplex(1 << 20);
    let peer: SocketAddr = peer.parse().unwrap();
    let (replies, _) = tokio::join!(converse(client, input), handle(&h.ctx, server, peer, None));
    replies
}

const HELLO: &str = "EHLO client.test\r\n";
/// The replies to a session that queues one message and quits.
const QUEUED: [&str; 7] = [
    "220",
    "250",
    "250 2.1.0",
    "250 2.1.5",
    "354",
    "250 2.0.0",
    "221 2.0.0",
];

#[tokio::test(flavor = "multi_thread")]
async fn a_whole_transaction_is_queued_with_a_received_header() {
    let mut h = harness("").await;
    let data = "Subject: hi\r\n\r\nhello\r\n..leading dot\r\n";
    let input = format!("{HELLO}MAIL FROM:<a@client.test> SIZE=100\r\nRCPT TO:<b@example.org>\r\nDATA\r\n{data}.\r\nQUIT\r\n");
    let replies = session(&h, STRANGER, input.as_bytes()).await;
    assert_eq!(codes(&replies), QUEUED);
    let ehlo = replies[1].lines.join("\n");
    for ext in [
        "PIPELINING",
        "SIZE 2000",
        "8BITMIME",
        "ENHANCEDSTATUSCODES",
        "SMTPUTF8",
        "CHUNKING",
        "DSN",
    ] {
        assert!(ehlo.contains(ext), "{ext} not advertised: {ehlo}");
    }
    let text = replies[5].text();
    let id: MessageId = text
        .strip_prefix("Ok: queued as ")
        .unwrap()
        .parse()
        .unwrap();

    let m = h.queued.try_recv().expect("handed to delivery");
    assert_eq!(m.id, id);
    let body = String::from_utf8(m.body.to_vec()).unwrap();
    assert!(body.starts_with(
        "Received: from client.test ([192.0.2.1])\r\n\tby mx.test (Skein) with ESMTP id "
    ));
    assert!(body.contains("\tfor <b@example.org>; "));
    assert!(
        body.ends_with("\r\nSubject: hi\r\n\r\nhello\r\n.leading dot\r\n"),
        "{body}"
    );
    // Committed and applied before the 250.
    let state = h.cluster.reader().read();
    let queued = state.get(&id).unwrap();
    assert_eq!(queued.recipients[0].address.to_string(), "b@example.org");
    assert_eq!(queued.lease.unwrap().node, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn pipelined_commands_get_their_replies_in_order() {
    let h = harness("").await;
    let input = format!(
        "{HELLO}MAIL FROM:<>\r\nRCPT TO:<x@example.org>\r\nRCPT TO:<y@elsewhere.test>\r\nRCPT TO:<z@example.org>\r\nDATA\r\nbody\r\n.\r\nNOOP\r\nRSET\r\nQUIT\r\n"
    );
    let replies = session(&h, STRANGER, input.as_bytes()).await;
    assert_eq!(
        codes(&replies),
        [
            "220",
            "250",
            "250 2.1.0",
            "250 2.1.5",
            "554 5.7.1",
            "250 2.1.5",
            "354",
            "250 2.0.0",
            "250 2.0.0",
            "250 2.0.0",
            "221 2.0.0"
        ]
    );
    assert!(replies[4].text().contains("Relay access denied"));
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_the_right_error_and_the_session_goes_on() {
    let h = harness("").await;
    let long = format!("NOOP {}\r\n", "x".repeat(600));
    let cases: Vec<(String, &str)> = vec![
        ("MAIL FROM:<a@b.test>\r\n".into(), "503 5.5.1"),
        ("BOGUS\r\n".into(), "500 5.5.2"),
        (format!("{HELLO}RCPT TO:<b@example.org>\r\n"), "503 5.5.1"),
        (format!("{HELLO}DATA\r\n"), "503 5.5.1"),
        (
            format!("{HELLO}MAIL FROM:<a@b.test>\r\nDATA\r\n"),
            "503 5.5.1",
        ),
        (
            format!("{HELLO}MAIL FROM:<a@b.test>\r\nMAIL FROM:<a@b.test>\r\n"),
            "503 5.5.1",
        ),
        (
            format!("{HELLO}MAIL FROM:<not an address>\r\n"),
            "501 5.1.7",
        ),
        (
            format!("{HELLO}MAIL FROM:<a@b.test>\r\nRCPT TO:<@@>\r\n"),
            "501 5.1.3",
        ),
        (
            format!("{HELLO}MAIL FROM:<a@b.test> SIZE=999999\r\n"),
            "552 5.3.4",
        ),
        (
            format!("{HELLO}MAIL FROM:<a@b.test> FROBNICATE=1\r\n"),
            "555 5.5.4",
        ),
        (
            "HELO client.test\r\nMAIL FROM:<a@b.test> SIZE=10\r\n".into(),
            "555 5.5.4",
        ),
        (long.clone(), "500 5.5.2"),
        (format!("{HELLO}VRFY someone\r\n"), "252 2.0.0"),
        (format!("{HELLO}EXPN list\r\n"), "502 5.5.1"),
        (format!("{HELLO}HELP\r\n"), "214 2.0.0"),
    ];
    for (input, want) in cases {
        let full = format!("{input}NOOP\r\nQUIT\r\n");
        let replies = session(&h, LOCAL, full.as_bytes()).await;
        let got = codes(&replies);
        let n = got.len();
        assert_eq!(got[n - 3], want, "input {input:?} gave {got:?}");
        assert_eq!(
            &got[n - 2..],
            ["250 2.0.0", "221 2.0.0"],
            "session did not go on after {input:?}"
        );
    }
    assert!(h.cluster.reader().read().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn fake_end_of_data_sequences_do_not_end_the_message() {
    let h = harness("").await;
    // Each would end the data for a lenient server; only CRLF "." CRLF ends
    // it here, and a message carrying any of them is refused whole.
    for fake in ["\n.\n", "\r\n.\n", "\n.\r\n", "\r.\r\n", "\r\n.\r"] {
        let data = format!("Subject: x\r\n\r\nbefore{fake}MAIL FROM:<evil@x.test>\r\nafter\r\n");
        let input = format!(
            "{HELLO}MAIL FROM:<a@client.test>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n{data}.\r\nNOOP\r\nQUIT\r\n"
        );
        let replies = session(&h, LOCAL, input.as_bytes()).await;
        assert_eq!(
            codes(&replies),
            [
                "220",
                "250",
                "250 2.1.0",
                "250 2.1.5",
                "354",
                "554 5.6.0",
                "250 2.0.0",
                "221 2.0.0"
            ],
            "{fake:?}"
        );
    }
    assert!(
        h.cluster.reader().read().is_empty(),
        "nothing smuggled was queued"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_messages_are_refused_after_the_data() {
    let h = harness("").await;
    let big = "x".repeat(100);
    let data: String = std::iter::repeat_n(format!("{big}\r\n"), 30).collect();
    let input = format!("{HELLO}MAIL FROM:<a@client.test>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n{data}.\r\nNOOP\r\nQUIT\r\n");
    let replies = session(&h, LOCAL, input.as_bytes()).await;
    assert_eq!(
        codes(&replies),
        [
            "220",
            "250",
            "250 2.1.0",
            "250 2.1.5",
            "354",
            "552 5.3.4",
            "250 2.0.0",
            "221 2.0.0"
        ]
    );
    assert!(h.cluster.reader().read().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn recipients_past_the_limit_get_452_and_the_rest_are_kept() {
    let mut h = harness("").await;
    let rcpts: String = (1..=5)
        .map(|i| format!("RCPT TO:<r{i}@example.org>\r\n"))
        .collect();
    let input = format!("{HELLO}MAIL FROM:<a@client.test>\r\n{rcpts}DATA\r\nhi\r\n.\r\nQUIT\r\n");
    let replies = session(&h, LOCAL, input.as_bytes()).await;
    assert_eq!(
        codes(&replies),
        [
            "220",
            "250",
            "250 2.1.0",
            "250 2.1.5",
            "250 2.1.5",
            "250 2.1.5",
            "452 4.5.3",
            "452 4.5.3",
            "354",
            "250 2.0.0",
            "221 2.0.0"
        ]
    );
    assert_eq!(h.queued.try_recv().unwrap().recipients.len(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn no_majority_means_451_never_250() {
    // Two voters, the other one nowhere: this node can never commit.
    let h = harness("secret = \"s-0123456789abcdef\"\n[cluster.peers]\n1 = \"127.0.0.1:7100\"\n2 = \"127.0.0.1:9\"")
        .await;
    let input = format!("{HELLO}MAIL FROM:<a@client.test>\r\nRCPT TO:<b@example.org>\r\nDATA\r\nhi\r\n.\r\nQUIT\r\n");
    let replies = session(&h, LOCAL, input.as_bytes()).await;
    assert_eq!(
        codes(&replies),
        [
            "220",
            "250",
            "250 2.1.0",
            "250 2.1.5",
            "354",
            "451 4.3.0",
            "221 2.0.0"
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn relay_rules_follow_the_client_address_and_accept_domains() {
    let h = harness("").await;
    let input = format!("{HELLO}MAIL FROM:<a@client.test>\r\nRCPT TO:<b@other.test>\r\nRCPT TO:<b@[192.0.2.9]>\r\nRCPT TO:<Postmaster>\r\nRCPT TO:<b@EXAMPLE.org>\r\nQUIT\r\n");
    let replies = session(&h, STRANGER, input.as_bytes()).await;
    assert_eq!(
        codes(&replies),
        [
            "220",
            "250",
            "250 2.1.0",
            "554 5.7.1",
            "554 5.7.1",
            "554 5.7.1",
            "250 2.1.5",
            "221 2.0.0"
        ]
    );
    let replies = session(&h, LOCAL, input.as_bytes()).await;
    assert_eq!(
        codes(&replies),
        [
            "220",
            "250",
            "250 2.1.0",
            "250 2.1.5",
            "250 2.1.5",
            "250 2.1.5",
            "452 4.5.3",
            "221 2.0.0"
        ]
    );
}

/// A data directory on a file system with less free space than
/// `smtp.queue_minfree` refuses new mail with 452 4.3.1 (the disk is real:
/// the reserve is set above what it has free), and takes it again once the
/// reserve is met.
#[tokio::test(flavor = "multi_thread")]
async fn mail_is_refused_with_452_while_the_disk_is_below_its_reserve() {
    let mut h = harness("").await;
    let mut config = (*h.ctx.config).clone();
    config.queue_minfree = u64::MAX;
    h.ctx.config = Arc::new(config.clone());
    let input = format!("{HELLO}MAIL FROM:<a@client.test>\r\nQUIT\r\n");
    let replies = session(&h, LOCAL, input.as_bytes()).await;
    assert_eq!(codes(&replies), ["220", "250", "452 4.3.1", "221 2.0.0"]);

    config.queue_minfree = 0;
    h.ctx.config = Arc::new(config);
    let input =
        format!("{HELLO}MAIL FROM:<a@client.test>\r\nRCPT TO:<b@example.org>\r\nDATA\r\nhi\r\n.\r\nQUIT\r\n");
    let replies = session(&h, LOCAL, input.as_bytes()).await;
    assert_eq!(codes(&replies), QUEUED);
    assert!(h.queued.try_recv().is_ok());
}

#[tokio::test(flavor = "multi_thread")]
async fn only_trusted_clients_mail_from_a_dkim_domain_is_signed() {
    let mut h = harness("").await;
    let key = h._dir.path().join("ed.pem");
    std::fs::write(
        &key,
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)
            .unwrap()
            .serialize_pem(),
    )
    .unwrap();
    h.ctx.dkim = crate::dkim::Signers::load(&[crate::config::DkimConfig {
        domain: "example.com".into(),
        selector: "ed".into(),
        key_file: key,
        headers: crate::dkim::DEFAULT_HEADERS
            .iter()
            .map(|h| h.to_string())
            .collect(),
        header_canon: crate::config::Canon::Relaxed,
        body_canon: crate::config::Canon::Relaxed,
        expire: None,
    }])
    .unwrap();
    let mut send = async |peer: &str, from: &str| {
        let input = format!("{HELLO}MAIL FROM:<a@client.test>\r\nRCPT TO:<b@example.org>\r\nDATA\r\nFrom: <{from}>\r\nSubject: s\r\n\r\nbody\r\n.\r\nQUIT\r\n");
        let replies = session(&h, peer, input.as_bytes()).await;
        assert_eq!(codes(&replies), QUEUED);
        String::from_utf8(h.queued.try_recv().unwrap().body.to_vec()).unwrap()
    };
    // A trusted client (127.0.0.1 is in the default relay networks).
    let signed = send(LOCAL, "ann@Example.COM").await;
    assert!(
        signed.starts_with("DKIM-Signature: v=1; a=ed25519-sha256; s=ed; d=example.com;"),
        "{signed}"
    );
    assert!(
        signed.contains("\r\nReceived: from "),
        "signed after our Received header"
    );
    // A stranger claiming the domain, and a trusted client of another domain.
    assert!(!send(STRANGER, "ann@example.com")
        .await
        .contains("DKIM-Signature"));
    assert!(!send(LOCAL, "ann@example.net")
        .await
        .contains("DKIM-Signature"));
}
