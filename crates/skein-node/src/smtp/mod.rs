//! The SMTP server: listeners, connection limits, and the accept path that
//! turns a finished DATA into a committed queue entry.

mod auth;
mod data;
mod replies;
mod session;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use skein_queue::{Command, IdGenerator, MessageId, NewMessage, NewRecipient, Response};
use skein_smtp::{Domain, MailParams, Mailbox, ReversePath};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

pub use auth::{hash_password, Authenticator};
pub use session::{End, Session};

use crate::clock::now_ms;
use crate::cluster::{Cluster, ProposeError};
use crate::config::SmtpConfig;
use crate::delivery::Dispatcher;
use crate::metrics::Metrics;

/// A TLS handshake that takes longer than this is abandoned.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the 421 to a refused connection may take to write.
const REFUSAL_WRITE: Duration = Duration::from_secs(10);

/// What every session of one listener shares.
pub struct SmtpContext {
    pub config: Arc<SmtpConfig>,
    pub acceptor: Acceptor,
    /// Submission listeners refuse mail until the client authenticates.
    pub require_auth: bool,
    /// STARTTLS is offered when set.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// Submission users and the limits on checking their passwords.
    pub auth: Arc<auth::Authenticator>,
    pub shutdown: watch::Receiver<bool>,
    /// The node fails as a crash would (a drill): sessions end at once,
    /// without a word.
    pub halt: watch::Receiver<bool>,
    pub metrics: Arc<Metrics>,
    /// Where the queue lives, to refuse mail before the disk is full.
    pub data_dir: PathBuf,
    /// The admin token: a drill's canaries carry a MAC made with it.
    pub canary_key: crate::secrets::Secret,
    /// `[[dkim]]` keys, for trusted clients' mail.
    pub dkim: crate::dkim::Signers,
}

impl SmtpContext {
    /// Relay control. Clients in `relay_networks` and authenticated users
    /// may send anywhere. Everyone else only to `accept_domains`, by domain
    /// name, and never with a local part that asks a later hop to route on
    /// (`%`, `!`, or an `@` in a quoted local part): an accepted domain must
    /// not become a relay behind us. Source routes are already dropped by the
    /// grammar, so the domain checked is the one delivered to.
    pub fn may_relay(&self, client: IpAddr, authenticated: bool, rcpt: &Mailbox) -> bool {
        if self.trusted(client, authenticated) {
            return true;
        }
        if rcpt.local.contains(['%', '!', '@']) {
            return false;
        }
        if let Domain::Name(d) = &rcpt.domain {
            if d.eq_ignore_ascii_case(skein_delivery::canary::DOMAIN) {
                // A drill's canary, delivered to nowhere: only with the MAC.
                return skein_delivery::canary::verify(
                    self.canary_key.expose().as_bytes(),
                    &rcpt.local,
                );
            }
        }
        match &rcpt.domain {
            Domain::Name(d) => {
                let d = d.to_ascii_lowercase();
                self.config.accept_domains.contains(&d)
            }
            Domain::Literal(_) => false,
        }
    }

    /// A client in `relay_networks`, or one that authenticated: it may
    /// relay, and its mail is DKIM-signed.
    pub fn trusted(&self, client: IpAddr, authenticated: bool) -> bool {
        let client = client.to_canonical();
        authenticated
            || self
                .config
                .relay_networks
                .iter()
                .any(|n| n.contains(&client))
    }

    /// Whether the disk of the data directory is nearly full.
    pub fn storage_low(&self) -> bool {
        crate::disk::free_bytes(&self.data_dir).is_some_and(|free| {
            free < self
                .config
                .queue_minfree
                .max(2 * self.config.max_message_size as u64)
        })
    }
}

/// The accept path: propose the message and answer only once it committed.
#[derive(Clone)]
pub struct Acceptor {
    cluster: Cluster,
    ids: Arc<IdGenerator>,
    lease_ms: u64,
    /// `delivery.deliver_as_learner`.
    deliver_as_learner: bool,
    dispatcher: Dispatcher,
    metrics: Arc<Metrics>,
}

impl Acceptor {
    pub fn new(
        cluster: Cluster,
        ids: Arc<IdGenerator>,
        lease_ms: u64,
        deliver_as_learner: bool,
        dispatcher: Dispatcher,
        metrics: Arc<Metrics>,
    ) -> Self {
        Acceptor {
            ids,
            cluster,
            lease_ms,
            deliver_as_learner,
            dispatcher,
            metrics,
        }
    }

    pub fn next_id(&self) -> MessageId {
        self.ids.next(now_ms())
    }

