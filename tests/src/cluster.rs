//! Several nodes on distinct addresses behind a [`Fabric`]: node `i` has
//! its SMTP port and advertised cluster address (a fabric proxy) on
//! 127.P.0.i, its real cluster listener on 127.P.1.i, where P is the
//! plan's own number.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::Context;
use skein_proto::v1::admin_client::AdminClient;
use skein_proto::v1::{
    AddNodeRequest, DrainReply, DrainRequest, ListQueueRequest, MembershipReply, QueuedMessage,
    RecoverReply, RecoverRequest, RemoveNodeRequest, StatusReply, StatusRequest,
};

use crate::config::{free_addr, TestConfig, TOKEN};
use crate::fabric::Fabric;
use crate::tls::TestCa;

pub struct ClusterPlan {
    pub dir: tempfile::TempDir,
    pub fabric: Fabric,
    pub configs: Vec<TestConfig>,
    octet: u8,
    dns: SocketAddr,
    mx_port: u16,
    /// The plan's CA, once [`ClusterPlan::secure`] made one.
    pub ca: Option<TestCa>,
}

/// Each plan in a test process gets addresses of its own (127.P.a.b), so
/// tests running side by side never race for the same address and port.
fn ip(plan: u8, a: u8, b: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, plan, a, b))
}

fn next_plan() -> u8 {
    static NEXT: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);
    10 + NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 200
}

impl ClusterPlan {
    /// Plan `n` voters; `tweak` adjusts every node's config (timings).
    pub async fn new(
        n: u64,
        dns: SocketAddr,
        mx_port: u16,
        tweak: impl Fn(&mut TestConfig),
    ) -> anyhow::Result<Self> {
        let mut plan = ClusterPlan {
            dir: tempfile::tempdir()?,
            fabric: Fabric::new(),
            configs: Vec::new(),
            octet: next_plan(),
            dns,
            mx_port,
            ca: None,
        };
        for id in 1..=n {
            let c = plan.node_config(id, &tweak).await?;
            plan.configs.push(c);
        }
        let peers: Vec<(u64, SocketAddr)> = plan
            .configs
            .iter()
            .map(|c| (c.node_id, c.admin_addr()))
            .collect();
        for c in &mut plan.configs {
            c.peers = peers.clone();
        }
        Ok(plan)
    }

    async fn node_config(
        &self,
        id: u64,
        tweak: &impl Fn(&mut TestConfig),
    ) -> anyhow::Result<TestConfig> {
        let (pub_ip, real_ip) = (ip(self.octet, 0, id as u8), ip(self.octet, 1, id as u8));
        let mut c = TestConfig::new(
            id,
            self.dir.path().join(format!("node{id}")),
            self.dns,
            self.mx_port,
        );
        c.smtp = free_addr(pub_ip);
        c.metrics = free_addr(pub_ip);
        c.cluster = free_addr(real_ip);
        c.advertise = Some(free_addr(pub_ip));
        tweak(&mut c);
        // A port free a moment ago can be taken before the proxy binds it
        // (another test's connection): draw another a few times.
        let mut tries = 0;
        loop {
            let advertise = c.advertise.context("an advertised address")?;
            match self
                .fabric
                .add_node(id, real_ip, advertise, c.cluster)
                .await
            {
                Ok(()) => break,
                Err(e) if tries < 5 && in_use(&e) => {
                    tries += 1;
                    c.advertise = Some(free_addr(pub_ip));
                }
                Err(e) => return Err(e.context("fabric proxy")),
            }
        }
        Ok(c)
    }

    /// Mutual TLS between the nodes and for admin calls: a CA of the
    /// plan's own and, for every node, a certificate naming its advertised
    /// address. The harness's admin calls trust that CA from now on.
    pub fn secure(&mut self) {
        let ca = TestCa::new(self.dir.path(), "cluster-ca");
        for c in &mut self.configs {
            secure_node(&ca, self.dir.path(), c);
        }
        self.ca = Some(ca);
    }

    /// A node that is not among the initial voters; it joins with AddNode.
    pub async fn joining_node(
        &mut self,
        id: u64,
        tweak: impl Fn(&mut TestConfig),
    ) -> anyhow::Result<TestConfig> {
        let mut c = self.node_config(id, &tweak).await?;
        if let Some(ca) = &self.ca {
            secure_node(ca, self.dir.path(), &mut c);
        }
        c.peers = self.configs[0].peers.clone();
        self.configs.push(c.clone());
        Ok(c)
    }

    pub fn ids(&self) -> Vec<u64> {
        self.configs.iter().map(|c| c.node_id).collect()
    }

    /// Every planned node's admin (cluster) address.
    pub fn admins(&self) -> Vec<SocketAddr> {
        self.configs.iter().map(TestConfig::admin_addr).collect()
    }

    /// Start every planned node in process and wait for an agreed leader.
    pub async fn start_all(&self) -> Vec<skein_node::Node> {
        let mut nodes = Vec::new();
        for c in &self.configs {
            nodes.push(skein_node::Node::start(c.config()).await.unwrap());
        }
        wait_for_leader(&self.admins(), Duration::from_secs(20))
            .await
            .unwrap();
        nodes
    }

