//! Property tests: encode → parse round trips, and no panics on any input.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use proptest::prelude::*;
use skein_smtp::*;

// ---- strategies -----------------------------------------------------------

fn local_part() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9!#$%&'*+/=?^_`{|}~-]{1,10}(\\.[a-zA-Z0-9+_-]{1,8}){0,2}",
        // quoted: qtext and quoted pairs, may hold @, space, >, <
        "\"([ !#-\\[\\]-~]|\\\\[ -~]){0,10}\"",
        // UTF-8 local parts (SMTPUTF8)
        "[a-zäöü]{1,8}",
    ]
}

fn domain() -> impl Strategy<Value = Domain> {
    let label = "[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?";
    prop_oneof![
        4 => proptest::collection::vec(label, 1..4).prop_map(|l| Domain::Name(l.join("."))),
        1 => "[a-zäöü]{1,8}\\.[a-z]{2,4}".prop_map(Domain::Name),
        1 => any::<[u8; 4]>().prop_map(|o| Domain::Literal(AddressLiteral::V4(Ipv4Addr::from(o)))),
        1 => any::<[u16; 8]>().prop_map(|s| Domain::Literal(AddressLiteral::V6(Ipv6Addr::from(s)))),
        1 => ("x-[a-z0-9]{1,5}", "[!-Z^-~]{1,10}").prop_map(|(tag, content)| {
            Domain::Literal(AddressLiteral::General { tag, content })
        }),
    ]
}

fn mailbox() -> impl Strategy<Value = Mailbox> {
    (local_part(), domain()).prop_map(|(local, domain)| Mailbox { local, domain })
}

fn other_params() -> impl Strategy<Value = Vec<(String, Option<String>)>> {
    let value = proptest::option::of("[!-<>-~]{1,10}");
    proptest::collection::btree_map("X-[A-Z0-9]{1,6}", value, 0..3)
        .prop_map(|m: BTreeMap<_, _>| m.into_iter().collect())
}

fn mail_params() -> impl Strategy<Value = MailParams> {
    let body = proptest::option::of(prop_oneof![
        Just(BodyType::SevenBit),
        Just(BodyType::EightBitMime),
        Just(BodyType::BinaryMime)
    ]);
    let ret = proptest::option::of(prop_oneof![Just(Ret::Full), Just(Ret::Hdrs)]);
    (
        proptest::option::of(any::<u64>()),
        body,
        any::<bool>(),
        ret,
        // xtext carries printable text only: controls are refused on entry
        proptest::option::of("[^\\p{Cc}]{1,20}"),
        proptest::option::of("[^\\p{Cc}]{1,20}"),
        other_params(),
    )
        .prop_map(
            |(size, body, smtputf8, ret, envid, auth, other)| MailParams {
                size,
                body,
                smtputf8,
                ret,
                envid,
                auth,
                other,
            },
        )
}

fn notify() -> impl Strategy<Value = Notify> {
    prop_oneof![
        Just(Notify {
            never: true,
            ..Default::default()
        }),
        (any::<bool>(), any::<bool>(), any::<bool>())
            .prop_filter("something set", |(s, f, d)| *s || *f || *d)
            .prop_map(|(success, failure, delay)| Notify {
                never: false,
                success,
                failure,
                delay
            }),
    ]
}

fn rcpt_params() -> impl Strategy<Value = RcptParams> {
    (
        proptest::option::of(notify()),
        proptest::option::of(
            ("[a-zA-Z0-9-]{1,8}", "[^\\p{Cc}]{1,30}").prop_map(|(t, a)| format!("{t};{a}")),
        ),
        other_params(),
    )
        .prop_map(|(notify, orcpt, other)| RcptParams {
            notify,
            orcpt,
            other,
        })
}

