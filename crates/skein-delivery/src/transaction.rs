//! One SMTP transaction on an open [`Session`]: greeting, EHLO, MAIL, RCPT
//! per recipient, DATA, QUIT (RFC 5321 §3.3, §4.2), and what each reply
//! means for the recipients.
//!
//! The outcome is either a result for every recipient or "try the next
//! host": only failures before the transaction started (greeting, EHLO,
//! a transient MAIL reply, a broken connection up to MAIL) move on, since
//! after that the peer has already judged some recipients.

use std::time::Duration;

use skein_smtp::{BodyType, Command, Extensions, ForwardPath, MailParams, RcptParams, Reply};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::config::DeliveryConfig;
use crate::job::{Job, RcptResult};
use crate::session::{Session, SessionError, Stage};

/// Longest wait for the reply to QUIT. The results are known by then, so
/// a peer that never answers QUIT must not hold them up for minutes.
const QUIT_WAIT: Duration = Duration::from_secs(10);

pub(crate) enum HostOutcome {
    /// A result for every recipient, in input order.
    Done(Vec<RcptResult>),
    /// This host could not take the message; the text says why.
    NextHost(String),
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

/// Runs the transaction for `job` on a session whose greeting has not been
/// read yet. `peer` is `host[ip]`, used in every result text.
pub(crate) async fn deliver_on<S>(
    s: &mut Session<S>,
    job: &Job,
    cfg: &DeliveryConfig,
    peer: &str,
) -> HostOutcome
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let t = &cfg.timeouts;
    let greeting = match s.read_reply(Stage::Greeting, t.greeting).await {
        Ok(r) => r,
        Err(e) => return HostOutcome::NextHost(broke(&e, peer)),
    };
    if !greeting.is_success() {
        quit_unless_421(s, &greeting).await;
        return HostOutcome::NextHost(said(&greeting, peer));
    }
    let ext = match hello(s, cfg, peer).await {
        Ok(ext) => ext,
        Err(text) => return HostOutcome::NextHost(text),
    };

    let size = job.body.len() as u64;
    if let Some(limit) = ext.size().filter(|limit| size > *limit) {
        quit(s).await;
        let text =
            format!("552 5.3.4 message size {size} exceeds the limit of {limit} bytes of {peer}");
        return HostOutcome::Done(all(job, failed(text)));
    }
    let utf8 = ext.smtputf8();
    if !utf8 && job.sender.mailbox().is_some_and(|m| m.is_utf8()) {
        quit(s).await;
        let text =
            format!("553 5.6.7 {peer} does not support SMTPUTF8, needed for the sender address");
        return HostOutcome::Done(all(job, failed(text)));
    }

    let mail = Command::Mail {
        from: job.sender.clone(),
        params: mail_params(&job.params, &ext, size),
    };
    let reply = match s.command(&mail, Stage::Mail, t.mail).await {
        Ok(r) => r,
        Err(e) => return HostOutcome::NextHost(broke(&e, peer)),
    };
    if !reply.is_success() {
        quit_unless_421(s, &reply).await;
        if reply.is_permanent() {
            tracing::info!(%reply, "sender refused");
            return HostOutcome::Done(all(job, failed(said(&reply, peer))));
        }
        return HostOutcome::NextHost(said(&reply, peer));
    }

    let mut results = Results::new(job.recipients.len());
    let mut accepted = Vec::with_capacity(job.recipients.len());
    for (i, (rcpt, params)) in job.recipients.iter().enumerate() {
        if !utf8 && rcpt.is_utf8() {
            let text = format!("553 5.6.7 {peer} does not support SMTPUTF8, needed for {rcpt}");
            results.set(i, failed(text));
            continue;
        }
        let command = Command::Rcpt {
            to: ForwardPath::Mailbox(rcpt.clone()),
            params: rcpt_params(params, &ext),
        };
        let reply = match s.command(&command, Stage::Rcpt, t.rcpt).await {
            Ok(r) => r,
            Err(e) => return HostOutcome::Done(results.finish(deferred(broke(&e, peer)))),
        };
        if reply.code == 421 {
            return HostOutcome::Done(results.finish(deferred(said(&reply, peer))));
        }
        if reply.is_success() {
            accepted.push(i);
        } else {
            tracing::info!(%rcpt, %reply, "recipient refused");
            results.set(i, refused(&reply, peer));
        }
    }
    if accepted.is_empty() {
        quit(s).await;
        let unreachable = deferred(format!("{peer}: no recipient accepted"));
        return HostOutcome::Done(results.finish(unreachable));
    }

