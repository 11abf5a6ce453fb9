//! A small SMTP client for tests, written on the shared grammar: one
//! message per connection, every reply checked by the caller.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context};
use skein_queue::MessageId;
use skein_smtp::{dot_stuff, parse_reply, Reply};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The final answer to one message.
#[derive(Debug, Clone)]
pub struct Submission {
    pub reply: Reply,
    /// The queue id of a 250.
    pub id: Option<MessageId>,
}

impl Submission {
    pub fn accepted(&self) -> bool {
        self.reply.code == 250
    }
}

struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn reply(&mut self) -> anyhow::Result<Reply> {
        loop {
            if let Some((r, n)) = parse_reply(&self.buf)? {
                self.buf.drain(..n);
                return Ok(r);
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(30), self.stream.read(&mut chunk))
                .await
                .context("timed out waiting for a reply")??;
            if n == 0 {
                bail!("connection closed");
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    async fn command(&mut self, line: &str) -> anyhow::Result<Reply> {
        self.stream
            .write_all(format!("{line}\r\n").as_bytes())
            .await?;
        self.reply().await
    }
}

/// Send one message; the error is for a broken conversation, an SMTP
/// refusal is an `Ok` with the reply.
pub async fn send(
    addr: SocketAddr,
    from: &str,
    to: &[&str],
    data: &[u8],
) -> anyhow::Result<Submission> {
    let to: Vec<(&str, &str)> = to.iter().map(|t| (*t, "")).collect();
    send_with_params(addr, (from, ""), &to, data).await
}

/// [`send`] with MAIL and RCPT parameters, written as they go on the wire
/// (`"RET=FULL ENVID=x"`): `from` and each of `to` are (address, parameters).
pub async fn send_with_params(
    addr: SocketAddr,
    from: (&str, &str),
    to: &[(&str, &str)],
    data: &[u8],
) -> anyhow::Result<Submission> {
    let stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .context("connect timed out")??;
    let mut c = Conn {
        stream,
        buf: Vec::new(),
    };
    let done = |reply: Reply| Ok(Submission { reply, id: None });
    let greeting = c.reply().await?;
    if greeting.code != 220 {
        return done(greeting);
    }
    let r = c.command("EHLO client.test").await?;
    if r.code != 250 {
        return done(r);
    }
    let line = |verb: &str, addr: &str, params: &str| {
        let mut l = format!("{verb}<{addr}>");
        if !params.is_empty() {
            l.push(' ');
            l.push_str(params);
        }
        l
    };
    let r = c.command(&line("MAIL FROM:", from.0, from.1)).await?;
    if r.code != 250 {
        return done(r);
    }
    for (rcpt, params) in to {
        let r = c.command(&line("RCPT TO:", rcpt, params)).await?;
        if r.code != 250 {
            return done(r);
        }
    }
    let r = c.command("DATA").await?;
    if r.code != 354 {
        return done(r);
    }
    let mut body = Vec::with_capacity(data.len() + 64);
    dot_stuff(data, &mut body);
    c.stream.write_all(&body).await?;
    let reply = c.reply().await?;
    let id = reply
        .text()
        .strip_prefix("Ok: queued as ")
        .and_then(|s| s.trim().parse().ok());
    let _ = c.command("QUIT").await;
    Ok(Submission { reply, id })
}
