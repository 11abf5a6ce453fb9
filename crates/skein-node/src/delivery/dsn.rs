//! Delivery status notifications (RFC 3464): `multipart/report` messages
//! from the null sender to a message's sender, saying what became of some
//! of its recipients. Pure formatting: the reporter decides when to send.

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

/// Bodies above this size are returned as headers only unless the sender
/// asked for RET=FULL (Postfix's bounce_size_limit is 50000 too).
const FULL_RETURN_LIMIT: usize = 50_000;

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
            let _ = write!(s, "Original-Envelope-Id: {envid}\r\n");
        }
        let _ = write!(s, "X-Skein-Queue-ID: {}\r\n", m.id);
        let _ = write!(s, "Arrival-Date: {}\r\n", rfc2822(m.received_at));
        for r in &self.recipients {
            s.push_str("\r\n");
            if let Some(orcpt) = r.orcpt {
                let _ = write!(
                    s,
                    "Original-Recipient: {}\r\n",
                    orcpt.replacen(';', "; ", 1)
                );
            }
            let _ = write!(s, "Final-Recipient: rfc822; {}\r\n", r.address);
            let _ = write!(s, "Action: {}\r\n", self.action.as_str());
            let _ = write!(s, "Status: {}\r\n", status(self.action, r.diagnostic));
            let diagnostic: String = r
                .diagnostic
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect();
            if !diagnostic.is_empty() {
                let _ = write!(s, "Diagnostic-Code: smtp; {diagnostic}\r\n");
            }
            if let Some(until) = self.retry_until {
                let _ = write!(s, "Will-Retry-Until: {until}\r\n");
            }
        }
        let full = match m.params.ret {
            Some(Ret::Full) => true,
            Some(Ret::Hdrs) => false,
            None => self.body.len() <= FULL_RETURN_LIMIT,
        };
        let (ctype, returned) = if full {
            ("message/rfc822", self.body)
        } else {
            ("text/rfc822-headers", headers(self.body))
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
            s.push_str(&format!("<{}>: {}\r\n", r.address, r.diagnostic));
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
