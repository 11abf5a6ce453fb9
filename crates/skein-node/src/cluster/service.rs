//! The gRPC side of the Raft transport: peers' RPCs into openraft, and
//! proposals forwarded by followers.

use futures::stream::FuturesUnordered;
use openraft::raft::{AppendEntriesRequest, VoteRequest};
use openraft::Vote;
use serde::Serialize;
use skein_proto::v1::raft_server::{Raft as RaftRpc, RaftServer};
use skein_proto::v1::{
    change_membership_request, propose_reply, ChangeMembershipReply, ChangeMembershipRequest,
    ElectReply, ElectRequest, NodeInfoReply, NodeInfoRequest, ProposeReply, ProposeRequest,
    RaftPayload, SnapshotChunk,
};
use skein_queue::{Command, NodeId, TypeConfig};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::metadata::MetadataMap;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status, Streaming};

use super::receive::{Answer, Chunk, Receiver};
use super::{Change, Cluster, ControlError, Step};
use crate::secrets::Secret;

/// Proposals one forwarding stream runs at once; more wait in the stream
/// (and, past its flow-control window, at the follower).
const STREAM_IN_FLIGHT: usize = 1024;

/// A command a follower forwarded, decoded. Never a batch: only the leader
/// batches, and a batch from a peer would nest.
fn forwarded_command(bytes: &[u8]) -> Result<Command, Status> {
    let cmd: Command = decode(bytes)?;
    if matches!(cmd, Command::Batch(_)) {
        return Err(Status::invalid_argument(
            "a forwarded command is never a batch",
        ));
    }
    Ok(cmd)
}

/// Run a forwarded command on this node (the leader, or the answer says who
/// is), within the commit timeout.
async fn run_proposal(cluster: &Cluster, cmd: Command) -> Result<propose_reply::Result, Status> {
    let done = tokio::time::timeout(cluster.commit_timeout(), cluster.propose_local(cmd)).await;
    Ok(match done {
        Ok(Ok(resp)) => {
            let b = postcard::to_stdvec(&resp).map_err(|e| Status::internal(e.to_string()))?;
            propose_reply::Result::Response(b.into())
        }
        Ok(Err(Step::Forward(leader))) => propose_reply::Result::ForwardTo(leader.unwrap_or(0)),
        Ok(Err(Step::Retry)) => propose_reply::Result::Error("retry".into()),
        Ok(Err(Step::Fail(e))) => propose_reply::Result::Error(e.to_string()),
        Err(_) => propose_reply::Result::Error("not committed within the commit timeout".into()),
    })
}

pub struct RaftService {
    cluster: Cluster,
    snapshots: Receiver,
}

/// The members this node knows (voters and learners), by id.
fn members(cluster: &Cluster) -> std::collections::BTreeMap<NodeId, String> {
    let m = cluster.raft().metrics();
    let m = m.borrow();
    m.membership_config
        .membership()
        .nodes()
        .map(|(id, n)| (*id, n.addr.clone()))
        .collect()
}

/// Checked before anything is decoded. With mutual TLS, every Raft call
/// comes with a certificate from the cluster CA (the handshake checked the
/// chain), and it must name the host of a member this node knows — a node
/// being added is a learner from the entry that adds it. A pristine node,
/// which knows no member yet (it waits to be added), takes the CA's word.
fn check_certificate<T>(cluster: &Cluster, req: &Request<T>) -> Result<(), Status> {
    if !cluster.peers().uses_tls() {
        return Ok(());
    }
    let Some(cert) = req.peer_certs().and_then(|c| c.first().cloned()) else {
        return Err(Status::permission_denied(
            "cluster calls need a node certificate from the cluster CA",
        ));
    };
    let members = members(cluster);
    if members.is_empty()
        || members
            .values()
            .any(|addr| crate::tls::cert_names(&cert, crate::tls::host_of(addr)))
    {
        return Ok(());
    }
    tracing::warn!("refused a cluster call with a certificate that names no member");
    Err(Status::permission_denied(
        "the certificate presented names no member of this cluster",
    ))
}

