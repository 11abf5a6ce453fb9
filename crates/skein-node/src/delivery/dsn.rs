//! Delivery status notifications (RFC 3464): `multipart/report` messages
//! from the null sender to a message's sender, saying what became of some
//! of its recipients. Pure formatting: the reporter decides when to send.
//!
//! Much of what a notice says came from someone else: the envelope's ENVID
//! and ORCPT from the sender, diagnostics from remote servers. Whatever they
//! held, a notice is well-formed RFC 5322: CRLF line endings only, no
//! control characters in its fields, no line over 998 octets, and a
//! returned message no larger than the bounce size limit.

use std::fmt::Write;

use skein_queue::Message;
use skein_smtp::{Mailbox, Ret};

/// What the notice says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Failed,
    Delayed,
    Relayed,
    /// Delivered into the mailbox store (LMTP): Skein is the final MTA.
    Delivered,
}

impl Action {
    fn as_str(&self) -> &'static str {
        match self {
            Action::Failed => "failed",
            Action::Delayed => "delayed",
            Action::Relayed => "relayed",
            Action::Delivered => "delivered",
        }
    }
}

/// One recipient in a notice.
pub struct RecipientStatus<'a> {
    pub address: &'a Mailbox,
    /// The ORCPT parameter, `type;address`.
    pub orcpt: Option<&'a str>,
    /// The last reply or error text for this recipient.
    pub diagnostic: &'a str,
}

/// What a notice returns of the original message by default, in bytes
/// (Postfix's `bounce_size_limit` is 50000 too).
pub const BOUNCE_SIZE_LIMIT: usize = 50_000;

/// The longest field value or text line written: with its field name it
/// stays well under RFC 5322's 998 octets a line.
const MAX_FIELD: usize = 900;

pub struct Notice<'a> {
    pub action: Action,
    pub message: &'a Message,
    pub recipients: Vec<RecipientStatus<'a>>,
    /// The original message as queued.
    pub body: &'a [u8],
    /// This node's host name (Reporting-MTA, MAILER-DAEMON's domain).
    pub hostname: &'a str,
    /// The notice's queue id, used in its Message-ID.
    pub id: &'a str,
    /// RFC 5322 date of now.
    pub date: &'a str,
    /// For delays: when the message will be given up.
    pub retry_until: Option<&'a str>,
    /// The most of the original message returned: a larger message is
    /// returned as its header section, itself cut at this size.
    pub return_limit: usize,
}

/// `s` fit for one line of a notice: control characters (CR, LF, TAB, NUL,
/// ESC, ...) become spaces, and the text is cut at [`MAX_FIELD`] bytes on a
/// character boundary.
pub fn one_line(s: &str) -> String {
    let mut out = String::with_capacity(s.len().min(MAX_FIELD));
    for c in s.chars() {
        let c = if c.is_control() { ' ' } else { c };
        if out.len() + c.len_utf8() > MAX_FIELD {
            out.push_str("...");
            break;
        }
        out.push(c);
    }
    out
}

/// The first `max` bytes of `text` or fewer, cut after a CRLF.
fn cut_at_line(text: &[u8], max: usize) -> &[u8] {
    if text.len() <= max {
        return text;
    }
    let head = &text[..max];
    match head.windows(2).rposition(|w| w == b"\r\n") {
        Some(i) => &head[..i + 2],
        None => &[],
    }
}

/// The enhanced status code of a reply text such as "550 5.1.1 …", or a
/// generic one for the action.
fn status(action: Action, diagnostic: &str) -> String {
    let generic = match action {
        Action::Failed => "5.0.0",
        Action::Delayed => "4.0.0",
        Action::Relayed | Action::Delivered => "2.0.0",
    };
    let mut words = diagnostic.split_whitespace();
    let first = words.next().unwrap_or("");
    let second = words.next().unwrap_or("");
    let class = generic.as_bytes()[0];
    let looks_like = |s: &str| {
        let parts: Vec<&str> = s.split('.').collect();
        parts.len() == 3
            && parts
                .iter()
                .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()))
    };
    if first.len() == 3
        && first.bytes().all(|b| b.is_ascii_digit())
        && looks_like(second)
        && second.as_bytes()[0] == class
    {
        second.to_string()
    } else {
        generic.to_string()
    }
}

/// The header section of a message (up to and without the empty line).
fn headers(body: &[u8]) -> &[u8] {
    body.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| &body[..i + 2])
        .unwrap_or(body)
}

