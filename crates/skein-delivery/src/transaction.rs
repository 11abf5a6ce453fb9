//! The SMTP (or LMTP) dialogue on one connection, in two parts:
//!
//! - [`open`]: greeting, EHLO/LHLO (HELO fallback), STARTTLS by the TLS
//!   policy with a second EHLO, and AUTH for smarthosts — a [`Conn`] ready
//!   for mail, or the reason to try the next host.
//! - [`transact`]: MAIL, RCPT per recipient, DATA (RFC 5321 §3.3), sent in
//!   one batch when the peer offers PIPELINING (RFC 2920) — and when it also
//!   offers CHUNKING (RFC 3030), the message itself as one `BDAT LAST`
//!   chunk in that batch, in place of DATA and its round trip — and what
//!   each reply means for each recipient. A connection left in a clean state can
//!   carry the next message.
//!
//! Only failures before the transaction started move on to the next host:
//! after that the peer has already judged some recipients.

use skein_smtp::Escaped;
use std::net::IpAddr;
use std::time::Duration;

use base64::Engine as _;
use skein_smtp::{BodyType, Command, Extensions, ForwardPath, MailParams, RcptParams, Reply};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::config::{Credentials, DeliveryConfig};
use crate::conn::{Conn, Stream};
use crate::job::{Job, RcptResult};
use crate::session::{Session, SessionError, Stage};
use crate::tls::{server_name, TlsClients, TlsPolicy};

/// Messages up to this size go as one BDAT chunk in the envelope's batch
/// when the peer offers PIPELINING and CHUNKING: a round trip less per
/// message, at the cost of sending the body before the peer judged the
/// recipients. Larger ones go by DATA, which sends no body to a peer that
/// refused every recipient.
const CHUNK_WITH_ENVELOPE: usize = 1 << 20;

/// Longest wait for the reply to QUIT. The results are known by then, so
/// a peer that never answers QUIT must not hold them up for minutes.
const QUIT_WAIT: Duration = Duration::from_secs(10);

pub(crate) enum HostOutcome {
    /// A result for every recipient, in input order.
    Done(Vec<RcptResult>),
    /// This host could not take the message; the text says why.
    NextHost(String),
    /// A pooled connection failed its RSET probe: nothing was sent for
    /// this message, another connection may carry it.
    Stale,
}

/// Why [`open`] gave no connection.
pub(crate) enum OpenError {
    /// Try the next host (or address); the text says why.
    NextHost(String),
    /// The STARTTLS handshake failed under `may`: try this address again in
    /// plaintext.
    RetryPlain(String),
    /// Under `verify`, TLS could not be had: `kind` is the TLS-RPT (RFC
    /// 8460) result type, `starttls-not-supported` or `validation-failure`.
    Tls { reason: String, kind: &'static str },
}

/// The state a transaction leaves its connection in.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum After {
    /// Between transactions: it can carry another message.
    Clean,
    /// Usable for nothing but QUIT.
    Quit,
    /// Closed or broken: drop it.
    Closed,
}

/// The server's reply as shown to operators: `451 4.3.0 text (host[ip])`.
fn said(reply: &Reply, peer: &str) -> String {
    format!("{reply} ({peer})")
}

/// A broken session as shown to operators: `host[ip]: timed out ... at DATA`.
fn broke(err: &SessionError, peer: &str) -> String {
    format!("{peer}: {err}")
}

fn deferred(reply: String) -> RcptResult {
    RcptResult::Deferred { reply }
}

fn failed(reply: String) -> RcptResult {
    RcptResult::Failed { reply }
}

/// The judgement of a non-2xx reply: 4xx defers, anything else fails.
fn refused(reply: &Reply, peer: &str) -> RcptResult {
    if reply.is_transient() {
        deferred(said(reply, peer))
    } else {
        failed(said(reply, peer))
    }
}

/// Results collected so far, one slot per recipient.
struct Results(Vec<Option<RcptResult>>);

impl Results {
    fn new(n: usize) -> Self {
        Results(vec![None; n])
    }

    fn set(&mut self, i: usize, result: RcptResult) {
        if let Some(slot) = self.0.get_mut(i) {
            *slot = Some(result);
        }
    }

    /// Every recipient not yet decided gets `rest`.
    fn finish(self, rest: RcptResult) -> Vec<RcptResult> {
        self.0
            .into_iter()
            .map(|r| r.unwrap_or_else(|| rest.clone()))
            .collect()
    }
}

