//! A follower's proposals go to the leader on one long-lived gRPC stream
//! (`ProposeStream`) rather than one call each. A unary call costs both
//! nodes a stream of its own — headers, a task on the server, a trip
//! through the channel's buffer — and with followers taking two thirds of
//! the mail that came to a quarter of a 3-node cluster's CPU
//! (docs/performance.md). Each request carries a number its reply repeats;
//! replies come as the leader finishes, in any order.
//!
//! A stream that breaks fails the proposals waiting on it as a failed call
//! would (the caller asks again). A leader that does not know the call (an
//! older version, during an upgrade) is asked one call at a time until the
//! leader changes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use skein_proto::v1::{ProposeReply, ProposeRequest};
use skein_queue::NodeId;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;

use super::network::{same_material, PeerChannels};
use crate::tls::ClusterTls;

/// Requests queued for one stream before a proposal waits for room.
const QUEUED: usize = 1024;

/// What became of one forwarded proposal.
pub(crate) enum Sent {
    Reply(ProposeReply),
    /// The stream broke or could not be opened: whether the leader took
    /// the command is unknown, as after a failed call.
    Broken,
    /// The leader does not know the call: ask it one call at a time.
    Unsupported,
}

/// The stream to the leader, opened on first use and again after it broke
/// or the leader changed.
#[derive(Default)]
pub(crate) struct Forwarder {
    current: Mutex<Current>,
}

#[derive(Default)]
struct Current {
    stream: Option<Stream>,
    /// A leader (and address) that answered the stream "unimplemented".
    unary: Option<(NodeId, String)>,
}

/// The sending side of one stream. Dropping it ends the requests; the
/// replies still due keep coming.
struct Stream {
    leader: NodeId,
    addr: String,
    /// The TLS material its channel was made with: after a reload of the
    /// certificates the next proposal opens a new stream, as every other
    /// call takes a new channel.
    tls: Option<Arc<ClusterTls>>,
    requests: mpsc::Sender<ProposeRequest>,
    next: Arc<AtomicU64>,
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    waiting: HashMap<u64, oneshot::Sender<Sent>>,
    /// Set when the stream ended: whether because the leader does not know
    /// the call.
    ended: Option<bool>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Takes a proposal off the waiting list if its caller stops waiting.
struct Waiter<'a> {
    shared: &'a Shared,
    seq: u64,
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.shared.state().waiting.remove(&self.seq);
    }
}

impl Forwarder {
    fn current(&self) -> MutexGuard<'_, Current> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Send `command` to `leader` at `addr` and wait for its reply.
    pub(crate) async fn send(
        &self,
        peers: &PeerChannels,
        leader: NodeId,
        addr: &str,
        command: Bytes,
    ) -> Sent {
        let (requests, next, shared) = {
            let mut cur = self.current();
            match &cur.unary {
                Some((l, a)) if *l == leader && a == addr => return Sent::Unsupported,
                // Another leader: the old one may be upgraded when it leads again.
                Some(_) => cur.unary = None,
                None => {}
            }
            let tls = peers.tls_material();
            let open = cur.stream.as_ref().is_some_and(|s| {
                s.leader == leader
                    && s.addr == addr
                    && same_material(&s.tls, &tls)
                    && s.shared.state().ended.is_none()
            });
            if !open {
                match open_stream(peers, leader, addr, tls) {
                    Some(s) => cur.stream = Some(s),
                    None => return Sent::Broken,
                }
            }
            let s = cur.stream.as_ref().expect("opened above");
            (s.requests.clone(), s.next.clone(), s.shared.clone())
        };
        let seq = next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut st = shared.state();
            if let Some(unsupported) = st.ended {
                drop(st);
                return self.ended(leader, addr, unsupported);
            }
            st.waiting.insert(seq, tx);
        }
        let _waiter = Waiter {
            shared: &shared,
            seq,
        };
        if requests
            .send(ProposeRequest { command, seq })
            .await
            .is_err()
        {
            return Sent::Broken;
        }
        match rx.await {
            Ok(Sent::Unsupported) => self.ended(leader, addr, true),
            Ok(sent) => sent,
            Err(_) => Sent::Broken,
        }
    }

    /// The stream to `leader` ended; remember a leader that does not know it.
    fn ended(&self, leader: NodeId, addr: &str, unsupported: bool) -> Sent {
        if unsupported {
            self.current().unary = Some((leader, addr.to_string()));
            Sent::Unsupported
        } else {
            Sent::Broken
        }
    }
}

