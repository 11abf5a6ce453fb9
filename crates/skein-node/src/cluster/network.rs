//! openraft's network over tonic: one lazily connected gRPC channel per peer
//! address (over mutual TLS when the cluster has certificates), the cluster
//! secret on every call, batches kept under the gRPC message limit.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError,
    Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use skein_proto::v1::raft_client::RaftClient;
use skein_proto::v1::{RaftPayload, SnapshotChunk};
use skein_queue::{NodeId, Raft, TypeConfig};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::tls::{host_of, ClusterTls, Reloading};

/// Append batches are split (by asking openraft for fewer entries) above
/// this size; a single entry may be as large as a message allows.
const SOFT_BATCH_BYTES: usize = 16 << 20;
/// How long one AppendEntries call may run on after openraft stopped
/// waiting for it (see [`InFlight`]).
const DETACHED_LIMIT: Duration = Duration::from_secs(10);

pub type PeerClient = RaftClient<InterceptedService<Channel, AddSecret>>;

/// gRPC channels to peers, shared by the Raft network and proposal forwarding.
#[derive(Clone)]
pub struct PeerChannels {
    inner: Arc<PeerInner>,
}

struct PeerInner {
    secret: Option<MetadataValue<Ascii>>,
    max_message: usize,
    /// Dial peers from this address (the cluster listener's), so traffic
    /// between nodes leaves on the cluster network of a multi-homed host.
    local: Option<std::net::IpAddr>,
    tls: Option<Arc<Reloading<ClusterTls>>>,
    /// Each channel with the TLS material it was made with: after a
    /// certificate reload the next call makes a new one.
    channels: Mutex<HashMap<String, MadeWith>>,
}

/// A channel and the TLS material it was made with.
type MadeWith = (Option<Arc<ClusterTls>>, Channel);

impl PeerChannels {
    /// `max_message`: the largest gRPC message sent or accepted, sized from
    /// `smtp.max_message_size` so that one whole mail fits in one entry.
    pub fn new(
        secret: &str,
        max_message: usize,
        local: Option<std::net::IpAddr>,
        tls: Option<Arc<Reloading<ClusterTls>>>,
    ) -> anyhow::Result<Self> {
        let secret = Some(
            secret
                .parse()
                .map_err(|_| anyhow::anyhow!("cluster.secret must be printable ASCII"))?,
        );
        Ok(PeerChannels {
            inner: Arc::new(PeerInner {
                secret,
                max_message,
                local: local.filter(|ip| !ip.is_unspecified()),
                tls,
                channels: Mutex::new(HashMap::new()),
            }),
        })
    }

    pub fn max_message(&self) -> usize {
        self.inner.max_message
    }

    /// A channel to `addr` (`host:port`), connected on first use and
    /// reconnected by tonic when it breaks.
    pub fn channel(&self, addr: &str) -> Result<Channel, tonic::transport::Error> {
        let mut map = self
            .inner
            .channels
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let tls = self.tls_material();
        if let Some((made_with, c)) = map.get(addr) {
            if same_material(made_with, &tls) {
                return Ok(c.clone());
            }
        }
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .local_address(self.inner.local);
        if let Some(t) = &tls {
            endpoint = endpoint.tls_config(t.client_config(host_of(addr)))?;
        }
        let ch = endpoint.connect_lazy();
        map.insert(addr.to_string(), (tls, ch.clone()));
        Ok(ch)
    }

    /// The TLS material new channels are made with now (`None` without
    /// TLS); a reload makes a new one.
    pub fn tls_material(&self) -> Option<Arc<ClusterTls>> {
        self.inner.tls.as_ref().map(|t| t.current())
    }

    /// The channel to a member of the cluster, by id, from the membership.
    pub async fn channel_for(&self, id: NodeId, raft: &Raft) -> Option<Channel> {
        self.channel(&member_addr(raft, id)?).ok()
    }

    pub fn uses_tls(&self) -> bool {
        self.inner.tls.is_some()
    }

    pub fn raft_client(&self, ch: Channel) -> PeerClient {
        RaftClient::with_interceptor(ch, AddSecret(self.inner.secret.clone()))
            .max_decoding_message_size(self.inner.max_message)
            .max_encoding_message_size(self.inner.max_message)
    }
}

