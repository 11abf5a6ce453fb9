//! The front door under attack: a table of hostile sessions against a live
//! node over TCP (and over STARTTLS where it matters), each with the exact
//! replies expected; then the node must be healthy and must have queued
//! nothing that was smuggled.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use skein_node::Node;
use skein_smtp::{parse_reply, Notify, Reply, Ret, ReversePath};
use skein_testkit::{codes, converse, converse_after_tls, wait_for, DnsServer, SinkMta};
use skein_tests::mail::http_status;
use skein_tests::tls::{connect, TestCert};
use skein_tests::{send, TestConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct FrontDoor {
    node: Node,
    sink: SinkMta,
    cert: TestCert,
    metrics: SocketAddr,
    _dns: DnsServer,
    dir: tempfile::TempDir,
}

impl FrontDoor {
    fn smtp(&self) -> SocketAddr {
        self.node.smtp_addrs[0]
    }

    fn submission(&self) -> SocketAddr {
        self.node.submission_addrs[0]
    }
}

async fn front_door(extra: &str) -> FrontDoor {
    let sink = SinkMta::builder().ehlo_extensions([
        "PIPELINING",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
    ]);
    front_door_with(extra, sink).await
}

async fn front_door_with(extra: &str, sink: skein_testkit::SinkMtaBuilder) -> FrontDoor {
    let dir = tempfile::tempdir().unwrap();
    let dns = DnsServer::builder()
        .mx("example.org", 10, "mx.example.org")
        .a("mx.example.org", Ipv4Addr::LOCALHOST)
        .a("other.test", Ipv4Addr::LOCALHOST)
        .start()
        .await
        .unwrap();
    let sink = sink.start().await.unwrap();
    let cert = TestCert::write(dir.path(), "smtp");
    let hash = skein_node::smtp::hash_password("s3cret").unwrap();
    let mut c = TestConfig::new(1, dir.path().join("data"), dns.addr(), sink.port());
    c.greet_pause = "150ms".into();
    // 127.0.0.1 — the test — is a stranger here: no relaying.
    c.smtp_extra = format!(
        r#"max_message_size = 10000
max_recipients = 3
relay_networks = ["192.0.2.0/24"]
submission_listen = ["127.0.0.1:0"]
tls_cert = {:?}
tls_key = {:?}
tls_reload_interval = "300ms"
timeout = "3s"
min_data_rate = 2000
{extra}
[smtp.users]
alice = "{hash}"
"#,
        cert.cert.display().to_string(),
        cert.key.display().to_string()
    );
    let metrics = skein_tests::free_addr([127, 0, 0, 1].into());
    c.metrics = metrics;
    let node = Node::start(c.config()).await.unwrap();
    FrontDoor {
        node,
        sink,
        cert,
        metrics,
        _dns: dns,
        dir,
    }
}

const H: &str = "EHLO client.test\r\n";
const M: &str = "MAIL FROM:<a@client.test>\r\n";
const R: &str = "RCPT TO:<b@example.org>\r\n";
const Q: &str = "QUIT\r\n";

fn data(body: &str) -> String {
    format!("DATA\r\n{body}.\r\n")
}

async fn talk(addr: SocketAddr, script: &str) -> Vec<String> {
    codes(&converse(TcpStream::connect(addr).await.unwrap(), script.as_bytes()).await)
}

fn expect(replies: &[&str]) -> Vec<String> {
    let mut v = vec!["220".to_string()];
    v.extend(replies.iter().map(|s| s.to_string()));
    v
}

/// Read one reply from a raw stream.
async fn reply<S: tokio::io::AsyncRead + Unpin>(s: &mut S, buf: &mut Vec<u8>) -> Option<Reply> {
    loop {
        if let Ok(Some((r, n))) = parse_reply(buf) {
            buf.drain(..n);
            return Some(r);
        }
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout(Duration::from_secs(15), s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return None,
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_hostile_battery_gets_exact_replies_and_smuggles_nothing() {
    let fd = front_door("").await;
    let long = "x".repeat(600);
    let mut hops = String::new();
    for i in 0..51 {
        hops.push_str(&format!(
            "Received: from hop{i}.test by hop{i}.test; Sun, 22 Nov 2026 09:00:00 +0000\r\n"
        ));
    }
    let fake = |f: &str| {
        format!(
            "{H}{M}{R}{}{Q}",
            data(&format!(
                "Subject: fake\r\n\r\nbefore{f}MAIL FROM:<smuggled@x.test>\r\nRCPT TO:<smuggled@example.org>\r\nsmuggled\r\n"
            ))
        )
    };
    let table: Vec<(&str, String, Vec<String>)> = vec![
        ("unknown command", format!("FOO\r\n{Q}"), expect(&["500 5.5.2", "221 2.0.0"])),
        ("MAIL before EHLO", format!("{M}{Q}"), expect(&["503 5.5.1", "221 2.0.0"])),
        ("RCPT before MAIL", format!("{H}{R}{Q}"), expect(&["250", "503 5.5.1", "221 2.0.0"])),
        ("DATA before RCPT", format!("{H}{M}DATA\r\n{Q}"), expect(&["250", "250 2.1.0", "503 5.5.1", "221 2.0.0"])),
        ("bad sender", format!("{H}MAIL FROM:<not an address>\r\n{Q}"), expect(&["250", "501 5.1.7", "221 2.0.0"])),
        ("bad recipient", format!("{H}{M}RCPT TO:<>\r\n{Q}"), expect(&["250", "250 2.1.0", "501 5.1.3", "221 2.0.0"])),
        ("command over 512 octets", format!("NOOP {long}\r\nNOOP\r\n{Q}"), expect(&["500 5.5.2", "250 2.0.0", "221 2.0.0"])),
        ("bare LF ends a command", format!("EHLO client.test\nNOOP\r\n{Q}"), expect(&["500 5.5.2", "250 2.0.0", "221 2.0.0"])),
        ("bare CR in a command", format!("NO\rOP\r\n{Q}"), expect(&["500 5.5.2", "221 2.0.0"])),
        ("NUL in a command", format!("NO\0OP\r\n{Q}"), expect(&["500 5.5.2", "221 2.0.0"])),
        ("fake end of data: LF . LF", fake("\n.\n"), expect(&["250", "250 2.1.0", "250 2.1.5", "354", "554 5.6.0", "221 2.0.0"])),
        ("fake end of data: CRLF . LF", fake("\r\n.\n"), expect(&["250", "250 2.1.0", "250 2.1.5", "354", "554 5.6.0", "221 2.0.0"])),
        ("fake end of data: LF . CRLF", fake("\n.\r\n"), expect(&["250", "250 2.1.0", "250 2.1.5", "354", "554 5.6.0", "221 2.0.0"])),
        ("fake end of data: CR . CRLF", fake("\r.\r\n"), expect(&["250", "250 2.1.0", "250 2.1.5", "354", "554 5.6.0", "221 2.0.0"])),
        ("fake end of data: CRLF . CR", fake("\r\n.\r"), expect(&["250", "250 2.1.0", "250 2.1.5", "354", "554 5.6.0", "221 2.0.0"])),
        ("NUL in data", format!("{H}{M}{R}{}{Q}", data("Subject: x\r\n\r\na\0b\r\n")), expect(&["250", "250 2.1.0", "250 2.1.5", "354", "554 5.6.0", "221 2.0.0"])),
        ("text line over 1000 octets", format!("{H}{M}{R}{}{Q}", data(&format!("Subject: x\r\n\r\n{}\r\n", "y".repeat(1001)))), expect(&["250", "250 2.1.0", "250 2.1.5", "354", "500 5.5.2", "221 2.0.0"])),
        ("SIZE over the limit", format!("{H}MAIL FROM:<a@client.test> SIZE=20000\r\n{Q}"), expect(&["250", "552 5.3.4", "221 2.0.0"])),
        ("data over the limit", format!("{H}{M}{R}{}{Q}", data(&format!("Subject: x\r\n\r\n{}", format!("{}\r\n", "z".repeat(98)).repeat(120)))), expect(&["250", "250 2.1.0", "250 2.1.5", "354", "552 5.3.4", "221 2.0.0"])),
        (
            "recipients past the limit",
            format!("{H}{M}{}{}{Q}", (1..=5).map(|i| format!("RCPT TO:<r{i}@example.org>\r\n")).collect::<String>(), data("Subject: many\r\n\r\nx\r\n")),
            expect(&["250", "250 2.1.0", "250 2.1.5", "250 2.1.5", "250 2.1.5", "452 4.5.3", "452 4.5.3", "354", "250 2.0.0", "221 2.0.0"]),
        ),
        (
            "relay in every address form",
            format!(
                "{H}{M}RCPT TO:<x@other.test>\r\nRCPT TO:<user%other.test@example.org>\r\nRCPT TO:<other.test!user@example.org>\r\nRCPT TO:<\"user@other.test\"@example.org>\r\nRCPT TO:<@example.org:user@other.test>\r\nRCPT TO:<user@[127.0.0.1]>\r\nRCPT TO:<user@EXAMPLE.org>\r\n{Q}"
            ),
            expect(&["250", "250 2.1.0", "554 5.7.1", "554 5.7.1", "554 5.7.1", "554 5.7.1", "554 5.7.1", "554 5.7.1", "250 2.1.5", "221 2.0.0"]),
        ),
        ("null sender", format!("{H}MAIL FROM:<>\r\n{R}{}{Q}", data("Subject: bounce\r\nX-Case: null-sender\r\n\r\nx\r\n")), expect(&["250", "250 2.1.0", "250 2.1.5", "354", "250 2.0.0", "221 2.0.0"])),
        ("mail loop", format!("{H}{M}{R}{}{Q}", data(&format!("{hops}Subject: loop\r\n\r\nx\r\n"))), expect(&["250", "250 2.1.0", "250 2.1.5", "354", "554 5.4.6", "221 2.0.0"])),
        ("non-ASCII without SMTPUTF8", format!("{H}{M}RCPT TO:<üser@example.org>\r\n{Q}"), expect(&["250", "250 2.1.0", "553 5.6.7", "221 2.0.0"])),
        (
            "non-ASCII with SMTPUTF8",
            format!("{H}MAIL FROM:<ä@client.test> SMTPUTF8\r\nRCPT TO:<üser@example.org>\r\n{}{Q}", data("Subject: utf8\r\nX-Case: utf8\r\n\r\nx\r\n")),
            expect(&["250", "250 2.1.0", "250 2.1.5", "354", "250 2.0.0", "221 2.0.0"]),
        ),
        (
            "BDAT in two chunks",
            format!("{H}{M}{R}BDAT 30\r\nSubject: chunk\r\nX-Case: bdat\r\nBDAT 13 LAST\r\n\r\nbody text\r\n{Q}"),
            expect(&["250", "250 2.1.0", "250 2.1.5", "250 2.0.0", "250 2.0.0", "221 2.0.0"]),
        ),
        ("BDAT without MAIL", format!("{H}BDAT 5\r\nhelloNOOP\r\n{Q}"), expect(&["250", "503 5.5.1", "250 2.0.0", "221 2.0.0"])),
        ("BDAT over the limit", format!("{H}{M}{R}BDAT 12000 LAST\r\n{}{Q}", "w".repeat(12000)), expect(&["250", "250 2.1.0", "250 2.1.5", "552 5.3.4", "221 2.0.0"])),
        (
            "DSN parameters",
            format!(
                "{H}MAIL FROM:<a@client.test> RET=HDRS ENVID=env-1\r\nRCPT TO:<b@example.org> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b@example.org\r\n{}{Q}",
                data("Subject: dsn\r\nX-Case: dsn\r\n\r\nx\r\n")
            ),
            expect(&["250", "250 2.1.0", "250 2.1.5", "354", "250 2.0.0", "221 2.0.0"]),
        ),
        ("error limit", "FOO\r\n".repeat(25), {
            let mut v = vec!["500 5.5.2"; 20];
            v.push("421 4.7.0");
            expect(&v)
        }),
        ("junk command limit", "NOOP\r\n".repeat(110), {
            let mut v = vec!["250 2.0.0"; 101];
            v.push("421 4.7.0");
            expect(&v)
        }),
        ("AUTH on the MX port", format!("{H}AUTH PLAIN AGFsaWNlAHMzY3JldA==\r\n{Q}"), expect(&["250", "503 5.5.1", "221 2.0.0"])),
    ];
    for (name, script, want) in &table {
        let got = talk(fd.smtp(), script).await;
        assert_eq!(&got, want, "case {name:?}");
    }

    // On submission, nothing before TLS and authentication.
    let got = talk(
        fd.submission(),
        &format!("{H}AUTH PLAIN AGFsaWNlAHMzY3JldA==\r\n{M}{Q}"),
    )
    .await;
    assert_eq!(
        got,
        expect(&["250", "538 5.7.11", "530 5.7.0", "221 2.0.0"])
    );

    // The node is healthy and takes ordinary mail.
    assert_eq!(http_status(fd.metrics, "/readyz").await.unwrap(), 200);
    let s = send(
        fd.smtp(),
        "a@client.test",
        &["b@example.org"],
        b"Subject: after\r\nX-Case: after\r\n\r\nfine\r\n",
    )
    .await
    .unwrap();
    assert!(s.accepted(), "{}", s.reply);

    // Exactly the accepted messages arrived, and nothing smuggled.
    let got = match fd.sink.wait_for(6, Duration::from_secs(20)).await {
        Ok(g) => g,
        Err(e) => {
            let state = fd.node.cluster().reader().read().clone();
            for m in state.messages() {
                eprintln!(
                    "still queued: {} {:?} {:?}",
                    m.id,
                    m.recipients
                        .iter()
                        .map(|r| r.address.to_string())
                        .collect::<Vec<_>>(),
                    m.last_error
                );
            }
            panic!("{e}; the sink has {:?}", fd.sink.commands());
        }
    };
    let reader = fd.node.cluster().reader().clone();
    wait_for(Duration::from_secs(20), "the queue to empty", || {
        let r = reader.clone();
        async move { r.read().is_empty() }
    })
    .await
    .unwrap();
    let all = fd.sink.messages();
    assert_eq!(
        all.len(),
        6,
        "{:?}",
        all.iter().map(|m| &m.rcpt_to).collect::<Vec<_>>()
    );
    for m in &all {
        let text = String::from_utf8_lossy(&m.data);
        assert!(
            !text.contains("smuggled"),
            "smuggled content delivered: {text}"
        );
        assert!(!m.mail_from.contains("smuggled"));
    }
    let case = |c: &str| {
        got.iter()
            .chain(all.iter())
            .find(|m| String::from_utf8_lossy(&m.data).contains(&format!("X-Case: {c}")))
            .cloned()
    };
    assert_eq!(
        case("null-sender").unwrap().mail_from,
        "",
        "a null sender stays null"
    );
    assert_eq!(
        case("utf8").unwrap().rcpt_to,
        vec!["üser@example.org".to_string()]
    );
    assert!(String::from_utf8_lossy(&case("bdat").unwrap().data)
        .ends_with("X-Case: bdat\r\n\r\nbody text\r\n"));
    assert!(String::from_utf8_lossy(&case("utf8").unwrap().data).contains(" with UTF8SMTP id "));
    drop(fd.dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn dsn_parameters_are_stored_with_the_message() {
    // The MX defers, so the message stays queued to be looked at.
    let sink = SinkMta::builder().defer_all();
    let fd = front_door_with("", sink).await;
    let script = format!(
        "{H}MAIL FROM:<a@client.test> RET=HDRS ENVID=env-1\r\nRCPT TO:<b@example.org> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b@example.org\r\n{}{Q}",
        data("Subject: dsn\r\n\r\nx\r\n")
    );
    let replies = converse(
        TcpStream::connect(fd.smtp()).await.unwrap(),
        script.as_bytes(),
    )
    .await;
    assert_eq!(
        codes(&replies),
        expect(&[
            "250",
            "250 2.1.0",
            "250 2.1.5",
            "354",
            "250 2.0.0",
            "221 2.0.0"
        ])
    );
    let id: skein_queue::MessageId = replies[5]
        .text()
        .strip_prefix("Ok: queued as ")
        .unwrap()
        .parse()
        .unwrap();
    let m = fd
        .node
        .cluster()
        .reader()
        .read()
        .get(&id)
        .cloned()
        .expect("queued");
    assert_eq!(m.params.envid.as_deref(), Some("env-1"));
    assert_eq!(m.params.ret, Some(Ret::Hdrs));
    assert_eq!(
        m.sender,
        ReversePath::Mailbox(skein_smtp::Mailbox::parse("a@client.test").unwrap())
    );
    let p = &m.recipients[0].params;
    assert_eq!(
        p.notify,
        Some(Notify {
            never: false,
            success: true,
            failure: true,
            delay: false
        })
    );
    assert_eq!(p.orcpt.as_deref(), Some("rfc822;b@example.org"));
}

#[tokio::test(flavor = "multi_thread")]
async fn talking_before_the_greeting_and_pipelining_past_data_are_refused() {
    let fd = front_door("").await;
    // Before the greeting.
    let mut s = TcpStream::connect(fd.smtp()).await.unwrap();
    s.write_all(H.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let r = reply(&mut s, &mut buf).await.unwrap();
    assert_eq!(
        (r.code, r.enhanced.map(|e| e.to_string())),
        (554, Some("5.5.0".into()))
    );
    assert!(reply(&mut s, &mut buf).await.is_none(), "connection closed");

    // Past DATA: the body sent without waiting for the 354.
    let mut s = TcpStream::connect(fd.smtp()).await.unwrap();
    let mut buf = Vec::new();
    assert_eq!(reply(&mut s, &mut buf).await.unwrap().code, 220);
    s.write_all(format!("{H}{M}{R}").as_bytes()).await.unwrap();
    for _ in 0..3 {
        reply(&mut s, &mut buf).await.unwrap();
    }
    s.write_all(b"DATA\r\nSubject: early\r\n\r\nsmuggled\r\n.\r\n")
        .await
        .unwrap();
    let r = reply(&mut s, &mut buf).await.unwrap();
    assert_eq!(
        (r.code, r.enhanced.map(|e| e.to_string())),
        (554, Some("5.5.0".into()))
    );
    assert!(reply(&mut s, &mut buf).await.is_none(), "connection closed");
    assert!(fd.node.cluster().reader().read().is_empty());
}

/// STARTTLS, then: plaintext sent after STARTTLS is dropped, no state from
/// before survives, and AUTH works on submission.
#[tokio::test(flavor = "multi_thread")]
async fn starttls_discards_injected_plaintext_resets_state_and_enables_auth() {
    let fd = front_door("").await;

    // The injection probe: "STARTTLS\r\nRSET\r\n" in one packet.
    let mut s = TcpStream::connect(fd.smtp()).await.unwrap();
    let mut buf = Vec::new();
    assert_eq!(reply(&mut s, &mut buf).await.unwrap().code, 220);
    s.write_all(format!("{H}{M}").as_bytes()).await.unwrap();
    let ehlo = reply(&mut s, &mut buf).await.unwrap();
    assert!(ehlo.lines.iter().any(|l| l == "STARTTLS"), "{ehlo:?}");
    assert_eq!(reply(&mut s, &mut buf).await.unwrap().code, 250);
    s.write_all(b"STARTTLS\r\nRSET\r\n").await.unwrap();
    let go = reply(&mut s, &mut buf).await.unwrap();
    assert_eq!(go.code, 220);
    assert!(
        buf.is_empty(),
        "the server answered the injected command in plaintext"
    );
    let (tls, presented) = connect(s, &[&fd.cert.der]).await.unwrap();
    assert_eq!(presented, fd.cert.der);
    // The first reply over TLS is to our EHLO, not to the injected RSET; the
    // MAIL from before the handshake is forgotten.
    let got = converse_after_tls(tls, format!("{R}{H}{R}{Q}").as_bytes()).await;
    assert_eq!(codes(&got), ["503 5.5.1", "250", "503 5.5.1", "221 2.0.0"]);
    assert!(
        !got[1].lines.iter().any(|l| l == "STARTTLS"),
        "STARTTLS offered twice"
    );

    // Submission: AUTH only under TLS; then authenticated users may relay.
    let tls_session = |script: String| {
        let addr = fd.submission();
        let der = fd.cert.der.clone();
        async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let mut buf = Vec::new();
            assert_eq!(reply(&mut s, &mut buf).await.unwrap().code, 220);
            s.write_all(format!("{H}STARTTLS\r\n").as_bytes())
                .await
                .unwrap();
            let ehlo = reply(&mut s, &mut buf).await.unwrap();
            assert!(
                !ehlo.lines.iter().any(|l| l.starts_with("AUTH")),
                "AUTH offered in plaintext"
            );
            assert_eq!(reply(&mut s, &mut buf).await.unwrap().code, 220);
            let (tls, _) = connect(s, &[&der]).await.unwrap();
            converse_after_tls(tls, script.as_bytes()).await
        }
    };
    // "\0alice\0wrong" and "\0alice\0s3cret", base64.
    let got = tls_session(format!("{H}{M}AUTH PLAIN AGFsaWNlAHdyb25n\r\nAUTH PLAIN AGFsaWNlAHMzY3JldA==\r\nMAIL FROM:<alice@client.test>\r\nRCPT TO:<x@other.test>\r\n{}{Q}", data("Subject: submitted\r\nX-Case: submitted\r\n\r\nx\r\n"))).await;
    assert_eq!(
        codes(&got),
        [
            "250",
            "530 5.7.0",
            "535 5.7.8",
            "235 2.7.0",
            "250 2.1.0",
            "250 2.1.5",
            "354",
            "250 2.0.0",
            "221 2.0.0"
        ]
    );
    assert!(
        got[0].lines.iter().any(|l| l == "AUTH PLAIN LOGIN"),
        "{:?}",
        got[0]
    );
    // LOGIN, with its two challenges.
    let got = tls_session(format!("{H}AUTH LOGIN\r\nYWxpY2U=\r\nczNjcmV0\r\n{Q}")).await;
    assert_eq!(codes(&got), ["250", "334", "334", "235 2.7.0", "221 2.0.0"]);
    let got = tls_session(format!("{H}AUTH LOGIN\r\n*\r\n{Q}")).await;
    assert_eq!(codes(&got), ["250", "334", "501 5.0.0", "221 2.0.0"]);

    let m = fd.sink.wait_for(1, Duration::from_secs(20)).await.unwrap();
    assert_eq!(m[0].rcpt_to, vec!["x@other.test".to_string()]);
    assert!(String::from_utf8_lossy(&m[0].data).contains(" with ESMTPSA id "));
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_and_trickling_clients_are_cut_off() {
    let fd = front_door("").await;
    // Idle: the server timeout (3s in this config) ends the session.
    let mut s = TcpStream::connect(fd.smtp()).await.unwrap();
    let mut buf = Vec::new();
    assert_eq!(reply(&mut s, &mut buf).await.unwrap().code, 220);
    let t = Instant::now();
    let r = reply(&mut s, &mut buf).await.unwrap();
    assert_eq!(
        (r.code, r.enhanced.map(|e| e.to_string())),
        (421, Some("4.4.2".into()))
    );
    assert!(t.elapsed() < Duration::from_secs(6), "{:?}", t.elapsed());

    // Trickling: one byte every 200ms is far below 2000 bytes/s.
    let mut s = TcpStream::connect(fd.smtp()).await.unwrap();
    let mut buf = Vec::new();
    assert_eq!(reply(&mut s, &mut buf).await.unwrap().code, 220);
    s.write_all(format!("{H}{M}{R}DATA\r\n").as_bytes())
        .await
        .unwrap();
    for _ in 0..4 {
        reply(&mut s, &mut buf).await.unwrap();
    }
    let (mut rd, mut wr) = s.into_split();
    let t = Instant::now();
    let trickler = tokio::spawn(async move {
        for _ in 0..150 {
            if wr.write_all(b"x").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let r = reply(&mut rd, &mut buf)
        .await
        .expect("cut off with a reply");
    assert_eq!(
        (r.code, r.enhanced.map(|e| e.to_string())),
        (421, Some("4.4.2".into())),
        "{r}"
    );
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    trickler.abort();
    assert!(fd.node.cluster().reader().read().is_empty());
}

/// A client that sends and never reads its replies cannot hold a session:
/// every write to it has the session timeout (3s here).
#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_never_reads_is_cut_off() {
    let fd = front_door("").await;
    let mut s = TcpStream::connect(fd.smtp()).await.unwrap();
    let mut buf = Vec::new();
    assert_eq!(reply(&mut s, &mut buf).await.unwrap().code, 220);
    let (_rd, mut wr) = s.into_split();
    // EHLO is neither an error nor junk: 200 bytes of reply each, until the
    // socket buffers fill and the server's writes stall.
    let writer = tokio::spawn(async move {
        let line = b"EHLO client.test\r\n".repeat(1000);
        for _ in 0..400 {
            if wr.write_all(&line).await.is_err() {
                break;
            }
        }
        wr
    });
    let active = || async {
        let (_, text) = skein_tests::mail::http_get(fd.metrics, "/metrics")
            .await
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix("skein_smtp_sessions_active "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    wait_for(Duration::from_secs(5), "the session to start", || async {
        active().await == 1.0
    })
    .await
    .unwrap();
    let t = Instant::now();
    wait_for(
        Duration::from_secs(20),
        "the session to be closed",
        || async { active().await == 0.0 },
    )
    .await
    .unwrap();
    println!(
        "a client that never reads was cut off after {:?}",
        t.elapsed()
    );
    writer.abort();
}

/// Clients in the exception lists (the relay networks by default) are not
/// throttled by what is meant for strangers: they may talk at once and open
/// more sessions than `max_connections_per_ip`.
#[tokio::test(flavor = "multi_thread")]
async fn trusted_clients_skip_the_greeting_pause_and_the_per_address_limit() {
    let fd = front_door(
        "max_connections_per_ip = 2\ngreet_pause_exceptions = [\"127.0.0.0/8\"]\nclient_connection_limit_exceptions = [\"127.0.0.1\"]",
    )
    .await;
    let mut open = Vec::new();
    for _ in 0..5 {
        let mut s = TcpStream::connect(fd.smtp()).await.unwrap();
        // Talking before the greeting is fine for a trusted client.
        s.write_all(H.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let greeting = reply(&mut s, &mut buf).await.unwrap();
        assert_eq!(greeting.code, 220, "{greeting}");
        assert_eq!(reply(&mut s, &mut buf).await.unwrap().code, 250);
        open.push(s);
    }
}

/// A client that opens sessions one after another, never more than the
/// limit at once, is never refused: a session's slot is free again by the
/// time the client reads its 221.
#[tokio::test(flavor = "multi_thread")]
async fn sessions_one_after_another_within_the_limit_are_never_refused() {
    let fd = front_door("max_connections_per_ip = 4").await;
    let addr = fd.smtp();
    let workers: Vec<_> = (0..4)
        .map(|_| {
            tokio::spawn(async move {
                let mut refused = Vec::new();
                for _ in 0..25 {
                    let mut s = TcpStream::connect(addr).await.unwrap();
                    let mut buf = Vec::new();
                    let greeting = reply(&mut s, &mut buf).await.unwrap();
                    if greeting.code != 220 {
                        refused.push(greeting.to_string());
                        continue;
                    }
                    s.write_all(format!("{H}{Q}").as_bytes()).await.unwrap();
                    assert_eq!(reply(&mut s, &mut buf).await.unwrap().code, 250);
                    assert_eq!(reply(&mut s, &mut buf).await.unwrap().code, 221);
                }
                refused
            })
        })
        .collect();
    for w in workers {
        let refused = w.await.unwrap();
        assert!(refused.is_empty(), "refused: {refused:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_per_client_address_are_limited() {
    let fd = front_door("max_connections_per_ip = 4").await;
    let mut open = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(fd.smtp()).await.unwrap();
        let mut buf = Vec::new();
        assert_eq!(reply(&mut s, &mut buf).await.unwrap().code, 220);
        open.push(s);
    }
    let mut s = TcpStream::connect(fd.smtp()).await.unwrap();
    let mut buf = Vec::new();
    let r = reply(&mut s, &mut buf).await.unwrap();
    assert_eq!(
        (r.code, r.enhanced.map(|e| e.to_string())),
        (421, Some("4.7.0".into()))
    );
    drop(open);
    // Once they close, the address may connect again.
    wait_for(Duration::from_secs(10), "a free slot", || async {
        let Ok(mut s) = TcpStream::connect(fd.smtp()).await else {
            return false;
        };
        let mut buf = Vec::new();
        reply(&mut s, &mut buf).await.is_some_and(|r| r.code == 220)
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_certificate_swapped_on_disk_is_served_without_a_restart() {
    let fd = front_door("").await;
    let presented = || async {
        let mut s = TcpStream::connect(fd.smtp()).await.unwrap();
        let mut buf = Vec::new();
        reply(&mut s, &mut buf).await.unwrap();
        s.write_all(format!("{H}STARTTLS\r\n").as_bytes())
            .await
            .unwrap();
        reply(&mut s, &mut buf).await.unwrap();
        reply(&mut s, &mut buf).await.unwrap();
        let new = TestCert::write(fd.dir.path(), "peek");
        // Trust both: we only want to see which one is served.
        connect(s, &[&fd.cert.der, &new.der])
            .await
            .map(|(_, c)| c)
            .ok()
    };
    assert_eq!(presented().await, Some(fd.cert.der.clone()));
    let next = TestCert::write(fd.dir.path(), "next");
    std::fs::copy(&next.key, &fd.cert.key).unwrap();
    std::fs::copy(&next.cert, &fd.cert.cert).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut s = TcpStream::connect(fd.smtp()).await.unwrap();
        let mut buf = Vec::new();
        reply(&mut s, &mut buf).await.unwrap();
        s.write_all(format!("{H}STARTTLS\r\n").as_bytes())
            .await
            .unwrap();
        reply(&mut s, &mut buf).await.unwrap();
        reply(&mut s, &mut buf).await.unwrap();
        if let Ok((_, c)) = connect(s, &[&next.der]).await {
            assert_eq!(c, next.der);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new certificate was not picked up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
