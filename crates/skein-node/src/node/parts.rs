//! The parts a node runs, each started by one method of [`Parts`], in the
//! order `Node::start` calls them: the cluster (Raft on the stores), the
//! observers, the metrics endpoint, the delivery worker, what SMTP sessions
//! share, the cluster port (Raft and admin gRPC), the SMTP listeners.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use skein_delivery::{Deliverer, OwnAddrs, Timeouts};
use skein_queue::IdGenerator;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::StreamExt;

use super::{AbortOnDrop, Lifecycle};
use crate::admin::{AdminService, NodeControl};
use crate::cluster::{Cluster, PeerChannels, RaftService, RequireSecret};
use crate::config::Config;
use crate::delivery::{self, DeliveryHandle, Dispatcher};
use crate::metrics::{self, Metrics};
use crate::secrets::Secret;
use crate::smtp::{self, Acceptor, PerClient, SmtpContext};
use crate::tls::{ClusterTls, Reloading, ReloadingCert};

/// Every listener, bound before anything else starts.
pub(super) struct Listeners {
    pub smtp: Vec<TcpListener>,
    pub submission: Vec<TcpListener>,
    pub cluster: TcpListener,
    pub metrics: TcpListener,
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for {what} on {addr}"))
}

impl Listeners {
    pub async fn bind(config: &Config) -> anyhow::Result<Self> {
        let mut smtp = Vec::new();
        for a in &config.smtp.listen {
            smtp.push(bind(*a, "SMTP").await?);
        }
        let mut submission = Vec::new();
        for a in &config.smtp.submission_listen {
            submission.push(bind(*a, "submission").await?);
        }
        Ok(Listeners {
            smtp,
            submission,
            cluster: bind(config.cluster.listen, "the cluster").await?,
            metrics: bind(config.metrics.listen, "metrics").await?,
        })
    }

    /// Where this node takes SMTP mail, wildcards expanded.
    fn smtp_addrs(&self) -> anyhow::Result<Vec<SocketAddr>> {
        let mut bound = Vec::new();
        for l in self.smtp.iter().chain(&self.submission) {
            bound.push(l.local_addr()?);
        }
        Ok(crate::own::expand(&bound))
    }
}

/// What the parts share while they start, and keep while they run.
pub(super) struct Parts<'a> {
    config: &'a Config,
    pub tasks: JoinSet<()>,
    pub metrics: Arc<Metrics>,
    /// Stops every task but the SMTP listeners (the lifecycle stops those).
    pub shutdown: watch::Sender<bool>,
    shutdown_rx: watch::Receiver<bool>,
    /// One gRPC message must hold a whole mail (plus envelope) in an entry.
    max_grpc: usize,
    cluster_tls: Option<Arc<Reloading<ClusterTls>>>,
    ids: Arc<IdGenerator>,
    own: OwnAddrs,
    local_smtp: Vec<SocketAddr>,
    /// What the TLS-RPT reports need, once delivery is set up.
    tls_reports: Option<TlsReporting>,
}

/// What sending TLS-RPT reports takes.
struct TlsReporting {
    reports: Arc<crate::tlsrpt::TlsReports>,
    policies: Arc<crate::sts::SharedPolicies>,
    deliverer: Deliverer,
}

/// What every SMTP session shares, and the switches that stop them.
pub(super) struct Smtp {
    pub stop: Arc<watch::Sender<bool>>,
    pub halt: watch::Sender<bool>,
    pub limit: Arc<Semaphore>,
    contexts: [Arc<SmtpContext>; 2],
    clients: Arc<PerClient>,
}

impl<'a> Parts<'a> {
    pub fn new(config: &'a Config) -> Self {
        let (shutdown, shutdown_rx) = watch::channel(false);
        Parts {
            config,
            tasks: JoinSet::new(),
            metrics: Arc::new(Metrics::new()),
            shutdown,
            shutdown_rx,
            max_grpc: (config.smtp.max_message_size * 2).max(64 << 20),
            cluster_tls: None,
            ids: Arc::new(IdGenerator::new(config.node_id)),
            own: OwnAddrs::new(),
            tls_reports: None,
            local_smtp: Vec::new(),
        }
    }

    /// Raft on the stores, with the channels to the peers.
    pub async fn cluster(
        &mut self,
        secret: &Secret,
        listeners: &Listeners,
    ) -> anyhow::Result<Cluster> {
        let config = self.config;
        let stores = skein_queue::open(&config.data_dir)
            .with_context(|| format!("cannot open the queue in {}", config.data_dir.display()))?;
        self.cluster_tls = match &config.cluster.tls {
            Some(files) => Some(
                ClusterTls::load(files)
                    .context("cluster.tls_cert / cluster.tls_key / cluster.tls_ca")?,
            ),
            None => {
                crate::privilege::warn_if_exposed(config);
                None
            }
        };
        let peers = PeerChannels::new(
            secret.expose(),
            self.max_grpc,
            Some(config.cluster.listen.ip()),
            self.cluster_tls.clone(),
        )?;
        let cluster = Cluster::start(config, stores, peers).await?;
        self.local_smtp = listeners.smtp_addrs()?;
        cluster.set_smtp_addrs(self.local_smtp.clone());
        Ok(cluster)
    }

