//! One running node: every listener bound, Raft started, workers spawned.
//! [`Node::start`] returns once the node serves; [`Node::shutdown`] is the
//! graceful stop of SIGTERM. Nothing here is process-global, so tests run
//! several nodes in one process.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use skein_delivery::{Deliverer, Timeouts};
use skein_queue::IdGenerator;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::StreamExt;

use crate::admin::{AdminService, NodeControl};
use crate::cluster::{Cluster, PeerChannels, RaftService, RequireSecret};
use crate::config::Config;
use crate::delivery::{self, DeliveryHandle};
use crate::metrics::{self, Metrics};
use crate::secrets::{self, Secret, SecretSource};
use crate::smtp::{self, Acceptor, PerClient, SmtpContext};
use crate::tls::{ClusterTls, ReloadingCert};

pub struct Node {
    cluster: Cluster,
    metrics: Arc<Metrics>,
    delivery: DeliveryHandle,
    shutdown: watch::Sender<bool>,
    smtp_stop: Arc<watch::Sender<bool>>,
    /// Ends every SMTP session at once (a drill's crash).
    halt: watch::Sender<bool>,
    /// Faults asked for by a drill, for whoever runs the node.
    faults: Option<tokio::sync::mpsc::UnboundedReceiver<Duration>>,
    smtp_limit: Arc<Semaphore>,
    max_connections: usize,
    tasks: JoinSet<()>,
    pub smtp_addrs: Vec<SocketAddr>,
    pub submission_addrs: Vec<SocketAddr>,
    pub cluster_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub admin_token: Secret,
    pub token_source: SecretSource,
    pub secret_source: SecretSource,
}

async fn bind_all(addrs: &[SocketAddr], what: &str) -> anyhow::Result<Vec<TcpListener>> {
    let mut out = Vec::new();
    for a in addrs {
        out.push(
            TcpListener::bind(a)
                .await
                .with_context(|| format!("cannot listen for {what} on {a}"))?,
        );
    }
    Ok(out)
}

