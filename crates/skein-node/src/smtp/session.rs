//! One SMTP session, generic over its stream so tests can run it in memory.
//!
//! The session reads into a buffer and answers every complete command in it
//! before writing: replies to pipelined commands go out together, and nothing
//! the client sent ahead is lost or reordered. STARTTLS ends the plaintext
//! session: [`Session::run`] hands the stream back, the caller does the
//! handshake and starts a fresh session on the encrypted stream, so no state
//! and no buffered plaintext survive the upgrade.

use std::net::SocketAddr;
use std::time::Instant;

use bytes::{Buf, BytesMut};
use skein_queue::NewRecipient;
use skein_smtp::{
    discard_line, next_line, parse_command_utf8, BodyType, Command, Escaped, ForwardPath, Line,
    LineEnding, MailParams, Mailbox, Reply, ReversePath, MAX_COMMAND_LINE,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use super::replies;
use super::SmtpContext;

/// Errors after which the session is closed (Postfix's hard error limit).
const MAX_ERRORS: u32 = 20;
/// NOOP, RSET, VRFY, HELP and the like without a transaction (Postfix's
/// junk command limit).
const MAX_JUNK: u32 = 100;

pub struct Session<'a, S> {
    pub(super) ctx: &'a SmtpContext,
    pub(super) stream: S,
    pub(super) peer: SocketAddr,
    pub(super) rbuf: BytesMut,
    wbuf: Vec<u8>,
    pub(super) helo: Option<String>,
    pub(super) esmtp: bool,
    pub(super) tls: bool,
    pub(super) user: Option<String>,
    pub(super) tx: Option<Transaction>,
    errors: u32,
    junk: u32,
    shutdown: watch::Receiver<bool>,
    pub(super) counts: Counts,
    /// Given back to the connection limits as the session ends.
    held: Option<super::Held>,
}

/// Commands seen, for the disconnect log line; they survive STARTTLS.
#[derive(Default, Clone, Copy)]
pub struct Counts {
    pub commands: u32,
    pub mail: u32,
    pub rcpt: u32,
    pub data: u32,
    pub queued: u32,
}

pub(super) struct Transaction {
    pub from: ReversePath,
    pub params: MailParams,
    pub rcpts: Vec<NewRecipient>,
    /// Message data received so far by BDAT.
    pub chunks: Option<super::data::Chunks>,
}

/// How a session ended.
pub enum End<S> {
    Closed,
    /// The client asked for TLS and was told to go ahead: do the handshake
    /// on this stream and continue with [`Session::after_starttls`].
    StartTls(S, Counts, Option<super::Held>),
}

pub(super) enum Flow {
    Continue,
    Close,
    StartTls,
}

impl<'a, S: AsyncRead + AsyncWrite + Unpin> Session<'a, S> {
    pub fn new(ctx: &'a SmtpContext, stream: S, peer: SocketAddr) -> Self {
        Session {
            ctx,
            stream,
            peer,
            rbuf: BytesMut::with_capacity(4096),
            wbuf: Vec::with_capacity(1024),
            helo: None,
            esmtp: false,
            tls: false,
            user: None,
            tx: None,
            errors: 0,
            junk: 0,
            shutdown: ctx.shutdown.clone(),
            counts: Counts::default(),
            held: None,
        }
    }

    /// The session holds `held` until it ends.
    pub fn holding(mut self, held: Option<super::Held>) -> Self {
        self.held = held;
        self
    }

    /// The session on the encrypted stream: no greeting (the client sends
    /// EHLO again), nothing remembered from before but the counters.
    pub fn after_starttls(
        ctx: &'a SmtpContext,
        stream: S,
        peer: SocketAddr,
        counts: Counts,
    ) -> Self {
        let mut s = Session::new(ctx, stream, peer);
        s.tls = true;
        s.counts = counts;
        s
    }

    pub async fn run(mut self) -> std::io::Result<End<S>> {
        if !self.tls {
            tracing::info!(client = %self.peer, "connect");
        }
        let result = self.serve().await;
        if !matches!(result, Ok(Flow::StartTls)) {
            drop(self.held.take());
        }
        let flush = self.flush().await;
        match result {
            Ok(Flow::StartTls) => {
                flush?;
                return Ok(End::StartTls(self.stream, self.counts, self.held));
            }
            Ok(_) => {}
            Err(ref e) => tracing::debug!(client = %self.peer, error = %e, "session error"),
        }
        let c = &self.counts;
        tracing::info!(
            client = %self.peer,
            tls = self.tls,
            user = %Escaped(self.user.as_deref().unwrap_or("")),
            commands = c.commands,
            mail = c.mail,
            rcpt = c.rcpt,
            data = c.data,
            queued = c.queued,
            "disconnect"
        );
        result.map(|_| End::Closed)
    }