    /// Compaction when quiet, a gone leader replaced, leader changes and
    /// takeovers seen, the history pruned, where the cluster takes mail,
    /// certificates watched.
    pub fn observers(&mut self, cluster: &Cluster) {
        let (rx, m) = (&self.shutdown_rx, &self.metrics);
        self.tasks
            .spawn(cluster.clone().compact_when_quiet(rx.clone()));
        self.tasks
            .spawn(cluster.clone().take_over_from_gone_leaders(rx.clone()));
        self.tasks.spawn(crate::observe::leader_changes(
            cluster.clone(),
            m.clone(),
            rx.clone(),
        ));
        self.tasks.spawn(crate::observe::takeovers(
            cluster.clone(),
            m.clone(),
            rx.clone(),
        ));
        self.tasks.spawn(crate::observe::prune_history(
            cluster.clone(),
            self.config.trace.clone(),
            rx.clone(),
        ));
        self.tasks.spawn(crate::own::track(
            cluster.clone(),
            self.local_smtp.clone(),
            self.own.clone(),
            rx.clone(),
        ));
        let c = self.config;
        for (label, path) in [
            ("smtp", c.smtp.tls_cert.as_ref()),
            ("cluster", c.cluster.tls.as_ref().map(|t| &t.cert)),
            ("cluster_ca", c.cluster.tls.as_ref().map(|t| &t.ca)),
            ("delivery_ca", c.delivery.tls_ca_file.as_ref()),
        ] {
            if let Some(p) = path {
                m.certificate(label, p.clone());
            }
        }
    }

    /// `/metrics`, `/healthz`, `/readyz`.
    pub fn metrics_endpoint(
        &mut self,
        listener: TcpListener,
        cluster: &Cluster,
    ) -> anyhow::Result<SocketAddr> {
        let addr = listener.local_addr()?;
        self.tasks.spawn(metrics::serve(
            listener,
            self.metrics.clone(),
            cluster.clone(),
        ));
        Ok(addr)
    }

    /// The delivery worker and the engine it drives.
    pub fn delivery(&mut self, cluster: &Cluster) -> anyhow::Result<(DeliveryHandle, Dispatcher)> {
        let c = self.config;
        let d = &c.delivery;
        let timeouts = Timeouts {
            connect: d.connect_timeout,
            ..d.command_timeout.map(Timeouts::uniform).unwrap_or_default()
        };
        let extra_roots = match &d.tls_ca_file {
            None => Vec::new(),
            Some(path) => crate::tls::load_certs(path)
                .with_context(|| format!("delivery.tls_ca_file {}", path.display()))?,
        };
        let reports = Arc::new(crate::tlsrpt::TlsReports::default());
        let policies = Arc::new(crate::sts::SharedPolicies::new(cluster.clone()));
        let deliverer = Deliverer::with_sts(
            skein_delivery::DeliveryConfig {
                helo_name: c.smtp.hostname.clone(),
                port: d.port,
                nameservers: d.nameservers.clone(),
                timeouts,
                tls: d.tls,
                extra_roots,
                routes: c.routes.clone(),
                concurrency_per_destination: d.concurrency_per_domain,
                connection_reuse: d.connection_reuse,
                own: self.own.clone(),
                mta_sts: d.mta_sts,
                mta_sts_port: d.mta_sts_port,
                dane: d.dane,
                dnssec_trust_anchors: d.dnssec_trust_anchors.clone(),
            },
            policies.clone(),
            Some(Arc::new(crate::metrics::StsSessions::new(
                self.metrics.clone(),
                d.tls_reports.then(|| reports.clone()),
            ))),
        )
        .context("cannot set up delivery")?;
        self.tls_reports = Some(TlsReporting {
            reports,
            policies,
            deliverer: deliverer.clone(),
        });
        let (dispatcher, handle) = delivery::start(
            cluster.clone(),
            deliverer,
            d.clone(),
            self.metrics.clone(),
            self.ids.clone(),
            c.smtp.hostname.clone(),
        );
        Ok((handle, dispatcher))
    }

