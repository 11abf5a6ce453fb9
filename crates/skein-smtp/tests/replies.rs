//! Replies: encoding, and parsing what servers actually send.

use skein_smtp::*;

fn reply(code: u16, enhanced: Option<&str>, lines: &[&str]) -> Reply {
    Reply::with_lines(
        code,
        enhanced.map(|e| EnhancedCode::parse(e).unwrap()),
        lines.iter().map(|l| l.to_string()).collect(),
    )
}

#[test]
fn parse_table() {
    let ok = |r: Reply, n: usize| Ok(Some((r, n)));
    type Parsed = Result<Option<(Reply, usize)>, ReplyError>;
    let cases: Vec<(&[u8], Parsed)> = vec![
        (b"250 ok\r\n", ok(reply(250, None, &["ok"]), 8)),
        (b"250 ok\r\n220 next", ok(reply(250, None, &["ok"]), 8)),
        (b"250\r\n", ok(reply(250, None, &[""]), 5)),
        (b"250 \r\n", ok(reply(250, None, &[""]), 6)),
        (b"250\n", ok(reply(250, None, &[""]), 4)),
        (b"250-a\n250 b\n", ok(reply(250, None, &["a", "b"]), 12)),
        (
            b"250-mx.example.org\r\n250-PIPELINING\r\n250 SIZE 100\r\n",
            ok(
                reply(250, None, &["mx.example.org", "PIPELINING", "SIZE 100"]),
                50,
            ),
        ),
        (
            b"451 4.3.0 try later\r\n",
            ok(reply(451, Some("4.3.0"), &["try later"]), 21),
        ),
        (b"250 2.0.0\r\n", ok(reply(250, Some("2.0.0"), &[""]), 11)),
        (b"550 5.1.1\r\n", ok(reply(550, Some("5.1.1"), &[""]), 11)),
        // the class must match the code, or it is just text
        (
            b"250 5.0.0 odd\r\n",
            ok(reply(250, None, &["5.0.0 odd"]), 15),
        ),
        (b"354 2.0.0 go\r\n", ok(reply(354, None, &["2.0.0 go"]), 14)),
        (b"250 2.0.0x\r\n", ok(reply(250, None, &["2.0.0x"]), 12)),
        (b"250 2.0 ok\r\n", ok(reply(250, None, &["2.0 ok"]), 12)),
        (
            b"550-5.7.1 first\r\n550 5.7.1 second\r\n",
            ok(reply(550, Some("5.7.1"), &["first", "second"]), 35),
        ),
        (
            b"550-5.7.1 first\r\n550 second\r\n",
            ok(reply(550, Some("5.7.1"), &["first", "second"]), 29),
        ),
        // a later line with a different code keeps it as text
        (
            b"550-5.7.1 first\r\n550 5.1.1 second\r\n",
            ok(reply(550, Some("5.7.1"), &["first", "5.1.1 second"]), 35),
        ),
        (
            b"220 h\xffst ready\r\n",
            ok(reply(220, None, &["h\u{fffd}st ready"]), 16),
        ),
        // incomplete
        (b"", Ok(None)),
        (b"2", Ok(None)),
        (b"25", Ok(None)),
        (b"250", Ok(None)),
        (b"250\r", Ok(None)),
        (b"250 ok", Ok(None)),
        (b"250 ok\r", Ok(None)),
        (b"250-a\r\n", Ok(None)),
        (b"250-a\r\n250", Ok(None)),
        (b"250-a\r\n250 b", Ok(None)),
        // garbage
        (b"hello\r\n", Err(ReplyError::Malformed)),
        (b"HTTP/1.1 400", Err(ReplyError::Malformed)),
        (b"2x", Err(ReplyError::Malformed)),
        (b"250x", Err(ReplyError::Malformed)),
        (b"250\rx", Err(ReplyError::Malformed)),
        (b"2500 x\r\n", Err(ReplyError::Malformed)),
        (b"25\r\n", Err(ReplyError::Malformed)),
        (b"600 x\r\n", Err(ReplyError::Malformed)),
        (b"050 x\r\n", Err(ReplyError::Malformed)),
        (b"\r\n", Err(ReplyError::Malformed)),
        (b"250-a\r\nxyz\r\n", Err(ReplyError::Malformed)),
        (b"250-a\r\n251 b\r\n", Err(ReplyError::CodeMismatch)),
    ];
    for (input, want) in cases {
        assert_eq!(
            parse_reply(input),
            want,
            "{:?}",
            String::from_utf8_lossy(input)
        );
    }
}