    async fn serve(&mut self) -> std::io::Result<Flow> {
        if !self.tls {
            if *self.shutdown.borrow() {
                self.reply(replies::shutting_down(&self.ctx.config.hostname));
                return Ok(Flow::Close);
            }
            if self.talks_first().await? {
                tracing::info!(client = %self.peer, "client talked before the greeting");
                self.reply(replies::talked_first());
                return Ok(Flow::Close);
            }
            self.reply(replies::greeting(&self.ctx.config.hostname));
        }
        loop {
            let Some(line) = self.next_command().await? else {
                return Ok(Flow::Close);
            };
            self.counts.commands += 1;
            match self.command(&line).await? {
                Flow::Continue => {}
                other => return Ok(other),
            }
            if self.errors >= MAX_ERRORS {
                self.reply(replies::too_many_errors());
                return Ok(Flow::Close);
            }
            if self.junk > MAX_JUNK {
                self.reply(replies::too_many_junk());
                return Ok(Flow::Close);
            }
        }
    }

    /// Whether the client sent anything during the greeting pause. Only
    /// strangers are paused: not submission clients (they authenticate),
    /// not `smtp.greet_pause_exceptions` (the relay networks by default).
    async fn talks_first(&mut self) -> std::io::Result<bool> {
        let pause = self.ctx.config.greet_pause;
        let ip = self.peer.ip().to_canonical();
        if pause.is_zero()
            || self.ctx.require_auth
            || self
                .ctx
                .config
                .greet_pause_exceptions
                .iter()
                .any(|n| n.contains(&ip))
        {
            return Ok(false);
        }
        match tokio::time::timeout(pause, self.stream.read_buf(&mut self.rbuf)).await {
            Err(_) => Ok(false),
            Ok(Ok(_)) => Ok(true),
            Ok(Err(e)) => Err(e),
        }
    }

    pub(super) fn reply(&mut self, r: Reply) {
        if r.code >= 500 {
            self.errors += 1;
        }
        r.encode(&mut self.wbuf);
    }