    pub fn config(&self, id: u64) -> &TestConfig {
        self.configs
            .iter()
            .find(|c| c.node_id == id)
            .expect("node in plan")
    }
}

fn secure_node(ca: &TestCa, dir: &std::path::Path, c: &mut TestConfig) {
    let addr = c.admin_addr();
    let cert = ca.issue(dir, &format!("node{}", c.node_id), &[addr.ip()]);
    c.cluster_tls = Some([cert.cert, cert.key, ca.pem.clone()]);
    ADMIN_CA
        .lock()
        .unwrap()
        .insert(addr, std::fs::read(&ca.pem).unwrap());
}

/// The CA (PEM) of every admin address that speaks TLS. Every plan has
/// addresses of its own, so one table serves every test in the process.
static ADMIN_CA: std::sync::Mutex<BTreeMap<SocketAddr, Vec<u8>>> =
    std::sync::Mutex::new(BTreeMap::new());

async fn admin(addr: SocketAddr) -> anyhow::Result<AdminClient<tonic::transport::Channel>> {
    let ca = ADMIN_CA.lock().unwrap().get(&addr).cloned();
    let scheme = if ca.is_some() { "https" } else { "http" };
    let mut endpoint = tonic::transport::Endpoint::from_shared(format!("{scheme}://{addr}"))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(60));
    if let Some(pem) = ca {
        endpoint = endpoint.tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(pem))
                .domain_name(addr.ip().to_string()),
        )?;
    }
    Ok(AdminClient::new(endpoint.connect().await?))
}

fn authed<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(
        skein_proto::AUTH_HEADER,
        format!("Bearer {TOKEN}").parse().unwrap(),
    );
    r
}

/// A node's status through its admin API.
pub async fn status(addr: SocketAddr) -> anyhow::Result<StatusReply> {
    Ok(admin(addr)
        .await?
        .status(authed(StatusRequest {}))
        .await?
        .into_inner())
}

/// Ask the node at `via` to add node `id` at `addr` (a voter once caught up).
pub async fn add_node(via: SocketAddr, id: u64, addr: SocketAddr) -> anyhow::Result<Vec<u64>> {
    Ok(add_member(via, id, addr, false).await?.voters)
}

/// Ask the node at `via` to add node `id` at `addr`, a voter or (with
/// `learner`) a non-voting replica.
pub async fn add_member(
    via: SocketAddr,
    id: u64,
    addr: SocketAddr,
    learner: bool,
) -> anyhow::Result<MembershipReply> {
    let r = admin(via)
        .await?
        .add_node(authed(AddNodeRequest {
            id,
            addr: addr.to_string(),
            learner,
        }))
        .await?;
    Ok(r.into_inner())
}

/// Ask the node at `via` to remove node `id` from the cluster.
pub async fn remove_node(via: SocketAddr, id: u64) -> anyhow::Result<Vec<u64>> {
    let r = admin(via)
        .await?
        .remove_node(authed(RemoveNodeRequest { id }))
        .await?;
    Ok(r.into_inner().voters)
}

/// Ask the node at `via` to make learner `id` a voter (`promote`) or voter
/// `id` a learner.
pub async fn set_voter(via: SocketAddr, id: u64, promote: bool) -> anyhow::Result<MembershipReply> {
    let mut a = admin(via).await?;
    let r = if promote {
        a.promote_node(authed(RemoveNodeRequest { id })).await?
    } else {
        a.demote_node(authed(RemoveNodeRequest { id })).await?
    };
    Ok(r.into_inner())
}

/// Ask the node at `addr` to recover as the single voter (or, without
/// `force`, what that would lose).
pub async fn recover(addr: SocketAddr, force: bool) -> anyhow::Result<RecoverReply> {
    let r = admin(addr)
        .await?
        .recover(authed(RecoverRequest { force }))
        .await?;
    Ok(r.into_inner())
}

/// The queue as the node at `addr` sees it; `state` as `skeinctl queue list`.
pub async fn list_queue(addr: SocketAddr, state: &str) -> anyhow::Result<Vec<QueuedMessage>> {
    Ok(admin(addr)
        .await?
        .list_queue(authed(ListQueueRequest {
            state: state.into(),
            domain: String::new(),
            limit: 0,
        }))
        .await?
        .into_inner()
        .messages)
}

/// Drain the node at `addr`.
pub async fn drain(addr: SocketAddr) -> anyhow::Result<DrainReply> {
    Ok(admin(addr)
        .await?
        .drain(authed(DrainRequest {}))
        .await?
        .into_inner())
}

/// The leader as the given nodes see it, once they agree on one.
pub async fn wait_for_leader(admins: &[SocketAddr], timeout: Duration) -> anyhow::Result<u64> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let mut seen = Vec::new();
        for a in admins {
            if let Ok(s) = status(*a).await {
                seen.push(s.leader);
            }
        }
        if let Some(&l) = seen.first() {
            if l != 0 && seen.len() == admins.len() && seen.iter().all(|&x| x == l) {
                return Ok(l);
            }
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "no agreed leader among {admins:?}: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn in_use(e: &anyhow::Error) -> bool {
    e.downcast_ref::<std::io::Error>()
        .is_some_and(|e| e.kind() == std::io::ErrorKind::AddrInUse)
}
