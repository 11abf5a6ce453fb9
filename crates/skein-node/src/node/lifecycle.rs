//! How a node stops taking work: the one place both `skeinctl node drain`
//! and SIGTERM go through.
//!
//! Both begin the same way — refuse new SMTP sessions, let the sessions
//! sending message data finish, stop claiming mail, give running deliveries
//! a moment, hand every lease still held back so peers take the mail at
//! once — and then part: a drain also gives up leadership and leaves the
//! node running (out of rotation, ready to be stopped); a shutdown then
//! closes the cluster port and stops Raft (see `Node::shutdown`).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Semaphore};

use crate::cluster::{Cluster, ControlError};
use crate::delivery::DeliveryControl;

/// Running deliveries may finish for this long at a shutdown before their
/// leases are handed back anyway: one about to finish saves a duplicate,
/// but peers must not wait long for the rest.
pub const SHUTDOWN_DELIVERY_GRACE: Duration = Duration::from_secs(2);
/// The same for a drain, where nobody is waiting on the process.
pub const DRAIN_DELIVERY_GRACE: Duration = Duration::from_secs(5);
/// How long a drained leader waits for another node to take over.
pub const DRAIN_HANDOVER: Duration = Duration::from_secs(15);

/// What stopping a node acts on. Cheap to clone.
#[derive(Clone)]
pub struct Lifecycle {
    cluster: Cluster,
    delivery: DeliveryControl,
    /// New SMTP sessions get 421, sessions between commands are told so.
    smtp_stop: Arc<watch::Sender<bool>>,
    /// Open SMTP sessions hold permits of this.
    smtp_limit: Arc<Semaphore>,
    max_connections: usize,
}

impl Lifecycle {
    pub fn new(
        cluster: Cluster,
        delivery: DeliveryControl,
        smtp_stop: Arc<watch::Sender<bool>>,
        smtp_limit: Arc<Semaphore>,
        max_connections: usize,
    ) -> Self {
        Lifecycle {
            cluster,
            delivery,
            smtp_stop,
            smtp_limit,
            max_connections,
        }
    }

    /// Stop taking work: SMTP refused, sessions sending data given up to
    /// `sessions` to finish, deliveries `deliveries`, then every lease
    /// handed back. Returns how many leases were.
    pub async fn stop_taking_work(&self, sessions: Duration, deliveries: Duration) -> usize {
        self.smtp_stop.send_replace(true);
        let deadline = tokio::time::Instant::now() + sessions;
        let sessions = async {
            while self.smtp_limit.available_permits() < self.max_connections
                && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        let (released, ()) = tokio::join!(self.delivery.drain(deliveries), sessions);
        released
    }

    /// `skeinctl node drain`: stop taking work, then give up leadership;
    /// the node keeps serving the cluster as a follower, out of rotation
    /// (`/readyz` 503), ready to be stopped. Returns the leader after it
    /// and the leases handed back.
    pub async fn drain(&self) -> Result<(u64, usize), ControlError> {
        tracing::info!("draining: refusing SMTP, handing back leases, giving up leadership");
        self.cluster.set_draining();
        let released = self
            .stop_taking_work(Duration::ZERO, DRAIN_DELIVERY_GRACE)
            .await;
        let leader = self.cluster.give_up_leadership(DRAIN_HANDOVER).await?;
        tracing::info!(leader, released, "drained: ready to be stopped");
        Ok((leader, released))
    }
}