impl Node {
    pub async fn start(config: Config) -> anyhow::Result<Node> {
        // Bind everything first: a port in use fails the start before any
        // state is touched.
        let smtp_listeners = bind_all(&config.smtp.listen, "SMTP").await?;
        let submission_listeners = bind_all(&config.smtp.submission_listen, "submission").await?;
        let cluster_listener = TcpListener::bind(config.cluster.listen)
            .await
            .with_context(|| {
                format!("cannot listen for the cluster on {}", config.cluster.listen)
            })?;
        let metrics_listener = TcpListener::bind(config.metrics.listen)
            .await
            .with_context(|| format!("cannot listen for metrics on {}", config.metrics.listen))?;

        create_private_dir(&config.data_dir)?;
        let (admin_token, token_source) = secrets::admin_token(&config)?;
        let (cluster_secret, secret_source) = secrets::cluster_secret(&config)?;
        let stores = skein_queue::open(&config.data_dir)
            .with_context(|| format!("cannot open the queue in {}", config.data_dir.display()))?;

        // One gRPC message must hold a whole mail (plus envelope) in an entry.
        let max_grpc = (config.smtp.max_message_size * 2).max(64 << 20);
        let cluster_tls = match &config.cluster.tls {
            Some(files) => Some(
                ClusterTls::load(files)
                    .context("cluster.tls_cert / cluster.tls_key / cluster.tls_ca")?,
            ),
            None => {
                warn_if_exposed(&config);
                None
            }
        };
        let peers = PeerChannels::new(
            cluster_secret.expose(),
            max_grpc,
            Some(config.cluster.listen.ip()),
            cluster_tls.clone(),
        )?;
        let cluster = Cluster::start(&config, stores, peers).await?;
        let mut listening = Vec::new();
        for l in smtp_listeners.iter().chain(&submission_listeners) {
            listening.push(l.local_addr()?);
        }
        let local_smtp = crate::own::expand(&listening);
        cluster.set_smtp_addrs(local_smtp.clone());
        let metrics = Arc::new(Metrics::new());
        let (shutdown, shutdown_rx) = watch::channel(false);
        // SMTP stops on shutdown and on a drain; the rest only on shutdown.
        let (smtp_stop, smtp_stop_rx) = watch::channel(false);
        let smtp_stop = Arc::new(smtp_stop);
        let mut tasks = JoinSet::new();

        tasks.spawn(cluster.clone().compact_when_quiet(shutdown_rx.clone()));
        tasks.spawn(crate::observe::leader_changes(
            cluster.clone(),
            metrics.clone(),
            shutdown_rx.clone(),
        ));
        tasks.spawn(crate::observe::takeovers(
            cluster.clone(),
            metrics.clone(),
            shutdown_rx.clone(),
        ));
        tasks.spawn(crate::observe::prune_history(
            cluster.clone(),
            config.trace.clone(),
            shutdown_rx.clone(),
        ));
        for (label, path) in [
            ("smtp", config.smtp.tls_cert.as_ref()),
            ("cluster", config.cluster.tls.as_ref().map(|t| &t.cert)),
            ("cluster_ca", config.cluster.tls.as_ref().map(|t| &t.ca)),
            ("delivery_ca", config.delivery.tls_ca_file.as_ref()),
        ] {
            if let Some(p) = path {
                metrics.certificate(label, p.clone());
            }
        }

        let metrics_addr = metrics_listener.local_addr()?;
        tasks.spawn(metrics::serve(
            metrics_listener,
            metrics.clone(),
            cluster.clone(),
        ));

        let d = &config.delivery;
        let timeouts = Timeouts {
            connect: d.connect_timeout,
            ..d.command_timeout.map(Timeouts::uniform).unwrap_or_default()
        };
        let extra_roots = match &d.tls_ca_file {
            None => Vec::new(),
            Some(path) => crate::tls::load_certs(path)
                .with_context(|| format!("delivery.tls_ca_file {}", path.display()))?,
        };
        let own = skein_delivery::OwnAddrs::new();
        let deliverer = Deliverer::new(skein_delivery::DeliveryConfig {
            helo_name: config.smtp.hostname.clone(),
            port: d.port,
            nameservers: d.nameservers.clone(),
            timeouts,
            tls: d.tls,
            extra_roots,
            routes: config.routes.clone(),
            concurrency_per_destination: d.concurrency_per_domain,
            connection_reuse: d.connection_reuse,
            own: own.clone(),
        })
        .context("cannot set up delivery")?;
        let ids = Arc::new(IdGenerator::new(config.node_id));
        tasks.spawn(crate::own::track(
            cluster.clone(),
            local_smtp,
            own.clone(),
            shutdown_rx.clone(),
        ));
        let (dispatcher, delivery) = delivery::start(
            cluster.clone(),
            deliverer,
            d.clone(),
            metrics.clone(),
            ids.clone(),
            config.smtp.hostname.clone(),
        );

        let cluster_addr = cluster_listener.local_addr()?;
        let raft_svc = RaftService::server(
            cluster.clone(),
            RequireSecret(cluster_secret.clone()),
            max_grpc,
            config.data_dir.clone(),
        );
        let (fault_tx, faults) = tokio::sync::mpsc::unbounded_channel();
        let control = NodeControl {
            smtp_stop: smtp_stop.clone(),
            delivery: delivery.control(),
            faults: fault_tx,
        };
        let admin_svc = AdminService::server(
            cluster.clone(),
            control,
            &admin_token,
            config.data_dir.clone(),
            max_grpc,
        );
        let mut grpc_shutdown = shutdown_rx.clone();
        let router = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .add_service(raft_svc)
            .add_service(admin_svc);
        let stopped = async move {
            let _ = grpc_shutdown.wait_for(|s| *s).await;
        };
        let reload_every = config.smtp.tls_reload_interval;
        tasks.spawn(async move {
            let r = match cluster_tls {
                Some(tls) => {
                    let _watcher = AbortOnDrop(tls.watch(reload_every, "cluster"));
                    let incoming = crate::tls::tls_incoming(cluster_listener, tls);
                    router.serve_with_incoming_shutdown(incoming, stopped).await
                }
                None => {
                    // Server::tcp_nodelay applies only to listeners tonic
                    // binds itself: without it, small replies (append acks,
                    // forwarded commits) wait out Nagle and delayed ACKs.
                    let incoming = TcpListenerStream::new(cluster_listener).map(|conn| {
                        if let Ok(c) = &conn {
                            let _ = c.set_nodelay(true);
                        }
                        conn
                    });
                    router.serve_with_incoming_shutdown(incoming, stopped).await
                }
            };
            if let Err(e) = r {
                tracing::error!(error = %e, "cluster gRPC server stopped");
            }
        });

        let acceptor = Acceptor::new(
            cluster.clone(),
            ids,
            d.lease.as_millis() as u64,
            dispatcher,
            metrics.clone(),
        );
        let smtp_config = Arc::new(config.smtp.clone());
        let smtp_limit = Arc::new(Semaphore::new(config.smtp.max_connections));
        let clients = Arc::new(PerClient::default());
        let auth = Arc::new(smtp::Authenticator::new(config.smtp.users.clone()));
        let tls = match (&config.smtp.tls_cert, &config.smtp.tls_key) {
            (Some(cert), Some(key)) => {
                let cert =
                    ReloadingCert::load_pair(cert, key).context("smtp.tls_cert / smtp.tls_key")?;
                let watcher = AbortOnDrop(cert.watch(config.smtp.tls_reload_interval, "SMTP"));
                tasks.spawn(async move {
                    let _watcher = watcher;
                    std::future::pending::<()>().await
                });
                Some(crate::tls::server_acceptor(cert)?)
            }
            _ => None,
        };
        if !config.smtp.submission_listen.is_empty() && auth.is_empty() {
            tracing::warn!(
                "submission listeners are on but [smtp.users] is empty: nobody can authenticate"
            );
        }
        let (halt, halt_rx) = watch::channel(false);
        let mut smtp_addrs = Vec::new();
        let mut submission_addrs = Vec::new();
        for (listeners, require_auth, addrs) in [
            (smtp_listeners, false, &mut smtp_addrs),
            (submission_listeners, true, &mut submission_addrs),
        ] {
            let ctx = Arc::new(SmtpContext {
                config: smtp_config.clone(),
                acceptor: acceptor.clone(),
                require_auth,
                tls: tls.clone(),
                auth: auth.clone(),
                shutdown: smtp_stop_rx.clone(),
                halt: halt_rx.clone(),
                metrics: metrics.clone(),
                data_dir: config.data_dir.clone(),
                canary_key: admin_token.clone(),
            });
            for l in listeners {
                addrs.push(l.local_addr()?);
                tasks.spawn(smtp::serve(
                    l,
                    ctx.clone(),
                    smtp_limit.clone(),
                    clients.clone(),
                ));
            }
        }

        Ok(Node {
            cluster,
            metrics,
            delivery,
            shutdown,
            smtp_stop,
            halt,
            faults: Some(faults),
            smtp_limit,
            max_connections: config.smtp.max_connections,
            tasks,
            smtp_addrs,
            submission_addrs,
            cluster_addr,
            metrics_addr,
            admin_token,
            token_source,
            secret_source,
        })
    }

    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The faults a drill asks of this node (`skeinctl drill`): each is an
    /// outage to fail for, as a crash would. Whoever runs the node takes
    /// them (skeind does: [`Node::halt`], wait, start again).
    pub fn take_faults(&mut self) -> Option<tokio::sync::mpsc::UnboundedReceiver<Duration>> {
        self.faults.take()
    }

