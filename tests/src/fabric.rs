//! A network between test nodes that the test can cut.
//!
//! Every node's advertised cluster address is a proxy in front of its real
//! listener. Nodes dial peers from their own listener's IP, so a proxy knows
//! which node is calling. A blocked direction holds its bytes back, as TCP
//! does behind a firewall DROP rule: nothing arrives, connections stay open
//! and go quiet, only Raft's own timeouts notice — and once healed, what
//! was held arrives, in order, as retransmission would bring it. (Dropping
//! the bytes instead would lose HTTP/2 frames mid-connection, which no TCP
//! connection ever does, and can leave one stuck for good with its flow
//! control credit lost.)

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

#[derive(Clone, Default)]
pub struct Fabric {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Source IP of each node's outgoing connections.
    sources: Mutex<HashMap<IpAddr, u64>>,
    /// (from, to): bytes from `from` to `to` are dropped.
    blocked: Mutex<HashSet<(u64, u64)>>,
    /// Every byte between nodes, both ways, while recording.
    recording: Mutex<Option<Vec<u8>>>,
    /// (from, to): bytes from `from` to `to` arrive this much later (a
    /// link between sites; half the round trip).
    delays: Mutex<HashMap<(u64, u64), Duration>>,
    tasks: Mutex<JoinSet<()>>,
}

impl Fabric {
    pub fn new() -> Self {
        Self::default()
    }

    /// Put a proxy for `node` at `public`, forwarding to `real`; connections
    /// from `source` are that node's own.
    pub async fn add_node(
        &self,
        node: u64,
        source: IpAddr,
        public: SocketAddr,
        real: SocketAddr,
    ) -> anyhow::Result<()> {
        self.inner.sources.lock().unwrap().insert(source, node);
        let listener = TcpListener::bind(public).await?;
        let inner = self.inner.clone();
        self.inner.tasks.lock().unwrap().spawn(async move {
            loop {
                let Ok((conn, peer)) = listener.accept().await else {
                    return;
                };
                let inner = inner.clone();
                tokio::spawn(async move {
                    let from = inner.sources.lock().unwrap().get(&peer.ip()).copied();
                    let Ok(upstream) = TcpStream::connect(real).await else {
                        return;
                    };
                    let _ = conn.set_nodelay(true);
                    let _ = upstream.set_nodelay(true);
                    let (cr, cw) = conn.into_split();
                    let (ur, uw) = upstream.into_split();
                    // Requests flow from the caller to `node`, replies back.
                    let a = pump(inner.clone(), from, Some(node), cr, uw);
                    let b = pump(inner, Some(node), from, ur, cw);
                    tokio::join!(a, b);
                });
            }
        });
        Ok(())
    }

    fn set(&self, pairs: impl IntoIterator<Item = (u64, u64)>, blocked: bool) {
        let mut b = self.inner.blocked.lock().unwrap();
        for p in pairs {
            if blocked {
                b.insert(p);
            } else {
                b.remove(&p);
            }
        }
    }

    /// Cut `node` off from every other node, both ways.
    pub fn isolate(&self, node: u64, all: &[u64]) {
        let pairs: Vec<_> = all
            .iter()
            .filter(|&&o| o != node)
            .flat_map(|&o| [(node, o), (o, node)])
            .collect();
        self.set(pairs, true);
    }

    /// Drop what `from` sends to `to` (one direction only).
    pub fn block(&self, from: u64, to: u64) {
        self.set([(from, to)], true);
    }

    /// Delay every byte between `a` and `b`, both ways, so that a round
    /// trip between them takes `rtt` longer (sites apart).
    pub fn set_rtt(&self, a: u64, b: u64, rtt: Duration) {
        let mut d = self.inner.delays.lock().unwrap();
        d.insert((a, b), rtt / 2);
        d.insert((b, a), rtt / 2);
    }

    pub fn heal(&self) {
        self.inner.blocked.lock().unwrap().clear();
    }

    /// Keep a copy of every byte between nodes from now on, as a wiretap
    /// on the network would see them.
    pub fn record(&self) {
        *self.inner.recording.lock().unwrap() = Some(Vec::new());
    }

    /// What was recorded so far.
    pub fn recorded(&self) -> Vec<u8> {
        self.inner
            .recording
            .lock()
            .unwrap()
            .clone()
            .unwrap_or_default()
    }
}

async fn pump(
    inner: Arc<Inner>,
    from: Option<u64>,
    to: Option<u64>,
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
) {
    // A delayed link: what is read now is written `delay` later, in order,
    // by a writer of its own (so the link's capacity is not cut by it).
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((due, bytes)) = rx.recv().await {
            tokio::time::sleep_until(due.into()).await;
            if w.write_all(&bytes).await.is_err() {
                return;
            }
        }
        let _ = w.shutdown().await;
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // Callers that are not nodes (the test itself) are never cut.
        let link = from.zip(to);
        let blocked = |l| inner.blocked.lock().unwrap().contains(&l);
        while link.is_some_and(blocked) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let delay = link
            .and_then(|l| inner.delays.lock().unwrap().get(&l).copied())
            .unwrap_or_default();
        if let Some(tap) = inner.recording.lock().unwrap().as_mut() {
            tap.extend_from_slice(&buf[..n]);
        }
        if tx
            .send((Instant::now() + delay, buf[..n].to_vec()))
            .is_err()
        {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}
