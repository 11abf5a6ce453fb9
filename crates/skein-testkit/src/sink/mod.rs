//! [`SinkMta`]: a receiving SMTP server on 127.0.0.1 that records what it is
//! sent and answers with scripted replies.
//!
//! Commands are framed with `skein_smtp::next_line` and parsed with
//! `parse_command`; bodies go through `DataReader`, so pipelined input and
//! dot-unstuffing behave as in the real server. A scripted reply of 421
//! closes the connection after it is sent, as a real server would.

mod session;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use skein_smtp::{EnhancedCode, MailParams, Reply};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tracing::Instrument as _;

use crate::wait::wait_for;

type OnAddress = Arc<dyn Fn(&str) -> Reply + Send + Sync>;
type OnCount = Arc<dyn Fn(usize) -> Reply + Send + Sync>;

/// One message the sink accepted (its final DATA reply was 2xx).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Received {
    /// The EHLO/HELO argument of the session.
    pub helo: String,
    /// The reverse-path without brackets; empty for `<>`.
    pub mail_from: String,
    pub mail_params: MailParams,
    /// The accepted recipients (2xx to RCPT), without brackets, in order.
    pub rcpt_to: Vec<String>,
    /// The body as received, dot-unstuffed, without the final `.` line.
    pub data: Vec<u8>,
    /// The transaction ran over TLS (after STARTTLS).
    pub tls: bool,
    /// The server name the client presented (SNI), under TLS.
    pub sni: Option<String>,
    /// The user the session authenticated as.
    pub auth: Option<String>,
    /// The connection it came on, numbered from 1 in accept order.
    pub connection: usize,
    /// When the sink answered the end of its data.
    pub at: std::time::Instant,
}

/// Where a sink stops answering, keeping the connection open until the sink
/// is dropped: for testing the client's timeouts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hang {
    /// Accept the connection and never send the greeting.
    BeforeGreeting,
    /// Send the greeting, then read nothing more.
    AfterGreeting,
    /// Read the whole body, then never send the final reply.
    AfterData,
}

/// What a sink says when. Shared read-only by all its connections.
#[derive(Clone)]
pub(crate) struct Script {
    pub greeting: Reply,
    pub ehlo_extensions: Vec<String>,
    pub ehlo_reply: Option<Reply>,
    pub on_mail: OnAddress,
    pub on_rcpt: OnAddress,
    pub on_data_command: OnCount,
    pub on_data: OnCount,
    pub hang: Option<Hang>,
    pub max_message_size: usize,
    /// Offer STARTTLS with this configuration.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Answer STARTTLS with 220 and then plaintext garbage.
    pub broken_tls: bool,
    /// Offer AUTH PLAIN (only under TLS when TLS is offered) for this user
    /// and password.
    pub auth: Option<(String, String)>,
    /// Speak LMTP: LHLO instead of EHLO, and after the body one reply per
    /// accepted recipient from this function.
    pub lmtp: Option<OnAddress>,
    /// Keep every command line (and pipelined batch) for inspection.
    pub keep_commands: bool,
}

/// What a sink saw, across all its connections.
#[derive(Default)]
pub(crate) struct Record {
    pub messages: Vec<Received>,
    /// Every command line received, without its line ending.
    pub commands: Vec<String>,
    /// Command lines grouped by the read that brought them: a pipelining
    /// client's batch arrives as one group.
    pub batches: Vec<Vec<String>>,
}

pub(crate) struct Shared {
    pub script: Script,
    pub record: Mutex<Record>,
    pub connections: AtomicUsize,
    /// Connections open now, and the most ever open at once.
    pub active: AtomicUsize,
    pub max_active: AtomicUsize,
    /// Bodies received so far (whatever their final reply), numbering
    /// the calls to `on_data`.
    pub bodies: AtomicUsize,
}

