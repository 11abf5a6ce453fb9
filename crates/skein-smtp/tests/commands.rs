//! Command parsing: a table of lines and what each must give.

use skein_smtp::*;

fn mb(s: &str) -> Mailbox {
    Mailbox::parse(s).unwrap()
}

fn mail(from: &str) -> Command {
    mail_p(from, MailParams::default())
}

fn mail_p(from: &str, params: MailParams) -> Command {
    let from = if from.is_empty() {
        ReversePath::Null
    } else {
        ReversePath::Mailbox(mb(from))
    };
    Command::Mail { from, params }
}

fn rcpt(to: &str) -> Command {
    rcpt_p(to, RcptParams::default())
}

fn rcpt_p(to: &str, params: RcptParams) -> Command {
    Command::Rcpt {
        to: ForwardPath::Mailbox(mb(to)),
        params,
    }
}

type Case = (&'static str, Result<Command, CommandError>);

fn check(cases: Vec<Case>, utf8: bool) {
    for (line, want) in cases {
        assert_eq!(parse_command_utf8(line.as_bytes(), utf8), want, "{line:?}");
    }
}

#[test]
fn simple_verbs() {
    use CommandError::*;
    check(
        vec![
            (
                "EHLO mx.example.org",
                Ok(Command::Ehlo("mx.example.org".into())),
            ),
            ("ehlo [192.0.2.1]", Ok(Command::Ehlo("[192.0.2.1]".into()))),
            ("HeLo MY_PC", Ok(Command::Helo("MY_PC".into()))),
            ("EHLO   x.org  \t", Ok(Command::Ehlo("x.org".into()))),
            ("EHLO", Err(Syntax("domain name required"))),
            ("EHLO ", Err(Syntax("domain name required"))),
            ("EHLO a b", Err(Syntax("invalid domain name"))),
            ("EHLO bücher.de", Err(Syntax("invalid domain name"))),
            ("DATA", Ok(Command::Data)),
            ("data ", Ok(Command::Data)),
            ("DATA x", Err(Syntax("DATA takes no arguments"))),
            ("RSET", Ok(Command::Rset)),
            ("RSET x", Err(Syntax("RSET takes no arguments"))),
            ("NOOP", Ok(Command::Noop)),
            ("NOOP anything at all", Ok(Command::Noop)),
            ("QUIT", Ok(Command::Quit)),
            ("quit\t", Ok(Command::Quit)),
            ("QUIT now", Err(Syntax("QUIT takes no arguments"))),
            ("STARTTLS", Ok(Command::StartTls)),
            ("StartTLS x", Err(Syntax("STARTTLS takes no arguments"))),
            ("VRFY postmaster", Ok(Command::Vrfy("postmaster".into()))),
            ("VRFY", Err(Syntax("VRFY requires an argument"))),
            ("EXPN staff list", Ok(Command::Expn("staff list".into()))),
            ("EXPN", Err(Syntax("EXPN requires an argument"))),
            ("VRFY jörg", Err(Syntax("non-ASCII argument"))),
            ("HELP", Ok(Command::Help(None))),
            ("HELP MAIL", Ok(Command::Help(Some("MAIL".into())))),
            (
                "BDAT 100",
                Ok(Command::Bdat {
                    size: 100,
                    last: false,
                }),
            ),
            (
                "bdat 0 last",
                Ok(Command::Bdat {
                    size: 0,
                    last: true,
                }),
            ),
            ("BDAT", Err(Syntax("expected BDAT size [LAST]"))),
            ("BDAT x", Err(Syntax("expected BDAT size [LAST]"))),
            ("BDAT -1", Err(Syntax("expected BDAT size [LAST]"))),
            ("BDAT 1 FIRST", Err(Syntax("expected BDAT size [LAST]"))),
            ("BDAT 1 LAST x", Err(Syntax("expected BDAT size [LAST]"))),
            (
                "BDAT 99999999999999999999999",
                Err(Syntax("expected BDAT size [LAST]")),
            ),
            (
                "AUTH PLAIN",
                Ok(Command::Auth {
                    mechanism: "PLAIN".into(),
                    initial: None,
                }),
            ),
            (
                "auth plain AHVzZXIAcGFzcw==",
                Ok(Command::Auth {
                    mechanism: "PLAIN".into(),
                    initial: Some("AHVzZXIAcGFzcw==".into()),
                }),
            ),
            (
                "AUTH PLAIN =",
                Ok(Command::Auth {
                    mechanism: "PLAIN".into(),
                    initial: Some("=".into()),
                }),
            ),
            ("AUTH", Err(Syntax("mechanism required"))),
            ("AUTH PL@IN", Err(Syntax("invalid mechanism"))),
            (
                "AUTH ABCDEFGHIJKLMNOPQRSTU",
                Err(Syntax("invalid mechanism")),
            ),
            ("AUTH PLAIN a!b", Err(Syntax("invalid initial response"))),
            ("AUTH PLAIN a b", Err(Syntax("invalid initial response"))),
            ("", Err(Unrecognized)),
            ("   ", Err(Unrecognized)),
            ("FOO", Err(Unrecognized)),
            ("MAILFROM:<a@b.c>", Err(Unrecognized)),
            ("DATAX", Err(Unrecognized)),
            ("NOOP\tx", Err(Unrecognized)),
            ("EHLO a\rb", Err(Syntax("control character in command"))),
            ("VRFY a\0b", Err(Syntax("control character in command"))),
        ],
        false,
    );
}

#[test]
fn mail_from() {
    use CommandError::*;
    let all = MailParams {
        size: Some(12345),
        body: Some(BodyType::EightBitMime),
        smtputf8: false,
        ret: Some(Ret::Hdrs),
        envid: Some("QQ314159 x=y+z".into()),
        auth: Some("<>".into()),
        other: vec![
            ("X-FOO".into(), Some("bar".into())),
            ("X-FLAG".into(), None),
        ],
    };
    let long_local = Box::leak(format!("MAIL FROM:<{}@x.org>", "a".repeat(65)).into_boxed_str());
    let long_path = Box::leak(
        format!(
            "MAIL FROM:<{}@{}.{}.{}.org>",
            "a".repeat(64),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(63)
        )
        .into_boxed_str(),
    );
    let long_domain = Box::leak(format!("MAIL FROM:<a@{}.org>", "b".repeat(64)).into_boxed_str());
    check(
        vec![
            ("MAIL FROM:<user@example.org>", Ok(mail("user@example.org"))),
            ("mail from:<user@Example.ORG>", Ok(mail("user@example.org"))),
            ("MAIL FROM: <user@example.org>", Ok(mail("user@example.org"))),
            ("MAIL  FROM:<user@example.org>  ", Ok(mail("user@example.org"))),
            ("MAIL FROM:<>", Ok(mail(""))),
            ("MAIL FROM:<@relay.org:user@example.org>", Ok(mail("user@example.org"))),
            ("MAIL FROM:<@a.org,@[192.0.2.1]:user@example.org>", Ok(mail("user@example.org"))),
            ("MAIL FROM:<\"john@home\"@example.org>", Ok(mail("\"john@home\"@example.org"))),
            ("MAIL FROM:<\"a>b\"@example.org>", Ok(mail("\"a>b\"@example.org"))),
            ("MAIL FROM:<user@[192.0.2.1]>", Ok(mail("user@[192.0.2.1]"))),
            ("MAIL FROM:<user@[IPv6:2001:db8::1]>", Ok(mail("user@[IPv6:2001:db8::1]"))),
            (
                "MAIL FROM:<a@b.org> SIZE=12345 BODY=8bitmime RET=hdrs ENVID=QQ314159+20x+3Dy+2Bz AUTH=<> X-FOO=bar x-flag",
                Ok(mail_p("a@b.org", all)),
            ),
            (
                "MAIL FROM:<a@b.org> BODY=7BIT",
                Ok(mail_p("a@b.org", MailParams { body: Some(BodyType::SevenBit), ..Default::default() })),
            ),
            (
                "MAIL FROM:<a@b.org> BODY=BINARYMIME RET=FULL",
                Ok(mail_p(
                    "a@b.org",
                    MailParams { body: Some(BodyType::BinaryMime), ret: Some(Ret::Full), ..Default::default() },
                )),
            ),
            (
                "MAIL FROM:<a@b.org> AUTH=user+40b.org",
                Ok(mail_p("a@b.org", MailParams { auth: Some("user@b.org".into()), ..Default::default() })),
            ),
            ("MAIL FROM:<a@b.org> SIZE=abc", Err(Syntax("invalid SIZE value"))),
            ("MAIL FROM:<a@b.org> SIZE", Err(Syntax("invalid SIZE value"))),
            ("MAIL FROM:<a@b.org> SIZE=-1", Err(Syntax("invalid SIZE value"))),
            ("MAIL FROM:<a@b.org> SIZE=99999999999999999999", Err(Syntax("invalid SIZE value"))),
            ("MAIL FROM:<a@b.org> BODY=foo", Err(Syntax("invalid BODY value"))),
            ("MAIL FROM:<a@b.org> RET=ALL", Err(Syntax("invalid RET value"))),
            ("MAIL FROM:<a@b.org> ENVID=a+2", Err(Syntax("invalid ENVID value"))),
            // smuggling through a bounce: CR, LF, NUL never decode
            ("MAIL FROM:<a@b.org> ENVID=a+0A.+0D+0AMAIL+20FROM:<x@y.org>", Err(Syntax("invalid ENVID value"))),
            ("MAIL FROM:<a@b.org> ENVID=a+0Db", Err(Syntax("invalid ENVID value"))),
            ("MAIL FROM:<a@b.org> ENVID=a+00b", Err(Syntax("invalid ENVID value"))),
            ("MAIL FROM:<a@b.org> AUTH=a+0Ab", Err(Syntax("invalid AUTH value"))),
            ("MAIL FROM:<a@b.org> SMTPUTF8=yes", Err(Syntax("SMTPUTF8 takes no value"))),
            ("MAIL FROM:<a@b.org> SIZE=1 size=2", Err(Syntax("duplicate parameter"))),
            ("MAIL FROM:<a@b.org> X=1 X", Err(Syntax("duplicate parameter"))),
            ("MAIL FROM:<a@b.org> SIZE=", Err(Syntax("invalid parameter value"))),
            ("MAIL FROM:<a@b.org> X=a=b", Err(Syntax("invalid parameter value"))),
            ("MAIL FROM:<a@b.org> =1", Err(Syntax("invalid parameter keyword"))),
            ("MAIL FROM:<a@b.org> -X=1", Err(Syntax("invalid parameter keyword"))),
            ("MAIL FROM:<a@b.org> X_Y=1", Err(Syntax("invalid parameter keyword"))),
            ("MAIL FROM:<a@b.org>SIZE=1", Err(BadSender("junk after address"))),
            ("MAIL FROM:a@b.org", Err(BadSender("address must be in angle brackets"))),
            ("MAIL FROM:<a@b.org", Err(BadSender("unterminated address"))),
            ("MAIL FROM:", Err(BadSender("address must be in angle brackets"))),
            ("MAIL TO:<a@b.org>", Err(Syntax("expected FROM:<address>"))),
            ("MAIL", Err(Syntax("expected FROM:<address>"))),
            ("MAIL FROM:<a>", Err(BadSender("missing @domain"))),
            ("MAIL FROM:<a@b.org.>", Err(BadSender("empty domain label"))),
            ("MAIL FROM:<a@-b.org>", Err(BadSender("invalid domain"))),
            ("MAIL FROM:<a@[300.1.1.1]>", Err(BadSender("invalid IPv4 address literal"))),
            ("MAIL FROM:<@a.org user@b.org>", Err(BadSender("invalid source route"))),
            ("MAIL FROM:<Postmaster>", Err(BadSender("missing @domain"))),
            (long_local, Err(BadSender("local part too long"))),
            (long_domain, Err(BadSender("domain label too long"))),
            (long_path, Err(BadSender("path too long"))),
        ],
        false,
    );
}

#[test]
fn rcpt_to() {
    use CommandError::*;
    let notify = |never, success, failure, delay| {
        Some(Notify {
            never,
            success,
            failure,
            delay,
        })
    };
    check(
        vec![
            ("RCPT TO:<user@example.org>", Ok(rcpt("user@example.org"))),
            ("rcpt to: <USER@example.org> ", Ok(rcpt("USER@example.org"))),
            (
                "RCPT TO:<Postmaster>",
                Ok(Command::Rcpt {
                    to: ForwardPath::Postmaster,
                    params: RcptParams::default(),
                }),
            ),
            (
                "RCPT TO:<postMASTER>",
                Ok(Command::Rcpt {
                    to: ForwardPath::Postmaster,
                    params: RcptParams::default(),
                }),
            ),
            ("RCPT TO:<postmaster@x.org>", Ok(rcpt("postmaster@x.org"))),
            (
                "RCPT TO:<@hosta.int,@jkl.org:userc@d.bar.org>",
                Ok(rcpt("userc@d.bar.org")),
            ),
            (
                "RCPT TO:<a@b.org> NOTIFY=SUCCESS,failure ORCPT=rfc822;a+2Bx@b.org",
                Ok(rcpt_p(
                    "a@b.org",
                    RcptParams {
                        notify: notify(false, true, true, false),
                        orcpt: Some("rfc822;a+x@b.org".into()),
                        other: vec![],
                    },
                )),
            ),
            (
                "RCPT TO:<a@b.org> NOTIFY=NEVER",
                Ok(rcpt_p(
                    "a@b.org",
                    RcptParams {
                        notify: notify(true, false, false, false),
                        ..Default::default()
                    },
                )),
            ),
            (
                "RCPT TO:<a@b.org> NOTIFY=DELAY X-Y=z",
                Ok(rcpt_p(
                    "a@b.org",
                    RcptParams {
                        notify: notify(false, false, false, true),
                        other: vec![("X-Y".into(), Some("z".into()))],
                        ..Default::default()
                    },
                )),
            ),
            (
                "RCPT TO:<a@b.org> NOTIFY=NEVER,SUCCESS",
                Err(Syntax("invalid NOTIFY value")),
            ),
            (
                "RCPT TO:<a@b.org> NOTIFY=SUCCESS,SUCCESS",
                Err(Syntax("invalid NOTIFY value")),
            ),
            (
                "RCPT TO:<a@b.org> NOTIFY=SOMETIMES",
                Err(Syntax("invalid NOTIFY value")),
            ),
            (
                "RCPT TO:<a@b.org> NOTIFY=SUCCESS,",
                Err(Syntax("invalid NOTIFY value")),
            ),
            (
                "RCPT TO:<a@b.org> NOTIFY",
                Err(Syntax("invalid NOTIFY value")),
            ),
            (
                "RCPT TO:<a@b.org> ORCPT=a@b.org",
                Err(Syntax("invalid ORCPT value")),
            ),
            (
                "RCPT TO:<a@b.org> ORCPT=;a@b.org",
                Err(Syntax("invalid ORCPT value")),
            ),
            (
                "RCPT TO:<a@b.org> ORCPT=rfc822;x+0D+0AInjected:+20yes",
                Err(Syntax("invalid ORCPT value")),
            ),
            (
                "RCPT TO:<a@b.org> NOTIFY=NEVER notify=NEVER",
                Err(Syntax("duplicate parameter")),
            ),
            ("RCPT TO:<>", Err(BadRecipient("null recipient"))),
            (
                "RCPT TO:a@b.org",
                Err(BadRecipient("address must be in angle brackets")),
            ),
            (
                "RCPT TO:<a@b..org>",
                Err(BadRecipient("empty domain label")),
            ),
            (
                "RCPT TO:<a b@b.org>",
                Err(BadRecipient("invalid local part")),
            ),
            ("RCPT FROM:<a@b.org>", Err(Syntax("expected TO:<address>"))),
        ],
        false,
    );
}

#[test]
fn non_ascii_needs_smtputf8() {
    use CommandError::*;
    let utf8_mail = |from: &str| {
        mail_p(
            from,
            MailParams {
                smtputf8: true,
                ..Default::default()
            },
        )
    };
    // (line, session allows UTF-8, expected)
    let cases: Vec<(&str, bool, Result<Command, CommandError>)> = vec![
        ("MAIL FROM:<jörg@bücher.de>", false, Err(NonAscii)),
        (
            "MAIL FROM:<jörg@bücher.de> SMTPUTF8",
            false,
            Ok(utf8_mail("jörg@bücher.de")),
        ),
        (
            "MAIL FROM:<jörg@x.de> smtputf8",
            false,
            Ok(utf8_mail("jörg@x.de")),
        ),
        (
            "MAIL FROM:<j@Bücher.DE> SMTPUTF8",
            false,
            Ok(utf8_mail("j@bücher.de")),
        ),
        (
            "MAIL FROM:<\"jö rg\"@x.de> SMTPUTF8",
            false,
            Ok(utf8_mail("\"jö rg\"@x.de")),
        ),
        ("MAIL FROM:<@bücher.de:j@x.de>", false, Err(NonAscii)),
        (
            "MAIL FROM:<j@x.de> X=ü",
            false,
            Err(Syntax("invalid parameter value")),
        ),
        ("RCPT TO:<jörg@bücher.de>", false, Err(NonAscii)),
        ("RCPT TO:<jörg@bücher.de>", true, Ok(rcpt("jörg@bücher.de"))),
        ("VRFY jörg", true, Ok(Command::Vrfy("jörg".into()))),
        ("EHLO bücher.de", true, Err(Syntax("invalid domain name"))),
    ];
    for (line, utf8, want) in cases {
        assert_eq!(
            parse_command_utf8(line.as_bytes(), utf8),
            want,
            "{line:?} utf8={utf8}"
        );
    }
    assert_eq!(
        parse_command("RCPT TO:<jörg@x.de>".as_bytes()),
        Err(NonAscii)
    );
    // 8-bit bytes that are not UTF-8 at all
    let latin1: &[u8] = b"MAIL FROM:<j\xf6rg@x.de>";
    assert_eq!(parse_command(latin1), Err(NonAscii));
    assert_eq!(
        parse_command_utf8(b"RCPT TO:<j\xf6rg@x.de>", true),
        Err(Syntax("invalid UTF-8"))
    );
    assert_eq!(parse_command(b"EHLO h\xf6st"), Err(Syntax("invalid UTF-8")));
    assert_eq!(parse_command(b"\xf6HLO x"), Err(Unrecognized));
}

#[test]
fn error_replies() {
    let cases = [
        (CommandError::Unrecognized, 500, "5.5.2"),
        (CommandError::Syntax("x"), 501, "5.5.4"),
        (CommandError::BadSender("x"), 501, "5.1.7"),
        (CommandError::BadRecipient("x"), 501, "5.1.3"),
        (CommandError::UnknownParameter("X-FOO".into()), 555, "5.5.4"),
        (CommandError::NonAscii, 553, "5.6.7"),
    ];
    for (err, code, enhanced) in cases {
        let reply = err.reply();
        assert_eq!(reply.code, code, "{err:?}");
        assert_eq!(reply.enhanced.unwrap().to_string(), enhanced, "{err:?}");
        assert!(reply.is_permanent());
    }
    let reply = CommandError::UnknownParameter("X-FOO\r\n250 ok".into()).reply();
    assert_eq!(reply.text(), "Unsupported parameter X-FOO250ok");
    assert_eq!(
        CommandError::Syntax("bad thing").reply().text(),
        "Syntax error: bad thing"
    );
}

#[test]
fn encode_examples() {
    let cases: Vec<(Command, &str)> = vec![
        (Command::Ehlo("mx.x.org".into()), "EHLO mx.x.org\r\n"),
        (mail(""), "MAIL FROM:<>\r\n"),
        (
            mail_p(
                "a@b.org",
                MailParams {
                    size: Some(10),
                    body: Some(BodyType::EightBitMime),
                    smtputf8: true,
                    envid: Some("a b+c".into()),
                    ..Default::default()
                },
            ),
            "MAIL FROM:<a@b.org> SIZE=10 BODY=8BITMIME SMTPUTF8 ENVID=a+20b+2Bc\r\n",
        ),
        (
            rcpt_p(
                "a@b.org",
                RcptParams {
                    notify: Some(Notify {
                        success: true,
                        delay: true,
                        ..Default::default()
                    }),
                    orcpt: Some("rfc822;a=b@c.org".into()),
                    other: vec![],
                },
            ),
            "RCPT TO:<a@b.org> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;a+3Db@c.org\r\n",
        ),
        (
            rcpt_p(
                "a@b.org",
                RcptParams {
                    notify: Some(Notify::default()),
                    ..Default::default()
                },
            ),
            "RCPT TO:<a@b.org> NOTIFY=NEVER\r\n",
        ),
        (
            Command::Rcpt {
                to: ForwardPath::Postmaster,
                params: RcptParams::default(),
            },
            "RCPT TO:<Postmaster>\r\n",
        ),
        (
            Command::Bdat {
                size: 5,
                last: true,
            },
            "BDAT 5 LAST\r\n",
        ),
        (Command::StartTls, "STARTTLS\r\n"),
        (Command::Help(None), "HELP\r\n"),
        (
            Command::Auth {
                mechanism: "PLAIN".into(),
                initial: Some("AA==".into()),
            },
            "AUTH PLAIN AA==\r\n",
        ),
    ];
    for (cmd, want) in cases {
        assert_eq!(String::from_utf8(cmd.to_bytes()).unwrap(), want);
    }
}
