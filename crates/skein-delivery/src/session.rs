//! The client side of one SMTP connection, generic over its stream so TLS
//! (STARTTLS wraps the stream and goes on) and in-memory tests fit in.
//!
//! It knows framing and timeouts, not policy: it sends commands and reads
//! replies with `skein-smtp`, and leaves deciding what a reply means to
//! the `transaction` module.

use skein_smtp::Escaped;
use std::fmt;
use std::time::Duration;

use skein_smtp::{
    dot_stuff, has_bare_line_endings, normalize_line_endings, parse_reply, Command, Reply,
    ReplyError,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Body bytes written per timed write: a slow but live peer keeps the
/// session going, a dead one is noticed within one `data_block` timeout.
const BODY_BLOCK: usize = 64 * 1024;

/// Where in the dialogue something happened; named as in logs and results.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    Greeting,
    Ehlo,
    Helo,
    StartTls,
    Auth,
    Rset,
    Mail,
    Rcpt,
    Data,
    Body,
    EndOfData,
    Quit,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::Greeting => "greeting",
            Stage::Ehlo => "EHLO",
            Stage::Helo => "HELO",
            Stage::StartTls => "STARTTLS",
            Stage::Auth => "AUTH",
            Stage::Rset => "RSET",
            Stage::Mail => "MAIL FROM",
            Stage::Rcpt => "RCPT TO",
            Stage::Data => "DATA",
            Stage::Body => "message body",
            Stage::EndOfData => "end of data",
            Stage::Quit => "QUIT",
        })
    }
}

/// Why a session could not go on. The connection is unusable afterwards.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("timed out after {after:?} at {stage}")]
    Timeout { stage: Stage, after: Duration },
    #[error("connection closed by peer at {stage}")]
    Closed { stage: Stage },
    #[error("{source} at {stage}")]
    Io {
        stage: Stage,
        #[source]
        source: std::io::Error,
    },
    /// A command line to send held a CR, LF or NUL of its own: it is not
    /// sent, so nothing we write can be read as two commands.
    #[error("refused to send a command line with a line break inside at {stage}")]
    Unsafe { stage: Stage },
    #[error("{source} at {stage}")]
    Protocol {
        stage: Stage,
        #[source]
        source: ReplyError,
    },
}

/// One SMTP client connection.
pub struct Session<S> {
    stream: S,
    /// Bytes read but not yet parsed into a reply.
    buf: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    pub fn new(stream: S) -> Self {
        Session {
            stream,
            buf: Vec::with_capacity(1024),
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    /// Gives the stream back, e.g. to wrap it in TLS. Bytes already read
    /// are dropped, which is what RFC 3207 §6 requires after STARTTLS.
    pub fn into_inner(self) -> S {
        self.stream
    }

    /// Reads one complete reply, waiting at most `timeout` for it.
    pub async fn read_reply(
        &mut self,
        stage: Stage,
        timeout: Duration,
    ) -> Result<Reply, SessionError> {
        match tokio::time::timeout(timeout, self.read_reply_untimed(stage)).await {
            Ok(result) => result,
            Err(_) => Err(SessionError::Timeout {
                stage,
                after: timeout,
            }),
        }
    }

    async fn read_reply_untimed(&mut self, stage: Stage) -> Result<Reply, SessionError> {
        loop {
            match parse_reply(&self.buf) {
                Ok(Some((reply, used))) => {
                    self.buf.drain(..used);
                    tracing::trace!(%stage, reply = %Escaped(&reply), "reply");
                    return Ok(reply);
                }
                Ok(None) => {}
                Err(source) => return Err(SessionError::Protocol { stage, source }),
            }
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) => return Err(SessionError::Closed { stage }),
                Ok(_) => {}
                Err(source) => return Err(SessionError::Io { stage, source }),
            }
        }
    }

    /// Writes one command line.
    pub async fn send(
        &mut self,
        command: &Command,
        stage: Stage,
        timeout: Duration,
    ) -> Result<(), SessionError> {
        let line = command.to_bytes();
        check_line(&line, stage)?;
        tracing::trace!(%stage, command = %String::from_utf8_lossy(&line).trim_end(), "send");
        self.write_timed(&line, stage, timeout).await
    }