impl Notice<'_> {
    pub fn subject(&self) -> &'static str {
        match self.action {
            Action::Failed => "Undelivered Mail Returned to Sender",
            Action::Delayed => "Delayed Mail (still being retried)",
            Action::Relayed | Action::Delivered => "Successful Mail Delivery Report",
        }
    }

    /// The whole notice, CRLF line endings, ready to queue.
    pub fn render(&self) -> Vec<u8> {
        let m = self.message;
        let boundary = format!("{}/{}", self.id, self.hostname);
        let to = m.sender.to_string();
        let mut s = String::new();
        let _ = write!(
            s,
            "From: Mail Delivery System <MAILER-DAEMON@{host}>\r\n\
             To: <{to}>\r\n\
             Subject: {subject}\r\n\
             Date: {date}\r\n\
             Message-ID: <{id}@{host}>\r\n\
             Auto-Submitted: auto-replied\r\n\
             MIME-Version: 1.0\r\n\
             Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"{boundary}\"\r\n\
             \r\n\
             This is a MIME-encapsulated message.\r\n\
             \r\n\
             --{boundary}\r\n\
             Content-Type: text/plain; charset=utf-8\r\n\
             \r\n",
            host = self.hostname,
            subject = self.subject(),
            date = self.date,
            id = self.id,
        );
        s.push_str(&self.explanation());
        let _ = write!(
            s,
            "\r\n--{boundary}\r\nContent-Type: message/delivery-status\r\n\r\n"
        );
        let _ = write!(s, "Reporting-MTA: dns; {}\r\n", self.hostname);
        if let Some(envid) = &m.params.envid {
            let _ = write!(s, "Original-Envelope-Id: {}\r\n", one_line(envid));
        }
        let _ = write!(s, "X-Skein-Queue-ID: {}\r\n", m.id);
        let _ = write!(s, "Arrival-Date: {}\r\n", rfc2822(m.received_at));
        for r in &self.recipients {
            s.push_str("\r\n");
            if let Some(orcpt) = r.orcpt {
                let _ = write!(
                    s,
                    "Original-Recipient: {}\r\n",
                    one_line(&orcpt.replacen(';', "; ", 1))
                );
            }
            let _ = write!(
                s,
                "Final-Recipient: rfc822; {}\r\n",
                one_line(&r.address.to_string())
            );
            let _ = write!(s, "Action: {}\r\n", self.action.as_str());
            let _ = write!(s, "Status: {}\r\n", status(self.action, r.diagnostic));
            let diagnostic = one_line(r.diagnostic);
            if !diagnostic.trim().is_empty() {
                let _ = write!(s, "Diagnostic-Code: smtp; {diagnostic}\r\n");
            }
            if let Some(until) = self.retry_until {
                let _ = write!(s, "Will-Retry-Until: {until}\r\n");
            }
        }
        // RET=FULL is a request, not a promise: a message over the limit
        // comes back as its headers, as with Postfix's bounce_size_limit.
        let full = m.params.ret != Some(Ret::Hdrs) && self.body.len() <= self.return_limit;
        let (ctype, returned) = if full {
            ("message/rfc822", self.body)
        } else {
            (
                "text/rfc822-headers",
                cut_at_line(headers(self.body), self.return_limit),
            )
        };
        let _ = write!(s, "\r\n--{boundary}\r\nContent-Type: {ctype}\r\n\r\n");
        let mut out = s.into_bytes();
        out.extend_from_slice(returned);
        if !out.ends_with(b"\r\n") {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        out
    }

    fn explanation(&self) -> String {
        let mut s = format!("This is the mail system at host {}.\r\n\r\n", self.hostname);
        s.push_str(match self.action {
            Action::Failed => "I'm sorry to have to inform you that your message could not\r\nbe delivered to one or more recipients. It's attached below.\r\n",
            Action::Delayed => "Your message could not be delivered yet to one or more\r\nrecipients. Delivery will be retried; you do not need to resend it.\r\n",
            Action::Relayed => "Your message was delivered to the destination mail server, which\r\ndoes not offer delivery notifications, so none will follow.\r\n",
            Action::Delivered => "Your message was delivered to the recipient's mailbox.\r\n",
        });
        s.push_str("\r\n");
        for r in &self.recipients {
            s.push_str(&one_line(&format!("<{}>: {}", r.address, r.diagnostic)));
            s.push_str("\r\n");
        }
        s
    }
}