fn all(job: &Job, result: RcptResult) -> Vec<RcptResult> {
    vec![result; job.recipients.len()]
}

/// How to open a session to one address.
pub(crate) struct Dial<'a> {
    pub cfg: &'a DeliveryConfig,
    pub tls: &'a TlsClients,
    pub policy: TlsPolicy,
    /// DANE's connector, in place of the policy's.
    pub dane: Option<&'a tokio_rustls::TlsConnector>,
    pub auth: Option<&'a Credentials>,
    pub lmtp: bool,
    /// The MX or relay host name (or `[literal]`).
    pub host: &'a str,
    /// The name to present in TLS (SNI) when it is not `host`: under DANE,
    /// the TLSA base domain (RFC 7672 §8.1), which differs from the MX
    /// name when the records were found at its CNAME-expanded name.
    pub tls_name: Option<&'a str>,
    pub ip: IpAddr,
    /// `host[ip]`.
    pub peer: &'a str,
}

/// Greeting, hello, STARTTLS and AUTH on a fresh TCP connection.
pub(crate) async fn open(tcp: tokio::net::TcpStream, d: &Dial<'_>) -> Result<Conn, OpenError> {
    use OpenError::NextHost;
    let t = &d.cfg.timeouts;
    let peer = d.peer;
    let mut s = Session::new(Stream::Plain(tcp));
    let greeting = s
        .read_reply(Stage::Greeting, t.greeting)
        .await
        .map_err(|e| NextHost(broke(&e, peer)))?;
    if !greeting.is_success() {
        quit_unless_421(&mut s, &greeting).await;
        return Err(NextHost(said(&greeting, peer)));
    }
    let mut ext = hello(&mut s, d).await.map_err(NextHost)?;
    let mut tls = false;
    if let Some(connector) = d.dane.or_else(|| d.tls.for_policy(d.policy)) {
        if ext.starttls() {
            let reply = s
                .command(&Command::StartTls, Stage::StartTls, t.ehlo)
                .await
                .map_err(|e| NextHost(broke(&e, peer)))?;
            if reply.code == 220 {
                let Stream::Plain(tcp) = s.into_inner() else {
                    unreachable!("STARTTLS is only sent on a plain stream")
                };
                let name = server_name(d.tls_name.unwrap_or(d.host), d.ip);
                let handshake = tokio::time::timeout(t.ehlo, connector.connect(name, tcp)).await;
                let stream = match handshake {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => {
                        return Err(tls_failed(
                            d,
                            format!("{peer}: TLS handshake: {}", handshake_error(&e)),
                        ))
                    }
                    Err(_) => {
                        return Err(tls_failed(
                            d,
                            format!("{peer}: TLS handshake timed out after {:?}", t.ehlo),
                        ))
                    }
                };
                s = Session::new(Stream::Tls(Box::new(stream)));
                tls = true;
                // RFC 3207 §4.2: forget what was learned before TLS.
                ext = hello(&mut s, d).await.map_err(NextHost)?;
            } else if d.policy.required() {
                quit_unless_421(&mut s, &reply).await;
                return Err(no_tls(
                    d,
                    format!(
                        "{} (TLS is required by policy {})",
                        said(&reply, peer),
                        d.policy
                    ),
                ));
            } else if reply.code == 421 {
                return Err(NextHost(said(&reply, peer)));
            }
        } else if d.policy.required() {
            quit(&mut s).await;
            return Err(no_tls(
                d,
                format!(
                    "451 4.7.4 {peer} does not offer STARTTLS, which {} requires",
                    if d.dane.is_some() {
                        "its DANE TLSA records".to_string()
                    } else {
                        format!("TLS policy {}", d.policy)
                    }
                ),
            ));
        }
    }
    if let Some(creds) = d.auth {
        authenticate(&mut s, &ext, creds, tls, d).await?;
    }
    Ok(Conn {
        session: s,
        ext,
        peer: peer.to_string(),
        lmtp: d.lmtp,
        tls,
        uses: 0,
    })
}

/// A failed handshake in words: rustls shows a certificate error made by
/// a verifier of ours (DANE) in its debug form, so that one is unwrapped.
fn handshake_error(e: &std::io::Error) -> String {
    let ours = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .and_then(|r| match r {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(o)) => {
                Some(o.0.to_string())
            }
            _ => None,
        });
    ours.unwrap_or_else(|| e.to_string())
}

