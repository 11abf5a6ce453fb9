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

use super::network::PeerChannels;

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
            if cur
                .unary
                .as_ref()
                .is_some_and(|(l, a)| *l == leader && a == addr)
            {
                return Sent::Unsupported;
            }
            let open = cur.stream.as_ref().is_some_and(|s| {
                s.leader == leader && s.addr == addr && s.shared.state().ended.is_none()
            });
            if !open {
                match open_stream(peers, leader, addr) {
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
fn open_stream(peers: &PeerChannels, leader: NodeId, addr: &str) -> Option<Stream> {
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