    /// Writes several command lines at once (RFC 2920 pipelining); their
    /// replies are read one by one afterwards.
    pub async fn send_batch(
        &mut self,
        commands: &[Command],
        stage: Stage,
        timeout: Duration,
    ) -> Result<(), SessionError> {
        let lines = encode_lines(commands, stage)?;
        tracing::trace!(%stage, commands = commands.len(), "send batch");
        self.write_timed(&lines, stage, timeout).await
    }

    /// Writes command lines followed by the whole message as one last BDAT
    /// chunk (RFC 3030), the chunk's bytes exactly as they are: no dot
    /// stuffing, line endings made CRLF as for DATA ([`crlf_only`]). The commands leave
    /// within `timeout`, the chunk block by block within `block_timeout`;
    /// every reply is read afterwards.
    pub async fn send_batch_with_chunk(
        &mut self,
        commands: &[Command],
        body: &[u8],
        timeout: Duration,
        block_timeout: Duration,
    ) -> Result<(), SessionError> {
        let body = crlf_only(body);
        let bdat = Command::Bdat {
            size: body.len() as u64,
            last: true,
        };
        let mut lines = encode_lines(commands.iter().chain([&bdat]), Stage::Mail)?;
        tracing::trace!(
            commands = commands.len(),
            bytes = body.len(),
            "send batch and BDAT"
        );
        // The commands and the chunk's first block in one write: a small
        // message leaves in a single segment.
        let first = body.len().min(BODY_BLOCK);
        lines.extend_from_slice(&body[..first]);
        self.write_timed(&lines, Stage::Mail, timeout).await?;
        for block in body[first..].chunks(BODY_BLOCK) {
            self.write_timed(block, Stage::Body, block_timeout).await?;
        }
        Ok(())
    }

    /// Writes raw bytes, e.g. the lone `.` that ends an unwanted DATA.
    pub async fn send_raw(
        &mut self,
        bytes: &[u8],
        stage: Stage,
        timeout: Duration,
    ) -> Result<(), SessionError> {
        self.write_timed(bytes, stage, timeout).await
    }

    /// Whether the peer sent bytes nobody asked for yet (a server that
    /// talks out of turn is not reused).
    pub fn has_unread(&self) -> bool {
        !self.buf.is_empty()
    }

    /// Sends a command and reads its reply, each within `timeout`.
    pub async fn command(
        &mut self,
        command: &Command,
        stage: Stage,
        timeout: Duration,
    ) -> Result<Reply, SessionError> {
        self.send(command, stage, timeout).await?;
        self.read_reply(stage, timeout).await
    }

    /// Writes the body dot-stuffed and terminated by `.`, block by block,
    /// each block within `block_timeout`, line endings made CRLF first
    /// ([`crlf_only`]). The final reply is read separately.
    pub async fn send_body(
        &mut self,
        body: &[u8],
        block_timeout: Duration,
    ) -> Result<(), SessionError> {
        let body = crlf_only(body);
        let mut wire = Vec::new();
        dot_stuff(&body, &mut wire);
        for block in wire.chunks(BODY_BLOCK) {
            self.write_timed(block, Stage::Body, block_timeout).await?;
        }
        Ok(())
    }

    async fn write_timed(
        &mut self,
        bytes: &[u8],
        stage: Stage,
        timeout: Duration,
    ) -> Result<(), SessionError> {
        let write = async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await
        };
        match tokio::time::timeout(timeout, write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => Err(SessionError::Io { stage, source }),
            Err(_) => Err(SessionError::Timeout {
                stage,
                after: timeout,
            }),
        }
    }
}

/// Nothing leaves with a bare CR or LF: the front door refuses such mail,
/// but a body that still holds one (from a restored backup, say) has its
/// line endings made CRLF first, so that no receiver can see the data end
/// somewhere else than we do.
fn crlf_only(body: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    if !has_bare_line_endings(body) {
        return std::borrow::Cow::Borrowed(body);
    }
    let mut v = Vec::with_capacity(body.len() + 64);
    normalize_line_endings(body, &mut v);
    std::borrow::Cow::Owned(v)
}