fn tls_failed(d: &Dial<'_>, text: String) -> OpenError {
    match d.policy {
        TlsPolicy::May => OpenError::RetryPlain(text),
        TlsPolicy::Verify => OpenError::Tls {
            reason: text,
            kind: "validation-failure",
        },
        _ => OpenError::NextHost(text),
    }
}

/// No STARTTLS where the policy requires it.
fn no_tls(d: &Dial<'_>, text: String) -> OpenError {
    match d.policy {
        TlsPolicy::Verify => OpenError::Tls {
            reason: text,
            kind: "starttls-not-supported",
        },
        _ => OpenError::NextHost(text),
    }
}

/// AUTH PLAIN (RFC 4954), never over plaintext unless the route says
/// `tls = "none"`.
async fn authenticate(
    s: &mut Session<Stream>,
    ext: &Extensions,
    creds: &Credentials,
    tls: bool,
    d: &Dial<'_>,
) -> Result<(), OpenError> {
    let peer = d.peer;
    if !tls && d.policy != TlsPolicy::None {
        quit(s).await;
        return Err(OpenError::NextHost(format!(
            "451 4.7.0 {peer}: no TLS, so the AUTH credentials were not sent"
        )));
    }
    if !ext.auth_mechanisms().iter().any(|m| m == "PLAIN") {
        quit(s).await;
        return Err(OpenError::NextHost(format!(
            "451 4.7.0 {peer} does not offer AUTH PLAIN"
        )));
    }
    let token = format!("\0{}\0{}", creds.user, creds.password);
    let command = Command::Auth {
        mechanism: "PLAIN".into(),
        initial: Some(base64::engine::general_purpose::STANDARD.encode(token)),
    };
    let reply = s
        .command(&command, Stage::Auth, d.cfg.timeouts.ehlo)
        .await
        .map_err(|e| OpenError::NextHost(broke(&e, peer)))?;
    if reply.is_success() {
        tracing::debug!(user = %creds.user, "authenticated");
        return Ok(());
    }
    quit_unless_421(s, &reply).await;
    // A refused login is a configuration problem: defer, never bounce.
    Err(OpenError::NextHost(format!(
        "{} (AUTH as {})",
        said(&reply, peer),
        creds.user
    )))
}

/// EHLO, falling back to HELO when EHLO is refused permanently (RFC 5321
/// §3.2); LHLO for LMTP. `Err` carries the text for moving on.
async fn hello<S>(s: &mut Session<S>, d: &Dial<'_>) -> Result<Extensions, String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (t, peer, name) = (d.cfg.timeouts.ehlo, d.peer, d.cfg.helo_name.clone());
    let first = if d.lmtp {
        Command::Lhlo(name.clone())
    } else {
        Command::Ehlo(name.clone())
    };
    let reply = s
        .command(&first, Stage::Ehlo, t)
        .await
        .map_err(|e| broke(&e, peer))?;
    if reply.is_success() {
        return Ok(Extensions::from_ehlo(&reply));
    }
    if !reply.is_permanent() || d.lmtp {
        quit_unless_421(s, &reply).await;
        return Err(said(&reply, peer));
    }
    let reply = s
        .command(&Command::Helo(name), Stage::Helo, t)
        .await
        .map_err(|e| broke(&e, peer))?;
    if reply.is_success() {
        Ok(Extensions::default())
    } else {
        quit_unless_421(s, &reply).await;
        Err(said(&reply, peer))
    }
}

/// Whether the body needs an 8-bit clean path.
fn eight_bit(job: &Job) -> bool {
    job.params.body == Some(BodyType::EightBitMime) || !job.body.is_ascii()
}

/// Checks that need no command: what the peer cannot take fails at once.
fn refuse_early(c: &Conn, job: &Job) -> Option<String> {
    let (peer, ext) = (&c.peer, &c.ext);
    let size = job.body.len() as u64;
    if let Some(limit) = ext.size().filter(|limit| size > *limit) {
        return Some(format!(
            "552 5.3.4 message size {size} exceeds the limit of {limit} bytes of {peer}"
        ));
    }
    if job.params.body == Some(BodyType::BinaryMime) {
        return Some(format!(
            "554 5.6.3 {peer}: binary content cannot be relayed with DATA"
        ));
    }
    if !ext.eight_bit_mime() && eight_bit(job) {
        return Some(format!(
            "554 5.6.3 {peer} does not offer 8BITMIME and the message has 8-bit content; \
             Skein does not convert it"
        ));
    }
    if !ext.smtputf8() && job.sender.mailbox().is_some_and(|m| m.is_utf8()) {
        return Some(format!(
            "553 5.6.7 {peer} does not support SMTPUTF8, needed for the sender address"
        ));
    }
    None
}

