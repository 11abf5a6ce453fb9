//! The admin API on the cluster port (`proto/skein/v1/admin.proto`), what
//! `skeinctl` talks to. Calls carry the admin token. Any node answers any
//! call: queue changes are proposals (forwarded to the leader like any
//! other), membership changes are forwarded to the leader, reads come from
//! the local replica.

mod backup;
mod recover;
mod view;

use std::time::Duration;

use skein_proto::v1::admin_server::{Admin, AdminServer};
use skein_proto::v1::*;
use skein_queue::{AdminCommand, Command, MessageId, Response as QResponse};
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status, Streaming};

use crate::cluster::{Change, Cluster, ProposeError};
use crate::secrets::Secret;

/// Refuses calls without `authorization: Bearer <token>`.
#[derive(Clone)]
pub struct RequireToken(Secret);

impl tonic::service::Interceptor for RequireToken {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let got = req
            .metadata()
            .get(skein_proto::AUTH_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if self.0.matches(got.as_bytes()) {
            Ok(req)
        } else {
            Err(Status::unauthenticated("admin token missing or wrong"))
        }
    }
}

/// What the admin API may do to the node it runs on.
#[derive(Clone)]
pub struct NodeControl {
    /// Drain: the same way of stopping work as SIGTERM's.
    pub lifecycle: crate::node::Lifecycle,
    /// Where a drill's fault goes: whoever runs the node (skeind) halts it
    /// and starts it again after the outage.
    pub faults: tokio::sync::mpsc::UnboundedSender<crate::node::Restart>,
}

/// The shortest and longest outage a drill may ask for.
const MIN_OUTAGE: Duration = Duration::from_secs(1);
const MAX_OUTAGE: Duration = Duration::from_secs(3600);

pub struct AdminService {
    cluster: Cluster,
    control: NodeControl,
    data_dir: std::path::PathBuf,
}

pub type Server = InterceptedService<AdminServer<AdminService>, RequireToken>;

impl AdminService {
    pub fn server(
        cluster: Cluster,
        control: NodeControl,
        token: &Secret,
        data_dir: std::path::PathBuf,
        max_message: usize,
    ) -> Server {
        let svc = AdminService {
            cluster,
            control,
            data_dir,
        };
        let server = AdminServer::new(svc)
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message);
        InterceptedService::new(server, RequireToken(token.clone()))
    }

    async fn membership(&self, change: Change) -> Result<Response<MembershipReply>, Status> {
        let m = self
            .cluster
            .change_membership(change)
            .await
            .map_err(crate::cluster::control_status)?;
        Ok(Response::new(MembershipReply {
            voters: m.voters,
            learners: m.learners,
            log_index: m.log_index,
        }))
    }

    async fn admin(&self, cmd: AdminCommand) -> Result<u64, Status> {
        match self.cluster.propose(Command::Admin(cmd)).await {
            Ok(QResponse::Changed(n)) => Ok(n),
            Ok(QResponse::NotFound) => Err(Status::not_found("no such message in the queue")),
            Ok(other) => Err(Status::internal(format!("unexpected answer {other:?}"))),
            Err(e) => Err(propose_status(e)),
        }
    }
}

fn propose_status(e: ProposeError) -> Status {
    match e {
        ProposeError::Timeout => {
            Status::unavailable("not committed in time: the cluster has no leader or no majority")
        }
        ProposeError::Refused(m) => Status::failed_precondition(m),
        e @ ProposeError::TooLarge { .. } => Status::invalid_argument(e.to_string()),
        ProposeError::Fatal(m) => Status::internal(m),
    }
}

