//! Mail with a token of its own, and counting tokens at the sink.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use skein_testkit::SinkMta;

use crate::client::send;

/// A DNS server where example.org has one MX, mx.example.org, on 127.0.0.1.
pub async fn example_org_dns() -> skein_testkit::DnsServer {
    skein_testkit::DnsServer::builder()
        .mx("example.org", 10, "mx.example.org")
        .a("mx.example.org", std::net::Ipv4Addr::LOCALHOST)
        .start()
        .await
        .unwrap()
}

/// A message whose token the sink can find again.
pub fn tokened(token: &str) -> Vec<u8> {
    format!("Subject: {token}\r\nX-Token: {token}\r\n\r\n{token}\r\n").into_bytes()
}

/// How often each token arrived at the sink.
pub fn arrived(sink: &SinkMta) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for m in sink.messages() {
        let text = String::from_utf8_lossy(&m.data);
        if let Some(t) = text.lines().find_map(|l| l.strip_prefix("X-Token: ")) {
            *out.entry(t.to_string()).or_insert(0) += 1;
        }
    }
    out
}

/// Wait until every token in `acked` arrived at least once; the missing ones
/// on timeout.
pub async fn wait_all_arrived(
    sink: &SinkMta,
    acked: &[String],
    timeout: Duration,
) -> Result<HashMap<String, usize>, Vec<String>> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let got = arrived(sink);
        let missing: Vec<String> = acked
            .iter()
            .filter(|t| !got.contains_key(*t))
            .cloned()
            .collect();
        if missing.is_empty() {
            return Ok(got);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(missing);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One reply seen by the load: when, from which node, accepted or not.
#[derive(Debug, Clone)]
pub struct Sent {
    pub token: String,
    pub node: usize,
    pub at: Instant,
    pub accepted: bool,
    /// From the first connection attempt to the final answer.
    pub took: Duration,
}

/// Senders that keep mail flowing to every node in turn until stopped.
pub struct Load {
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<Sent>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// `workers` concurrent senders over `targets` (SMTP addresses); any
    /// answer but 250 counts as not accepted.
    pub fn start(targets: Vec<SocketAddr>, workers: usize, prefix: &str) -> Load {
        Self::spawn(targets, workers, prefix, false)
    }

    /// Like [`Load::start`], but as a real MTA with several MX hosts: a node
    /// that cannot be reached or answers 421 (shutting down, drained) is
    /// skipped for the next one; only a refusal from a node that took the
    /// session counts as not accepted.
    pub fn start_failover(targets: Vec<SocketAddr>, workers: usize, prefix: &str) -> Load {
        Self::spawn(targets, workers, prefix, true)
    }

    fn spawn(targets: Vec<SocketAddr>, workers: usize, prefix: &str, failover: bool) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let log: Arc<Mutex<Vec<Sent>>> = Arc::default();
        let tasks = (0..workers)
            .map(|w| {
                let (stop, log, targets, prefix) = (
                    stop.clone(),
                    log.clone(),
                    targets.clone(),
                    prefix.to_string(),
                );
                tokio::spawn(async move {
                    let mut n = 0usize;
                    while !stop.load(Ordering::Relaxed) {
                        let node = (w + n) % targets.len();
                        let token = format!("{prefix}-w{w}-m{n}");
                        n += 1;
                        let started = Instant::now();
                        let tries = if failover { targets.len() } else { 1 };
                        let mut accepted = false;
                        for k in 0..tries {
                            let target = targets[(node + k) % targets.len()];
                            let r = tokio::time::timeout(
                                Duration::from_secs(20),
                                send(
                                    target,
                                    "load@client.test",
                                    &["rcpt@example.org"],
                                    &tokened(&token),
                                ),
                            )
                            .await;
                            match r {
                                Ok(Ok(s)) if s.accepted() => {
                                    accepted = true;
                                    break;
                                }
                                Ok(Ok(s)) if s.reply.code == 421 => continue,
                                Ok(Err(_)) => continue,
                                _ => break,
                            }
                        }
                        log.lock().unwrap().push(Sent {
                            token,
                            node,
                            at: Instant::now(),
                            accepted,
                            took: started.elapsed(),
                        });
                        if !accepted {
                            // A refused or broken session: do not hammer a node that is down.
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                })
            })
            .collect();
        Load { stop, log, tasks }
    }

    pub fn snapshot(&self) -> Vec<Sent> {
        self.log.lock().unwrap().clone()
    }

    pub async fn stop(self) -> Vec<Sent> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        let log = self.log.lock().unwrap().clone();
        log
    }
}

/// Status code and body of `GET path` on a node's metrics listener.
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await??;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text.split_whitespace().nth(1).unwrap_or("0").parse()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

/// The value of one series (`name{labels}` exactly as rendered) on a
/// node's `/metrics`; 0 when the series is not there yet.
pub async fn metric(addr: SocketAddr, series: &str) -> anyhow::Result<f64> {
    let (_, body) = http_get(addr, "/metrics").await?;
    let prefix = format!("{series} ");
    Ok(body
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.trim().parse::<f64>())
        .transpose()?
        .unwrap_or(0.0))
}

/// Status code of `GET path` on a node's metrics listener.
pub async fn http_status(addr: SocketAddr, path: &str) -> anyhow::Result<u16> {
    Ok(http_get(addr, path).await?.0)
}