    /// Stop as a crash would, keeping the data: SMTP sessions and listeners
    /// gone without a word, deliveries cut off mid-way, no lease handed
    /// back, the cluster port closed, Raft stopped. Starting a node on the
    /// same config afterwards is a restart.
    pub async fn halt(mut self) {
        tracing::warn!("failing as a crash would, for a drill");
        self.halt.send_replace(true);
        self.smtp_stop.send_replace(true);
        self.delivery.halt();
        self.shutdown.send_replace(true);
        self.cluster.shutdown().await;
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
    }

    /// The graceful stop: new SMTP sessions get 421, open ones finish their
    /// transaction, leases are handed back so peers deliver at once, Raft
    /// stops last.
    pub async fn shutdown(mut self, grace: Duration) {
        tracing::info!("shutting down");
        self.smtp_stop.send_replace(true);
        let deadline = tokio::time::Instant::now() + grace;
        // Deliveries get a short grace: an attempt about to finish saves a
        // duplicate, but peers must not wait long for the rest.
        let sessions = async {
            while self.smtp_limit.available_permits() < self.max_connections
                && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::join!(self.delivery.drain(grace.min(DELIVERY_GRACE)), sessions);
        self.delivery.shutdown();
        // The cluster port serves Raft until now: handing leases back is a
        // commit, and a node whose peers cannot reach it stops hearing its
        // leader, starts an election and can commit nothing.
        self.shutdown.send_replace(true);
        self.cluster.shutdown().await;
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        tracing::info!("stopped");
    }
}

/// Stops a background task when its owner goes away.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Without TLS, mail bodies and Raft entries cross the network in clear:
/// fine on loopback, a warning anywhere else.
fn warn_if_exposed(config: &Config) {
    let exposed = exposed_addresses(config);
    if !exposed.is_empty() {
        tracing::warn!(
            addresses = ?exposed,
            "CLUSTER TRAFFIC IS NOT ENCRYPTED: mail bodies and Raft entries cross the network \
             in clear to peers off loopback; set cluster.tls_cert, cluster.tls_key and cluster.tls_ca"
        );
    }
}

/// The cluster addresses (peers' and this node's advertised one) that are
/// not on loopback, when there are peers to talk to.
fn exposed_addresses(config: &Config) -> Vec<&str> {
    if config.is_single_node() {
        return Vec::new();
    }
    config
        .cluster
        .peers
        .iter()
        .filter(|(id, _)| **id != config.node_id)
        .map(|(_, addr)| addr.as_str())
        .chain(std::iter::once(config.cluster.advertise.as_str()))
        .filter(|addr| !is_loopback(crate::tls::host_of(addr)))
        .collect()
}

fn is_loopback(host: &str) -> bool {
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => host.eq_ignore_ascii_case("localhost"),
    }
}

