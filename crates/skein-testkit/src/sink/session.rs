//! One sink connection: read bytes, answer every complete command, flush
//! the answers once the input runs dry (which is what lets a pipelining
//! client's batch come back as one batch).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use base64::Engine as _;
use skein_smtp::{
    discard_line, next_line, parse_command_utf8, Command, DataReader, Line, MailParams, Reply,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{new_reply, Hang, Received, Shared};

/// Longer than RFC 5321's 512 so MAIL with many parameters never trips it;
/// the sink tests clients, not line limits.
const MAX_LINE: usize = 4096;

/// A BDAT chunk being read.
struct Chunk {
    left: u64,
    last: bool,
    /// The chunk is read and dropped, and this is its reply.
    refused: Option<Reply>,
}

struct Tx {
    from: String,
    params: MailParams,
    rcpts: Vec<String>,
    /// The message so far from BDAT chunks, and whether it went over the
    /// size limit: gone with the transaction (RSET, EHLO, its end).
    chunks: Vec<u8>,
    chunks_exceeded: bool,
}

/// What to do after handling some input.
enum Next {
    Continue,
    Close,
    Hang,
    /// STARTTLS was answered 220: the handshake comes next.
    StartTls,
}

struct Session {
    shared: Arc<Shared>,
    helo: Option<String>,
    tx: Option<Tx>,
    /// Set while a body is being read.
    data: Option<(DataReader, Vec<u8>)>,
    /// Set while a BDAT chunk is being read (RFC 3030), offered when the
    /// sink's extensions name CHUNKING.
    chunk: Option<Chunk>,
    tls: bool,
    /// The server name the client presented in its TLS handshake (SNI).
    sni: Option<String>,
    auth: Option<String>,
    connection: usize,
    starttls: bool,
    /// Command lines of the current read.
    batch: Vec<String>,
}

pub(crate) async fn run<S>(mut stream: S, shared: Arc<Shared>, connection: usize)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let hang = shared.script.hang;
    if hang == Some(Hang::BeforeGreeting) {
        let _keep = stream;
        return hold().await;
    }
    if stream
        .write_all(&shared.script.greeting.to_bytes())
        .await
        .is_err()
    {
        return;
    }
    if hang == Some(Hang::AfterGreeting) {
        let _keep = stream;
        return hold().await;
    }
    let mut session = Session {
        shared,
        helo: None,
        tx: None,
        data: None,
        chunk: None,
        tls: false,
        sni: None,
        auth: None,
        connection,
        starttls: false,
        batch: Vec::new(),
    };
    if !serve(&mut stream, &mut session).await {
        return;
    }
    // STARTTLS was accepted.
    if session.shared.script.broken_tls {
        let _ = stream.write_all(b"this is not a TLS handshake\r\n").await;
        return;
    }
    let Some(config) = session.shared.script.tls.clone() else {
        return;
    };
    let Ok(mut tls) = tokio_rustls::TlsAcceptor::from(config).accept(stream).await else {
        return;
    };
    // RFC 3207 §4.2: everything learned before TLS is forgotten.
    session.tls = true;
    session.sni = tls.get_ref().1.server_name().map(str::to_string);
    session.starttls = false;
    session.helo = None;
    session.tx = None;
    session.auth = None;
    serve(&mut tls, &mut session).await;
}

/// Answers commands until the session ends (`false`) or STARTTLS was
/// accepted (`true`).
async fn serve<S>(stream: &mut S, session: &mut Session) -> bool
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut input = Vec::with_capacity(8192);
    let mut output = Vec::new();
    loop {
        match stream.read_buf(&mut input).await {
            Ok(0) | Err(_) => return false,
            Ok(_) => {}
        }
        let next = session.handle(&mut input, &mut output);
        if !output.is_empty() && stream.write_all(&output).await.is_err() {
            return false;
        }
        output.clear();
        match next {
            Next::Continue => {}
            Next::Close => return false,
            Next::Hang => {
                hold().await;
                return false;
            }
            Next::StartTls => return true,
        }
    }
}

/// Says nothing more, keeping the connection open until the sink is dropped.
async fn hold() {
    std::future::pending::<()>().await
}

