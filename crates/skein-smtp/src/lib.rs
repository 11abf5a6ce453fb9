//! The SMTP grammar, without IO: commands, replies, addresses, and the DATA
//! reader, shared by Skein's SMTP server and its outbound delivery client.
//!
//! Nothing here reads a socket or knows a session's state. Callers hand in
//! bytes and get typed values back; "not enough bytes yet" is a normal
//! answer (`Line::Incomplete`, `Ok(None)` from [`parse_reply`], a
//! [`DataProgress`] that is not done), never an error. Policy — which
//! extensions are offered, which hosts are acceptable — lives in the server.
//!
//! Map of the crate:
//! - [`line`](mod@line): finding command lines in a buffer, with RFC length limits.
//! - [`command`]: [`Command`] parsing and encoding, [`CommandError`] and the
//!   reply each error maps to. [`params`] holds the MAIL/RCPT parameters,
//!   [`xtext`] their encoding.
//! - [`address`], [`domain`], [`path`]: mailboxes, domains, address literals,
//!   reverse and forward paths (serde-ready, the queue stores them).
//! - [`reply`]: the typed [`Reply`], its wire form, and [`parse_reply`].
//! - [`data`]: [`DataReader`], the smuggling-proof end-of-data finder and
//!   dot-unstuffer. [`stuff`] is its client-side mirror.
//! - [`ehlo`]: [`Extensions`], what a server's EHLO reply offers.
//! - [`escape`]: [`Escaped`], a peer's text shown safely in a log line.
//!
//! A server's view of a pipelined DATA transaction:
//!
//! ```
//! use skein_smtp::{next_line, parse_command, Command, DataReader, Line, MAX_COMMAND_LINE};
//!
//! let mut buf: &[u8] = b"DATA\r\nSubject: hi\r\n\r\n..dot\r\n.\r\nQUIT\r\n";
//! let Line::Complete { len, consumed, .. } = next_line(buf, MAX_COMMAND_LINE) else {
//!     unreachable!()
//! };
//! assert_eq!(parse_command(&buf[..len]), Ok(Command::Data));
//! buf = &buf[consumed..];
//!
//! let mut reader = DataReader::new(10 << 20);
//! let mut body = Vec::new();
//! let progress = reader.feed(buf, &mut body);
//! assert!(progress.done);
//! assert_eq!(body, b"Subject: hi\r\n\r\n.dot\r\n");
//! // what follows the end marker is the next command, untouched
//! assert_eq!(&buf[progress.consumed..], b"QUIT\r\n");
//! ```

pub mod address;
pub mod command;
pub mod data;
pub mod domain;
pub mod ehlo;
pub mod escape;
pub mod line;
pub mod params;
pub mod path;
pub mod reply;
pub mod stuff;
pub mod xtext;

pub use address::{AddressError, Mailbox, MAX_LOCAL_PART};
pub use command::{parse_command, parse_command_utf8, Command, CommandError};
pub use data::{DataProgress, DataReader};
pub use domain::{AddressLiteral, Domain, MAX_DOMAIN, MAX_LABEL};
pub use ehlo::Extensions;
pub use escape::Escaped;
pub use line::{discard_line, next_line, Line, LineEnding, MAX_COMMAND_LINE, MAX_TEXT_LINE};
pub use params::{BodyType, MailParams, Notify, RcptParams, Ret};
pub use path::{ForwardPath, ReversePath, MAX_PATH};
pub use reply::{
    parse_reply, EnhancedCode, Reply, ReplyClass, ReplyError, MAX_REPLY_LINE, MAX_REPLY_LINES,
};
pub use stuff::{dot_stuff, has_bare_line_endings, normalize_line_endings};
pub use xtext::{xtext_decode, xtext_encode};
