//! One delivery job in, one result per recipient out.

use bytes::Bytes;
use skein_smtp::{MailParams, Mailbox, RcptParams, ReversePath};

/// A message to the recipients of one destination domain.
#[derive(Clone, Debug)]
pub struct Job {
    /// The queue id, carried in tracing spans.
    pub id: String,
    /// Lowercase domain, or an address literal such as `[127.0.0.1]` or
    /// `[IPv6:::1]`.
    pub domain: String,
    pub sender: ReversePath,
    /// The submitter's MAIL parameters. BODY and SMTPUTF8 are passed on when
    /// the peer offers them; RET and ENVID when it offers DSN. SIZE is always
    /// recomputed from `body`.
    pub params: MailParams,
    pub recipients: Vec<(Mailbox, RcptParams)>,
    /// The message, unstuffed, with CRLF line endings.
    pub body: Bytes,
}

/// What happened to one recipient. `reply` is the text an operator wants
/// to see: the server's reply with the host it came from, or our own
/// description of what went wrong (DNS, connection, timeout).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RcptResult {
    /// The host accepted the message for this recipient.
    Delivered {
        reply: String,
        host: String,
        /// The session ran over TLS.
        tls: bool,
        /// The receiver took responsibility for delivery notices (it offered
        /// DSN and was given NOTIFY), or is the final mailbox store (LMTP).
        /// When false and the sender asked for NOTIFY=SUCCESS, Skein sends a
        /// "relayed" notice itself (RFC 3461 §4.3).
        dsn: bool,
        /// Delivered into a mailbox store by LMTP rather than relayed.
        lmtp: bool,
    },
    /// Try again later.
    Deferred { reply: String },
    /// Permanent failure: bounce.
    Failed { reply: String },
}

/// The longest result text kept, in bytes: a remote reply may be 128 lines
/// of 4 KB, and the text goes into the replicated queue for every recipient,
/// into logs and into notices.
pub const MAX_RESULT_TEXT: usize = 800;

impl RcptResult {
    /// The result with its text made safe to keep and show: control
    /// characters (a remote server's ESC or NUL) become spaces, and the text
    /// is cut at [`MAX_RESULT_TEXT`] bytes.
    pub fn bounded(mut self) -> Self {
        let text = match &mut self {
            RcptResult::Delivered { reply, .. }
            | RcptResult::Deferred { reply }
            | RcptResult::Failed { reply } => reply,
        };
        if text.len() > MAX_RESULT_TEXT || text.chars().any(char::is_control) {
            let mut out = String::with_capacity(text.len().min(MAX_RESULT_TEXT));
            for c in text.chars() {
                if out.len() + c.len_utf8() > MAX_RESULT_TEXT - 3 {
                    out.push_str("...");
                    break;
                }
                out.push(if c.is_control() { ' ' } else { c });
            }
            *text = out;
        }
        self
    }

    pub fn reply(&self) -> &str {
        match self {
            RcptResult::Delivered { reply, .. }
            | RcptResult::Deferred { reply }
            | RcptResult::Failed { reply } => reply,
        }
    }

    pub fn is_delivered(&self) -> bool {
        matches!(self, RcptResult::Delivered { .. })
    }

    pub fn is_deferred(&self) -> bool {
        matches!(self, RcptResult::Deferred { .. })
    }

    pub fn is_failed(&self) -> bool {
        matches!(self, RcptResult::Failed { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_texts_are_bounded_and_one_line() {
        let long = RcptResult::Failed {
            reply: format!("550 5.1.1 {}", "é".repeat(2000)),
        }
        .bounded();
        assert!(long.reply().len() <= MAX_RESULT_TEXT);
        assert!(long.reply().ends_with("..."));
        let ctl = RcptResult::Deferred {
            reply: "451 a\x1b[31m\r\nb\0".into(),
        }
        .bounded();
        assert_eq!(ctl.reply(), "451 a [31m  b ");
        let fine = RcptResult::Deferred {
            reply: "451 4.3.0 later".into(),
        };
        assert_eq!(fine.clone().bounded(), fine);
    }
}
