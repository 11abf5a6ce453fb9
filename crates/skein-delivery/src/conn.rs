//! Open client connections: the stream (plain TCP or TLS after STARTTLS),
//! what the peer offered, and the pool that keeps idle connections for
//! the next message to the same destination, within the destination's
//! concurrency limit.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use skein_smtp::Extensions;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::session::Session;

/// Messages sent over one connection before it is closed anyway, so that a
/// long-lived session never pins one peer forever.
pub(crate) const MAX_USES: u32 = 100;

/// A client connection's byte stream.
pub(crate) enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Stream {
    /// The TCP connection under any TLS.
    pub(crate) fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => s.get_ref().0,
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A session past its greeting, EHLO (or LHLO), STARTTLS and AUTH: ready
/// for MAIL.
pub(crate) struct Conn {
    pub session: Session<Stream>,
    pub ext: Extensions,
    /// `host[ip]`, as shown in results and logs.
    pub peer: String,
    pub lmtp: bool,
    /// Whether the session runs over TLS.
    pub tls: bool,
    /// Transactions completed on it.
    pub uses: u32,
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// Idle connections by destination, and each destination's limit.
pub(crate) struct Pool {
    idle: Mutex<HashMap<String, Vec<Idle>>>,
    limits: Mutex<HashMap<String, Arc<Semaphore>>>,
    per_destination: usize,
    keep: Duration,
}

impl Pool {
    pub fn new(per_destination: usize, keep: Duration) -> Self {
        Pool {
            idle: Mutex::default(),
            limits: Mutex::default(),
            per_destination: per_destination.max(1),
            keep,
        }
    }

    /// Waits for a delivery slot to `dest`. A connection is opened only
    /// while holding one, and an idle connection is taken before a new one
    /// is opened, so connections to a destination never outnumber its limit.
    pub async fn slot(&self, dest: &str) -> OwnedSemaphorePermit {
        let sem = {
            let mut limits = self.limits.lock().unwrap_or_else(|p| p.into_inner());
            limits
                .entry(dest.to_string())
                .or_insert_with(|| Arc::new(Semaphore::new(self.per_destination)))
                .clone()
        };
        sem.acquire_owned()
            .await
            .expect("the pool never closes its semaphores")
    }

    /// The most recently used idle connection to `dest`, if one is fresh.
    pub fn take(&self, dest: &str) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.get_mut(dest)?;
        while let Some(i) = list.pop() {
            if i.since.elapsed() < self.keep {
                return Some(i.conn);
            }
            close(i.conn);
        }
        None
    }

    /// Keeps `conn` for the next message to `dest` (or closes it when reuse
    /// is off or the connection has done its share).
    pub fn put(&self, dest: &str, conn: Conn) {
        if self.keep.is_zero() || conn.uses >= MAX_USES {
            close(conn);
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.entry(dest.to_string()).or_default().push(Idle {
            conn,
            since: Instant::now(),
        });
    }

    /// Closes connections idle for longer than the keep time, and forgets
    /// limits nobody is using.
    pub fn sweep(&self) {
        let mut expired = Vec::new();
        {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            for list in idle.values_mut() {
                let (old, fresh): (Vec<Idle>, Vec<Idle>) =
                    list.drain(..).partition(|i| i.since.elapsed() >= self.keep);
                *list = fresh;
                expired.extend(old);
            }
            idle.retain(|_, l| !l.is_empty());
        }
        for i in expired {
            close(i.conn);
        }
        let mut limits = self.limits.lock().unwrap_or_else(|p| p.into_inner());
        let full = self.per_destination;
        limits.retain(|_, s| Arc::strong_count(s) > 1 || s.available_permits() < full);
    }

    /// Idle connections held now, for tests and metrics.
    pub fn idle_count(&self) -> usize {
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.values().map(Vec::len).sum()
    }
}

/// Says QUIT in the background and drops the connection.
fn close(conn: Conn) {
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(async move {
            let mut s = conn.session;
            crate::transaction::quit(&mut s).await;
        });
    }
}
