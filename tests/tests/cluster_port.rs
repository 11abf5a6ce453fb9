//! The cluster port is never open, and a peer cannot crash a node: a node
//! with no secret in its config makes one and refuses every call without
//! it; a peer that holds the secret (and, under mutual TLS, a member's
//! certificate) still cannot nest commands, push an absurd snapshot or speak
//! in another node's name; a removed node cannot come back by itself; a
//! single node grows into three with its own secret passed on.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use openraft::raft::{AppendEntriesRequest, VoteRequest};
use openraft::{CommittedLeaderId, LogId, Vote};
use skein_node::Node;
use skein_proto::v1::raft_client::RaftClient;
use skein_proto::v1::{
    change_membership_request, propose_reply, ChangeMembershipRequest, ElectRequest,
    NodeInfoRequest, ProposeRequest, RaftPayload, SnapshotChunk,
};
use skein_queue::{Command, SnapshotMeta, TypeConfig};
use skein_testkit::{wait_for, SinkMta};
use skein_tests::mail::{example_org_dns, tokened, wait_all_arrived};
use skein_tests::tls::{raft_client, with_secret, TestCert};
use skein_tests::{
    add_node, free_addr, remove_node, send, status, ClusterPlan, SecretConf, TestConfig,
};
use tonic::Code;

async fn shutdown(nodes: Vec<Node>) {
    for n in nodes {
        n.shutdown(Duration::from_secs(5)).await;
    }
}