/// How a transaction ends when it ends early: the outcome and the state
/// the connection is left in.
type Stop = (HostOutcome, After);

/// One message on an open connection. Every recipient gets a result, or
/// the whole message moves on to the next host.
///
/// A reused connection (`probe`) is checked with RSET first; with PIPELINING
/// the RSET leads the MAIL/RCPT/DATA batch instead of costing a round trip
/// of its own.
pub(crate) async fn transact(
    c: &mut Conn,
    job: &Job,
    cfg: &DeliveryConfig,
    probe: bool,
) -> (HostOutcome, After) {
    let pipelined = c.ext.pipelining() || c.lmtp;
    if probe && !pipelined && !reset(c, cfg).await {
        return (HostOutcome::Stale, After::Closed);
    }
    if let Some(text) = refuse_early(c, job) {
        return (HostOutcome::Done(all(job, failed(text))), After::Clean);
    }
    let chunked =
        pipelined && !c.lmtp && c.ext.has("CHUNKING") && job.body.len() <= CHUNK_WITH_ENVELOPE;
    let mut tx = Transaction::new(c, job, cfg, pipelined, chunked);
    if tx.asked.is_empty() {
        return (
            HostOutcome::Done(tx.results.finish(failed(String::new()))),
            After::Clean,
        );
    }
    let steps = async {
        tx.send_envelope(probe).await?;
        tx.mail_reply().await?;
        tx.rcpt_replies().await?;
        if tx.chunked {
            tx.chunk_without_recipients().await?;
        } else {
            tx.data().await?;
            tx.body().await?;
        }
        Err::<std::convert::Infallible, Stop>(tx.final_replies().await)
    };
    let Err(stop) = steps.await;
    stop
}

/// The dialogue of one message, step by step (RFC 5321 §3.3): the
/// envelope, MAIL's reply, each RCPT's, DATA's, the body, the final
/// reply (with LMTP one per accepted recipient).
struct Transaction<'a> {
    c: &'a mut Conn,
    job: &'a Job,
    t: &'a crate::config::Timeouts,
    peer: String,
    pipelined: bool,
    /// The message goes as one BDAT chunk at the end of the pipelined
    /// batch (no DATA).
    chunked: bool,
    /// MAIL, then an RCPT for each of `asked` (then DATA when pipelining
    /// without chunking).
    commands: Vec<Command>,
    /// The recipients RCPT is sent for, by index into the job.
    asked: Vec<usize>,
    /// Those the peer took.
    accepted: Vec<usize>,
    results: Results,
}

impl<'a> Transaction<'a> {
    fn new(
        c: &'a mut Conn,
        job: &'a Job,
        cfg: &'a DeliveryConfig,
        pipelined: bool,
        chunked: bool,
    ) -> Self {
        let peer = c.peer.clone();
        let (utf8, dsn) = (c.ext.smtputf8(), c.ext.dsn());
        let mut results = Results::new(job.recipients.len());
        let mut asked = Vec::with_capacity(job.recipients.len());
        let mut commands = vec![Command::Mail {
            from: job.sender.clone(),
            params: mail_params(&job.params, &c.ext, job.body.len() as u64, eight_bit(job)),
        }];
        for (i, (rcpt, params)) in job.recipients.iter().enumerate() {
            if !utf8 && rcpt.is_utf8() {
                let text = format!("553 5.6.7 {peer} does not support SMTPUTF8, needed for {rcpt}");
                results.set(i, failed(text));
                continue;
            }
            asked.push(i);
            commands.push(Command::Rcpt {
                to: ForwardPath::Mailbox(rcpt.clone()),
                params: rcpt_params(params, dsn),
            });
        }
        Transaction {
            c,
            job,
            t: &cfg.timeouts,
            peer,
            pipelined,
            chunked,
            commands,
            asked,
            accepted: Vec::new(),
            results,
        }
    }

    /// The session broke after the peer saw the envelope: whoever has no
    /// result is tried again later.
    fn broken(&mut self, e: &SessionError) -> Stop {
        let results = std::mem::replace(&mut self.results, Results::new(0));
        (
            HostOutcome::Done(results.finish(deferred(broke(e, &self.peer)))),
            After::Closed,
        )
    }