    let reply = match s.command(&Command::Data, Stage::Data, t.data_init).await {
        Ok(r) => r,
        Err(e) => return HostOutcome::Done(results.finish(deferred(broke(&e, peer)))),
    };
    if reply.code != 354 {
        quit_unless_421(s, &reply).await;
        // A 2xx instead of 354 is nonsense; retrying is the safe reading.
        let outcome = if reply.is_permanent() {
            failed(said(&reply, peer))
        } else {
            deferred(said(&reply, peer))
        };
        return HostOutcome::Done(results.finish(outcome));
    }
    if let Err(e) = s.send_body(&job.body, t.data_block).await {
        return HostOutcome::Done(results.finish(deferred(broke(&e, peer))));
    }
    let reply = match s.read_reply(Stage::EndOfData, t.data_term).await {
        Ok(r) => r,
        // The peer may have taken the message before going silent: this is
        // the duplicate window every MTA has (RFC 1047).
        Err(e) => return HostOutcome::Done(results.finish(deferred(broke(&e, peer)))),
    };
    let outcome = if reply.is_success() {
        tracing::info!(%reply, recipients = accepted.len(), "delivered");
        RcptResult::Delivered {
            reply: reply.to_string(),
            host: peer.to_string(),
        }
    } else {
        tracing::info!(%reply, "message refused");
        refused(&reply, peer)
    };
    for i in accepted {
        results.set(i, outcome.clone());
    }
    quit_unless_421(s, &reply).await;
    HostOutcome::Done(results.finish(outcome))
}

/// EHLO, falling back to HELO when EHLO is refused permanently (RFC 5321
/// §3.2). `Err` carries the text for moving on to the next host.
async fn hello<S>(
    s: &mut Session<S>,
    cfg: &DeliveryConfig,
    peer: &str,
) -> Result<Extensions, String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let t = cfg.timeouts.ehlo;
    let ehlo = Command::Ehlo(cfg.helo_name.clone());
    let reply = s
        .command(&ehlo, Stage::Ehlo, t)
        .await
        .map_err(|e| broke(&e, peer))?;
    if reply.is_success() {
        return Ok(Extensions::from_ehlo(&reply));
    }
    if !reply.is_permanent() {
        quit_unless_421(s, &reply).await;
        return Err(said(&reply, peer));
    }
    let helo = Command::Helo(cfg.helo_name.clone());
    let reply = s
        .command(&helo, Stage::Helo, t)
        .await
        .map_err(|e| broke(&e, peer))?;
    if reply.is_success() {
        Ok(Extensions::default())
    } else {
        quit_unless_421(s, &reply).await;
        Err(said(&reply, peer))
    }
}

/// MAIL parameters for this peer: SIZE when it advertises SIZE, BODY when
/// it offers 8BITMIME, SMTPUTF8 when offered, RET/ENVID when it offers DSN.
/// Without 8BITMIME an 8-bit body is sent as is, as Postfix does: a
/// conversion to 7 bits would change signed content.
fn mail_params(job: &MailParams, ext: &Extensions, size: u64) -> MailParams {
    let dsn = ext.dsn();
    MailParams {
        size: ext.has("SIZE").then_some(size),
        body: job
            .body
            .filter(|b| *b != BodyType::BinaryMime && ext.eight_bit_mime()),
        smtputf8: job.smtputf8 && ext.smtputf8(),
        ret: job.ret.filter(|_| dsn),
        envid: job.envid.clone().filter(|_| dsn),
        ..MailParams::default()
    }
}

fn rcpt_params(params: &RcptParams, ext: &Extensions) -> RcptParams {
    if !ext.dsn() {
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
async fn quit<S>(s: &mut Session<S>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if let Err(error) = s.command(&Command::Quit, Stage::Quit, QUIT_WAIT).await {
        tracing::debug!(%error, "QUIT failed");
    }
}