/// An RFC 5322 date for milliseconds since the epoch.
pub fn rfc2822(ms: u64) -> String {
    chrono::DateTime::from_timestamp_millis(ms as i64)
        .unwrap_or_default()
        .to_rfc2822()
}

#[cfg(test)]
mod tests {
    use skein_queue::{MessageId, RcptState, Recipient};
    use skein_smtp::{MailParams, RcptParams, ReversePath};

    use super::*;

    fn message(ret: Option<Ret>) -> Message {
        let rcpt = |a: &str| Recipient {
            address: Mailbox::parse(a).unwrap(),
            params: RcptParams::default(),
            state: RcptState::Pending,
            last_reply: None,
        };
        Message {
            id: MessageId(42),
            sender: ReversePath::Mailbox(Mailbox::parse("alice@example.net").unwrap()),
            recipients: vec![rcpt("bob@example.org"), rcpt("carol@example.org")],
            params: MailParams {
                ret,
                envid: Some("env-7".into()),
                ..Default::default()
            },
            size: 100,
            received_at: 1_700_000_000_000,
            accepted_by: 1,
            attempts: 1,
            next_attempt: 0,
            last_error: None,
            lease: None,
            held: false,
            warned: false,
        }
    }

    #[test]
    fn a_failure_notice_has_the_rfc_3464_parts_and_fields() {
        let m = message(Some(Ret::Hdrs));
        let body = b"Subject: original\r\nX-Y: z\r\n\r\nsecret body\r\n";
        let orcpt = "rfc822;bob@example.org";
        let n = Notice {
            action: Action::Failed,
            message: &m,
            recipients: vec![RecipientStatus {
                address: &m.recipients[0].address,
                orcpt: Some(orcpt),
                diagnostic: "550 5.1.1 no such user (mx.example.org[192.0.2.1])",
            }],
            body,
            hostname: "mx1.skein.test",
            id: "BOUNCEID",
            date: "Sun, 22 Nov 2026 09:00:00 +0000",
            retry_until: None,
            return_limit: BOUNCE_SIZE_LIMIT,
        };
        let text = String::from_utf8(n.render()).unwrap();
        for want in [
            "From: Mail Delivery System <MAILER-DAEMON@mx1.skein.test>\r\n",
            "To: <alice@example.net>\r\n",
            "Content-Type: multipart/report; report-type=delivery-status;",
            "Auto-Submitted: auto-replied\r\n",
            "Content-Type: message/delivery-status\r\n",
            "Reporting-MTA: dns; mx1.skein.test\r\n",
            "Original-Envelope-Id: env-7\r\n",
            "Original-Recipient: rfc822; bob@example.org\r\n",
            "Final-Recipient: rfc822; bob@example.org\r\n",
            "Action: failed\r\n",
            "Status: 5.1.1\r\n",
            "Diagnostic-Code: smtp; 550 5.1.1 no such user",
            "Content-Type: text/rfc822-headers\r\n\r\nSubject: original\r\nX-Y: z\r\n",
            "\r\n--BOUNCEID/mx1.skein.test--\r\n",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
        assert!(
            !text.contains("secret body"),
            "RET=HDRS returns headers only"
        );
        assert!(!text.contains("carol"), "only the recipients reported on");
        assert!(!text.contains("\n\r\n.\r\n") && !text.lines().any(|l| l.len() > 998));
    }

    #[test]
    fn ret_full_returns_the_whole_message_and_delays_say_until_when() {
        let m = message(Some(Ret::Full));
        let body = b"Subject: original\r\n\r\nsecret body\r\n";
        let n = Notice {
            action: Action::Delayed,
            message: &m,
            recipients: vec![RecipientStatus {
                address: &m.recipients[1].address,
                orcpt: None,
                diagnostic: "451 4.3.0 try later",
            }],
            body,
            hostname: "mx1.skein.test",
            id: "D",
            date: "Sun, 22 Nov 2026 09:00:00 +0000",
            retry_until: Some("Fri, 27 Nov 2026 09:00:00 +0000"),
            return_limit: BOUNCE_SIZE_LIMIT,
        };
        let text = String::from_utf8(n.render()).unwrap();
        assert!(text.contains(
            "Content-Type: message/rfc822\r\n\r\nSubject: original\r\n\r\nsecret body\r\n"
        ));
        assert!(text.contains("Action: delayed\r\nStatus: 4.3.0\r\n"));
        assert!(text.contains("Will-Retry-Until: Fri, 27 Nov 2026 09:00:00 +0000\r\n"));
        assert_eq!(n.subject(), "Delayed Mail (still being retried)");
    }

    #[test]
    fn ret_full_over_the_bounce_size_limit_returns_headers_only() {
        let m = message(Some(Ret::Full));
        let mut body = b"Subject: big\r\nX-Pad: 1\r\n\r\n".to_vec();
        while body.len() < 15_000_000 {
            body.extend_from_slice(&[b'x'; 998]);
            body.extend_from_slice(b"\r\n");
        }
        let n = Notice {
            action: Action::Failed,
            message: &m,
            recipients: vec![RecipientStatus {
                address: &m.recipients[0].address,
                orcpt: None,
                diagnostic: "550 5.1.1 no such user\r\nInjected: yes",
            }],
            body: &body,
            hostname: "mx1.skein.test",
            id: "B",
            date: "Sun, 22 Nov 2026 09:00:00 +0000",
            retry_until: None,
            return_limit: BOUNCE_SIZE_LIMIT,
        };
        let out = n.render();
        assert!(out.len() < 10_000, "a {} byte notice", out.len());
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains("Content-Type: text/rfc822-headers\r\n\r\nSubject: big\r\nX-Pad: 1\r\n")
        );
        assert!(!text.contains("\nInjected: yes"), "{text}");
        assert!(text.contains("no such user  Injected: yes"));

        // Headers alone over the limit are cut at a line.
        let mut headers = Vec::new();
        for i in 0..10_000 {
            headers.extend_from_slice(format!("X-H{i}: v\r\n").as_bytes());
        }
        headers.extend_from_slice(b"\r\nbody\r\n");
        let n = Notice {
            body: &headers,
            return_limit: 1000,
            ..n
        };
        let text = String::from_utf8(n.render()).unwrap();
        let returned = text.split("text/rfc822-headers\r\n\r\n").nth(1).unwrap();
        let returned = returned.split("\r\n--B/").next().unwrap();
        assert!(
            returned.len() <= 1002 && returned.ends_with("\r\n"),
            "{returned:?}"
        );
    }