    /// The recipients not yet decided get `rest`.
    fn finish(&mut self, rest: RcptResult, after: After) -> Stop {
        let results = std::mem::replace(&mut self.results, Results::new(0));
        (HostOutcome::Done(results.finish(rest)), after)
    }

    /// MAIL alone, or with PIPELINING the whole envelope and DATA (or the
    /// message as a BDAT chunk) in one write, led by the probe's RSET on a
    /// reused connection.
    async fn send_envelope(&mut self, probe: bool) -> Result<(), Stop> {
        let (s, t) = (&mut self.c.session, self.t);
        if !self.pipelined {
            return s
                .send(&self.commands[0], Stage::Mail, t.mail)
                .await
                .map_err(|e| (HostOutcome::NextHost(broke(&e, &self.peer)), After::Closed));
        }
        if !self.chunked {
            self.commands.push(Command::Data);
        }
        if probe {
            self.commands.insert(0, Command::Rset);
        }
        let sent = if self.chunked {
            let sent = s
                .send_batch_with_chunk(&self.commands, &self.job.body, t.mail, t.data_block)
                .await;
            // The peer may answer the envelope before it has read the whole
            // chunk, and the chunk after: two writes. Without TCP_NODELAY
            // its second waits for our ACK of the first, which we would
            // delay (we have nothing to send) by up to 40 ms. Acknowledge
            // at once instead.
            quick_ack(s.get_ref().tcp());
            sent
        } else {
            s.send_batch(&self.commands, Stage::Mail, t.mail).await
        };
        if let Err(e) = sent {
            if probe {
                return Err((HostOutcome::Stale, After::Closed));
            }
            return Err((HostOutcome::NextHost(broke(&e, &self.peer)), After::Closed));
        }
        if probe {
            // Anything but 2xx: the peer is not in the state we think, and
            // the commands behind it cannot be trusted; closing abandons them
            // (DATA never gets its body). A chunk was the whole message; a
            // server must answer RSET 250 (RFC 5321 §4.1.1.5), and what
            // fails it here is a connection the peer already closed or a
            // 421 it left behind, after which it reads nothing more.
            match s.read_reply(Stage::Rset, t.mail).await {
                Ok(r) if r.is_success() => {
                    self.commands.remove(0);
                }
                _ => return Err((HostOutcome::Stale, After::Closed)),
            }
        }
        Ok(())
    }

    /// MAIL's reply: the sender refused ends the message here (for good or
    /// for this host), after the rest of a pipelined batch is read.
    async fn mail_reply(&mut self) -> Result<(), Stop> {
        let (s, t) = (&mut self.c.session, self.t);
        let mail = match s.read_reply(Stage::Mail, t.mail).await {
            Ok(r) => r,
            Err(e) => return Err((HostOutcome::NextHost(broke(&e, &self.peer)), After::Closed)),
        };
        if mail.code == 421 {
            return Err((
                HostOutcome::NextHost(said(&mail, &self.peer)),
                After::Closed,
            ));
        }
        if mail.is_success() {
            return Ok(());
        }
        let after = if self.pipelined {
            drain_refused_batch(s, self.asked.len(), self.chunked, t.rcpt).await
        } else {
            After::Clean
        };
        if mail.is_permanent() {
            tracing::info!(reply = %Escaped(&mail), "sender refused");
            return Err((
                HostOutcome::Done(all(self.job, failed(said(&mail, &self.peer)))),
                after,
            ));
        }
        let after = if after == After::Clean {
            After::Quit
        } else {
            after
        };
        Err((HostOutcome::NextHost(said(&mail, &self.peer)), after))
    }

    /// Each RCPT's reply (sent one by one without PIPELINING).
    async fn rcpt_replies(&mut self) -> Result<(), Stop> {
        for k in 0..self.asked.len() {
            let i = self.asked[k];
            if !self.pipelined {
                let r = self
                    .c
                    .session
                    .send(&self.commands[k + 1], Stage::Rcpt, self.t.rcpt);
                if let Err(e) = r.await {
                    return Err(self.broken(&e));
                }
            }
            let reply = match self.c.session.read_reply(Stage::Rcpt, self.t.rcpt).await {
                Ok(r) => r,
                Err(e) => return Err(self.broken(&e)),
            };
            if reply.code == 421 {
                let rest = deferred(said(&reply, &self.peer));
                return Err(self.finish(rest, After::Closed));
            }
            if reply.is_success() {
                self.accepted.push(i);
            } else {
                tracing::info!(rcpt = %Escaped(&self.job.recipients[i].0), reply = %Escaped(&reply), "recipient refused");
                self.results.set(i, refused(&reply, &self.peer));
            }
        }
        Ok(())
    }