fn command() -> impl Strategy<Value = Command> {
    let word = "[!-~]{1,20}";
    let text = "[!-~]([ -~]{0,20}[!-~])?";
    prop_oneof![
        word.prop_map(Command::Ehlo),
        word.prop_map(Command::Helo),
        (
            proptest::option::of(mailbox())
                .prop_map(|m| m.map_or(ReversePath::Null, ReversePath::Mailbox)),
            mail_params()
        )
            .prop_map(|(from, params)| Command::Mail { from, params }),
        (
            proptest::option::of(mailbox())
                .prop_map(|m| m.map_or(ForwardPath::Postmaster, ForwardPath::Mailbox)),
            rcpt_params()
        )
            .prop_map(|(to, params)| Command::Rcpt { to, params }),
        Just(Command::Data),
        (any::<u64>(), any::<bool>()).prop_map(|(size, last)| Command::Bdat { size, last }),
        Just(Command::Rset),
        Just(Command::Noop),
        Just(Command::Quit),
        text.prop_map(Command::Vrfy),
        text.prop_map(Command::Expn),
        proptest::option::of(text).prop_map(Command::Help),
        Just(Command::StartTls),
        (
            "[A-Z0-9_-]{1,20}",
            proptest::option::of("[A-Za-z0-9+/=]{1,40}")
        )
            .prop_map(|(mechanism, initial)| Command::Auth { mechanism, initial }),
    ]
}

fn reply() -> impl Strategy<Value = Reply> {
    let code = (1u16..=5, 0u16..=5, 0u16..=9).prop_map(|(a, b, c)| a * 100 + b * 10 + c);
    let lines = proptest::collection::vec("([A-Za-z][ -~]{0,40})?", 1..6);
    (code, any::<bool>(), 0u16..1000, 0u16..1000, lines).prop_map(
        |(code, enh, subject, detail, lines)| {
            let class = (code / 100) as u8;
            let enhanced = (enh && matches!(class, 2 | 4 | 5))
                .then(|| EnhancedCode::new(class, subject, detail));
            Reply::with_lines(code, enhanced, lines)
        },
    )
}

/// Bytes rich in the characters that matter to the DATA reader.
fn data_bytes() -> impl Strategy<Value = Vec<u8>> {
    let byte = prop_oneof![
        3 => Just(b'.'),
        3 => Just(b'\r'),
        3 => Just(b'\n'),
        1 => Just(0u8),
        4 => any::<u8>(),
    ];
    proptest::collection::vec(byte, 0..200)
}

fn crlf_body() -> impl Strategy<Value = Vec<u8>> {
    let line = proptest::collection::vec(
        prop_oneof![3 => Just(b'.'), 1 => Just(b'\n'), 1 => Just(b'\r'), 4 => any::<u8>()],
        0..20,
    );
    proptest::collection::vec(line, 0..10).prop_map(|lines| {
        let mut body = Vec::new();
        for l in lines {
            body.extend_from_slice(&l);
            body.extend_from_slice(b"\r\n");
        }
        body
    })
}

/// Reads `wire` in two pieces split at `cut`; returns (body, consumed, done).
fn read_data(wire: &[u8], cut: usize) -> (Vec<u8>, usize, bool) {
    let mut reader = DataReader::new(usize::MAX);
    let mut out = Vec::new();
    let cut = cut.min(wire.len());
    let first = reader.feed(&wire[..cut], &mut out);
    if first.done {
        return (out, first.consumed, true);
    }
    let second = reader.feed(&wire[cut..], &mut out);
    (out, cut + second.consumed, second.done)
}

