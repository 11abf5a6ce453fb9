//! Message content: DATA (dot-stuffed, ended only by CRLF "." CRLF) and
//! BDAT chunks (RFC 3030), the checks every message passes, and the hand
//! over to the accept path.
//!
//! What a message may not contain, whichever way it came: a bare CR or LF
//! or a NUL (refused, never normalised: a lenient server further on could
//! read a bare LF "." LF as the end of the data and find a second message
//! — SMTP smuggling), a line over 1000 octets (RFC 5321 §4.5.3.1.6), more
//! than [`MAX_HOPS`] Received headers (a mail loop).

use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use skein_queue::MessageId;
use skein_smtp::{has_bare_line_endings, DataReader, Escaped, MAX_TEXT_LINE};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

use super::replies;
use super::session::{Flow, Session, Transaction};
use crate::cluster::ProposeError;
use crate::metrics::ResultLabel;

/// Received headers after which a message is taken to be looping.
pub const MAX_HOPS: usize = 50;
/// Time allowed before the minimum data rate applies.
const RATE_GRACE: Duration = Duration::from_secs(5);
/// The most time a client can have in hand: what it sent ahead of the
/// minimum rate buys it at most this long a pause.
const RATE_WINDOW: Duration = Duration::from_secs(10);

/// The minimum data rate as a leaky bucket: the client has time in hand,
/// which passes, and which each byte it sends adds `1 / rate` seconds to,
/// never more than [`RATE_WINDOW`]. With no time left it is too slow. So
/// the rate holds over any stretch of the data, not just on average since
/// its start: a client cannot send quickly at first and then trickle.
pub(super) struct DataClock {
    rate: u64,
    /// When the time in hand runs out.
    until: Instant,
}

impl DataClock {
    pub(super) fn start(rate: u64) -> Self {
        DataClock {
            rate: rate.max(1),
            until: Instant::now() + RATE_GRACE,
        }
    }

    /// `n` more bytes arrived now.
    pub(super) fn received(&mut self, n: usize, now: Instant) {
        let earned = Duration::from_micros((n as u64).saturating_mul(1_000_000) / self.rate);
        self.until = (self.until + earned).min(now + RATE_WINDOW);
    }

    /// When the next bytes must have arrived.
    pub(super) fn deadline(&self) -> Instant {
        self.until
    }
}

/// BDAT chunks received so far in a transaction.
#[derive(Default)]
pub(super) struct Chunks {
    body: Vec<u8>,
    received: u64,
    exceeded: bool,
}