    /// DATA (already sent when pipelining; otherwise only with recipients)
    /// and its 354.
    async fn data(&mut self) -> Result<(), Stop> {
        let no_one = || deferred(format!("{}: no recipient accepted", self.peer));
        if !self.pipelined && self.accepted.is_empty() {
            let rest = no_one();
            return Err(self.finish(rest, After::Clean));
        }
        let (s, t) = (&mut self.c.session, self.t);
        if !self.pipelined {
            if let Err(e) = s.send(&Command::Data, Stage::Data, t.data_init).await {
                return Err(self.broken(&e));
            }
        }
        let data = match self.c.session.read_reply(Stage::Data, t.data_init).await {
            Ok(r) => r,
            Err(e) => return Err(self.broken(&e)),
        };
        if self.accepted.is_empty() {
            // Pipelined DATA after every RCPT was refused: a correct server
            // refuses it; one that says 354 gets an empty message it must drop.
            let after = match data.code {
                354 => end_unwanted_data(&mut self.c.session, t.data_term).await,
                421 => After::Closed,
                _ => After::Clean,
            };
            let rest = no_one();
            return Err(self.finish(rest, after));
        }
        if data.code != 354 {
            // A 2xx instead of 354 is nonsense; retrying is the safe reading.
            let outcome = if data.is_permanent() {
                failed(said(&data, &self.peer))
            } else {
                deferred(said(&data, &self.peer))
            };
            let after = if data.code == 421 {
                After::Closed
            } else {
                After::Clean
            };
            return Err(self.finish(outcome, after));
        }
        Ok(())
    }

    /// The chunk's reply when every RCPT was refused: a correct server
    /// refuses the chunk; one that takes it took a message without
    /// recipients, and the connection is not trusted for another.
    async fn chunk_without_recipients(&mut self) -> Result<(), Stop> {
        if !self.accepted.is_empty() {
            return Ok(());
        }
        let reply = match self
            .c
            .session
            .read_reply(Stage::EndOfData, self.t.data_term)
            .await
        {
            Ok(r) => r,
            Err(e) => return Err(self.broken(&e)),
        };
        let after = match reply.code {
            421 => After::Closed,
            _ if reply.is_success() => After::Quit,
            _ => After::Clean,
        };
        let rest = deferred(format!("{}: no recipient accepted", self.peer));
        Err(self.finish(rest, after))
    }

    async fn body(&mut self) -> Result<(), Stop> {
        match self
            .c
            .session
            .send_body(&self.job.body, self.t.data_block)
            .await
        {
            Ok(()) => Ok(()),
            Err(e) => Err(self.broken(&e)),
        }
    }

    /// The final reply, or with LMTP one per accepted recipient.
    async fn final_replies(&mut self) -> Stop {
        let lmtp = self.c.lmtp;
        let finals = if lmtp { self.accepted.len() } else { 1 };
        let mut after = After::Clean;
        for k in 0..finals {
            let reply = match self
                .c
                .session
                .read_reply(Stage::EndOfData, self.t.data_term)
                .await
            {
                Ok(r) => r,
                // The peer may have taken the message before going silent:
                // this is the duplicate window every MTA has (RFC 1047).
                Err(e) => return self.broken(&e),
            };
            if reply.code == 421 {
                after = After::Closed;
            }
            let outcome = if reply.is_success() {
                RcptResult::Delivered {
                    reply: reply.to_string(),
                    host: self.peer.clone(),
                    tls: self.c.tls,
                    dsn: self.c.ext.dsn() || lmtp,
                    lmtp,
                }
            } else {
                tracing::info!(reply = %Escaped(&reply), "message refused");
                refused(&reply, &self.peer)
            };
            if lmtp {
                self.results.set(self.accepted[k], outcome);
                if after == After::Closed {
                    let rest = deferred(said(&reply, &self.peer));
                    return self.finish(rest, after);
                }
            } else {
                if outcome.is_delivered() {
                    // The node logs each recipient's outcome once (Postfix's
                    // status=sent line); this is the transaction's view of it.
                    tracing::debug!(reply = %Escaped(&reply), recipients = self.accepted.len(), tls = self.c.tls, "delivered");
                }
                for &i in &self.accepted {
                    self.results.set(i, outcome.clone());
                }
            }
        }
        if self.c.session.has_unread() {
            after = After::Quit;
        }
        self.c.uses += 1;
        self.finish(failed(String::new()), after)
    }
}