/// Whether a channel made with `a` may go on where `b` is current: the
/// same certificates, or TLS in neither.
pub fn same_material(a: &Option<Arc<ClusterTls>>, b: &Option<Arc<ClusterTls>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (a, b) => a.is_none() && b.is_none(),
    }
}

/// Where member `id` is reached, from the membership this node knows.
pub fn member_addr(raft: &Raft, id: NodeId) -> Option<String> {
    let m = raft.metrics();
    let m = m.borrow();
    m.membership_config
        .membership()
        .get_node(&id)
        .map(|n| n.addr.clone())
}

/// Puts the cluster secret on every outgoing call.
#[derive(Clone)]
pub struct AddSecret(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for AddSecret {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(s) = &self.0 {
            req.metadata_mut()
                .insert(skein_proto::SECRET_HEADER, s.clone());
        }
        Ok(req)
    }
}

/// Makes a [`PeerConn`] per replication target.
pub struct Network {
    peers: PeerChannels,
}

impl Network {
    pub fn new(peers: PeerChannels) -> Self {
        Network { peers }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerConn;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerConn {
        PeerConn {
            target,
            node: node.clone(),
            peers: self.peers.clone(),
            inflight: None,
        }
    }
}

pub struct PeerConn {
    target: NodeId,
    node: BasicNode,
    peers: PeerChannels,
    inflight: Option<InFlight>,
}

type Reply = Arc<Result<Vec<u8>, tonic::Status>>;

/// The AppendEntries call to this peer under way. openraft 0.9 gives each
/// call the heartbeat interval and then sends the entries again — with any
/// appended meanwhile, and with heartbeats in between; an entry too large
/// to cross and be written in that time (a 15 MB message on a busy machine)
/// would be cut off and resent for ever, the follower falling behind until
/// it called elections. So the call runs on its own, up to
/// [`DETACHED_LIMIT`]: a heartbeat goes beside it, and openraft's next
/// request from the same point (vote and previous log id) waits for it and
/// is answered with what it got across — all of the new request, or
/// `PartialSuccess` up to the call's last entry, and openraft sends the
/// rest. At most one per peer: a request from another point aborts it.
struct InFlight {
    /// Where its entries start: vote, previous log id.
    key: (openraft::Vote<NodeId>, Option<openraft::LogId<NodeId>>),
    /// Its last entry.
    last: Option<openraft::LogId<NodeId>>,
    reply: futures::future::Shared<futures::future::BoxFuture<'static, Reply>>,
    task: tokio::task::AbortHandle,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type RpcErr<E = openraft::error::Infallible> = RPCError<NodeId, BasicNode, RaftError<NodeId, E>>;

impl PeerConn {
    fn client(&self) -> Result<PeerClient, Unreachable> {
        let ch = self
            .peers
            .channel(&self.node.addr)
            .map_err(|e| Unreachable::new(&e))?;
        Ok(self.peers.raft_client(ch))
    }

    /// One small call: `rpc` encoded, sent with `send`, the reply decoded,
    /// all within the call's time.
    async fn unary<Req, T, E, F>(
        &self,
        rpc: &Req,
        option: &RPCOption,
        send: impl FnOnce(PeerClient, RaftPayload) -> F,
    ) -> Result<T, RpcErr<E>>
    where
        Req: serde::Serialize,
        T: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
        F: std::future::Future<Output = Result<tonic::Response<RaftPayload>, tonic::Status>>,
    {
        let data =
            postcard::to_stdvec(rpc).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let payload = RaftPayload { data: data.into() };
        let reply = tokio::time::timeout(option.hard_ttl(), send(self.client()?, payload))
            .await
            .map_err(|_| timed_out())?
            .map_err(transport_err)?;
        self.decode(&reply.into_inner().data)
    }