/// Why the data of a message is refused.
enum Verdict {
    TooBig,
    BareLineEnding,
    Nul,
    LineTooLong,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<'_, S> {
    /// Read more message data, keeping to the minimum data rate: `false`
    /// when the client went away or is too slow (it was told).
    async fn more_data(&mut self, clock: &mut DataClock, received: u64) -> std::io::Result<bool> {
        let by_rate = clock.deadline();
        let deadline = (Instant::now() + self.ctx.config.timeout).min(by_rate);
        self.flush().await?;
        let before = self.rbuf.len();
        match tokio::time::timeout_at(deadline.into(), self.stream.read_buf(&mut self.rbuf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => Ok(false),
            Ok(Ok(_)) => {
                clock.received(self.rbuf.len() - before, Instant::now());
                Ok(true)
            }
            Err(_) => {
                tracing::info!(client = %self.peer, received, "message data too slow");
                self.reply(if deadline == by_rate {
                    replies::data_too_slow()
                } else {
                    replies::timeout(&self.ctx.config.hostname)
                });
                Ok(false)
            }
        }
    }

    fn transaction_ready(&mut self) -> bool {
        match &self.tx {
            None => {
                self.reply(replies::need_mail());
                false
            }
            Some(t) if t.rcpts.is_empty() => {
                self.reply(replies::need_rcpt());
                false
            }
            Some(_) => true,
        }
    }

    pub(super) async fn data(&mut self) -> std::io::Result<Flow> {
        if !self.transaction_ready() {
            return Ok(Flow::Continue);
        }
        if !self.rbuf.is_empty() {
            // The client sent data without waiting for the 354: it does not
            // follow the protocol, and what it sent cannot be trusted to be
            // what it meant. Postfix's answer, and ours.
            tracing::info!(client = %self.peer, "pipelining past DATA");
            self.tx = None;
            self.reply(replies::out_of_sync());
            return Ok(Flow::Close);
        }
        self.counts.data += 1;
        self.reply(replies::start_data());
        let max = self.ctx.config.max_message_size;
        let mut reader = DataReader::new(max);
        let hint = self
            .tx
            .as_ref()
            .and_then(|t| t.params.size)
            .unwrap_or(0)
            .min(max as u64) as usize;
        let mut body = Vec::with_capacity(hint.max(4096));
        let mut clock = DataClock::start(self.ctx.config.min_data_rate);
        loop {
            let p = reader.feed(&self.rbuf, &mut body);
            self.rbuf.advance(p.consumed);
            if p.done {
                break;
            }
            if !self.more_data(&mut clock, reader.body_len()).await? {
                // Gone or stalled mid-message: nothing accepted, nothing queued.
                self.tx = None;
                return Ok(Flow::Close);
            }
        }
        let tx = self.tx.take().expect("checked by transaction_ready");
        let verdict = if reader.exceeded() {
            Some(Verdict::TooBig)
        } else if reader.saw_bare_lf() || reader.saw_bare_cr() {
            Some(Verdict::BareLineEnding)
        } else if reader.saw_nul() {
            Some(Verdict::Nul)
        } else if reader.longest_line() > MAX_TEXT_LINE {
            Some(Verdict::LineTooLong)
        } else {
            None
        };
        self.conclude(tx, body, verdict).await;
        Ok(Flow::Continue)
    }

    pub(super) async fn bdat(&mut self, size: u64, last: bool) -> std::io::Result<Flow> {
        // The chunk follows the command whatever we answer: read it first.
        let ready = self.tx.is_some() && self.tx.as_ref().is_some_and(|t| !t.rcpts.is_empty());
        let max = self.ctx.config.max_message_size as u64;
        let mut chunks = self
            .tx
            .as_mut()
            .and_then(|t| t.chunks.take())
            .unwrap_or_default();
        let mut clock = DataClock::start(self.ctx.config.min_data_rate);
        let mut left = size;
        while left > 0 {
            if self.rbuf.is_empty() && !self.more_data(&mut clock, size - left).await? {
                self.tx = None;
                return Ok(Flow::Close);
            }
            let n = (left as usize).min(self.rbuf.len());
            if ready && !chunks.exceeded && chunks.received + (n as u64) <= max {
                chunks.body.extend_from_slice(&self.rbuf[..n]);
            } else {
                chunks.exceeded = true;
                chunks.body = Vec::new();
            }
            chunks.received += n as u64;
            self.rbuf.advance(n);
            left -= n as u64;
        }
        if !ready {
            self.transaction_ready();
            return Ok(Flow::Continue);
        }
        if chunks.received == size {
            self.counts.data += 1;
        }
        if !last {
            if let Some(t) = self.tx.as_mut() {
                t.chunks = Some(chunks);
            }
            self.reply(replies::chunk_received(size));
            return Ok(Flow::Continue);
        }
        let tx = self.tx.take().expect("checked above");
        let body = chunks.body;
        let verdict = if chunks.exceeded {
            Some(Verdict::TooBig)
        } else if has_bare_line_endings(&body) {
            Some(Verdict::BareLineEnding)
        } else if body.contains(&0) {
            Some(Verdict::Nul)
        } else if longest_line(&body) > MAX_TEXT_LINE {
            Some(Verdict::LineTooLong)
        } else {
            None
        };
        self.conclude(tx, body, verdict).await;
        Ok(Flow::Continue)
    }

    /// Refuse the message, or queue it and answer only once it committed.
    async fn conclude(&mut self, tx: Transaction, body: Vec<u8>, verdict: Option<Verdict>) {
        let refusal = match verdict {
            Some(Verdict::TooBig) => Some(replies::message_too_big()),
            Some(Verdict::BareLineEnding) => Some(replies::bare_line_ending_in_data()),
            Some(Verdict::Nul) => Some(replies::nul_in_data()),
            Some(Verdict::LineTooLong) => Some(replies::text_line_too_long()),
            None if received_headers(&body) > MAX_HOPS => Some(replies::too_many_hops()),
            None => None,
        };
        if let Some(r) = refusal {
            tracing::info!(client = %self.peer, size = body.len(), reply = %r, "message refused");
            return self.reply(r);
        }
        let id = self.ctx.acceptor.next_id();
        let message = self.with_received_header(&id, &tx, &body);
        let message = self.dkim_signed(&id, message).await;
        let (nrcpt, size) = (tx.rcpts.len(), message.len());
        let from = tx.from.clone();
        match self
            .ctx
            .acceptor
            .accept(id, tx.from, tx.params, tx.rcpts, message)
            .await
        {
            Ok(()) => {
                self.counts.queued += 1;
                tracing::info!(
                    queue_id = %id,
                    client = %self.peer,
                    helo = %Escaped(self.helo.as_deref().unwrap_or("")),
                    user = %Escaped(self.user.as_deref().unwrap_or("")),
                    from = %Escaped(&from),
                    nrcpt,
                    size,
                    "queued"
                );
                self.reply(replies::queued(&id));
            }
            Err(e @ ProposeError::TooLarge { .. }) => {
                // The envelope and data together are more than one log entry
                // can carry: it would never replicate, so it is refused for
                // good rather than deferred.
                tracing::warn!(queue_id = %id, client = %self.peer, error = %e, "message refused: too large to replicate");
                self.reply(replies::message_too_big());
            }
            Err(e) => {
                self.ctx.metrics.commit_failures.inc();
                tracing::warn!(queue_id = %id, client = %self.peer, error = %e, "message not committed; answered 451");
                self.reply(replies::not_committed());
            }
        }
    }

    /// A trusted client's message with a DKIM signature in front for each
    /// `[[dkim]]` key of its `From:` domain. Signing happens here, once,
    /// before the commit; a failure sends the message on unsigned.
    async fn dkim_signed(&self, id: &MessageId, message: Bytes) -> Bytes {
        let signers = &self.ctx.dkim;
        if signers.is_empty() || !self.ctx.trusted(self.peer.ip(), self.user.is_some()) {
            return message;
        }
        let (signers, m) = (signers.clone(), message.clone());
        let Ok((fields, errors)) = tokio::task::spawn_blocking(move || signers.sign(&m)).await
        else {
            return message;
        };
        let metrics = &self.ctx.metrics.dkim_signatures;
        for e in &errors {
            metrics
                .get_or_create(&ResultLabel { result: "failed" })
                .inc();
            tracing::warn!(queue_id = %id, error = %e, "message not DKIM-signed with this key");
        }
        if fields.is_empty() {
            return message;
        }
        metrics
            .get_or_create(&ResultLabel { result: "signed" })
            .inc_by(fields.len() as u64);
        let mut out =
            Vec::with_capacity(fields.iter().map(String::len).sum::<usize>() + message.len());
        for f in &fields {
            out.extend_from_slice(f.as_bytes());
        }
        out.extend_from_slice(&message);
        Bytes::from(out)
    }

    /// The message as queued: our Received header (RFC 5321 §4.4), then the
    /// client's data byte for byte.
    fn with_received_header(&self, id: &MessageId, tx: &Transaction, body: &[u8]) -> Bytes {
        let helo = self.helo.as_deref().unwrap_or("unknown");
        let ip = match self.peer.ip().to_canonical() {
            std::net::IpAddr::V4(v4) => v4.to_string(),
            std::net::IpAddr::V6(v6) => format!("IPv6:{v6}"),
        };
        let mut h = format!(
            "Received: from {helo} ([{ip}])\r\n\tby {} (Skein) with {} id {id}",
            self.ctx.config.hostname,
            self.protocol(tx.params.smtputf8)
        );
        if let [only] = tx.rcpts.as_slice() {
            h.push_str(&format!("\r\n\tfor <{}>", only.address));
        }
        h.push_str(&format!("; {}\r\n", chrono::Utc::now().to_rfc2822()));
        let mut out = Vec::with_capacity(h.len() + body.len());
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(body);
        Bytes::from(out)
    }
}

/// Received headers in the header section (up to the first empty line).
fn received_headers(body: &[u8]) -> usize {
    body.split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .take_while(|l| !l.is_empty())
        .filter(|l| l.len() >= 9 && l[..9].eq_ignore_ascii_case(b"received:"))
        .count()
}

/// The longest line, CRLF included.
fn longest_line(body: &[u8]) -> usize {
    body.split(|&b| b == b'\n')
        .map(|l| l.len() + 1)
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_data_rate_holds_over_any_stretch_not_just_on_average() {
        let t0 = Instant::now();
        let mut c = DataClock {
            rate: 1000,
            until: t0 + RATE_WINDOW,
        };
        // A fast start banks at most the window, however much it sent.
        c.received(10_000_000, t0 + Duration::from_secs(1));
        assert_eq!(c.deadline(), t0 + Duration::from_secs(1) + RATE_WINDOW);
        // Then a trickle of 100 bytes a second falls behind and runs out.
        let mut now = t0 + Duration::from_secs(1);
        while c.deadline() > now {
            now += Duration::from_secs(1);
            c.received(100, now);
        }
        let stalled = now.duration_since(t0 + Duration::from_secs(1));
        assert!(
            stalled <= Duration::from_secs(12),
            "a trickle lasted {stalled:?} after a fast start"
        );
        // Keeping up with the rate never runs out.
        let mut c = DataClock::start(1000);
        let mut now = Instant::now();
        for _ in 0..1000 {
            now += Duration::from_secs(1);
            c.received(1000, now);
            assert!(c.deadline() > now);
        }
    }

    #[test]
    fn hops_are_counted_in_the_header_section_only() {
        let m = b"Received: a\r\nreceived: b\r\nSubject: x\r\n\r\nReceived: in the body\r\n";
        assert_eq!(received_headers(m), 2);
        assert_eq!(received_headers(b"\r\nReceived: x\r\n"), 0);
    }

    #[test]
    fn longest_line_counts_the_line_ending() {
        assert_eq!(longest_line(b"abc\r\nde\r\n"), 5);
        assert_eq!(longest_line(&[b'x'; 1001]), 1002);
    }
}