/// How long running delivery attempts may finish at shutdown before their
/// leases are handed back anyway.
const DELIVERY_GRACE: Duration = Duration::from_secs(2);

/// The data directory is the queue: readable by this user alone. One that
/// exists, belongs to this user and is open to others (a fresh container
/// volume, say) is closed; one owned by someone else is left as it is, and
/// reported at start (`crate::privilege`).
fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create the data directory {}", dir.display()))?;
        return Ok(());
    }
    let meta = std::fs::metadata(dir)?;
    if meta.uid() == crate::privilege::euid() && meta.permissions().mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot make {} private", dir.display()))?;
        tracing::info!(dir = %dir.display(), "data directory made private (mode 700)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(peers: &str) -> Config {
        Config::parse(&format!(
            "node_id = 1\n[cluster]\nsecret = \"s-0123456789abcdef\"\n[cluster.peers]\n{peers}"
        ))
        .unwrap()
    }

    #[test]
    fn an_open_data_directory_of_our_own_is_closed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
        create_private_dir(&data).unwrap();
        let mode = std::fs::metadata(&data).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        create_private_dir(&dir.path().join("new/deeper")).unwrap();
        let mode = std::fs::metadata(dir.path().join("new/deeper"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    #[test]
    fn peers_off_loopback_without_tls_are_named() {
        let local =
            cluster("1 = \"127.0.0.1:7100\"\n2 = \"127.0.0.2:7100\"\n3 = \"localhost:7100\"\n");
        assert!(exposed_addresses(&local).is_empty());
        let lan = cluster(
            "1 = \"127.0.0.1:7100\"\n2 = \"10.0.0.2:7100\"\n3 = \"node3.example.com:7100\"\n",
        );
        assert_eq!(
            exposed_addresses(&lan),
            vec!["10.0.0.2:7100", "node3.example.com:7100"]
        );
        assert!(exposed_addresses(&Config::defaults()).is_empty());
    }
}