#[test]
fn overlong_lines_and_replies() {
    let long = format!("250 {}\r\n", "x".repeat(MAX_REPLY_LINE));
    assert_eq!(parse_reply(long.as_bytes()), Err(ReplyError::LineTooLong));
    let partial = format!("250 {}", "x".repeat(MAX_REPLY_LINE));
    assert_eq!(
        parse_reply(partial.as_bytes()),
        Err(ReplyError::LineTooLong)
    );
    let fits = format!("250 {}\r\n", "x".repeat(MAX_REPLY_LINE - 6));
    assert!(parse_reply(fits.as_bytes()).unwrap().is_some());

    let many = "250-x\r\n".repeat(MAX_REPLY_LINES) + "250 x\r\n";
    assert_eq!(parse_reply(many.as_bytes()), Err(ReplyError::TooManyLines));
    let most = "250-x\r\n".repeat(MAX_REPLY_LINES - 1) + "250 x\r\n";
    assert_eq!(
        parse_reply(most.as_bytes()).unwrap().unwrap().0.lines.len(),
        MAX_REPLY_LINES
    );
}

#[test]
fn encode_table() {
    let e = |c, s, d| Some(EnhancedCode::new(c, s, d));
    let cases: Vec<(Reply, &str)> = vec![
        (Reply::new(250, None, "ok"), "250 ok\r\n"),
        (Reply::new(250, e(2, 0, 0), "ok"), "250 2.0.0 ok\r\n"),
        (Reply::new(250, e(2, 0, 0), ""), "250 2.0.0\r\n"),
        (Reply::new(354, None, "go ahead"), "354 go ahead\r\n"),
        (Reply::with_lines(250, None, vec![]), "250 \r\n"),
        (Reply::with_lines(250, e(2, 1, 5), vec![]), "250 2.1.5\r\n"),
        (
            Reply::with_lines(
                250,
                None,
                vec!["mx".into(), "PIPELINING".into(), "SIZE 10".into()],
            ),
            "250-mx\r\n250-PIPELINING\r\n250 SIZE 10\r\n",
        ),
        (
            Reply::with_lines(421, e(4, 3, 2), vec!["a".into(), "b".into()]),
            "421-4.3.2 a\r\n421 4.3.2 b\r\n",
        ),
        // line breaks in text cannot forge a second reply
        (Reply::new(550, None, "no\r\n250 ok"), "550 no  250 ok\r\n"),
    ];
    for (r, want) in cases {
        assert_eq!(String::from_utf8(r.to_bytes()).unwrap(), want);
    }
}

#[test]
fn text_display_and_class() {
    let r = Reply::with_lines(
        451,
        Some(EnhancedCode::new(4, 3, 0)),
        vec!["a".into(), "b".into()],
    );
    assert_eq!(r.text(), "a / b");
    assert_eq!(r.to_string(), "451 4.3.0 a / b");
    assert!(r.is_transient() && !r.is_success() && !r.is_permanent());
    assert_eq!(Reply::new(250, None, "").to_string(), "250");
    assert_eq!(Reply::new(550, None, "no").to_string(), "550 no");
    assert!(Reply::new(550, None, "no").is_permanent());
    assert!(Reply::new(250, None, "ok").is_success());
    assert_eq!(EnhancedCode::new(4, 3, 0).to_string(), "4.3.0");
}