/// Open a stream to `leader` and start reading its replies; `None` if no
/// channel could be made for `addr`.
fn open_stream(
    peers: &PeerChannels,
    leader: NodeId,
    addr: &str,
    tls: Option<Arc<ClusterTls>>,
) -> Option<Stream> {
    let channel = match peers.channel(addr) {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(leader, addr, error = %e, "no channel to the leader");
            return None;
        }
    };
    let (requests, rx) = mpsc::channel(QUEUED);
    let shared = Arc::new(Shared::default());
    let client = peers.raft_client(channel);
    tokio::spawn(read_replies(
        client,
        ReceiverStream::new(rx),
        shared.clone(),
    ));
    Some(Stream {
        leader,
        addr: addr.to_string(),
        tls,
        requests,
        next: Arc::new(AtomicU64::new(1)),
        shared,
    })
}

/// Hand each reply to whoever waits for it; when the stream ends, fail
/// everyone still waiting.
async fn read_replies(
    mut client: super::network::PeerClient,
    requests: ReceiverStream<ProposeRequest>,
    shared: Arc<Shared>,
) {
    let unsupported = match client.propose_stream(requests).await {
        Ok(replies) => {
            let mut replies = replies.into_inner();
            loop {
                match replies.message().await {
                    Ok(Some(r)) => {
                        if let Some(w) = shared.state().waiting.remove(&r.seq) {
                            let _ = w.send(Sent::Reply(r));
                        }
                    }
                    Ok(None) => break false,
                    Err(status) => {
                        tracing::debug!(%status, "the forwarding stream broke");
                        break false;
                    }
                }
            }
        }
        Err(status) if status.code() == tonic::Code::Unimplemented => true,
        Err(status) => {
            tracing::debug!(%status, "could not open a forwarding stream");
            false
        }
    };
    let mut st = shared.state();
    st.ended = Some(unsupported);
    for (_, w) in st.waiting.drain() {
        let _ = w.send(if unsupported {
            Sent::Unsupported
        } else {
            Sent::Broken
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use skein_proto::v1::raft_server::{Raft as RaftRpc, RaftServer};
    use skein_proto::v1::{
        propose_reply, ChangeMembershipReply, ChangeMembershipRequest, ElectReply, ElectRequest,
        NodeInfoReply, NodeInfoRequest, RaftPayload, SnapshotChunk,
    };
    use tonic::{Request, Response, Status, Streaming};

    use super::*;

    /// A peer that serves proposals only one way: over the stream (each
    /// answered with its command echoed, later requests sooner), or, as an
    /// older version would, only one call at a time.
    struct Peer {
        streams: bool,
        unary_calls: Arc<AtomicUsize>,
    }

    fn echo(command: &[u8], seq: u64) -> ProposeReply {
        ProposeReply {
            result: Some(propose_reply::Result::Response(command.to_vec().into())),
            seq,
        }
    }

    #[tonic::async_trait]
    impl RaftRpc for Peer {
        async fn append_entries(
            &self,
            _: Request<RaftPayload>,
        ) -> Result<Response<RaftPayload>, Status> {
            Err(Status::unimplemented("not here"))
        }
        async fn vote(&self, _: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
            Err(Status::unimplemented("not here"))
        }
        async fn install_snapshot(
            &self,
            _: Request<SnapshotChunk>,
        ) -> Result<Response<RaftPayload>, Status> {
            Err(Status::unimplemented("not here"))
        }
        async fn propose(
            &self,
            req: Request<ProposeRequest>,
        ) -> Result<Response<ProposeReply>, Status> {
            self.unary_calls.fetch_add(1, Ordering::SeqCst);
            Ok(Response::new(echo(&req.into_inner().command, 0)))
        }
        type ProposeStreamStream = ReceiverStream<Result<ProposeReply, Status>>;
        async fn propose_stream(
            &self,
            req: Request<Streaming<ProposeRequest>>,
        ) -> Result<Response<Self::ProposeStreamStream>, Status> {
            if !self.streams {
                return Err(Status::unimplemented("an older version"));
            }
            let mut requests = req.into_inner();
            let (tx, rx) = mpsc::channel(16);
            tokio::spawn(async move {
                while let Ok(Some(r)) = requests.message().await {
                    // Later requests are answered sooner.
                    let wait = Duration::from_millis(5 * (16 - r.seq % 16));
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(wait).await;
                        let _ = tx.send(Ok(echo(&r.command, r.seq))).await;
                    });
                }
            });
            Ok(Response::new(ReceiverStream::new(rx)))
        }
        async fn change_membership(
            &self,
            _: Request<ChangeMembershipRequest>,
        ) -> Result<Response<ChangeMembershipReply>, Status> {
            Err(Status::unimplemented("not here"))
        }
        async fn node_info(
            &self,
            _: Request<NodeInfoRequest>,
        ) -> Result<Response<NodeInfoReply>, Status> {
            Err(Status::unimplemented("not here"))
        }
        async fn elect(&self, _: Request<ElectRequest>) -> Result<Response<ElectReply>, Status> {
            Err(Status::unimplemented("not here"))
        }
    }

    /// A peer on a real socket; its address and its count of unary calls.
    async fn peer(streams: bool) -> (String, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let unary_calls = Arc::new(AtomicUsize::new(0));
        let svc = RaftServer::new(Peer {
            streams,
            unary_calls: unary_calls.clone(),
        });
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        (addr, unary_calls)
    }

    fn command_of(sent: Sent) -> Vec<u8> {
        match sent {
            Sent::Reply(ProposeReply {
                result: Some(propose_reply::Result::Response(b)),
                ..
            }) => b.to_vec(),
            Sent::Reply(r) => panic!("unexpected reply {r:?}"),
            Sent::Broken => panic!("broken"),
            Sent::Unsupported => panic!("unsupported"),
        }
    }

    async fn within<T>(f: impl std::future::Future<Output = T>, what: &str) -> T {
        tokio::time::timeout(Duration::from_secs(10), f)
            .await
            .unwrap_or_else(|_| panic!("{what}: no answer within 10 s"))
    }

    /// Proposals sent at once share one stream, and each gets its own
    /// reply although the peer answers out of order.
    #[tokio::test]
    async fn each_proposal_gets_its_own_reply_in_any_order() {
        let (addr, unary_calls) = peer(true).await;
        let peers = PeerChannels::new("secret", 1 << 20, None, None).unwrap();
        let f = Forwarder::default();
        let sends = (0..10u8).map(|i| f.send(&peers, 1, &addr, Bytes::from(vec![i; 3])));
        let got = futures::future::join_all(sends).await;
        for (i, sent) in got.into_iter().enumerate() {
            assert_eq!(command_of(sent), vec![i as u8; 3]);
        }
        assert_eq!(unary_calls.load(Ordering::SeqCst), 0);
    }

    /// A peer without the stream is answered "unsupported" (the caller
    /// asks it one call at a time), and is not asked for a stream again
    /// until the leader changes; a peer that is gone fails the proposal as
    /// broken, to be asked again.
    #[tokio::test]
    async fn an_older_leader_is_remembered_and_a_gone_one_is_broken() {
        let (addr, _) = peer(false).await;
        let peers = PeerChannels::new("secret", 1 << 20, None, None).unwrap();
        let f = Forwarder::default();
        let sent = within(f.send(&peers, 1, &addr, Bytes::from_static(b"x")), "first").await;
        assert!(matches!(sent, Sent::Unsupported));
        assert_eq!(f.current().unary, Some((1, addr.clone())));
        let sent = within(f.send(&peers, 1, &addr, Bytes::from_static(b"x")), "second").await;
        assert!(matches!(sent, Sent::Unsupported));

        let gone = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        let sent = within(f.send(&peers, 2, &gone, Bytes::from_static(b"x")), "gone").await;
        assert!(matches!(sent, Sent::Broken));
        assert_eq!(f.current().unary, None, "forgotten when the leader changed");
        // A new leader that has the stream is asked over it.
        let (addr3, unary_calls) = peer(true).await;
        let sent = within(f.send(&peers, 3, &addr3, Bytes::from_static(b"y")), "new").await;
        assert_eq!(command_of(sent), b"y");
        assert_eq!(unary_calls.load(Ordering::SeqCst), 0);
    }
}
