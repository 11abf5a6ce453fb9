//! The load generator: `sessions` connections, each sending messages one
//! after another (MAIL, RCPT, DATA, reply, next) until `messages` are sent.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use skein_delivery::{Session, Stage};
use skein_smtp::{parse_command, Command, Reply};
use tokio::net::TcpStream;

#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// SMTP addresses; sessions are spread over them in turn.
    pub targets: Vec<SocketAddr>,
    pub sessions: usize,
    pub messages: usize,
    /// Body size in bytes (headers included).
    pub size: usize,
    pub from: String,
    pub rcpt: String,
    /// Open loop: message `n` starts no earlier than `n / rate` seconds
    /// after the start (all sessions together). `None`: each session sends
    /// its next message as soon as the last is answered.
    pub rate: Option<f64>,
}

#[derive(Debug, Default)]
pub struct LoadReport {
    pub accepted: usize,
    pub refused: usize,
    pub errors: usize,
    pub elapsed: Duration,
    /// Every accepted message, in the order its DATA ended: when (since
    /// the start), its latency (end of DATA to the 250) and which target
    /// took it — to see whether slow answers come together.
    pub timeline: Vec<Sample>,
}

#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub at: Duration,
    pub latency: Duration,
    /// Index into [`LoadSpec::targets`].
    pub target: usize,
}

impl LoadReport {
    pub fn rate(&self) -> f64 {
        self.accepted as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The `p`th percentile (0–100) of acceptance latency.
    pub fn percentile(&self, p: f64) -> Duration {
        if self.timeline.is_empty() {
            return Duration::ZERO;
        }
        let mut v: Vec<Duration> = self.timeline.iter().map(|s| s.latency).collect();
        v.sort_unstable();
        let i = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
        v[i.min(v.len() - 1)]
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "accepted": self.accepted,
            "refused": self.refused,
            "errors": self.errors,
            "seconds": self.elapsed.as_secs_f64(),
            "accepted_per_second": self.rate(),
            "latency_ms": {
                "p50": ms(self.percentile(50.0)),
                "p90": ms(self.percentile(90.0)),
                "p99": ms(self.percentile(99.0)),
                "max": ms(self.percentile(100.0)),
            }
        })
    }
}

pub fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// A message of about `size` bytes with a unique Message-ID.
pub fn message(n: usize, size: usize, from: &str, rcpt: &str) -> Vec<u8> {
    let mut m = format!(
        "From: <{from}>\r\nTo: <{rcpt}>\r\nSubject: skein-load {n}\r\nMessage-ID: <{n}.{}@skein-load>\r\n\r\n",
        std::process::id()
    )
    .into_bytes();
    let line =
        b"The quick brown fox jumps over the lazy dog; 0123456789 abcdefghijklmnopqrstuvwxyz.\r\n";
    while m.len() + line.len() <= size.max(m.len()) {
        m.extend_from_slice(line);
    }
    m
}

/// Every reply is waited for at most this long.
const WAIT: Duration = Duration::from_secs(60);

/// The envelope every message of a run carries, as commands.
#[derive(Clone)]
pub struct Envelope([Command; 3]);

impl Envelope {
    pub fn new(from: &str, rcpt: &str) -> anyhow::Result<Self> {
        let mail = parse_command(format!("MAIL FROM:<{from}>").as_bytes())?;
        let rcpt = parse_command(format!("RCPT TO:<{rcpt}>").as_bytes())?;
        Ok(Envelope([mail, rcpt, Command::Data]))
    }
}

/// One load session, on the delivery engine's [`Session`].
pub struct Conn(Session<TcpStream>);

impl Conn {
    pub async fn open(addr: SocketAddr) -> anyhow::Result<Conn> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let mut s = Session::new(stream);
        expect(s.read_reply(Stage::Greeting, WAIT).await?, 220)?;
        let ehlo = Command::Ehlo("skein-load".into());
        expect(s.command(&ehlo, Stage::Ehlo, WAIT).await?, 250)?;
        Ok(Conn(s))
    }

    /// Send one message; the final reply and the acceptance latency.
    pub async fn send(&mut self, env: &Envelope, body: &[u8]) -> anyhow::Result<(Reply, Duration)> {
        let s = &mut self.0;
        // Envelope pipelined, as a PIPELINING client does.
        s.send_batch(&env.0, Stage::Mail, WAIT).await?;
        let stages = [Stage::Mail, Stage::Rcpt, Stage::Data];
        for (i, want) in [250, 250, 354].into_iter().enumerate() {
            let r = s.read_reply(stages[i], WAIT).await?;
            if r.code != want {
                // Read the replies to the rest of the pipelined commands.
                for stage in &stages[i + 1..] {
                    s.read_reply(*stage, WAIT).await?;
                }
                s.command(&Command::Rset, Stage::Rset, WAIT).await?;
                return Ok((r, Duration::ZERO));
            }
        }
        s.send_body(body, WAIT).await?;
        let t = Instant::now();
        let r = s.read_reply(Stage::EndOfData, WAIT).await?;
        Ok((r, t.elapsed()))
    }
}

fn expect(r: Reply, code: u16) -> anyhow::Result<()> {
    if r.code != code {
        bail!("expected {code}, got {r}");
    }
    Ok(())
}

pub async fn run(spec: LoadSpec) -> anyhow::Result<LoadReport> {
    let envelope = Envelope::new(&spec.from, &spec.rcpt)?;
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for s in 0..spec.sessions {
        let (spec, next, envelope) = (spec.clone(), next.clone(), envelope.clone());
        tasks.push(tokio::spawn(async move {
            let target = s % spec.targets.len();
            let addr = spec.targets[target];
            let mut report = LoadReport::default();
            let mut conn: Option<Conn> = None;
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= spec.messages {
                    break;
                }
                if let Some(rate) = spec.rate {
                    let due = started + Duration::from_secs_f64(n as f64 / rate);
                    tokio::time::sleep_until(due.into()).await;
                }
                if conn.is_none() {
                    match Conn::open(addr).await {
                        Ok(c) => conn = Some(c),
                        Err(_) => {
                            report.errors += 1;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    }
                }
                let body = message(n, spec.size, &spec.from, &spec.rcpt);
                match conn
                    .as_mut()
                    .expect("connected")
                    .send(&envelope, &body)
                    .await
                {
                    Ok((r, lat)) if r.code == 250 => {
                        report.accepted += 1;
                        report.timeline.push(Sample {
                            at: started.elapsed().saturating_sub(lat),
                            latency: lat,
                            target,
                        });
                    }
                    Ok(_) => report.refused += 1,
                    Err(_) => {
                        report.errors += 1;
                        conn = None;
                    }
                }
            }
            report
        }));
    }
    let mut total = LoadReport::default();
    for t in tasks {
        if let Ok(r) = t.await {
            total.accepted += r.accepted;
            total.refused += r.refused;
            total.errors += r.errors;
            total.timeline.extend(r.timeline);
        }
    }
    total.timeline.sort_unstable_by_key(|s| s.at);
    total.elapsed = started.elapsed();
    Ok(total)
}