impl Session {
    /// Handles everything complete in `input`, leaving a partial line in it.
    fn handle(&mut self, input: &mut Vec<u8>, output: &mut Vec<u8>) -> Next {
        let mut pos = 0;
        let next = loop {
            if let Some(chunk) = &mut self.chunk {
                let take = chunk.left.min((input.len() - pos) as u64) as usize;
                // A chunk not refused belongs to a transaction.
                if let Some(tx) = self.tx.as_mut().filter(|_| chunk.refused.is_none()) {
                    if tx.chunks.len() + take > self.shared.script.max_message_size {
                        tx.chunks_exceeded = true;
                    }
                    if !tx.chunks_exceeded {
                        tx.chunks.extend_from_slice(&input[pos..pos + take]);
                    }
                }
                pos += take;
                chunk.left -= take as u64;
                if chunk.left > 0 {
                    break Next::Continue;
                }
                match self.end_of_chunk(output) {
                    Next::Continue => continue,
                    other => break other,
                }
            }
            if let Some((reader, body)) = &mut self.data {
                let progress = reader.feed(&input[pos..], body);
                pos += progress.consumed;
                if !progress.done {
                    break Next::Continue;
                }
                match self.end_of_data(output) {
                    Next::Continue => continue,
                    other => break other,
                }
            }
            match next_line(&input[pos..], MAX_LINE) {
                Line::Incomplete => break Next::Continue,
                Line::TooLong => {
                    let Some(skip) = discard_line(&input[pos..]) else {
                        // Drop what we have; the rest of the line follows.
                        pos = input.len();
                        break Next::Continue;
                    };
                    pos += skip;
                    new_reply(500, (5, 5, 2), "Line too long").encode(output);
                }
                Line::Complete { len, consumed, .. } => {
                    let line = input[pos..pos + len].to_vec();
                    pos += consumed;
                    let code = self.command(&line, output);
                    if code == 221 || code == 421 {
                        break Next::Close;
                    }
                    if self.starttls {
                        // Anything pipelined after STARTTLS is discarded.
                        pos = input.len();
                        break Next::StartTls;
                    }
                }
            }
        };
        input.drain(..pos);
        let batch = std::mem::take(&mut self.batch);
        if !batch.is_empty() && self.shared.script.keep_commands {
            self.shared.record().batches.push(batch);
        }
        next
    }

    /// Answers one command line; returns the reply code sent.
    fn command(&mut self, line: &[u8], output: &mut Vec<u8>) -> u16 {
        let text = String::from_utf8_lossy(line).into_owned();
        tracing::debug!(command = %text, "sink received");
        if self.shared.script.keep_commands {
            self.shared.record().commands.push(text.clone());
            self.batch.push(text);
        }
        let shared = self.shared.clone();
        let script = &shared.script;
        let offer_tls = (script.tls.is_some() || script.broken_tls) && !self.tls;
        let offer_auth = script.auth.is_some() && (self.tls || !offer_tls);
        let lmtp = script.lmtp.is_some();
        let chunking = script.ehlo_extensions.iter().any(|e| e == "CHUNKING");
        // UTF-8 addresses are allowed in a transaction opened with SMTPUTF8.
        let utf8 = self.tx.as_ref().is_some_and(|t| t.params.smtputf8);
        let answer = match parse_command_utf8(line, utf8) {
            Err(e) => e.reply(),
            Ok(Command::Ehlo(_)) if lmtp => new_reply(500, (5, 5, 1), "This is LMTP: LHLO"),
            Ok(Command::Lhlo(_)) if !lmtp => new_reply(500, (5, 5, 1), "This is SMTP"),
            Ok(Command::Ehlo(domain) | Command::Lhlo(domain)) => {
                self.tx = None;
                let answer = script.ehlo_reply.clone().unwrap_or_else(|| {
                    let mut lines = vec![format!("sink.test greets {domain}")];
                    lines.extend(script.ehlo_extensions.iter().cloned());
                    if offer_tls {
                        lines.push("STARTTLS".into());
                    }
                    if offer_auth {
                        lines.push("AUTH PLAIN".into());
                    }
                    Reply::with_lines(250, None, lines)
                });
                if answer.is_success() {
                    self.helo = Some(domain);
                }
                answer
            }
            Ok(Command::Helo(domain)) => {
                self.tx = None;
                self.helo = Some(domain);
                Reply::new(250, None, "sink.test")
            }
            Ok(Command::Mail { from, params }) => {
                if self.helo.is_none() {
                    new_reply(503, (5, 5, 1), "Send EHLO first")
                } else if self.tx.is_some() {
                    new_reply(503, (5, 5, 1), "Nested MAIL command")
                } else {
                    let from = from.to_string();
                    let answer = (script.on_mail)(&from);
                    if answer.is_success() {
                        self.tx = Some(Tx {
                            from,
                            params,
                            rcpts: Vec::new(),
                            chunks: Vec::new(),
                            chunks_exceeded: false,
                        });
                    }
                    answer
                }
            }
            Ok(Command::Rcpt { to, .. }) => match &mut self.tx {
                None => new_reply(503, (5, 5, 1), "Need MAIL first"),
                Some(tx) => {
                    let to = to.to_string();
                    let answer = (script.on_rcpt)(&to);
                    if answer.is_success() {
                        tx.rcpts.push(to);
                    }
                    answer
                }
            },
            Ok(Command::Data) => match &self.tx {
                None => new_reply(503, (5, 5, 1), "Need MAIL first"),
                Some(tx) if tx.rcpts.is_empty() => new_reply(554, (5, 5, 1), "No valid recipients"),
                Some(_) => {
                    let count = self.shared.bodies.load(Ordering::SeqCst);
                    let answer = (script.on_data_command)(count);
                    if answer.code == 354 {
                        self.data = Some((DataReader::new(script.max_message_size), Vec::new()));
                    } else {
                        self.tx = None;
                    }
                    answer
                }
            },
            Ok(Command::Bdat { size, last }) if chunking => {
                let refused = match &self.tx {
                    None => Some(new_reply(503, (5, 5, 1), "Need MAIL first")),
                    Some(tx) if tx.rcpts.is_empty() => {
                        Some(new_reply(554, (5, 5, 1), "No valid recipients"))
                    }
                    Some(_) => None,
                };
                self.chunk = Some(Chunk {
                    left: size,
                    last,
                    refused,
                });
                // Answered once the chunk is read (see `end_of_chunk`).
                return 0;
            }
            Ok(Command::StartTls) if offer_tls => {
                self.starttls = true;
                Reply::new(220, None, "Ready to start TLS")
            }
            Ok(Command::Auth { mechanism, initial }) if offer_auth && mechanism == "PLAIN" => {
                let decoded = initial
                    .and_then(|i| base64::engine::general_purpose::STANDARD.decode(i).ok())
                    .unwrap_or_default();
                let parts: Vec<&[u8]> = decoded.split(|&b| b == 0).collect();
                let (user, password) = script.auth.clone().unwrap_or_default();
                if parts.len() == 3
                    && parts[1] == user.as_bytes()
                    && parts[2] == password.as_bytes()
                {
                    self.auth = Some(user);
                    new_reply(235, (2, 7, 0), "Authentication successful")
                } else {
                    new_reply(535, (5, 7, 8), "Authentication credentials invalid")
                }
            }
            Ok(Command::Rset) => {
                self.tx = None;
                new_reply(250, (2, 0, 0), "Ok")
            }
            Ok(Command::Noop) => new_reply(250, (2, 0, 0), "Ok"),
            Ok(Command::Quit) => new_reply(221, (2, 0, 0), "Bye"),
            Ok(Command::Vrfy(_)) => new_reply(252, (2, 5, 2), "Cannot VRFY"),
            Ok(_) => new_reply(502, (5, 5, 1), "Command not implemented"),
        };
        answer.encode(output);
        answer.code
    }