impl Shared {
    pub fn record(&self) -> std::sync::MutexGuard<'_, Record> {
        self.record.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub(crate) fn new_reply(code: u16, enhanced: (u8, u16, u16), text: &str) -> Reply {
    let (c, s, d) = enhanced;
    Reply::new(code, Some(EnhancedCode::new(c, s, d)), text)
}

/// Builds a [`SinkMta`]. Defaults accept everything.
#[must_use]
pub struct SinkMtaBuilder {
    script: Script,
    refuse: bool,
    ip: IpAddr,
    port: u16,
}

impl Default for SinkMtaBuilder {
    fn default() -> Self {
        SinkMtaBuilder {
            script: Script {
                greeting: Reply::new(220, None, "sink.test ESMTP skein-testkit"),
                ehlo_extensions: ["PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES"]
                    .map(String::from)
                    .to_vec(),
                ehlo_reply: None,
                on_mail: Arc::new(|_| new_reply(250, (2, 1, 0), "Ok")),
                on_rcpt: Arc::new(|_| new_reply(250, (2, 1, 5), "Ok")),
                on_data_command: Arc::new(|_| {
                    Reply::new(354, None, "End data with <CR><LF>.<CR><LF>")
                }),
                on_data: Arc::new(|_| new_reply(250, (2, 0, 0), "Ok")),
                hang: None,
                max_message_size: 64 << 20,
                tls: None,
                broken_tls: false,
                auth: None,
                lmtp: None,
                keep_commands: true,
            },
            refuse: false,
            ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: 0,
        }
    }
}

impl SinkMtaBuilder {
    pub fn greeting(mut self, reply: Reply) -> Self {
        self.script.greeting = reply;
        self
    }

    /// The keywords listed after the first line of the EHLO reply, e.g.
    /// `["PIPELINING", "SIZE 1000000", "8BITMIME"]`.
    pub fn ehlo_extensions<I, S>(mut self, extensions: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.script.ehlo_extensions = extensions.into_iter().map(Into::into).collect();
        self
    }

    /// Offers CHUNKING (RFC 3030) as well, as Postfix 3.4 and later and
    /// the large mailbox providers do: BDAT chunks are taken, and a message
    /// can end with `BDAT n LAST` instead of DATA.
    pub fn chunking(mut self) -> Self {
        if !self.script.ehlo_extensions.iter().any(|e| e == "CHUNKING") {
            self.script.ehlo_extensions.push("CHUNKING".into());
        }
        self
    }

    /// Answers EHLO with `reply` instead of the extension list (e.g. a 502,
    /// to make the client fall back to HELO).
    pub fn ehlo_reply(mut self, reply: Reply) -> Self {
        self.script.ehlo_reply = Some(reply);
        self
    }

    /// The reply to MAIL FROM, given the reverse-path ("" for `<>`).
    pub fn on_mail(mut self, f: impl Fn(&str) -> Reply + Send + Sync + 'static) -> Self {
        self.script.on_mail = Arc::new(f);
        self
    }

    /// The reply to each RCPT TO, given the address without brackets.
    pub fn on_rcpt(mut self, f: impl Fn(&str) -> Reply + Send + Sync + 'static) -> Self {
        self.script.on_rcpt = Arc::new(f);
        self
    }

    /// The reply to the DATA command itself (default 354), given how many
    /// bodies the sink has received before. Anything but 354 refuses the body.
    pub fn on_data_command(mut self, f: impl Fn(usize) -> Reply + Send + Sync + 'static) -> Self {
        self.script.on_data_command = Arc::new(f);
        self
    }

    /// The final reply after a body, given the 0-based count of bodies
    /// received before this one. Only 2xx records the message.
    pub fn on_data(mut self, f: impl Fn(usize) -> Reply + Send + Sync + 'static) -> Self {
        self.script.on_data = Arc::new(f);
        self
    }

    /// Offer STARTTLS with this server configuration.
    pub fn tls(mut self, config: Arc<rustls::ServerConfig>) -> Self {
        self.script.tls = Some(config);
        self
    }

    /// Offer STARTTLS, answer it with 220, then send plaintext garbage and
    /// close: a handshake that always fails.
    pub fn broken_tls(mut self) -> Self {
        self.script.broken_tls = true;
        self
    }

    /// Offer AUTH PLAIN and accept only this user and password.
    pub fn auth(mut self, user: &str, password: &str) -> Self {
        self.script.auth = Some((user.into(), password.into()));
        self
    }

    /// Speak LMTP (RFC 2033): after the body, one reply per accepted
    /// recipient, given its address.
    pub fn lmtp(mut self, per_recipient: impl Fn(&str) -> Reply + Send + Sync + 'static) -> Self {
        self.script.lmtp = Some(Arc::new(per_recipient));
        self
    }

    pub fn hang(mut self, at: Hang) -> Self {
        self.script.hang = Some(at);
        self
    }

    pub fn hang_before_greeting(self) -> Self {
        self.hang(Hang::BeforeGreeting)
    }

    pub fn hang_after_greeting(self) -> Self {
        self.hang(Hang::AfterGreeting)
    }

