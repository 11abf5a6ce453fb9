//! Sending one message per connection for tests, on the delivery engine's
//! [`Session`]: every reply checked by the caller.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use skein_delivery::{Session, Stage};
use skein_queue::MessageId;
use skein_smtp::Reply;
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

/// Every reply is waited for at most this long.
const WAIT: Duration = Duration::from_secs(30);

/// A session that writes exactly the lines a test gives it (a test may
/// mean to send what a real client must not) on the delivery engine's
/// framing and timeouts.
struct Conn(Session<TcpStream>);

impl Conn {
    async fn reply(&mut self, stage: Stage) -> anyhow::Result<Reply> {
        Ok(self.0.read_reply(stage, WAIT).await?)
    }

    async fn command(&mut self, line: &str, stage: Stage) -> anyhow::Result<Reply> {
        self.0
            .send_raw(format!("{line}\r\n").as_bytes(), stage, WAIT)
            .await?;
        self.reply(stage).await
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
    let mut c = Conn(Session::new(stream));
    let done = |reply: Reply| Ok(Submission { reply, id: None });
    let greeting = c.reply(Stage::Greeting).await?;
    if greeting.code != 220 {
        return done(greeting);
    }
    let r = c.command("EHLO client.test", Stage::Ehlo).await?;
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
    let r = c
        .command(&line("MAIL FROM:", from.0, from.1), Stage::Mail)
        .await?;
    if r.code != 250 {
        return done(r);
    }
    for (rcpt, params) in to {
        let r = c
            .command(&line("RCPT TO:", rcpt, params), Stage::Rcpt)
            .await?;
        if r.code != 250 {
            return done(r);
        }
    }
    let r = c.command("DATA", Stage::Data).await?;
    if r.code != 354 {
        return done(r);
    }
    c.0.send_body(data, WAIT).await?;
    let reply = c.reply(Stage::EndOfData).await?;
    let id = reply
        .text()
        .strip_prefix("Ok: queued as ")
        .and_then(|s| s.trim().parse().ok());
    let _ = c.command("QUIT", Stage::Quit).await;
    Ok(Submission { reply, id })
}
