//! MTA-STS policies shared by the cluster: the node that fetches a domain's
//! policy proposes it, every node applies it, and so every node obeys the
//! same policy and a domain's policy is fetched once per `max_age` for the
//! whole cluster, not once per node — and survives restarts.
//!
//! A member whose skeind cannot apply the command yet (a rolling upgrade)
//! would stop on it: unless every member says in `NodeInfo` that it can,
//! the policy stays on the node that fetched it.

use skein_delivery::mta_sts::{Cached, MemoryStore, Mode, Policy, PolicyStore};
use skein_queue::{Command, StsMode, StsPolicy};

use crate::cluster::Cluster;

/// The `NodeInfo` feature of a node that applies `Command::SetStsPolicy`.
pub const FEATURE: &str = "sts-policies";

pub struct SharedPolicies {
    cluster: Cluster,
    /// What this node fetched, in case the cluster could not take it.
    local: MemoryStore,
}

impl SharedPolicies {
    pub fn new(cluster: Cluster) -> Self {
        SharedPolicies {
            cluster,
            local: MemoryStore::default(),
        }
    }
}

fn cached(p: &StsPolicy) -> Cached {
    Cached {
        id: p.id.clone(),
        policy: Policy {
            mode: match p.mode {
                StsMode::Enforce => Mode::Enforce,
                StsMode::Testing => Mode::Testing,
                StsMode::None => Mode::None,
            },
            mx: p.mx.clone(),
            max_age: p.max_age,
        },
        expires: p.expires,
    }
}

fn replicated(domain: &str, c: &Cached) -> StsPolicy {
    StsPolicy {
        domain: domain.to_string(),
        id: c.id.clone(),
        mode: match c.policy.mode {
            Mode::Enforce => StsMode::Enforce,
            Mode::Testing => StsMode::Testing,
            Mode::None => StsMode::None,
        },
        mx: c.policy.mx.clone(),
        max_age: c.policy.max_age,
        expires: c.expires,
    }
}

impl PolicyStore for SharedPolicies {
    fn get(&self, domain: &str) -> Option<Cached> {
        let shared = self.cluster.reader().read().sts_policy(domain).map(cached);
        match (shared, self.local.get(domain)) {
            (Some(s), Some(l)) => Some(if l.expires > s.expires { l } else { s }),
            (s, l) => s.or(l),
        }
    }

    fn put(&self, domain: &str, c: Cached) {
        self.local.put(domain, c.clone());
        let cmd = Command::SetStsPolicy(replicated(domain, &c));
        let (cluster, domain) = (self.cluster.clone(), domain.to_string());
        tokio::spawn(async move {
            // Fetches are rare (once per domain and max_age): ask every
            // member now whether it can apply the command.
            let all = cluster
                .gather_node_info()
                .await
                .iter()
                .all(|(id, _, _, info)| {
                    *id == cluster.id()
                        || info
                            .as_ref()
                            .is_some_and(|i| i.features.iter().any(|f| f == FEATURE))
                });
            if !all {
                tracing::info!(%domain, "a member cannot take MTA-STS policies (or did not answer); this node keeps it");
                return;
            }
            if let Err(e) = cluster.propose(cmd).await {
                tracing::info!(%domain, error = %e, "MTA-STS policy not shared with the cluster; this node keeps it");
            }
        });
    }
}