/// Checked once the payload says in whose name a call is made (a leader's
/// append, a candidate's vote, a snapshot). The node must be a member this
/// node knows, or be named by the membership the call itself carries (a
/// leader this node has not heard of yet sends the entry that made it one);
/// with mutual TLS the certificate must name that member's host. So no
/// call is made in the name of a node that is no member — a removed node
/// cannot come back by itself — nor, under TLS, in another node's name.
fn check_claim<T>(
    cluster: &Cluster,
    req: &Request<T>,
    claimed: Option<NodeId>,
    carried: impl Fn(NodeId) -> Option<String>,
) -> Result<(), Status> {
    let Some(id) = claimed else { return Ok(()) };
    let members = members(cluster);
    if members.is_empty() {
        return Ok(());
    }
    let Some(addr) = members.get(&id).cloned().or_else(|| carried(id)) else {
        tracing::warn!(
            node = id,
            "refused a call in the name of a node that is no member"
        );
        return Err(Status::permission_denied(format!(
            "node {id} is not a member of this cluster"
        )));
    };
    if !cluster.peers().uses_tls() {
        return Ok(());
    }
    let host = crate::tls::host_of(&addr);
    match req.peer_certs().and_then(|c| c.first().cloned()) {
        Some(cert) if crate::tls::cert_names(&cert, host) => Ok(()),
        _ => {
            tracing::warn!(node = id, %host, "refused a call in a node's name with a certificate not naming its host");
            Err(Status::permission_denied(format!(
                "the certificate presented does not name {host}, the address of node {id}"
            )))
        }
    }
}

/// The address of `id` in a membership carried by entries.
fn in_entries(entries: &[skein_queue::Entry], id: NodeId) -> Option<String> {
    entries.iter().rev().find_map(|e| match &e.payload {
        openraft::EntryPayload::Membership(m) => m.get_node(&id).map(|n| n.addr.clone()),
        _ => None,
    })
}

/// Refuses every call that does not carry the cluster secret, before its
/// payload is decoded (tonic runs the interceptor on the headers alone).
#[derive(Clone)]
pub struct RequireSecret(pub Secret);