fn parse_id(s: &str) -> Result<MessageId, Status> {
    s.parse()
        .map_err(|_| Status::invalid_argument(format!("{s:?} is not a queue id")))
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn status(&self, _req: Request<StatusRequest>) -> Result<Response<StatusReply>, Status> {
        Ok(Response::new(view::status(&self.cluster).await))
    }

    async fn list_queue(
        &self,
        req: Request<ListQueueRequest>,
    ) -> Result<Response<ListQueueReply>, Status> {
        let r = req.into_inner();
        let state = match r.state.as_str() {
            "" | "all" => None,
            s @ ("ready" | "leased" | "deferred" | "held") => Some(s.to_string()),
            other => {
                return Err(Status::invalid_argument(format!(
                    "{other:?} is not ready, leased, deferred, held or all"
                )))
            }
        };
        Ok(Response::new(ListQueueReply {
            messages: view::list(&self.cluster, state.as_deref(), &r.domain, r.limit),
        }))
    }

    async fn show_message(
        &self,
        req: Request<MessageRequest>,
    ) -> Result<Response<QueuedMessage>, Status> {
        let id = parse_id(&req.into_inner().id)?;
        view::show(&self.cluster, &id)
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("no message {id} in the queue")))
    }

    async fn retry_messages(
        &self,
        req: Request<RetryRequest>,
    ) -> Result<Response<ChangedReply>, Status> {
        let id = req.into_inner().id;
        let target = if id.is_empty() {
            None
        } else {
            Some(parse_id(&id)?)
        };
        let changed = self.admin(AdminCommand::RetryNow(target)).await?;
        Ok(Response::new(ChangedReply { changed }))
    }

    async fn hold_message(
        &self,
        req: Request<MessageRequest>,
    ) -> Result<Response<ChangedReply>, Status> {
        let id = parse_id(&req.into_inner().id)?;
        let changed = self.admin(AdminCommand::Hold(id)).await?;
        Ok(Response::new(ChangedReply { changed }))
    }

    async fn release_message(
        &self,
        req: Request<MessageRequest>,
    ) -> Result<Response<ChangedReply>, Status> {
        let id = parse_id(&req.into_inner().id)?;
        let changed = self.admin(AdminCommand::Unhold(id)).await?;
        Ok(Response::new(ChangedReply { changed }))
    }

    async fn delete_message(
        &self,
        req: Request<MessageRequest>,
    ) -> Result<Response<ChangedReply>, Status> {
        let id = parse_id(&req.into_inner().id)?;
        let changed = self.admin(AdminCommand::Delete(id)).await?;
        tracing::info!(queue_id = %id, "deleted by an operator");
        Ok(Response::new(ChangedReply { changed }))
    }

    async fn add_node(
        &self,
        req: Request<AddNodeRequest>,
    ) -> Result<Response<MembershipReply>, Status> {
        let r = req.into_inner();
        if r.id == 0 {
            return Err(Status::invalid_argument(
                "node ids are whole numbers from 1",
            ));
        }
        if !r
            .addr
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
        {
            return Err(Status::invalid_argument(format!(
                "{:?} is not host:port",
                r.addr
            )));
        }
        self.membership(Change::Add {
            id: r.id,
            addr: r.addr,
            learner: r.learner,
        })
        .await
    }

    async fn remove_node(
        &self,
        req: Request<RemoveNodeRequest>,
    ) -> Result<Response<MembershipReply>, Status> {
        let id = req.into_inner().id;
        self.membership(Change::Remove { id }).await
    }

    async fn promote_node(
        &self,
        req: Request<RemoveNodeRequest>,
    ) -> Result<Response<MembershipReply>, Status> {
        let id = req.into_inner().id;
        self.membership(Change::Promote { id }).await
    }

    async fn demote_node(
        &self,
        req: Request<RemoveNodeRequest>,
    ) -> Result<Response<MembershipReply>, Status> {
        let id = req.into_inner().id;
        self.membership(Change::Demote { id }).await
    }

    async fn recover(
        &self,
        req: Request<RecoverRequest>,
    ) -> Result<Response<RecoverReply>, Status> {
        let force = req.into_inner().force;
        recover::recover(&self.cluster, &self.control.faults, &self.data_dir, force)
            .await
            .map(Response::new)
    }

    async fn drain(&self, _req: Request<DrainRequest>) -> Result<Response<DrainReply>, Status> {
        let (leader, released) = self
            .control
            .lifecycle
            .drain()
            .await
            .map_err(crate::cluster::control_status)?;
        Ok(Response::new(DrainReply {
            node_id: self.cluster.id(),
            leader,
            leases_released: released as u64,
        }))
    }

    type BackupStream = backup::ChunkStream;

    async fn backup(
        &self,
        _req: Request<BackupRequest>,
    ) -> Result<Response<Self::BackupStream>, Status> {
        backup::backup(&self.cluster, &self.data_dir)
            .await
            .map(Response::new)
    }

    async fn trace(&self, req: Request<MessageRequest>) -> Result<Response<TraceReply>, Status> {
        let id = parse_id(&req.into_inner().id)?;
        // It reads the records saved since the message was queued: off the
        // async threads.
        let history = self.cluster.reader().history().clone();
        let events = tokio::task::spawn_blocking(move || history.events(&id))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::internal(e.to_string()))?;
        if events.is_empty() {
            return Err(Status::not_found(format!(
                "nothing is known of {id} here (never queued, or past the retention period)"
            )));
        }
        Ok(Response::new(TraceReply {
            id: id.to_string(),
            events: events.into_iter().map(view::trace_event).collect(),
        }))
    }

    async fn fault(&self, req: Request<FaultRequest>) -> Result<Response<FaultReply>, Status> {
        let outage = Duration::from_millis(req.into_inner().outage_ms);
        if !(MIN_OUTAGE..=MAX_OUTAGE).contains(&outage) {
            return Err(Status::invalid_argument(format!(
                "an outage lasts from {MIN_OUTAGE:?} to {MAX_OUTAGE:?}"
            )));
        }
        if self.control.faults.is_closed() {
            return Err(Status::failed_precondition(
                "this node is not run by skeind, which brings it back: no drill here",
            ));
        }
        let back_at_ms = crate::clock::now_ms() + outage.as_millis() as u64;
        tracing::warn!(outage = ?outage, "a drill asks this node to fail as a crash would");
        // Answer first: the node goes down a moment after the reply leaves.
        let faults = self.control.faults.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let _ = faults.send(crate::node::Restart::Drill(outage));
        });
        Ok(Response::new(FaultReply {
            node_id: self.cluster.id(),
            back_at_ms,
        }))
    }

    async fn restore(
        &self,
        req: Request<Streaming<BackupChunk>>,
    ) -> Result<Response<RestoreReply>, Status> {
        backup::restore(&self.cluster, &self.data_dir, req.into_inner())
            .await
            .map(Response::new)
    }
}