    /// A BDAT chunk is read: answer it, and after the last one end the
    /// message as DATA's end does.
    fn end_of_chunk(&mut self, output: &mut Vec<u8>) -> Next {
        let Some(chunk) = self.chunk.take() else {
            return Next::Continue;
        };
        if let Some(reply) = chunk.refused {
            reply.encode(output);
            if let Some(tx) = self.tx.as_mut() {
                tx.chunks.clear();
                tx.chunks_exceeded = false;
            }
            return Next::Continue;
        }
        if !chunk.last {
            new_reply(250, (2, 0, 0), "Chunk received").encode(output);
            return Next::Continue;
        }
        // A chunk is refused unless it has a transaction; should that ever
        // not hold, the client still gets an answer, never silence.
        let Some(tx) = self.tx.as_mut() else {
            new_reply(503, (5, 5, 1), "Need MAIL first").encode(output);
            return Next::Continue;
        };
        let (body, exceeded) = (std::mem::take(&mut tx.chunks), tx.chunks_exceeded);
        self.end_of_message(body, exceeded, output)
    }

    /// The body is complete: pick the final reply and record on 2xx.
    fn end_of_data(&mut self, output: &mut Vec<u8>) -> Next {
        let Some((reader, body)) = self.data.take() else {
            return Next::Continue;
        };
        self.end_of_message(body, reader.exceeded(), output)
    }

    fn end_of_message(&mut self, body: Vec<u8>, exceeded: bool, output: &mut Vec<u8>) -> Next {
        let Some(tx) = self.tx.take() else {
            return Next::Continue;
        };
        let count = self.shared.bodies.fetch_add(1, Ordering::SeqCst);
        if self.shared.script.hang == Some(Hang::AfterData) {
            return Next::Hang;
        }
        let answers: Vec<(Reply, Vec<String>)> = match &self.shared.script.lmtp {
            Some(per_rcpt) => tx
                .rcpts
                .iter()
                .map(|r| (per_rcpt(r), vec![r.clone()]))
                .collect(),
            None if exceeded => {
                vec![(
                    new_reply(552, (5, 3, 4), "Message too big"),
                    tx.rcpts.clone(),
                )]
            }
            None => vec![((self.shared.script.on_data)(count), tx.rcpts.clone())],
        };
        let delivered: Vec<String> = answers
            .iter()
            .filter(|(a, _)| a.is_success())
            .flat_map(|(_, r)| r.iter().cloned())
            .collect();
        if !delivered.is_empty() {
            self.shared.record().messages.push(Received {
                helo: self.helo.clone().unwrap_or_default(),
                mail_from: tx.from,
                mail_params: tx.params,
                rcpt_to: delivered,
                data: body,
                tls: self.tls,
                sni: self.sni.clone(),
                auth: self.auth.clone(),
                connection: self.connection,
                at: std::time::Instant::now(),
            });
        }
        for (a, _) in &answers {
            a.encode(output);
        }
        let answer = answers
            .last()
            .map(|(a, _)| a.clone())
            .unwrap_or_else(|| new_reply(250, (2, 0, 0), "Ok"));
        if answer.code == 421 {
            Next::Close
        } else {
            Next::Continue
        }
    }
}