/// Every Raft method called once with `secret` (or none), with a payload
/// that would decode; the status codes in call order.
async fn every_method(addr: SocketAddr, secret: Option<&str>) -> Vec<(&'static str, Code)> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = RaftClient::new(ch);
    fn with<T>(m: T, secret: Option<&str>) -> tonic::Request<T> {
        let mut r = tonic::Request::new(m);
        if let Some(s) = secret {
            r.metadata_mut()
                .insert(skein_proto::SECRET_HEADER, s.parse().unwrap());
        }
        r
    }
    macro_rules! req {
        ($m:expr) => {
            with($m, secret)
        };
    }
    let vote: VoteRequest<u64> = VoteRequest::new(Vote::new(0, 9), None);
    let payload = || RaftPayload {
        data: postcard::to_stdvec(&vote).unwrap().into(),
    };
    let claim = |seq| ProposeRequest {
        command: postcard::to_stdvec(&Command::Claim {
            node: 9,
            max: 1,
            lease_ms: 1,
        })
        .unwrap()
        .into(),
        seq,
    };
    let code = |r: Result<(), tonic::Status>| r.err().map_or(Code::Ok, |s| s.code());
    vec![
        (
            "AppendEntries",
            code(c.append_entries(req!(payload())).await.map(drop)),
        ),
        ("Vote", code(c.vote(req!(payload())).await.map(drop))),
        (
            "InstallSnapshot",
            code(
                c.install_snapshot(req!(SnapshotChunk::default()))
                    .await
                    .map(drop),
            ),
        ),
        ("Propose", code(c.propose(req!(claim(0))).await.map(drop))),
        (
            "ProposeStream",
            code(
                c.propose_stream(req!(tokio_stream::iter([claim(1)])))
                    .await
                    .map(drop),
            ),
        ),
        (
            "ChangeMembership",
            code(
                c.change_membership(req!(ChangeMembershipRequest {
                    node_id: 9,
                    change: Some(change_membership_request::Change::Remove(true)),
                }))
                .await
                .map(drop),
            ),
        ),
        (
            "NodeInfo",
            code(c.node_info(req!(NodeInfoRequest {})).await.map(drop)),
        ),
        (
            "Elect",
            code(c.elect(req!(ElectRequest {})).await.map(drop)),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_without_a_configured_secret_makes_one_and_refuses_every_call_without_it() {
    let dir = tempfile::tempdir().unwrap();
    let dns = example_org_dns().await;
    let mut c = TestConfig::new(1, dir.path().join("data"), dns.addr(), 25);
    c.secret = SecretConf::Made;
    assert!(!c.toml().contains("secret"), "{}", c.toml());
    let node = Node::start(c.config()).await.unwrap();
    let path = dir.path().join("data/cluster.secret");
    let secret = std::fs::read_to_string(&path).unwrap().trim().to_string();
    assert!(secret.len() >= 16, "{secret:?}");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    for secret in [
        None,
        Some("wrong"),
        Some("0123456789abcdef0123456789abcdef"),
    ] {
        for (method, code) in every_method(node.cluster_addr, secret).await {
            assert_eq!(code, Code::Unauthenticated, "{method} with {secret:?}");
        }
    }
    // The secret it made opens the door (what follows is up to Raft).
    let with = every_method(node.cluster_addr, Some(&secret)).await;
    assert!(
        with.iter().all(|(_, c)| *c != Code::Unauthenticated),
        "{with:?}"
    );
    let ok = with.iter().find(|(m, _)| *m == "NodeInfo").unwrap();
    assert_eq!(ok.1, Code::Ok);
    node.shutdown(Duration::from_secs(5)).await;

    // The same secret after a restart.
    let node = Node::start(c.config()).await.unwrap();
    let again = std::fs::read_to_string(&path).unwrap();
    assert_eq!(again.trim(), secret);
    node.shutdown(Duration::from_secs(5)).await;
}

/// postcard's encoding of `Command::Batch` nested `depth` times.
fn nested_batch(depth: usize) -> Vec<u8> {
    let mut v = Vec::new();
    for _ in 0..depth {
        v.extend_from_slice(&[6, 1]);
    }
    let claim = Command::Claim {
        node: 1,
        max: 1,
        lease_ms: 1,
    };
    v.extend(postcard::to_stdvec(&claim).unwrap());
    v
}

fn leftover_snapshot_files(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir.join("snapshots"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".tmp"))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_peer_with_the_secret_and_a_members_certificate_cannot_crash_a_node() {
    let sink = SinkMta::builder().start().await.unwrap();
    let dns = example_org_dns().await;
    let mut plan = ClusterPlan::new(3, dns.addr(), sink.addr().port(), |_| {})
        .await
        .unwrap();
    plan.secure();
    let nodes = plan.start_all().await;
    let ca = plan.ca.as_ref().unwrap().pem.clone();
    let tls = plan.config(1).cluster_tls.clone().unwrap();
    let node1 = TestCert {
        cert: tls[0].clone(),
        key: tls[1].clone(),
        der: plan.ca.as_ref().unwrap().der().clone(),
    };
    let target = plan.config(2).admin_addr();
    let mut peer = raft_client(target, &ca, Some(&node1)).await.unwrap();

    // A command nested a million deep, and a batch at all: refused, not
    // decoded into a stack overflow.
    for (what, command) in [
        ("nested", nested_batch(1_000_000)),
        ("a batch", nested_batch(1)),
    ] {
        let e = peer
            .propose(with_secret(ProposeRequest {
                command: command.clone().into(),
                seq: 0,
            }))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{what}: {e:?}");
        // On a stream: that request is answered with the error, and the
        // stream goes on to the next.
        let mut replies = peer
            .propose_stream(with_secret(tokio_stream::iter([
                ProposeRequest {
                    command: command.into(),
                    seq: 7,
                },
                ProposeRequest {
                    command: vec![0xff; 3].into(),
                    seq: 8,
                },
            ])))
            .await
            .unwrap()
            .into_inner();
        let mut answered = Vec::new();
        while let Some(r) = replies.message().await.unwrap() {
            match r.result {
                Some(propose_reply::Result::Error(e)) => answered.push((r.seq, e)),
                other => panic!("{what}: {other:?}"),
            }
        }
        answered.sort();
        assert_eq!(answered.len(), 2, "{what}: {answered:?}");
        assert_eq!((answered[0].0, answered[1].0), (7, 8), "{what}");
    }

    // Snapshots: a chunk far past the start, a chunk over the size limit,
    // and a whole "snapshot" declaring absurd sizes. Node 1 speaks in its
    // own name, with a term from the future so nothing stops at the vote.
    let vote: Vote<u64> = Vote::new_committed(1 << 40, 1);
    let meta = |id: &str| SnapshotMeta {
        last_log_id: Some(LogId::new(CommittedLeaderId::new(1 << 40, 1), 1 << 40)),
        snapshot_id: id.into(),
        ..Default::default()
    };
    let chunk = |id: &str, offset: u64, data: Vec<u8>, done: bool| {
        with_secret(SnapshotChunk {
            vote: postcard::to_stdvec(&vote).unwrap().into(),
            meta: postcard::to_stdvec(&meta(id)).unwrap().into(),
            offset,
            data: data.into(),
            done,
        })
    };
    let r = peer
        .install_snapshot(chunk("far", 1 << 62, vec![1; 16], false))
        .await
        .unwrap()
        .into_inner();
    let answer: skein_proto_answer::Answer = postcard::from_bytes(&r.data).unwrap();
    assert!(
        answer.is_err(),
        "a chunk past what was received: {answer:?}"
    );
    let e = peer
        .install_snapshot(chunk("big", 0, vec![0; 9 << 20], false))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let mut absurd = b"SKEINSN1".to_vec();
    let header = (meta("absurd"), 0u64, u64::MAX);
    let h = postcard::to_stdvec(&header).unwrap();
    absurd.extend_from_slice(&(h.len() as u32).to_le_bytes());
    absurd.extend_from_slice(&h);
    absurd.extend_from_slice(&u32::MAX.to_le_bytes());
    let e = peer
        .install_snapshot(chunk("absurd", 0, absurd, true))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("does not check out"), "{e:?}");

    // Appends in another node's name, and in the name of no member.
    for leader in [3, 99] {
        let append: AppendEntriesRequest<TypeConfig> = AppendEntriesRequest {
            vote: Vote::new_committed(1 << 40, leader),
            prev_log_id: None,
            leader_commit: None,
            entries: Vec::new(),
        };
        let e = peer
            .append_entries(with_secret(RaftPayload {
                data: postcard::to_stdvec(&append).unwrap().into(),
            }))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "as node {leader}: {e:?}");
    }

    // Nothing left behind, nothing broken: node 2 still takes and
    // delivers mail, and every node still runs Raft.
    assert!(
        leftover_snapshot_files(&plan.config(2).data_dir).is_empty(),
        "{:?}",
        leftover_snapshot_files(&plan.config(2).data_dir)
    );
    let s = send(
        nodes[1].smtp_addrs[0],
        "a@client.test",
        &["b@example.org"],
        &tokened("after-the-attack"),
    )
    .await
    .unwrap();
    assert!(s.accepted(), "{}", s.reply);
    wait_all_arrived(&sink, &["after-the-attack".into()], Duration::from_secs(20))
        .await
        .unwrap();
    for n in &nodes {
        let m = n.cluster().raft().metrics().borrow().clone();
        assert!(
            m.running_state.is_ok(),
            "node {}: {:?}",
            m.id,
            m.running_state
        );
    }
    // The certificates it uses, and when they run out.
    let (_, text) = skein_tests::mail::http_get(nodes[0].metrics_addr, "/metrics")
        .await
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as f64;
    for cert in ["cluster", "cluster_ca"] {
        let line =
            format!("skein_tls_certificate_expiry_timestamp_seconds{{certificate=\"{cert}\"}} ");
        let t: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix(&line))
            .unwrap_or_else(|| panic!("no expiry of {cert}: {text}"))
            .trim()
            .parse()
            .unwrap();
        assert!(t > now + 86400.0, "{cert} expires at {t}");
    }
    shutdown(nodes).await;
}