    /// Commit the message through Raft (this node takes the delivery lease in
    /// the same entry), then hand it to this node's delivery worker. A
    /// learner that does not deliver takes no lease: the voters claim it.
    pub async fn accept(
        &self,
        id: MessageId,
        sender: ReversePath,
        params: MailParams,
        recipients: Vec<NewRecipient>,
        body: Bytes,
    ) -> Result<(), ProposeError> {
        let started = Instant::now();
        let delivers = self.deliver_as_learner || !self.cluster.is_learner();
        let msg = NewMessage {
            id,
            sender,
            recipients,
            params,
            body,
            owner: self.cluster.id(),
            lease_ms: if delivers { self.lease_ms } else { 0 },
        };
        match self.cluster.propose(Command::Enqueue(msg.clone())).await? {
            Response::Enqueued { .. } => {
                self.metrics.accepted(started.elapsed());
                if delivers {
                    self.dispatcher.fresh(msg);
                }
                Ok(())
            }
            other => Err(ProposeError::Refused(format!(
                "unexpected answer {other:?}"
            ))),
        }
    }
}

/// Open sessions per client address.
#[derive(Default)]
pub struct PerClient {
    open: Mutex<HashMap<IpAddr, usize>>,
}

struct ClientSlot(Arc<PerClient>, IpAddr);

/// What a session holds against the connection limits. It is given back
/// as the session ends, before its last reply is written: a client that
/// reconnects the moment it reads the 221 must find its slot free again.
pub struct Held {
    _permit: OwnedSemaphorePermit,
    _client: Option<ClientSlot>,
}

impl PerClient {
    fn take(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<ClientSlot> {
        let mut m = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(ClientSlot(self.clone(), ip))
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut m = self.0.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}

/// Accept connections until the process ends. Past the connection limits
/// (overall and per client address) a client is told 421 and closed; during
/// shutdown every new session gets 421.
pub async fn serve(
    listener: TcpListener,
    ctx: Arc<SmtpContext>,
    limit: Arc<Semaphore>,
    clients: Arc<PerClient>,
) {
    loop {
        let (mut stream, peer): (_, SocketAddr) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and the like: back off briefly.
                tracing::warn!(error = %e, "smtp accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let ctx = ctx.clone();
        let ip = peer.ip().to_canonical();
        // Trusted clients are not held to the per-address limit.
        let client = if in_any(&ctx.config.connection_limit_exceptions, ip) {
            Some(None)
        } else {
            clients
                .take(ip, ctx.config.max_connections_per_ip)
                .map(Some)
        };
        let refusal = match (limit.clone().try_acquire_owned(), client) {
            (Ok(permit), Some(client)) => {
                let held = Held {
                    _permit: permit,
                    _client: client,
                };
                tokio::spawn(async move {
                    ctx.metrics.smtp_sessions_active.inc();
                    let mut halt = ctx.halt.clone();
                    tokio::select! {
                        _ = handle(&ctx, stream, peer, Some(held)) => {}
                        // Dropping the session closes its connection.
                        _ = halt.wait_for(|h| *h) => {}
                    }
                    ctx.metrics.smtp_sessions_active.dec();
                });
                continue;
            }
            (Err(_), _) => replies::too_many_connections(&ctx.config.hostname),
            (_, None) => replies::too_many_from_you(&ctx.config.hostname),
        };
        tracing::warn!(client = %peer, reply = %refusal, "connection refused");
        tokio::spawn(async move {
            // A refused client gets a moment to read why, no more.
            let _ =
                tokio::time::timeout(REFUSAL_WRITE, stream.write_all(&refusal.to_bytes())).await;
        });
    }
}

/// Whether `ip` is in one of `nets`.
fn in_any(nets: &[ipnet::IpNet], ip: IpAddr) -> bool {
    nets.iter().any(|n| n.contains(&ip))
}

/// One connection: a plaintext session, and after STARTTLS a fresh one on
/// the encrypted stream. `held` is given back as the session ends.
pub async fn handle<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &SmtpContext,
    stream: S,
    peer: SocketAddr,
    held: Option<Held>,
) {
    let (stream, counts, held) = match Session::new(ctx, stream, peer).holding(held).run().await {
        Ok(End::StartTls(stream, counts, held)) => (stream, counts, held),
        Ok(End::Closed) => return,
        Err(e) => {
            tracing::debug!(client = %peer, error = %e, "session ended with an error");
            return;
        }
    };
    let Some(acceptor) = &ctx.tls else { return };
    let tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::info!(client = %peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::info!(client = %peer, "TLS handshake timed out");
            return;
        }
    };
    let (_, conn) = tls.get_ref();
    tracing::info!(
        client = %peer,
        version = ?conn.protocol_version(),
        cipher = ?conn.negotiated_cipher_suite().map(|c| c.suite()),
        "TLS established"
    );
    if let Err(e) = Session::after_starttls(ctx, tls, peer, counts)
        .holding(held)
        .run()
        .await
    {
        tracing::debug!(client = %peer, error = %e, "session ended with an error");
    }
}