    #[test]
    fn status_codes_come_from_the_reply_or_a_generic_one() {
        assert_eq!(status(Action::Failed, "550 5.7.1 relaying denied"), "5.7.1");
        assert_eq!(status(Action::Failed, "connect to x: refused"), "5.0.0");
        assert_eq!(
            status(Action::Failed, "550 4.1.1 mismatched class"),
            "5.0.0"
        );
        assert_eq!(status(Action::Delayed, "421 4.4.2 timeout"), "4.4.2");
    }
}

/// Whatever the envelope and the remote servers said, a notice is a
/// well-formed message: checked over arbitrary MAIL and RCPT parameters as
/// the front door admits them, arbitrary diagnostics and bodies.
#[cfg(test)]
mod properties {
    use proptest::prelude::*;
    use skein_queue::{MessageId, RcptState, Recipient};
    use skein_smtp::{parse_command_utf8, Command, MailParams, ReversePath};

    use super::*;

    /// xtext as a hostile sender writes it: escapes of any octet, raw text.
    fn xtext() -> impl Strategy<Value = String> {
        "(\\+[0-9A-F]{2}|[!-*,-<>-~]|[äß]){1,40}"
    }

    /// An arbitrary envelope, kept only where the parser admits it.
    fn envelope() -> impl Strategy<Value = Option<(ReversePath, MailParams, Vec<Recipient>)>> {
        (
            xtext(),
            prop_oneof![Just("FULL"), Just("HDRS")],
            proptest::collection::vec((xtext(), "[a-z]{1,8}"), 1..4),
            any::<bool>(),
        )
            .prop_map(|(envid, ret, rcpts, utf8)| {
                let mail = format!("MAIL FROM:<s@example.net> RET={ret} ENVID={envid}");
                let Ok(Command::Mail { from, params }) = parse_command_utf8(mail.as_bytes(), utf8)
                else {
                    return None;
                };
                let recipients = rcpts
                    .iter()
                    .filter_map(|(orcpt, local)| {
                        let line = format!(
                            "RCPT TO:<{local}@example.org> NOTIFY=FAILURE ORCPT=rfc822;{orcpt}"
                        );
                        match parse_command_utf8(line.as_bytes(), utf8) {
                            Ok(Command::Rcpt {
                                to: skein_smtp::ForwardPath::Mailbox(address),
                                params,
                            }) => Some(Recipient {
                                address,
                                params,
                                state: RcptState::Pending,
                                last_reply: None,
                            }),
                            _ => None,
                        }
                    })
                    .collect::<Vec<_>>();
                (!recipients.is_empty()).then_some((from, params, recipients))
            })
    }