impl RequireSecret {
    pub fn check(&self, md: &MetadataMap) -> Result<(), Status> {
        let got = md
            .get(skein_proto::SECRET_HEADER)
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if self.0.matches(got) {
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
        data_dir: std::path::PathBuf,
    ) -> InterceptedService<RaftServer<RaftService>, RequireSecret> {
        let server = RaftServer::new(RaftService {
            cluster,
            snapshots: Receiver::new(data_dir.join("snapshots")),
        })
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
        check_certificate(&self.cluster, &req)?;
        let rpc: AppendEntriesRequest<TypeConfig> = decode(&req.get_ref().data)?;
        check_claim(
            &self.cluster,
            &req,
            rpc.vote.leader_id().voted_for(),
            |id| in_entries(&rpc.entries, id),
        )?;
        self.cluster.note_leader_contact();
        encode(&self.cluster.raft().append_entries(rpc).await)
    }

    async fn vote(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        check_certificate(&self.cluster, &req)?;
        let rpc: VoteRequest<NodeId> = decode(&req.get_ref().data)?;
        check_claim(
            &self.cluster,
            &req,
            rpc.vote.leader_id().voted_for(),
            |_| None,
        )?;
        encode(&self.cluster.raft().vote(rpc).await)
    }

    async fn install_snapshot(
        &self,
        req: Request<SnapshotChunk>,
    ) -> Result<Response<RaftPayload>, Status> {
        check_certificate(&self.cluster, &req)?;
        let vote: Vote<NodeId> = decode(&req.get_ref().vote)?;
        let meta: skein_queue::SnapshotMeta = decode(&req.get_ref().meta)?;
        check_claim(&self.cluster, &req, vote.leader_id().voted_for(), |id| {
            meta.last_membership
                .membership()
                .get_node(&id)
                .map(|n| n.addr.clone())
        })?;
        let c = req.into_inner();
        let chunk = Chunk {
            vote,
            meta,
            offset: c.offset,
            data: c.data,
            done: c.done,
        };
        let answer: Answer = self.snapshots.chunk(self.cluster.raft(), chunk).await?;
        encode(&answer)
    }

    async fn propose(
        &self,
        req: Request<ProposeRequest>,
    ) -> Result<Response<ProposeReply>, Status> {
        check_certificate(&self.cluster, &req)?;
        let cmd = forwarded_command(&req.into_inner().command)?;
        let result = run_proposal(&self.cluster, cmd).await?;
        Ok(Response::new(ProposeReply {
            result: Some(result),
            seq: 0,
        }))
    }

    type ProposeStreamStream = ReceiverStream<Result<ProposeReply, Status>>;

    /// Each request is run as it comes, at most [`STREAM_IN_FLIGHT`] at
    /// once, and answered when done; a request that cannot be decoded is
    /// answered with an error, as the unary call would be. The stream ends
    /// when the follower ends its side and every request is answered, or
    /// when the follower goes away.
    async fn propose_stream(
        &self,
        req: Request<Streaming<ProposeRequest>>,
    ) -> Result<Response<Self::ProposeStreamStream>, Status> {
        check_certificate(&self.cluster, &req)?;
        let mut requests = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(STREAM_IN_FLIGHT);
        let cluster = self.cluster.clone();
        tokio::spawn(async move {
            let mut running = FuturesUnordered::new();
            let mut open = true;
            while open || !running.is_empty() {
                tokio::select! {
                    next = requests.message(), if open && running.len() < STREAM_IN_FLIGHT => {
                        match next {
                            Ok(Some(r)) => {
                                let cluster = cluster.clone();
                                running.push(async move {
                                    let result = match forwarded_command(&r.command) {
                                        Ok(cmd) => run_proposal(&cluster, cmd).await,
                                        Err(e) => Err(e),
                                    };
                                    let result = result.unwrap_or_else(|s| {
                                        propose_reply::Result::Error(s.message().to_string())
                                    });
                                    ProposeReply { result: Some(result), seq: r.seq }
                                });
                            }
                            Ok(None) => open = false,
                            Err(status) => {
                                tracing::debug!(%status, "a forwarding stream broke");
                                open = false;
                            }
                        }
                    }
                    Some(reply) = running.next(), if !running.is_empty() => {
                        if tx.send(Ok(reply)).await.is_err() {
                            // The follower is gone; so is whoever waited.
                            return;
                        }
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn change_membership(
        &self,
        req: Request<ChangeMembershipRequest>,
    ) -> Result<Response<ChangeMembershipReply>, Status> {
        check_certificate(&self.cluster, &req)?;
        let r = req.into_inner();
        use change_membership_request::Change as Wire;
        let id = r.node_id;
        let change = match r.change {
            Some(Wire::AddAddr(addr)) => Change::Add {
                id,
                addr,
                learner: false,
            },
            Some(Wire::AddLearnerAddr(addr)) => Change::Add {
                id,
                addr,
                learner: true,
            },
            Some(Wire::Remove(_)) => Change::Remove { id },
            Some(Wire::Promote(_)) => Change::Promote { id },
            Some(Wire::Demote(_)) => Change::Demote { id },
            None => return Err(Status::invalid_argument("no change given")),
        };
        match self.cluster.change_membership(change).await {
            Ok(m) => Ok(Response::new(ChangeMembershipReply {
                voters: m.voters,
                learners: m.learners,
                log_index: m.log_index,
            })),
            Err(e) => Err(control_status(e)),
        }
    }

    async fn node_info(
        &self,
        req: Request<NodeInfoRequest>,
    ) -> Result<Response<NodeInfoReply>, Status> {
        check_certificate(&self.cluster, &req)?;
        Ok(Response::new(self.cluster.node_info()))
    }

    async fn elect(&self, req: Request<ElectRequest>) -> Result<Response<ElectReply>, Status> {
        check_certificate(&self.cluster, &req)?;
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
