//! The sink, driven by a raw TCP client writing SMTP by hand.

use std::time::Duration;

use skein_smtp::{parse_reply, EnhancedCode, Reply};
use skein_testkit::SinkMta;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(5);

/// Reads replies until `n` complete ones arrived.
async fn read_replies(stream: &mut TcpStream, buf: &mut Vec<u8>, n: usize) -> Vec<Reply> {
    let mut replies = Vec::new();
    while replies.len() < n {
        while let Some((reply, used)) = parse_reply(buf).expect("valid reply") {
            buf.drain(..used);
            replies.push(reply);
            if replies.len() == n {
                return replies;
            }
        }
        let read = tokio::time::timeout(WAIT, stream.read_buf(buf))
            .await
            .expect("reply in time")
            .expect("read");
        assert!(read > 0, "connection closed after {replies:?}");
    }
    replies
}

#[tokio::test]
async fn records_a_pipelined_message_byte_for_byte() {
    let sink = SinkMta::builder().start().await.unwrap();
    let mut stream = TcpStream::connect(sink.addr()).await.unwrap();
    let mut buf = Vec::new();
    let greeting = read_replies(&mut stream, &mut buf, 1).await;
    assert_eq!(greeting[0].code, 220);

    stream.write_all(b"EHLO client.test\r\n").await.unwrap();
    let ehlo = read_replies(&mut stream, &mut buf, 1).await;
    assert!(ehlo[0].lines.iter().any(|l| l == "PIPELINING"), "{ehlo:?}");

    // One write holding the whole transaction, body included: the sink
    // must cope with commands and data arriving in the same read.
    let pipelined = b"MAIL FROM:<a@client.test> BODY=8BITMIME\r\n\
        RCPT TO:<b@sink.test>\r\nRCPT TO:<c@sink.test>\r\nDATA\r\n\
        Subject: hi\r\n\r\n..leading dot\r\nlast line\r\n.\r\nQUIT\r\n";
    stream.write_all(pipelined).await.unwrap();
    let replies = read_replies(&mut stream, &mut buf, 6).await;
    let codes: Vec<u16> = replies.iter().map(|r| r.code).collect();
    assert_eq!(codes, vec![250, 250, 250, 354, 250, 221]);

    let got = sink.wait_for(1, WAIT).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].helo, "client.test");
    assert_eq!(got[0].mail_from, "a@client.test");
    assert_eq!(got[0].rcpt_to, vec!["b@sink.test", "c@sink.test"]);
    assert_eq!(
        got[0].data,
        b"Subject: hi\r\n\r\n.leading dot\r\nlast line\r\n"
    );
    assert_eq!(
        got[0].mail_params.body,
        Some(skein_smtp::BodyType::EightBitMime)
    );
    assert_eq!(sink.connections(), 1);
    assert!(sink.commands().iter().any(|c| c == "QUIT"));
}

#[tokio::test]
async fn scripted_replies_decide_what_is_recorded() {
    let e = |c, s, d| Some(EnhancedCode::new(c, s, d));
    let sink = SinkMta::builder()
        .ehlo_extensions(["SIZE 1000"])
        .on_rcpt(move |rcpt| {
            if rcpt.starts_with("nobody@") {
                Reply::new(550, e(5, 1, 1), "no such user")
            } else {
                Reply::new(250, e(2, 1, 5), "Ok")
            }
        })
        .on_data(move |n| match n {
            0 => Reply::new(451, e(4, 3, 0), "try again"),
            _ => Reply::new(250, e(2, 0, 0), "queued"),
        })
        .start()
        .await
        .unwrap();
    let mut stream = TcpStream::connect(sink.addr()).await.unwrap();
    let mut buf = Vec::new();
    read_replies(&mut stream, &mut buf, 1).await;
    stream.write_all(b"EHLO c\r\n").await.unwrap();
    let ehlo = read_replies(&mut stream, &mut buf, 1).await;
    assert_eq!(
        skein_smtp::Extensions::from_ehlo(&ehlo[0]).size(),
        Some(1000)
    );

    for attempt in 0..2 {
        stream
            .write_all(
                b"MAIL FROM:<>\r\nRCPT TO:<nobody@x>\r\nRCPT TO:<u@x>\r\nDATA\r\nbody\r\n.\r\n",
            )
            .await
            .unwrap();
        let codes: Vec<u16> = read_replies(&mut stream, &mut buf, 5)
            .await
            .iter()
            .map(|r| r.code)
            .collect();
        let last = if attempt == 0 { 451 } else { 250 };
        assert_eq!(codes, vec![250, 550, 250, 354, last]);
    }
    let got = sink.wait_for(1, WAIT).await.unwrap();
    assert_eq!(got.len(), 1, "the 451'd body is not recorded");
    assert_eq!(got[0].mail_from, "");
    assert_eq!(got[0].rcpt_to, vec!["u@x"]);
    assert_eq!(got[0].data, b"body\r\n");
}

#[tokio::test]
async fn a_421_closes_the_connection() {
    let sink = SinkMta::builder()
        .on_mail(|_| Reply::new(421, None, "shutting down"))
        .start()
        .await
        .unwrap();
    let mut stream = TcpStream::connect(sink.addr()).await.unwrap();
    let mut buf = Vec::new();
    read_replies(&mut stream, &mut buf, 1).await;
    stream
        .write_all(b"HELO c\r\nMAIL FROM:<a@b>\r\n")
        .await
        .unwrap();
    let codes: Vec<u16> = read_replies(&mut stream, &mut buf, 2)
        .await
        .iter()
        .map(|r| r.code)
        .collect();
    assert_eq!(codes, vec![250, 421]);
    let n = tokio::time::timeout(WAIT, stream.read_buf(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n, 0, "closed after 421");
}

#[tokio::test]
async fn refusing_sink_refuses_and_hanging_sink_stays_silent() {
    let refusing = SinkMta::builder()
        .refuse_connections()
        .start()
        .await
        .unwrap();
    let err = TcpStream::connect(refusing.addr()).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);

    let hanging = SinkMta::builder()
        .hang_before_greeting()
        .start()
        .await
        .unwrap();
    let mut stream = TcpStream::connect(hanging.addr()).await.unwrap();
    let mut buf = Vec::new();
    let silent = tokio::time::timeout(Duration::from_millis(100), stream.read_buf(&mut buf)).await;
    assert!(silent.is_err(), "no greeting expected, got {buf:?}");
    assert_eq!(hanging.connections(), 1);
}
