//! The gRPC side of the Raft transport: peers' RPCs into openraft, and
//! proposals forwarded by followers.

use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use openraft::Vote;
use serde::Serialize;
use skein_proto::v1::raft_server::{Raft as RaftRpc, RaftServer};
use skein_proto::v1::{
    change_membership_request, propose_reply, ChangeMembershipReply, ChangeMembershipRequest,
    ElectReply, ElectRequest, NodeInfoReply, NodeInfoRequest, ProposeReply, ProposeRequest,
    RaftPayload, SnapshotChunk,
};
use skein_queue::{Command, NodeId, TypeConfig};
use tonic::metadata::MetadataMap;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};

use super::network::member_addr;
use super::{secret_eq, Change, Cluster, ControlError, Step};

pub struct RaftService {
    cluster: Cluster,
}

/// With mutual TLS, every Raft call must come with a certificate from the
/// cluster CA (the handshake checked the chain), and a call made in a
/// node's name (a leader's append, a candidate's vote) with that node's
/// certificate: one naming the host of its address in the membership.
fn check_peer<T>(
    cluster: &Cluster,
    req: &Request<T>,
    claimed: Option<NodeId>,
) -> Result<(), Status> {
    if !cluster.peers().uses_tls() {
        return Ok(());
    }
    let Some(certs) = req.peer_certs() else {
        return Err(Status::permission_denied(
            "cluster calls need a node certificate from the cluster CA",
        ));
    };
    // A node not (yet) in this node's membership, such as the leader
    // adding this node, is vouched for by the CA alone.
    let Some(id) = claimed else { return Ok(()) };
    let Some(addr) = member_addr(cluster.raft(), id) else {
        return Ok(());
    };
    let host = crate::tls::host_of(&addr);
    match certs.first() {
        Some(cert) if crate::tls::cert_names(cert, host) => Ok(()),
        _ => {
            tracing::warn!(node = id, %host, "refused a call in a node's name with a certificate not naming its host");
            Err(Status::permission_denied(format!(
                "the certificate presented does not name {host}, the address of node {id}"
            )))
        }
    }
}

/// Refuses every call that does not carry the cluster secret.
#[derive(Clone)]
pub struct RequireSecret(pub Option<std::sync::Arc<str>>);

impl RequireSecret {
    pub fn check(&self, md: &MetadataMap) -> Result<(), Status> {
        let Some(want) = &self.0 else { return Ok(()) };
        let got = md
            .get(skein_proto::SECRET_HEADER)
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if secret_eq(got, want.as_bytes()) {
            Ok(())
        } else {
            Err(Status::unauthenticated("cluster secret missing or wrong"))
        }
    }
}

impl tonic::service::Interceptor for RequireSecret {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        self.check(req.metadata())?;
        Ok(req)
    }
}

impl RaftService {
    pub fn server(
        cluster: Cluster,
        secret: RequireSecret,
        max_message: usize,
    ) -> InterceptedService<RaftServer<RaftService>, RequireSecret> {
        let server = RaftServer::new(RaftService { cluster })
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message);
        InterceptedService::new(server, secret)
    }
}

fn decode<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, Status> {
    postcard::from_bytes(b)
        .map_err(|e| Status::invalid_argument(format!("undecodable payload: {e}")))
}

fn encode<T: Serialize>(v: &T) -> Result<Response<RaftPayload>, Status> {
    let data = postcard::to_stdvec(v).map_err(|e| Status::internal(e.to_string()))?;
    Ok(Response::new(RaftPayload { data: data.into() }))
}

#[tonic::async_trait]
impl RaftRpc for RaftService {
    async fn append_entries(
        &self,
        req: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let rpc: AppendEntriesRequest<TypeConfig> = decode(&req.get_ref().data)?;
        check_peer(&self.cluster, &req, rpc.vote.leader_id().voted_for())?;
        self.cluster.note_leader_contact();
        encode(&self.cluster.raft().append_entries(rpc).await)
    }

    async fn vote(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let rpc: VoteRequest<NodeId> = decode(&req.get_ref().data)?;
        check_peer(&self.cluster, &req, rpc.vote.leader_id().voted_for())?;
        encode(&self.cluster.raft().vote(rpc).await)
    }

    async fn install_snapshot(
        &self,
        req: Request<SnapshotChunk>,
    ) -> Result<Response<RaftPayload>, Status> {
        let vote: Vote<NodeId> = decode(&req.get_ref().vote)?;
        check_peer(&self.cluster, &req, vote.leader_id().voted_for())?;
        let c = req.into_inner();
        let rpc = InstallSnapshotRequest {
            vote,
            meta: decode(&c.meta)?,
            offset: c.offset,
            data: c.data.to_vec(),
            done: c.done,
        };
        let r: Result<_, RaftError<NodeId, InstallSnapshotError>> =
            self.cluster.raft().install_snapshot(rpc).await;
        encode(&r)
    }

    async fn propose(
        &self,
        req: Request<ProposeRequest>,
    ) -> Result<Response<ProposeReply>, Status> {
        check_peer(&self.cluster, &req, None)?;
        let cmd: Command = decode(&req.into_inner().command)?;
        let result = match self.cluster.propose_local(cmd).await {
            Ok(resp) => {
                let b = postcard::to_stdvec(&resp).map_err(|e| Status::internal(e.to_string()))?;
                propose_reply::Result::Response(b.into())
            }
            Err(Step::Forward(leader)) => propose_reply::Result::ForwardTo(leader.unwrap_or(0)),
            Err(Step::Retry) => propose_reply::Result::Error("retry".into()),
            Err(Step::Fail(e)) => propose_reply::Result::Error(e.to_string()),
        };
        Ok(Response::new(ProposeReply {
            result: Some(result),
        }))
    }

    async fn change_membership(
        &self,
        req: Request<ChangeMembershipRequest>,
    ) -> Result<Response<ChangeMembershipReply>, Status> {
        check_peer(&self.cluster, &req, None)?;
        let r = req.into_inner();
        let change = match r.change {
            Some(change_membership_request::Change::AddAddr(addr)) => Change::Add {
                id: r.node_id,
                addr,
            },
            Some(change_membership_request::Change::Remove(_)) => Change::Remove { id: r.node_id },
            None => return Err(Status::invalid_argument("no change given")),
        };
        match self.cluster.change_membership(change).await {
            Ok((voters, log_index)) => {
                Ok(Response::new(ChangeMembershipReply { voters, log_index }))
            }
            Err(e) => Err(control_status(e)),
        }
    }

    async fn node_info(
        &self,
        req: Request<NodeInfoRequest>,
    ) -> Result<Response<NodeInfoReply>, Status> {
        check_peer(&self.cluster, &req, None)?;
        Ok(Response::new(self.cluster.node_info()))
    }

    async fn elect(&self, req: Request<ElectRequest>) -> Result<Response<ElectReply>, Status> {
        check_peer(&self.cluster, &req, None)?;
        if self.cluster.is_draining() {
            return Err(Status::failed_precondition("this node is draining"));
        }
        self.cluster
            .raft()
            .trigger()
            .elect()
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(ElectReply {}))
    }
}

/// The gRPC status for a failed cluster operation.
pub fn control_status(e: ControlError) -> Status {
    match e {
        ControlError::NoLeader | ControlError::Unreachable(..) => {
            Status::unavailable(e.to_string())
        }
        ControlError::Refused(_) => Status::failed_precondition(e.to_string()),
        ControlError::Fatal(_) => Status::internal(e.to_string()),
    }
}