/// Command lines one after another, each checked by [`check_line`].
fn encode_lines<'c>(
    commands: impl IntoIterator<Item = &'c Command>,
    stage: Stage,
) -> Result<Vec<u8>, SessionError> {
    let mut lines = Vec::new();
    for c in commands {
        let start = lines.len();
        c.encode(&mut lines);
        check_line(&lines[start..], stage)?;
    }
    Ok(lines)
}

/// An encoded command line must hold no CR, LF or NUL but its final CRLF.
fn check_line(line: &[u8], stage: Stage) -> Result<(), SessionError> {
    let body = line.strip_suffix(b"\r\n").unwrap_or(line);
    if body.iter().any(|&b| matches!(b, b'\r' | b'\n' | 0)) {
        return Err(SessionError::Unsafe { stage });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    #[tokio::test]
    async fn reads_split_multiline_replies_and_times_out() {
        let (client, mut server) = duplex(1024);
        let mut session = Session::new(client);
        let t = Duration::from_secs(5);
        server.write_all(b"250-first\r\n250").await.unwrap();
        let pending = tokio::spawn(async move {
            let r = session.read_reply(Stage::Ehlo, t).await.map(|r| r.lines);
            (session, r)
        });
        server.write_all(b" second\r\n").await.unwrap();
        let (mut session, lines) = pending.await.unwrap();
        assert_eq!(lines.unwrap(), vec!["first", "second"]);

        let err = session
            .read_reply(Stage::Mail, Duration::from_millis(20))
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                SessionError::Timeout {
                    stage: Stage::Mail,
                    ..
                }
            ),
            "{err}"
        );

        drop(server);
        let err = session.read_reply(Stage::Rcpt, t).await.unwrap_err();
        assert!(
            matches!(err, SessionError::Closed { stage: Stage::Rcpt }),
            "{err}"
        );
    }

    #[tokio::test]
    async fn body_is_dot_stuffed_and_terminated() {
        let (client, mut server) = duplex(1 << 20);
        let mut session = Session::new(client);
        session
            .send_body(b".a\r\nb\r\n", Duration::from_secs(5))
            .await
            .unwrap();
        drop(session);
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"..a\r\nb\r\n.\r\n");
    }

    #[tokio::test]
    async fn a_chunk_follows_the_commands_as_is_with_crlf_line_endings() {
        let (client, mut server) = duplex(1 << 20);
        let mut session = Session::new(client);
        let t = Duration::from_secs(5);
        session
            .send_batch_with_chunk(&[Command::Rset], b".a\nb\r\n", t, t)
            .await
            .unwrap();
        drop(session);
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"RSET\r\nBDAT 7 LAST\r\n.a\r\nb\r\n");
    }

    #[tokio::test]
    async fn a_body_with_bare_line_endings_leaves_with_crlf_only() {
        let (client, mut server) = duplex(1 << 20);
        let mut session = Session::new(client);
        session
            .send_body(b"a\n.\r\nMAIL FROM:<x@y>\rb\r\n", Duration::from_secs(5))
            .await
            .unwrap();
        drop(session);
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"a\r\n..\r\nMAIL FROM:<x@y>\r\nb\r\n.\r\n");
        assert!(!has_bare_line_endings(&got));
    }

    #[tokio::test]
    async fn a_command_with_a_line_break_inside_is_never_sent() {
        let (client, mut server) = duplex(1024);
        let mut session = Session::new(client);
        let forged = Command::Helo("a\r\nRCPT TO:<x@y.org>".into());
        let err = session
            .send(&forged, Stage::Helo, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(err, SessionError::Unsafe { .. }), "{err}");
        let err = session
            .send_batch(
                &[Command::Noop, forged],
                Stage::Mail,
                Duration::from_secs(5),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, SessionError::Unsafe { .. }), "{err}");
        drop(session);
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert!(got.is_empty(), "nothing written: {got:?}");
    }

    #[tokio::test]
    async fn garbage_is_a_protocol_error() {
        let (client, mut server) = duplex(1024);
        let mut session = Session::new(client);
        server
            .write_all(b"HTTP/1.1 400 Bad Request\r\n")
            .await
            .unwrap();
        let err = session
            .read_reply(Stage::Greeting, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(err, SessionError::Protocol { .. }), "{err}");
    }
}
