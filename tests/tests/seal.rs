//! The sealed cluster: mutual TLS between nodes, the admin API over TLS,
//! certificates rotated on disk under load. A wiretap between the nodes (the
//! test fabric) must never see a message body; a node or client without the
//! cluster's CA, its own certificate, or the admin token gets nothing.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use openraft::raft::VoteRequest;
use openraft::Vote;
use skein_node::Node;
use skein_proto::v1::{NodeInfoRequest, RaftPayload};
use skein_testkit::{wait_for, SinkMta};
use skein_tests::mail::{example_org_dns, tokened, wait_all_arrived, Load};
use skein_tests::tls::{connect_as, raft_client, with_secret, TestCa, TestCert};
use skein_tests::{add_node, send, ClusterPlan, TestConfig, TOKEN};

const SKEINCTL: &str = env!("CARGO_BIN_EXE_skeinctl-under-test");

fn quick(c: &mut TestConfig) {
    c.smtp_extra = "tls_reload_interval = \"200ms\"".into();
}

async fn shutdown(nodes: Vec<Node>) {
    for n in nodes {
        n.shutdown(Duration::from_secs(5)).await;
    }
}

/// Send one tokened message through `smtp` and wait for it at the sink.
async fn deliver_one(smtp: SocketAddr, sink: &SinkMta, token: &str) {
    let s = send(smtp, "a@client.test", &["b@example.org"], &tokened(token))
        .await
        .unwrap();
    assert!(s.accepted(), "{token}: {:?}", s.reply);
    wait_all_arrived(sink, &[token.to_string()], Duration::from_secs(20))
        .await
        .unwrap();
}

/// Mail through a three-node cluster with the fabric recording: with TLS
/// the marker never shows on the wire, without it (the control, which
/// shows the wiretap works) it does.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wiretap_between_nodes_sees_only_tls_records() {
    let sink = SinkMta::builder().start().await.unwrap();
    let dns = example_org_dns().await;
    for secure in [true, false] {
        let mut plan = ClusterPlan::new(3, dns.addr(), sink.addr().port(), |_| {})
            .await
            .unwrap();
        if secure {
            plan.secure();
        }
        let nodes = plan.start_all().await;
        plan.fabric.record();
        let marker = format!("WIRETAP-MARKER-{}", if secure { "tls" } else { "plain" });
        deliver_one(nodes[0].smtp_addrs[0], &sink, &marker).await;
        // Every follower has the entry: it crossed the fabric to both.
        let last = nodes
            .iter()
            .filter_map(|n| n.cluster().raft().metrics().borrow().last_log_index)
            .max();
        for n in &nodes {
            wait_for(
                Duration::from_secs(10),
                "every node applies the entry",
                || async {
                    n.cluster()
                        .raft()
                        .metrics()
                        .borrow()
                        .last_applied
                        .map(|l| l.index)
                        >= last
                },
            )
            .await
            .unwrap();
        }
        let wire = plan.fabric.recorded();
        let seen = wire.windows(marker.len()).any(|w| w == marker.as_bytes());
        if secure {
            assert!(
                wire.len() > 2000,
                "replication crossed the fabric: {} bytes",
                wire.len()
            );
            assert!(!seen, "the message body crossed the network in clear");
        } else {
            assert!(seen, "the control run must see the marker on the wire");
        }
        shutdown(nodes).await;
    }
}