    /// Decode a peer's `Result<T, RaftError<E>>`.
    fn decode<T, E>(&self, data: &[u8]) -> Result<T, RpcErr<E>>
    where
        T: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let r: Result<T, RaftError<NodeId, E>> =
            postcard::from_bytes(data).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        r.map_err(|e| {
            RPCError::RemoteError(RemoteError::new_with_node(
                self.target,
                self.node.clone(),
                e,
            ))
        })
    }
}

/// Transport failures: a peer that cannot be reached is backed off from;
/// anything else is retried at once.
fn transport_err<E: std::error::Error>(status: tonic::Status) -> RpcErr<E> {
    match status.code() {
        tonic::Code::Unavailable | tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => {
            RPCError::Unreachable(Unreachable::new(&status))
        }
        _ => RPCError::Network(NetworkError::new(&status)),
    }
}

fn timed_out<E: std::error::Error>() -> RpcErr<E> {
    let e = std::io::Error::new(std::io::ErrorKind::TimedOut, "rpc timed out");
    RPCError::Network(NetworkError::new(&e))
}

impl RaftNetwork<TypeConfig> for PeerConn {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcErr> {
        if rpc.entries.is_empty() {
            // A heartbeat: small, and never in the way of the call under way.
            return self
                .unary(&rpc, &option, |mut c, p| async move {
                    c.append_entries(p).await
                })
                .await;
        }
        let key = (rpc.vote, rpc.prev_log_id);
        let wanted = rpc.entries.last().map(|e| e.log_id);
        let (reply, got) = match &self.inflight {
            Some(f) if f.key == key => (f.reply.clone(), f.last),
            _ => {
                let data = postcard::to_stdvec(&rpc)
                    .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
                if data.len() > SOFT_BATCH_BYTES && rpc.entries.len() > 1 {
                    let fit = (rpc.entries.len() * SOFT_BATCH_BYTES / data.len()).max(1);
                    return Err(RPCError::PayloadTooLarge(
                        PayloadTooLarge::new_entries_hint(fit as u64),
                    ));
                }
                let mut client = self.client()?;
                let call = tokio::spawn(async move {
                    let r = tokio::time::timeout(
                        DETACHED_LIMIT,
                        client.append_entries(RaftPayload { data: data.into() }),
                    )
                    .await;
                    match r {
                        Ok(r) => r.map(|r| r.into_inner().data.to_vec()),
                        Err(_) => Err(tonic::Status::deadline_exceeded("append entries")),
                    }
                });
                let task = call.abort_handle();
                use futures::FutureExt;
                let reply = async move {
                    Arc::new(call.await.unwrap_or_else(|e| {
                        Err(tonic::Status::cancelled(format!("append entries: {e}")))
                    }))
                }
                .boxed()
                .shared();
                self.inflight = Some(InFlight {
                    key,
                    last: wanted,
                    reply: reply.clone(),
                    task,
                });
                (reply, wanted)
            }
        };
        let reply = tokio::time::timeout(option.hard_ttl(), reply)
            .await
            .map_err(|_| timed_out())?;
        self.inflight = None;
        let resp: AppendEntriesResponse<NodeId> = match &*reply {
            Ok(data) => self.decode(data)?,
            Err(status) => return Err(transport_err(status.clone())),
        };
        // Entries from one leader (one vote) after one log id are the same
        // in every request: what the call got across is a prefix of these.
        Ok(match resp {
            AppendEntriesResponse::Success if got < wanted => {
                AppendEntriesResponse::PartialSuccess(got)
            }
            other => other,
        })
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcErr<InstallSnapshotError>> {
        let enc = |e: postcard::Error| RPCError::Network(NetworkError::new(&e));
        let chunk = SnapshotChunk {
            vote: postcard::to_stdvec(&rpc.vote).map_err(enc)?.into(),
            meta: postcard::to_stdvec(&rpc.meta).map_err(enc)?.into(),
            offset: rpc.offset,
            data: rpc.data.into(),
            done: rpc.done,
        };
        let mut client = self.client()?;
        let reply = tokio::time::timeout(option.hard_ttl(), client.install_snapshot(chunk))
            .await
            .map_err(|_| timed_out())?
            .map_err(transport_err)?;
        self.decode(&reply.into_inner().data)
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RpcErr> {
        self.unary(&rpc, &option, |mut c, p| async move { c.vote(p).await })
            .await
    }
}
