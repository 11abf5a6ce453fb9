//! Placement across sites, measured: release `skeind` processes whose
//! cluster traffic goes through the test fabric, which delays every byte
//! between nodes at different sites by half the round trip. SMTP clients
//! are local to the node they send to. For each layout and round trip:
//! throughput (closed loop) and acceptance latency at a modest rate (open
//! loop), and where the leader was.

use std::net::SocketAddr;
use std::time::Duration;

use skein_testkit::SinkMta;
use skein_tests::cluster::add_member;
use skein_tests::{wait_for_leader, ClusterPlan, ProcessNode, TestConfig};

use crate::load::{run, LoadReport, LoadSpec};

/// Where each node is: voters first, then learners.
pub struct Layout {
    pub name: &'static str,
    /// Site (a letter) of each voter.
    pub voters: &'static [char],
    /// Site of each learner.
    pub learners: &'static [char],
}

pub const LAYOUTS: &[Layout] = &[
    Layout {
        name: "3 voters at A, 2 learners at B",
        voters: &['A', 'A', 'A'],
        learners: &['B', 'B'],
    },
    Layout {
        name: "voters over 2 sites (A A B)",
        voters: &['A', 'A', 'B'],
        learners: &[],
    },
    Layout {
        name: "voters over 3 sites (A B C)",
        voters: &['A', 'B', 'C'],
        learners: &[],
    },
];

pub struct Measured {
    pub leader_site: char,
    pub throughput: LoadReport,
    pub latency: LoadReport,
}

fn product_timings(c: &mut TestConfig) {
    c.raft_timings = None;
    c.commit_timeout = "10s".into();
    c.lease = "30s".into();
}

/// One layout at one round trip between sites. Load goes to the voters
/// (`sessions` in all, spread over them); the latency run offers `rate`
/// messages a second for ten seconds.
pub async fn measure(
    skeind: &str,
    layout: &Layout,
    rtt: Duration,
    sessions: usize,
    messages: usize,
    size: usize,
    rate: f64,
) -> anyhow::Result<Measured> {
    let dns = skein_tests::mail::example_org_dns().await;
    let sink = SinkMta::builder().forget_commands().start().await?;
    let n = layout.voters.len() as u64;
    let mut plan = ClusterPlan::new(n, dns.addr(), sink.port(), product_timings).await?;
    let mut nodes = Vec::new();
    for c in &plan.configs {
        nodes.push(ProcessNode::start(skeind, c.clone())?);
    }
    let sites: Vec<char> = layout
        .voters
        .iter()
        .chain(layout.learners)
        .copied()
        .collect();
    let all = sites.len() as u64;
    for a in 1..=all {
        for b in a + 1..=all {
            if sites[(a - 1) as usize] != sites[(b - 1) as usize] {
                plan.fabric.set_rtt(a, b, rtt);
            }
        }
    }
    for node in &nodes {
        node.wait_ready(Duration::from_secs(60)).await?;
    }
    let voter_admins: Vec<SocketAddr> = plan.admins();
    let leader = wait_for_leader(&voter_admins, Duration::from_secs(60)).await?;
    for id in n + 1..=all {
        let c = plan.joining_node(id, product_timings).await?;
        nodes.push(ProcessNode::start(skeind, c.clone())?);
        nodes
            .last()
            .expect("just pushed")
            .wait_ready(Duration::from_secs(60))
            .await?;
        add_member(
            plan.config(leader).admin_addr(),
            id,
            c.advertise.expect("advertised"),
            true,
        )
        .await?;
    }
    let targets: Vec<SocketAddr> = plan.configs[..n as usize].iter().map(|c| c.smtp).collect();
    let spec = |messages, rate| LoadSpec {
        targets: targets.clone(),
        sessions,
        messages,
        size,
        from: "load@bench.test".into(),
        rcpt: "sink@example.org".into(),
        rate,
    };
    let throughput = run(spec(messages, None)).await?;
    let latency = run(spec((rate * 10.0) as usize, Some(rate))).await?;
    let leader = wait_for_leader(&voter_admins, Duration::from_secs(30)).await?;
    for mut node in nodes {
        let _ = node.terminate();
    }
    Ok(Measured {
        leader_site: sites[(leader - 1) as usize],
        throughput,
        latency,
    })
}