    /// What SMTP sessions share: the accept path, the limits, STARTTLS,
    /// AUTH, the switches that stop them.
    pub fn smtp_shared(
        &mut self,
        cluster: &Cluster,
        dispatcher: Dispatcher,
        admin_token: &Secret,
    ) -> anyhow::Result<Smtp> {
        let c = self.config;
        let acceptor = Acceptor::new(
            cluster.clone(),
            self.ids.clone(),
            c.delivery.lease.as_millis() as u64,
            c.delivery.deliver_as_learner,
            dispatcher,
            self.metrics.clone(),
        );
        if let (true, Some(t)) = (c.delivery.tls_reports, &self.tls_reports) {
            self.tasks.spawn(crate::tlsrpt::send_periodically(
                t.reports.clone(),
                c.delivery.tls_report_interval,
                t.deliverer.clone(),
                t.policies.clone(),
                acceptor.clone(),
                c.smtp.hostname.clone(),
                self.shutdown_rx.clone(),
            ));
        }
        let auth = Arc::new(smtp::Authenticator::new(c.smtp.users.clone()));
        if !c.smtp.submission_listen.is_empty() && auth.is_empty() {
            tracing::warn!(
                "submission listeners are on but [smtp.users] is empty: nobody can authenticate"
            );
        }
        let tls = match (&c.smtp.tls_cert, &c.smtp.tls_key) {
            (Some(cert), Some(key)) => {
                let cert =
                    ReloadingCert::load_pair(cert, key).context("smtp.tls_cert / smtp.tls_key")?;
                let watcher =
                    AbortOnDrop(cert.watch(c.smtp.tls_reload_interval, "SMTP certificate"));
                self.tasks.spawn(async move {
                    let _watcher = watcher;
                    std::future::pending::<()>().await
                });
                Some(crate::tls::server_acceptor(cert)?)
            }
            _ => None,
        };
        let dkim = crate::dkim::Signers::load(&c.dkim)?;
        for w in dkim.watch(c.smtp.tls_reload_interval) {
            let watcher = AbortOnDrop(w);
            self.tasks.spawn(async move {
                let _watcher = watcher;
                std::future::pending::<()>().await
            });
        }
        let (stop, stop_rx) = watch::channel(false);
        let (halt, halt_rx) = watch::channel(false);
        let config = Arc::new(c.smtp.clone());
        let context = |require_auth| {
            Arc::new(SmtpContext {
                config: config.clone(),
                acceptor: acceptor.clone(),
                require_auth,
                tls: tls.clone(),
                auth: auth.clone(),
                shutdown: stop_rx.clone(),
                halt: halt_rx.clone(),
                metrics: self.metrics.clone(),
                data_dir: c.data_dir.clone(),
                canary_key: admin_token.clone(),
                dkim: dkim.clone(),
            })
        };
        Ok(Smtp {
            contexts: [context(false), context(true)],
            stop: Arc::new(stop),
            halt,
            limit: Arc::new(Semaphore::new(c.smtp.max_connections)),
            clients: Arc::new(PerClient::default()),
        })
    }

    /// The cluster port: Raft between peers and the admin API, over mutual
    /// TLS when configured.
    pub fn cluster_port(
        &mut self,
        listener: TcpListener,
        cluster: &Cluster,
        secret: &Secret,
        admin_token: &Secret,
        lifecycle: Lifecycle,
        faults: mpsc::UnboundedSender<super::Restart>,
    ) -> anyhow::Result<SocketAddr> {
        let c = self.config;
        let addr = listener.local_addr()?;
        let raft = RaftService::server(
            cluster.clone(),
            RequireSecret(secret.clone()),
            self.max_grpc,
            c.data_dir.clone(),
        );
        let admin = AdminService::server(
            cluster.clone(),
            NodeControl { lifecycle, faults },
            admin_token,
            c.data_dir.clone(),
            self.max_grpc,
        );
        let router = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .add_service(raft)
            .add_service(admin);
        let mut stop = self.shutdown_rx.clone();
        let stopped = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        let (tls, reload_every) = (self.cluster_tls.clone(), c.smtp.tls_reload_interval);
        self.tasks.spawn(async move {
            let r = match tls {
                Some(tls) => {
                    let _watcher = AbortOnDrop(tls.watch(reload_every, "cluster certificate"));
                    let incoming = crate::tls::tls_incoming(listener, tls);
                    router.serve_with_incoming_shutdown(incoming, stopped).await
                }
                None => {
                    // Server::tcp_nodelay applies only to listeners tonic
                    // binds itself: without it, small replies (append acks,
                    // forwarded commits) wait out Nagle and delayed ACKs.
                    let incoming = TcpListenerStream::new(listener).map(|conn| {
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
        Ok(addr)
    }

    /// The SMTP and submission listeners, serving sessions.
    pub fn smtp_listeners(
        &mut self,
        smtp: &Smtp,
        plain: Vec<TcpListener>,
        submission: Vec<TcpListener>,
    ) -> anyhow::Result<(Vec<SocketAddr>, Vec<SocketAddr>)> {
        let mut addrs = (Vec::new(), Vec::new());
        for (listeners, ctx, out) in [
            (plain, &smtp.contexts[0], &mut addrs.0),
            (submission, &smtp.contexts[1], &mut addrs.1),
        ] {
            for l in listeners {
                out.push(l.local_addr()?);
                self.tasks.spawn(smtp::serve(
                    l,
                    ctx.clone(),
                    smtp.limit.clone(),
                    smtp.clients.clone(),
                ));
            }
        }
        Ok(addrs)
    }
}