    pub fn hang_after_data(self) -> Self {
        self.hang(Hang::AfterData)
    }

    /// Bodies longer than this are answered 552 5.3.4 (default 64 MiB).
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.script.max_message_size = bytes;
        self
    }

    /// The sink gets an address that refuses connections: a port that was
    /// bound and released, with nothing listening on it.
    pub fn refuse_connections(mut self) -> Self {
        self.refuse = true;
        self
    }

    /// Listen on this address instead of 127.0.0.1. Any 127.x.y.z works on
    /// Linux: with [`port`](Self::port), several sinks can share one port,
    /// which is how a client dialling a fixed port meets several MX hosts.
    pub fn ip(mut self, ip: IpAddr) -> Self {
        self.ip = ip;
        self
    }

    /// Keep no command lines: for long runs (a benchmark's receiving MTA),
    /// whose memory would otherwise grow with every command.
    pub fn forget_commands(mut self) -> Self {
        self.script.keep_commands = false;
        self
    }

    /// Answer every RCPT 451 4.3.0: the sender keeps all its mail queued.
    pub fn defer_all(self) -> Self {
        self.on_rcpt(|_| new_reply(451, (4, 3, 0), "try again later"))
    }

    /// Listen on this port instead of a random one.
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    pub async fn start(self) -> anyhow::Result<SinkMta> {
        let listener = TcpListener::bind((self.ip, self.port)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            script: self.script,
            record: Mutex::new(Record::default()),
            connections: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            max_active: AtomicUsize::new(0),
            bodies: AtomicUsize::new(0),
        });
        let task = if self.refuse {
            drop(listener);
            None
        } else {
            Some(tokio::spawn(accept_loop(listener, shared.clone())))
        };
        tracing::debug!(%addr, refusing = self.refuse, "sink mta listening");
        Ok(SinkMta { addr, shared, task })
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    // Connection tasks live in this set so that aborting the accept loop
    // (when the sink is dropped) drops and closes them all.
    let mut sessions = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let number = shared.connections.fetch_add(1, Ordering::SeqCst) + 1;
                    let now = shared.active.fetch_add(1, Ordering::SeqCst) + 1;
                    shared.max_active.fetch_max(now, Ordering::SeqCst);
                    let span = tracing::debug_span!("sink session", %peer);
                    let shared = shared.clone();
                    sessions.spawn(async move {
                        session::run(stream, shared.clone(), number).await;
                        shared.active.fetch_sub(1, Ordering::SeqCst);
                    }.instrument(span));
                }
                Err(error) => tracing::warn!(%error, "sink accept failed"),
            },
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
        }
    }
}

/// A running sink. Dropping it closes the listener and every connection.
pub struct SinkMta {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: Option<JoinHandle<()>>,
}

impl Drop for SinkMta {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

impl SinkMta {
    pub fn builder() -> SinkMtaBuilder {
        SinkMtaBuilder::default()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops the sink and waits until its listener is closed, so the
    /// address refuses connections once this returns. Dropping the sink
    /// closes it too, but only when the runtime next gets to it.
    pub async fn stop(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Messages accepted so far, in the order their DATA completed.
    pub fn messages(&self) -> Vec<Received> {
        self.shared.record().messages.clone()
    }

    /// How many messages were accepted so far (and not taken).
    pub fn message_count(&self) -> usize {
        self.shared.record().messages.len()
    }

    /// Messages accepted since the last take, leaving none kept: for long
    /// runs that report messages as they come.
    pub fn take_messages(&self) -> Vec<Received> {
        std::mem::take(&mut self.shared.record().messages)
    }

    /// Every command line received so far, over all connections.
    pub fn commands(&self) -> Vec<String> {
        self.shared.record().commands.clone()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Connections open now.
    pub fn active_connections(&self) -> usize {
        self.shared.active.load(Ordering::SeqCst)
    }

    /// The most connections that were ever open at once.
    pub fn max_concurrent_connections(&self) -> usize {
        self.shared.max_active.load(Ordering::SeqCst)
    }

    /// Command lines grouped by the read that brought them.
    pub fn batches(&self) -> Vec<Vec<String>> {
        self.shared.record().batches.clone()
    }

    /// Waits until at least `n` messages were accepted, then returns them all.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> anyhow::Result<Vec<Received>> {
        let what = format!("{n} message(s) at the sink");
        wait_for(timeout, &what, || async { self.message_count() >= n }).await?;
        Ok(self.messages())
    }
}