/// A fourth node whose certificate comes from another CA: the cluster will
/// not replicate to it, and its certificate opens no Raft call on a member.
/// A client with no certificate, or with a member's certificate speaking in
/// another member's name, is refused too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_with_a_foreign_certificate_can_neither_join_nor_read() {
    let sink = SinkMta::builder().start().await.unwrap();
    let dns = example_org_dns().await;
    let mut plan = ClusterPlan::new(3, dns.addr(), sink.addr().port(), quick)
        .await
        .unwrap();
    plan.secure();
    let nodes = plan.start_all().await;
    deliver_one(nodes[0].smtp_addrs[0], &sink, "before-the-intruder").await;
    let ca = plan.ca.as_ref().unwrap().pem.clone();

    // The intruder: a node 4 with a certificate from its own CA, trusting
    // the real CA (it copied the CA certificate, not the key).
    let mut c4 = plan.joining_node(4, quick).await.unwrap();
    let rogue_ca = TestCa::new(plan.dir.path(), "rogue-ca");
    let rogue = rogue_ca.issue(plan.dir.path(), "rogue4", &[c4.admin_addr().ip()]);
    c4.cluster_tls = Some([rogue.cert.clone(), rogue.key.clone(), ca.clone()]);
    let node4 = Node::start(c4.config()).await.unwrap();
    // The addition is called off once node 4 has received nothing for a
    // while; the rest of the test runs meanwhile.
    let via = plan.config(1).admin_addr();
    let join = tokio::spawn(add_node(via, 4, c4.admin_addr()));

    // Its certificate opens no call on a member, not even with the secret.
    let member = plan.config(2).admin_addr();
    let r = match raft_client(member, &ca, Some(&rogue)).await {
        Ok(mut c) => c
            .node_info(with_secret(NodeInfoRequest {}))
            .await
            .map(|_| ()),
        Err(e) => Err(tonic::Status::unavailable(e.to_string())),
    };
    assert!(r.is_err(), "a foreign certificate read node info");

    // No certificate at all: the TLS handshake passes (skeinctl has none)
    // but the Raft service refuses.
    let mut anon = raft_client(member, &ca, None).await.unwrap();
    let e = anon
        .node_info(with_secret(NodeInfoRequest {}))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");

    // Node 1's own certificate asking for votes in node 3's name.
    let node1_cert = TestCert {
        cert: plan.config(1).cluster_tls.as_ref().unwrap()[0].clone(),
        key: plan.config(1).cluster_tls.as_ref().unwrap()[1].clone(),
        der: rogue.der.clone(),
    };
    let mut impostor = raft_client(member, &ca, Some(&node1_cert)).await.unwrap();
    let vote: VoteRequest<u64> = VoteRequest::new(Vote::new(1_000, 3), None);
    let e = impostor
        .vote(with_secret(RaftPayload {
            data: postcard::to_stdvec(&vote).unwrap().into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    // ...while node 1 may speak for itself (the vote is simply lost: a
    // stale term, no harm done).
    let own: VoteRequest<u64> = VoteRequest::new(Vote::new(0, 1), None);
    impostor
        .vote(with_secret(RaftPayload {
            data: postcard::to_stdvec(&own).unwrap().into(),
        }))
        .await
        .expect("a member speaking in its own name is heard");

    let joined = join.await.unwrap();
    let e = joined.expect_err("a node with a foreign certificate joined");
    assert!(e.to_string().contains("received no log entries"), "{e:#}");
    let m = node4.cluster().raft().metrics().borrow().clone();
    assert_eq!(m.last_log_index, None, "the intruder received log entries");
    wait_for(
        Duration::from_secs(10),
        "the learner taken out again",
        || async {
            skein_tests::status(via)
                .await
                .is_ok_and(|s| s.nodes.iter().map(|n| n.id).collect::<Vec<_>>() == vec![1, 2, 3])
        },
    )
    .await
    .unwrap();

    // The cluster carried on.
    deliver_one(nodes[1].smtp_addrs[0], &sink, "after-the-intruder").await;
    node4.shutdown(Duration::from_secs(2)).await;
    shutdown(nodes).await;
}

struct Out {
    code: i32,
    stderr: String,
}

async fn skeinctl(node: SocketAddr, ca: Option<&std::path::Path>, token: Option<&str>) -> Out {
    let mut cmd = tokio::process::Command::new(SKEINCTL);
    cmd.env_remove("SKEIN_TOKEN")
        .env_remove("SKEIN_NODE")
        .env_remove("SKEIN_CA")
        .arg("--node")
        .arg(node.to_string());
    if let Some(ca) = ca {
        cmd.env("SKEIN_CA", ca);
    }
    if let Some(t) = token {
        cmd.arg("--token").arg(t);
    }
    let o = cmd.arg("status").output().await.expect("run skeinctl");
    Out {
        code: o.status.code().unwrap_or(-1),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn skeinctl_needs_the_cluster_ca_and_the_token() {
    let sink = SinkMta::builder().start().await.unwrap();
    let dns = example_org_dns().await;
    let mut plan = ClusterPlan::new(3, dns.addr(), sink.addr().port(), |_| {})
        .await
        .unwrap();
    plan.secure();
    let nodes = plan.start_all().await;
    let node = plan.config(2).admin_addr();
    let ca = plan.ca.as_ref().unwrap().pem.clone();
    let other_ca = TestCa::new(plan.dir.path(), "other-ca").pem;

    let ok = skeinctl(node, Some(&ca), Some(TOKEN)).await;
    assert_eq!(ok.code, 0, "{}", ok.stderr);

    let no_ca = skeinctl(node, None, Some(TOKEN)).await;
    println!("without --ca: {}", no_ca.stderr.trim());
    assert_eq!(no_ca.code, 3, "{}", no_ca.stderr);
    assert!(no_ca.stderr.contains("--ca"), "{}", no_ca.stderr);

    let wrong_ca = skeinctl(node, Some(&other_ca), Some(TOKEN)).await;
    println!("another CA: {}", wrong_ca.stderr.trim());
    assert_eq!(wrong_ca.code, 3, "{}", wrong_ca.stderr);
    assert!(
        wrong_ca.stderr.contains("not trusted"),
        "{}",
        wrong_ca.stderr
    );

    let no_token = skeinctl(node, Some(&ca), None).await;
    assert_eq!(no_token.code, 3, "{}", no_token.stderr);
    assert!(no_token.stderr.contains("token"), "{}", no_token.stderr);

    let bad_token = skeinctl(node, Some(&ca), Some("guess")).await;
    assert_eq!(bad_token.code, 3, "{}", bad_token.stderr);

    // The node made its data directory and token file private.
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&plan.config(2).data_dir), 0o700);
    shutdown(nodes).await;
}

/// Whether the node's real listener at `addr` (named `name` in its
/// certificate) serves a certificate from `ca`.
async fn serves_cert_from(addr: SocketAddr, name: std::net::IpAddr, ca: &TestCa) -> bool {
    let Ok(tcp) = tokio::net::TcpStream::connect(addr).await else {
        return false;
    };
    connect_as(tcp, &[ca.der()], &name.to_string())
        .await
        .is_ok()
}

fn accepted_since(load: &Load, from: usize) -> usize {
    load.snapshot()[from..]
        .iter()
        .filter(|s| s.accepted)
        .count()
}

/// Under steady load, every node moves to certificates from a new CA: the
/// bundle of both CAs first, then the new certificates, then the new CA
/// alone. Each reload makes every later connection between nodes anew, so
/// mail still committing at the end shows the nodes talking with the new
/// certificates both ways; no acknowledged message is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn certificates_swapped_on_disk_are_picked_up_without_dropping_mail() {
    let sink = SinkMta::builder().start().await.unwrap();
    let dns = example_org_dns().await;
    let mut plan = ClusterPlan::new(3, dns.addr(), sink.addr().port(), quick)
        .await
        .unwrap();
    plan.secure();
    let nodes = plan.start_all().await;
    let dir = plan.dir.path().to_owned();
    let old_ca = plan.ca.take().unwrap();
    let new_ca = TestCa::new(&dir, "new-ca");
    let load = Load::start(nodes.iter().map(|n| n.smtp_addrs[0]).collect(), 4, "rotate");
    let write_ca = |pems: &[&std::path::Path]| {
        let mut bundle = Vec::new();
        for p in pems {
            bundle.extend(std::fs::read(p).unwrap());
        }
        for c in &plan.configs {
            let file = &c.cluster_tls.as_ref().unwrap()[2];
            let tmp = file.with_extension("tmp");
            std::fs::write(&tmp, &bundle).unwrap();
            std::fs::rename(&tmp, file).unwrap();
        }
    };
    let keeps_accepting = |what: &'static str| {
        let from = load.snapshot().len();
        let load = &load;
        async move {
            wait_for(Duration::from_secs(20), what, || async {
                accepted_since(load, from) >= 20
            })
            .await
            .unwrap()
        }
    };
    keeps_accepting("mail flows before the rotation").await;

    // 1. Trust both CAs.
    write_ca(&[&old_ca.pem, &new_ca.pem]);
    // 2. New certificates from the new CA, written over the old ones.
    for c in &plan.configs {
        let cert = &c.cluster_tls.as_ref().unwrap()[0];
        let name = cert.file_stem().unwrap().to_str().unwrap();
        new_ca.issue(&dir, name, &[c.admin_addr().ip()]);
    }
    for c in &plan.configs {
        wait_for(
            Duration::from_secs(10),
            "the new certificate served",
            || serves_cert_from(c.cluster, c.admin_addr().ip(), &new_ca),
        )
        .await
        .unwrap();
    }
    keeps_accepting("mail flows with the new certificates").await;

    // 3. The old CA alone is no longer trusted: a certificate from it,
    //    accepted a moment ago, is refused once each node has reloaded.
    write_ca(&[&new_ca.pem]);
    for c in &plan.configs {
        let probe = old_ca.issue(&dir, &format!("probe{}", c.node_id), &[c.admin_addr().ip()]);
        wait_for(Duration::from_secs(10), "the old CA dropped", || async {
            match raft_client(c.admin_addr(), &new_ca.pem, Some(&probe)).await {
                Ok(mut client) => client
                    .node_info(with_secret(NodeInfoRequest {}))
                    .await
                    .is_err(),
                Err(_) => true,
            }
        })
        .await
        .unwrap();
    }
    keeps_accepting("mail flows on the new CA alone").await;

    let sent = load.stop().await;
    let acked: Vec<String> = sent
        .iter()
        .filter(|s| s.accepted)
        .map(|s| s.token.clone())
        .collect();
    println!(
        "rotation under load: sent {}, acknowledged {}",
        sent.len(),
        acked.len()
    );
    wait_all_arrived(&sink, &acked, Duration::from_secs(60))
        .await
        .unwrap_or_else(|missing| {
            panic!("{} acknowledged messages lost: {missing:?}", missing.len())
        });
    shutdown(nodes).await;
}