// ---- properties -----------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn command_round_trip(cmd in command()) {
        let wire = cmd.to_bytes();
        prop_assert!(wire.ends_with(b"\r\n"));
        let line = &wire[..wire.len() - 2];
        prop_assert!(line.len() < 1000);
        let utf8 = !line.is_ascii();
        prop_assert_eq!(parse_command_utf8(line, utf8), Ok(cmd.clone()));
        if !utf8 {
            prop_assert_eq!(parse_command(line), Ok(cmd));
        }
    }

    #[test]
    fn mailbox_display_round_trip(m in mailbox()) {
        prop_assert_eq!(Mailbox::parse(&m.to_string()), Ok(m));
    }

    #[test]
    fn reply_round_trip(r in reply(), trailing in proptest::collection::vec(any::<u8>(), 0..10)) {
        let wire = r.to_bytes();
        let mut buf = wire.clone();
        buf.extend_from_slice(&trailing);
        prop_assert_eq!(parse_reply(&buf), Ok(Some((r, wire.len()))));
        // every proper prefix is "need more bytes"
        for cut in 0..wire.len() {
            prop_assert_eq!(parse_reply(&wire[..cut]), Ok(None));
        }
    }

    #[test]
    fn dot_stuff_round_trip_crlf_bodies(body in crlf_body(), cut in any::<usize>(), tail in data_bytes()) {
        let mut wire = Vec::new();
        dot_stuff(&body, &mut wire);
        let end = wire.len();
        wire.extend_from_slice(&tail); // pipelined bytes must stay untouched
        let cut = cut % (wire.len() + 1);
        prop_assert_eq!(read_data(&wire, cut), (body, end, true));
    }

    #[test]
    fn dot_stuff_round_trip_any_bytes(body in data_bytes(), cut in any::<usize>()) {
        let mut wire = Vec::new();
        dot_stuff(&body, &mut wire);
        let mut want = body.clone();
        if !want.is_empty() && !want.ends_with(b"\r\n") {
            want.extend_from_slice(b"\r\n");
        }
        let cut = cut % (wire.len() + 1);
        prop_assert_eq!(read_data(&wire, cut), (want, wire.len(), true));
    }

    #[test]
    fn normalized_bodies_have_no_bare_endings(body in data_bytes()) {
        let mut out = Vec::new();
        normalize_line_endings(&body, &mut out);
        prop_assert!(!has_bare_line_endings(&out));
        if !has_bare_line_endings(&body) {
            prop_assert_eq!(out, body);
        }
    }

    #[test]
    fn data_reader_split_invariance(input in data_bytes(), cut in any::<usize>()) {
        let whole = read_data(&input, input.len());
        prop_assert_eq!(read_data(&input, cut % (input.len() + 1)), whole.clone());
        // one byte at a time
        let mut reader = DataReader::new(usize::MAX);
        let mut out = Vec::new();
        let mut consumed = 0;
        let mut done = false;
        for b in &input {
            let p = reader.feed(std::slice::from_ref(b), &mut out);
            consumed += p.consumed;
            if p.done {
                done = true;
                break;
            }
        }
        prop_assert_eq!((out, consumed, done), whole);
    }

    #[test]
    fn parsers_never_panic(input in proptest::collection::vec(any::<u8>(), 0..600), utf8 in any::<bool>()) {
        let _ = parse_reply(&input);
        let _ = parse_command_utf8(&input, utf8);
        let _ = next_line(&input, MAX_COMMAND_LINE);
        let mut out = Vec::new();
        let p = DataReader::new(16).feed(&input, &mut out);
        prop_assert!(p.consumed <= input.len());
        prop_assert!(out.len() <= 16);
        let text = String::from_utf8_lossy(&input);
        let _ = Mailbox::parse(&text);
        let _ = Domain::parse(&text);
        let _ = xtext_decode(&text);
    }

    #[test]
    fn xtext_decodes_to_printable_text_only(text in "(\\+[0-9A-Fa-f]{2}|[ -~]|[äö\u{85}\u{2028}]){0,40}") {
        if let Some(decoded) = xtext_decode(&text) {
            prop_assert!(!decoded.chars().any(char::is_control), "{:?} -> {:?}", text, decoded);
        }
    }

    #[test]
    fn xtext_round_trips_printable_text(text in "[^\\p{Cc}]{0,40}") {
        let mut wire = String::new();
        xtext_encode(&text, &mut wire);
        prop_assert!(!wire.contains(|c: char| c == ' ' || c == '=' || c.is_control()));
        prop_assert_eq!(xtext_decode(&wire), Some(text));
    }

    #[test]
    fn smtp_shaped_lines_never_panic(
        verb in prop_oneof![Just("MAIL FROM:"), Just("RCPT TO:"), Just("EHLO "), Just("BDAT "), Just("AUTH ")],
        rest in "[<>@\\[\\]:,.\"\\\\a-zA-Z0-9 =+;äö-]{0,60}",
        utf8 in any::<bool>(),
    ) {
        let line = format!("{verb}{rest}");
        if let Ok(cmd) = parse_command_utf8(line.as_bytes(), utf8) {
            // whatever parses must survive its own encoding
            let wire = cmd.to_bytes();
            prop_assert_eq!(parse_command_utf8(&wire[..wire.len() - 2], true), Ok(cmd));
        }
    }
}