    /// A body as the front door admits it: CRLF lines without NUL, bare CR
    /// or LF, of at most 998 octets.
    fn body() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec("[^\\r\\n\\x00]{0,120}", 0..60).prop_map(|lines| {
            let mut b = Vec::new();
            for l in lines {
                b.extend_from_slice(l.as_bytes());
                b.extend_from_slice(b"\r\n");
            }
            b
        })
    }

    fn check_well_formed(text: &[u8]) -> Result<(), String> {
        if skein_smtp::has_bare_line_endings(text) {
            return Err("bare CR or LF".into());
        }
        if text.contains(&0) {
            return Err("NUL".into());
        }
        if !text.ends_with(b"\r\n") {
            return Err("does not end with CRLF".into());
        }
        let lines: Vec<&[u8]> = text[..text.len() - 2].split(|&b| b == b'\n').collect();
        for l in &lines {
            if l.len() > 999 {
                return Err(format!("line of {} octets", l.len() - 1));
            }
        }
        // The header section: fields and their continuations up to the
        // first empty line.
        let mut in_header = true;
        for l in &lines {
            let l = l.strip_suffix(b"\r").unwrap_or(l);
            if !in_header {
                break;
            }
            if l.is_empty() {
                in_header = false;
            } else if !(l[0] == b' ' || l[0] == b'\t') {
                let colon = l
                    .iter()
                    .position(|&b| b == b':')
                    .ok_or("field without a colon")?;
                if colon == 0 || !l[..colon].iter().all(|b| (33..=126).contains(b)) {
                    return Err(format!(
                        "bad field name in {:?}",
                        String::from_utf8_lossy(l)
                    ));
                }
            }
        }
        if in_header {
            return Err("no end of the header section".into());
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        #[test]
        fn every_notice_is_well_formed(
            env in envelope(),
            diagnostics in proptest::collection::vec("([\\r\\n\\t\\x00\\x1b]|[ -~]{1,40}|é){0,60}", 1..4),
            body in body(),
            limit in 0usize..4000,
            action in prop_oneof![Just(Action::Failed), Just(Action::Delayed), Just(Action::Relayed), Just(Action::Delivered)],
        ) {
            let Some((sender, params, recipients)) = env else { return Ok(()) };
            let m = Message {
                id: MessageId(7),
                sender,
                recipients,
                params,
                size: body.len() as u64,
                received_at: 1_700_000_000_000,
                accepted_by: 1,
                attempts: 1,
                next_attempt: 0,
                last_error: None,
                lease: None,
                held: false,
                warned: false,
            };
            let statuses = m
                .recipients
                .iter()
                .zip(diagnostics.iter().cycle())
                .map(|(r, d)| RecipientStatus {
                    address: &r.address,
                    orcpt: r.params.orcpt.as_deref(),
                    diagnostic: d,
                })
                .collect();
            let n = Notice {
                action,
                message: &m,
                recipients: statuses,
                body: &body,
                hostname: "mx1.skein.test",
                id: "N1",
                date: "Sun, 22 Nov 2026 09:00:00 +0000",
                retry_until: Some("Fri, 27 Nov 2026 09:00:00 +0000"),
                return_limit: limit,
            };
            let text = n.render();
            if let Err(why) = check_well_formed(&text) {
                return Err(TestCaseError::fail(format!("{why}:\n{}", String::from_utf8_lossy(&text))));
            }
            // What is returned never exceeds the limit.
            let last = text.windows(14).rposition(|w| w == b"Content-Type: ").unwrap();
            let start = last + text[last..].windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
            let end = text.len() - b"\r\n--N1/mx1.skein.test--\r\n".len();
            let returned = end.saturating_sub(start);
            prop_assert!(returned <= limit + 2, "{} returned over a limit of {}", returned, limit);
        }
    }
}
