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

impl RcptResult {
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
