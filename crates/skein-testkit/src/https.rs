//! [`StaticHttps`]: an HTTPS server (rustls) answering every GET with one
//! fixed response, for MTA-STS policies. Written out by hand on purpose: a
//! test must be able to serve what no well-behaved server would (a
//! redirect with a policy body, HTML, a wrong media type).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// The request head a client may send before it is cut off.
const MAX_HEAD: usize = 16 * 1024;

pub struct StaticHttps {
    port: u16,
    served: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl StaticHttps {
    /// Serve `status` (e.g. `"200 OK"`), `content_type` and `body` over TLS
    /// with `config`, on 127.0.0.1 and a random port.
    pub async fn start(
        config: Arc<rustls::ServerConfig>,
        status: &str,
        content_type: &str,
        body: &str,
    ) -> anyhow::Result<StaticHttps> {
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let served = Arc::new(AtomicUsize::new(0));
        let count = served.clone();
        let response = Arc::new(format!(
            "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
             Location: https://elsewhere.example/\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ));
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, count, response) =
                    (acceptor.clone(), count.clone(), response.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    if !head.starts_with(b"GET ") {
                        return;
                    }
                    count.fetch_add(1, Ordering::SeqCst);
                    let _ = tls.write_all(response.as_bytes()).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        Ok(StaticHttps { port, served, task })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Requests answered so far.
    pub fn served(&self) -> usize {
        self.served.load(Ordering::SeqCst)
    }
}

impl Drop for StaticHttps {
    fn drop(&mut self) {
        self.task.abort();
    }
}
