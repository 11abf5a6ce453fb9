//! One running node: every listener bound, Raft started, workers spawned.
//! [`Node::start`] returns once the node serves; [`Node::shutdown`] is the
//! graceful stop of SIGTERM, [`Node::halt`] the crash of a drill. Nothing
//! here is process-global, so tests run several nodes in one process.
//!
//! - `parts`: each part a node runs, started one after another.
//! - `lifecycle`: how a node stops taking work, for a drain and a shutdown.

mod lifecycle;
mod parts;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

pub use lifecycle::Lifecycle;

/// A restart asked of whoever runs the node: skeind replaces its process,
/// which closes every socket and file at once, as a crash would.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    /// A drill: stay down this long, then start from the data directory.
    Drill(Duration),
    /// `cluster recover --force`: start again at once; opening the store
    /// makes this node the single voter.
    Recover,
}

use crate::cluster::Cluster;
use crate::config::Config;
use crate::delivery::DeliveryHandle;
use crate::metrics::Metrics;
use crate::secrets::{self, Secret, SecretSource};

pub struct Node {
    cluster: Cluster,
    metrics: Arc<Metrics>,
    lifecycle: Lifecycle,
    delivery: DeliveryHandle,
    /// Stops everything but SMTP (which the lifecycle stops first).
    shutdown: watch::Sender<bool>,
    /// Ends every SMTP session at once (a drill's crash).
    halt: watch::Sender<bool>,
    /// Faults asked for by a drill, for whoever runs the node.
    faults: Option<mpsc::UnboundedReceiver<Restart>>,
    tasks: JoinSet<()>,
    pub smtp_addrs: Vec<SocketAddr>,
    pub submission_addrs: Vec<SocketAddr>,
    pub cluster_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub admin_token: Secret,
    pub token_source: SecretSource,
    pub secret_source: SecretSource,
}

impl Node {
    pub async fn start(config: Config) -> anyhow::Result<Node> {
        // Bind everything first: a port in use fails the start before any
        // state is touched.
        let listeners = parts::Listeners::bind(&config).await?;
        crate::privilege::create_private_dir(&config.data_dir)?;
        let (admin_token, token_source) = secrets::admin_token(&config)?;
        let (cluster_secret, secret_source) = secrets::cluster_secret(&config)?;
        let mut p = parts::Parts::new(&config);

        let cluster = p.cluster(&cluster_secret, &listeners).await?;
        p.observers(&cluster);
        let metrics_addr = p.metrics_endpoint(listeners.metrics, &cluster)?;
        let (delivery, dispatcher) = p.delivery(&cluster)?;
        let smtp = p.smtp_shared(&cluster, dispatcher, &admin_token)?;
        let lifecycle = Lifecycle::new(
            cluster.clone(),
            delivery.control(),
            smtp.stop.clone(),
            smtp.limit.clone(),
            config.smtp.max_connections,
        );
        let (faults_tx, faults) = mpsc::unbounded_channel();
        let cluster_addr = p.cluster_port(
            listeners.cluster,
            &cluster,
            &cluster_secret,
            &admin_token,
            lifecycle.clone(),
            faults_tx,
        )?;
        let (smtp_addrs, submission_addrs) =
            p.smtp_listeners(&smtp, listeners.smtp, listeners.submission)?;

        Ok(Node {
            cluster,
            metrics: p.metrics.clone(),
            lifecycle,
            delivery,
            shutdown: p.shutdown,
            halt: smtp.halt,
            faults: Some(faults),
            tasks: p.tasks,
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
    /// them (skeind does: it replaces its process, see `cli`).
    pub fn take_faults(&mut self) -> Option<mpsc::UnboundedReceiver<Restart>> {
        self.faults.take()
    }

    /// Stop as a crash would, keeping the data: SMTP sessions and listeners
    /// gone without a word, deliveries cut off mid-way, no lease handed
    /// back, the cluster port closed, Raft stopped. Starting a node on the
    /// same config afterwards is a restart.
    pub async fn halt(mut self) {
        tracing::warn!("failing as a crash would, for a drill");
        self.halt.send_replace(true);
        self.delivery.halt();
        self.stop_the_rest().await;
    }

    /// The graceful stop of SIGTERM: the lifecycle stops taking work (new
    /// SMTP sessions get 421, those sending data get `grace` to finish,
    /// leases are handed back so peers deliver at once), then the rest
    /// stops, Raft last.
    pub async fn shutdown(mut self, grace: Duration) {
        tracing::info!("shutting down");
        self.lifecycle
            .stop_taking_work(grace, grace.min(lifecycle::SHUTDOWN_DELIVERY_GRACE))
            .await;
        self.delivery.shutdown();
        self.stop_the_rest().await;
        tracing::info!("stopped");
    }

    /// The cluster port serves Raft until here: handing leases back is a
    /// commit, and a node whose peers cannot reach it stops hearing its
    /// leader, starts an election and can commit nothing.
    async fn stop_the_rest(&mut self) {
        self.shutdown.send_replace(true);
        self.cluster.shutdown().await;
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Stops a background task when its owner goes away.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