/// The answer to an InstallSnapshot call, as the leader decodes it.
mod skein_proto_answer {
    use openraft::error::{InstallSnapshotError, RaftError};
    use openraft::raft::InstallSnapshotResponse;
    pub type Answer = Result<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>>;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_removed_node_cannot_come_back_by_itself() {
    let sink = SinkMta::builder().start().await.unwrap();
    let dns = example_org_dns().await;
    let plan = ClusterPlan::new(3, dns.addr(), sink.addr().port(), |_| {})
        .await
        .unwrap();
    let nodes = plan.start_all().await;
    let via = plan.config(1).admin_addr();
    remove_node(via, 3).await.unwrap();
    // Node 3 runs on, no longer hearing a leader.
    let members = || async {
        status(via)
            .await
            .map(|s| s.nodes.iter().map(|n| n.id).collect::<Vec<_>>())
            .unwrap_or_default()
    };
    wait_for(Duration::from_secs(10), "node 3 to be gone", || async {
        members().await == vec![1, 2]
    })
    .await
    .unwrap();
    // Several election timeouts (300 ms here) in which it must stay out.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(members().await, vec![1, 2], "node 3 came back");
    let s = status(via).await.unwrap();
    assert!(s.leader == 1 || s.leader == 2, "leader {}", s.leader);
    // Its votes are refused outright.
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", plan.config(1).cluster))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let vote: VoteRequest<u64> = VoteRequest::new(Vote::new(1 << 40, 3), None);
    let e = RaftClient::new(ch)
        .vote(with_secret(RaftPayload {
            data: postcard::to_stdvec(&vote).unwrap().into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // The two carry on.
    let s = send(
        nodes[0].smtp_addrs[0],
        "a@client.test",
        &["b@example.org"],
        &tokened("after-the-removal"),
    )
    .await
    .unwrap();
    assert!(s.accepted(), "{}", s.reply);

    // Replication lag comes from the leader alone, and only for members.
    let leader = status(via).await.unwrap().leader;
    for (i, n) in nodes.iter().enumerate().take(2) {
        let (_, text) = skein_tests::mail::http_get(n.metrics_addr, "/metrics")
            .await
            .unwrap();
        let lags: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("skein_raft_replication_lag{"))
            .collect();
        if i as u64 + 1 == leader {
            assert!(!lags.is_empty(), "the leader exports lag");
            assert!(lags.iter().all(|l| !l.contains("peer=\"3\"")), "{lags:?}");
        } else {
            assert!(lags.is_empty(), "a follower exports lag: {lags:?}");
        }
    }
    shutdown(nodes).await;
}

/// One node started alone makes its own secret; two more get a copy of it
/// (`cluster.secret_file`) and are added with `add-node`, as
/// docs/operations.md says.
#[tokio::test(flavor = "multi_thread")]
async fn a_single_node_grows_into_three_with_its_secret_passed_on() {
    let sink = SinkMta::builder().start().await.unwrap();
    let dns = example_org_dns().await;
    let dir = tempfile::tempdir().unwrap();
    let ip = |i: u8| std::net::IpAddr::from([127, 0, 30, i]);
    let config = |id: u64| {
        let mut c = TestConfig::new(
            id,
            dir.path().join(format!("node{id}")),
            dns.addr(),
            sink.port(),
        );
        c.smtp = free_addr(ip(id as u8));
        c.cluster = free_addr(ip(id as u8));
        c
    };
    let mut c1 = config(1);
    c1.secret = SecretConf::Made;
    let n1 = Node::start(c1.config()).await.unwrap();
    let made = c1.data_dir.join("cluster.secret");
    let copy = dir.path().join("cluster.secret");
    std::fs::copy(&made, &copy).unwrap();

    let mut nodes = vec![n1];
    for id in [2, 3] {
        let mut c = config(id);
        c.secret = SecretConf::File(copy.clone());
        c.advertise = Some(c.cluster);
        c.peers = vec![(1, c1.cluster)];
        nodes.push(Node::start(c.config()).await.unwrap());
        let voters = add_node(c1.cluster, id, c.cluster).await.unwrap();
        assert!(voters.contains(&id), "{voters:?}");
    }
    let s = status(c1.cluster).await.unwrap();
    assert_eq!(s.nodes.len(), 3);
    for (i, n) in nodes.iter().enumerate() {
        let token = format!("grown-{i}");
        let s = send(
            n.smtp_addrs[0],
            "a@client.test",
            &["b@example.org"],
            &tokened(&token),
        )
        .await
        .unwrap();
        assert!(s.accepted(), "{}", s.reply);
        wait_all_arrived(&sink, &[token], Duration::from_secs(20))
            .await
            .unwrap();
    }
    shutdown(nodes).await;
}