    /// Write the replies waiting. A client that does not read them within
    /// `smtp.timeout` loses the session: it cannot hold a slot, and the
    /// replies it will not take, for longer than one that does not write.
    pub(super) async fn flush(&mut self) -> std::io::Result<()> {
        if !self.wbuf.is_empty() {
            let write = async {
                self.stream.write_all(&self.wbuf).await?;
                self.stream.flush().await
            };
            match tokio::time::timeout(self.ctx.config.timeout, write).await {
                Ok(r) => r?,
                Err(_) => {
                    tracing::info!(client = %self.peer, bytes = self.wbuf.len(), "client does not read its replies; closing");
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "writing to the client timed out",
                    ));
                }
            }
            self.wbuf.clear();
        }
        Ok(())
    }

    /// Read more input, flushing pending replies first. `Ok(false)` at end
    /// of input, after `deadline`, or when the node shuts down (the client
    /// was told).
    pub(super) async fn fill(&mut self, deadline: Instant) -> std::io::Result<bool> {
        self.flush().await?;
        let mut shutdown = self.shutdown.clone();
        let read = tokio::select! {
            r = tokio::time::timeout_at(deadline.into(), self.stream.read_buf(&mut self.rbuf)) => Some(r),
            _ = shutdown.wait_for(|s| *s) => None,
        };
        match read {
            None => {
                self.reply(replies::shutting_down(&self.ctx.config.hostname));
                Ok(false)
            }
            Some(Ok(Ok(0))) => Ok(false),
            Some(Ok(Ok(_))) => Ok(true),
            Some(Ok(Err(e))) => Err(e),
            Some(Err(_)) => {
                self.reply(replies::timeout(&self.ctx.config.hostname));
                Ok(false)
            }
        }
    }

    /// The next line of at most `max` octets, without its ending; `None`
    /// when the session is over. Overlong lines, and lines with a bare CR or
    /// LF or a NUL, are answered here and skipped.
    pub(super) async fn next_line(&mut self, max: usize) -> std::io::Result<Option<Vec<u8>>> {
        // The whole line must arrive in time, not just each byte of it.
        let deadline = Instant::now() + self.ctx.config.timeout;
        loop {
            match next_line(&self.rbuf, max) {
                Line::Complete {
                    len,
                    consumed,
                    ending,
                    bare_cr,
                    nul,
                } => {
                    let line = self.rbuf[..len].to_vec();
                    self.rbuf.advance(consumed);
                    if ending == LineEnding::BareLf || bare_cr {
                        self.reply(replies::bare_line_ending());
                        continue;
                    }
                    if nul {
                        self.reply(replies::nul_in_command());
                        continue;
                    }
                    return Ok(Some(line));
                }
                Line::TooLong => {
                    // Answer once, then drop everything through the next LF.
                    self.reply(replies::line_too_long());
                    loop {
                        if let Some(n) = discard_line(&self.rbuf) {
                            self.rbuf.advance(n);
                            break;
                        }
                        self.rbuf.clear();
                        if !self.fill(deadline).await? {
                            return Ok(None);
                        }
                    }
                }
                Line::Incomplete => {
                    if !self.fill(deadline).await? {
                        return Ok(None);
                    }
                }
            }
        }
    }

    async fn next_command(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        self.next_line(MAX_COMMAND_LINE).await
    }

    async fn command(&mut self, line: &[u8]) -> std::io::Result<Flow> {
        let utf8 = self.tx.as_ref().is_some_and(|t| t.params.smtputf8);
        let cmd = match parse_command_utf8(line, utf8) {
            Ok(c) => c,
            Err(e) => {
                self.reply(e.reply());
                return Ok(Flow::Continue);
            }
        };
        // BDAT chunks come one after another; anything else ends them.
        if self.tx.as_ref().is_some_and(|t| t.chunks.is_some())
            && !matches!(cmd, Command::Bdat { .. } | Command::Noop)
        {
            self.tx = None;
            if !matches!(cmd, Command::Rset | Command::Quit) {
                self.reply(replies::bdat_interrupted());
                return Ok(Flow::Continue);
            }
        }
        match cmd {
            Command::Ehlo(domain) => self.hello(domain, true),
            Command::Helo(domain) => self.hello(domain, false),
            Command::Mail { from, params } => self.mail(from, params),
            Command::Rcpt { to, params } => self.rcpt(to, params),
            Command::Data => return self.data().await,
            Command::Bdat { size, last } => return self.bdat(size, last).await,
            Command::Rset => {
                self.junk += 1;
                self.tx = None;
                self.reply(replies::ok());
            }
            Command::Noop => {
                self.junk += 1;
                self.reply(replies::ok());
            }
            Command::Quit => {
                self.reply(replies::bye());
                return Ok(Flow::Close);
            }
            Command::Help(_) => {
                self.junk += 1;
                self.reply(replies::help());
            }
            Command::Vrfy(_) => {
                self.junk += 1;
                self.reply(replies::vrfy());
            }
            Command::Expn(_) => {
                self.junk += 1;
                self.reply(replies::not_implemented("EXPN"));
            }
            // LMTP's greeting is no SMTP command.
            Command::Lhlo(_) => {
                self.junk += 1;
                self.reply(skein_smtp::CommandError::Unrecognized.reply());
            }
            Command::StartTls => return Ok(self.starttls()),
            Command::Auth { mechanism, initial } => return self.auth(&mechanism, initial).await,
        }
        Ok(Flow::Continue)
    }

    fn hello(&mut self, domain: String, esmtp: bool) {
        self.tx = None;
        self.helo = Some(domain);
        self.esmtp = esmtp;
        if !esmtp {
            return self.reply(replies::helo(&self.ctx.config.hostname));
        }
        let mut lines = vec![
            self.ctx.config.hostname.clone(),
            "PIPELINING".into(),
            format!("SIZE {}", self.ctx.config.max_message_size),
        ];
        if self.ctx.tls.is_some() && !self.tls {
            lines.push("STARTTLS".into());
        }
        if self.auth_offered() {
            lines.push("AUTH PLAIN LOGIN".into());
        }
        lines.extend(
            [
                "ENHANCEDSTATUSCODES",
                "8BITMIME",
                "SMTPUTF8",
                "CHUNKING",
                "DSN",
                "HELP",
            ]
            .map(String::from),
        );
        self.reply(Reply::with_lines(250, None, lines));
    }

    /// AUTH is offered on submission listeners, and only under TLS.
    pub(super) fn auth_offered(&self) -> bool {
        self.ctx.require_auth && self.tls && self.user.is_none()
    }

    fn starttls(&mut self) -> Flow {
        if self.tls {
            self.reply(replies::tls_already());
            return Flow::Continue;
        }
        if self.ctx.tls.is_none() {
            self.reply(replies::not_implemented("STARTTLS"));
            return Flow::Continue;
        }
        if self.helo.is_none() {
            self.reply(replies::need_helo());
            return Flow::Continue;
        }
        self.reply(replies::tls_go_ahead());
        // Anything the client sent after STARTTLS in plaintext is thrown
        // away: it must not be taken as coming over TLS (CVE-2011-0411).
        if !self.rbuf.is_empty() {
            tracing::info!(client = %self.peer, bytes = self.rbuf.len(), "discarding plaintext pipelined after STARTTLS");
            self.rbuf.clear();
        }
        Flow::StartTls
    }

    fn mail(&mut self, from: ReversePath, params: MailParams) {
        if self.helo.is_none() {
            return self.reply(replies::need_helo());
        }
        if self.tx.is_some() {
            return self.reply(replies::nested_mail());
        }
        if self.ctx.require_auth {
            if !self.tls {
                return self.reply(replies::tls_required());
            }
            if self.user.is_none() {
                return self.reply(replies::auth_required());
            }
        }
        let has_params = params.size.is_some()
            || params.body.is_some()
            || params.smtputf8
            || params.ret.is_some()
            || params.envid.is_some()
            || params.auth.is_some()
            || !params.other.is_empty();
        if has_params && !self.esmtp {
            return self.reply(replies::params_need_ehlo());
        }
        if let Some((name, _)) = params.other.first() {
            return self.reply(replies::unknown_parameter(name));
        }
        if matches!(params.body, Some(BodyType::BinaryMime)) {
            return self.reply(replies::unknown_parameter("BODY=BINARYMIME"));
        }
        if params
            .size
            .is_some_and(|s| s > self.ctx.config.max_message_size as u64)
        {
            return self.reply(replies::message_too_big());
        }
        if self.ctx.storage_low() {
            return self.reply(replies::storage_low());
        }
        self.counts.mail += 1;
        self.tx = Some(Transaction {
            from,
            params,
            rcpts: Vec::new(),
            chunks: None,
        });
        self.reply(replies::sender_ok());
    }

    fn rcpt(&mut self, to: ForwardPath, params: skein_smtp::RcptParams) {
        let Some(tx) = &self.tx else {
            return self.reply(replies::need_mail());
        };
        if let Some((name, _)) = params.other.first() {
            return self.reply(replies::unknown_parameter(name));
        }
        if tx.rcpts.len() >= self.ctx.config.max_recipients {
            return self.reply(replies::too_many_recipients());
        }
        let address = match to {
            ForwardPath::Mailbox(m) => m,
            // RFC 5321 §4.5.1: postmaster is always accepted; it stands for
            // the postmaster of this host's name.
            ForwardPath::Postmaster => {
                match Mailbox::parse(&format!("postmaster@{}", self.ctx.config.hostname)) {
                    Ok(m) => m,
                    Err(_) => return self.reply(replies::relay_denied("postmaster")),
                }
            }
        };
        if !self
            .ctx
            .may_relay(self.peer.ip(), self.user.is_some(), &address)
        {
            tracing::info!(client = %self.peer, to = %Escaped(&address), "relay refused");
            return self.reply(replies::relay_denied(&address.to_string()));
        }
        self.counts.rcpt += 1;
        if let Some(tx) = &mut self.tx {
            tx.rcpts.push(NewRecipient { address, params });
        }
        self.reply(replies::recipient_ok());
    }

    /// Received-header protocol name (RFC 3848).
    pub(super) fn protocol(&self, utf8: bool) -> &'static str {
        match (utf8, self.esmtp, self.tls, self.user.is_some()) {
            (true, _, true, true) => "UTF8SMTPSA",
            (true, _, true, false) => "UTF8SMTPS",
            (true, _, false, true) => "UTF8SMTPA",
            (true, _, false, false) => "UTF8SMTP",
            (false, false, _, _) => "SMTP",
            (false, true, true, true) => "ESMTPSA",
            (false, true, true, false) => "ESMTPS",
            (false, true, false, true) => "ESMTPA",
            (false, true, false, false) => "ESMTP",
        }
    }
}