/// After a refused MAIL in a pipelined batch: read the RCPT and DATA (or
/// BDAT) replies the batch still has coming (a server wrongly saying 354
/// gets a lone `.`; one taking the chunk is not trusted for another).
async fn drain_refused_batch(
    s: &mut Session<Stream>,
    rcpts: usize,
    chunked: bool,
    t: Duration,
) -> After {
    for _ in 0..rcpts {
        match s.read_reply(Stage::Rcpt, t).await {
            Ok(r) if r.code == 421 => return After::Closed,
            Ok(_) => {}
            Err(_) => return After::Closed,
        }
    }
    if chunked {
        return match s.read_reply(Stage::EndOfData, t).await {
            Ok(r) if r.code == 421 => After::Closed,
            Ok(r) if r.is_success() => After::Quit,
            Ok(_) => After::Clean,
            Err(_) => After::Closed,
        };
    }
    match s.read_reply(Stage::Data, t).await {
        Ok(r) if r.code == 354 => end_unwanted_data(s, t).await,
        Ok(r) if r.code == 421 => After::Closed,
        Ok(_) => After::Clean,
        Err(_) => After::Closed,
    }
}

async fn end_unwanted_data(s: &mut Session<Stream>, t: Duration) -> After {
    if s.send_raw(b".\r\n", Stage::EndOfData, t).await.is_err() {
        return After::Closed;
    }
    match s.read_reply(Stage::EndOfData, t).await {
        Ok(r) if r.code != 421 => After::Quit,
        _ => After::Closed,
    }
}

/// Acknowledge what the peer sends next at once (Linux: TCP_QUICKACK,
/// which holds until the connection looks interactive again, so it is set
/// after each batch). Elsewhere, and if it fails, ACKs stay delayed.
fn quick_ack(tcp: &tokio::net::TcpStream) {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let _ = socket2::SockRef::from(tcp).set_tcp_quickack(true);
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = tcp;
}

/// A pooled connection is probed with RSET before it carries a message.
async fn reset(c: &mut Conn, cfg: &DeliveryConfig) -> bool {
    matches!(
        c.session.command(&Command::Rset, Stage::Rset, cfg.timeouts.mail).await,
        Ok(r) if r.is_success()
    )
}

/// MAIL parameters for this peer: SIZE when it advertises SIZE, BODY when
/// it offers 8BITMIME, SMTPUTF8 when offered, RET/ENVID when it offers DSN.
fn mail_params(job: &MailParams, ext: &Extensions, size: u64, eight_bit: bool) -> MailParams {
    let dsn = ext.dsn();
    let body = match job.body {
        Some(BodyType::BinaryMime) => None,
        _ if eight_bit && ext.eight_bit_mime() => Some(BodyType::EightBitMime),
        other => other.filter(|_| ext.eight_bit_mime()),
    };
    MailParams {
        size: ext.has("SIZE").then_some(size),
        body,
        smtputf8: job.smtputf8 && ext.smtputf8(),
        ret: job.ret.filter(|_| dsn),
        envid: job.envid.clone().filter(|_| dsn),
        ..MailParams::default()
    }
}

fn rcpt_params(params: &RcptParams, dsn: bool) -> RcptParams {
    if !dsn {
        return RcptParams::default();
    }
    RcptParams {
        notify: params.notify,
        orcpt: params.orcpt.clone(),
        ..RcptParams::default()
    }
}

/// After a 421 the server closes the connection; saying QUIT would only
/// produce an error.
async fn quit_unless_421<S>(s: &mut Session<S>, reply: &Reply)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if reply.code != 421 {
        quit(s).await;
    }
}

/// Polite end of session. Its failure changes nothing.
pub(crate) async fn quit<S>(s: &mut Session<S>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if let Err(error) = s.command(&Command::Quit, Stage::Quit, QUIT_WAIT).await {
        tracing::debug!(error = %Escaped(&error), "QUIT failed");
    }
}
