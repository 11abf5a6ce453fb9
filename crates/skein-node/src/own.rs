//! Where this cluster takes mail, so that delivery never sends mail back to
//! it: this node's SMTP listeners (a wildcard listener stands for every
//! address of the host) and those its peers report in `NodeInfo`.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use skein_delivery::OwnAddrs;
use skein_queue::NodeId;
use tokio::sync::watch;

use crate::cluster::Cluster;

/// How often the peers' listeners are asked for again; sooner while a
/// member has not answered yet.
const REFRESH: Duration = Duration::from_secs(15);
const RETRY: Duration = Duration::from_millis(500);

/// The addresses `listeners` serve: each as is, a wildcard (`0.0.0.0`,
/// `::`) as every address of the host in its family (`::` takes IPv4 too,
/// as a dual-stack socket does).
pub fn expand(listeners: &[SocketAddr]) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    let mut host: Option<Vec<IpAddr>> = None;
    for l in listeners {
        if !l.ip().is_unspecified() {
            out.push(*l);
            continue;
        }
        let ips = host.get_or_insert_with(host_addresses);
        let v6 = l.ip().is_ipv6();
        out.extend(
            ips.iter()
                .filter(|ip| v6 || ip.is_ipv4())
                .map(|ip| SocketAddr::new(*ip, l.port())),
        );
    }
    out.sort();
    out.dedup();
    out
}

/// Every address of this host's interfaces (loopback included).
fn host_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below; every
    // sockaddr is read according to its family.
    unsafe {
        if libc::getifaddrs(&mut head) != 0 {
            tracing::warn!(error = %std::io::Error::last_os_error(), "cannot list the host's addresses");
            return out;
        }
        let mut p = head;
        while !p.is_null() {
            let sa = (*p).ifa_addr;
            if !sa.is_null() {
                match i32::from((*sa).sa_family) {
                    libc::AF_INET => {
                        let a = &*(sa as *const libc::sockaddr_in);
                        out.push(IpAddr::from(u32::from_be(a.sin_addr.s_addr).to_be_bytes()));
                    }
                    libc::AF_INET6 => {
                        let a = &*(sa as *const libc::sockaddr_in6);
                        out.push(IpAddr::from(a.sin6_addr.s6_addr));
                    }
                    _ => {}
                }
            }
            p = (*p).ifa_next;
        }
        libc::freeifaddrs(head);
    }
    out
}

/// Keeps `own` at this node's listeners plus every member's, asking the
/// members every [`REFRESH`] (every [`RETRY`] while one has never
/// answered). A member that does not answer keeps what it said last; one
/// that left the membership is forgotten.
pub async fn track(
    cluster: Cluster,
    local: Vec<SocketAddr>,
    own: OwnAddrs,
    mut shutdown: watch::Receiver<bool>,
) {
    own.replace(local.iter().copied());
    let mut known: BTreeMap<NodeId, Vec<SocketAddr>> = BTreeMap::new();
    loop {
        let infos = cluster.gather_node_info().await;
        let members: HashSet<NodeId> = infos.iter().map(|(id, ..)| *id).collect();
        known.retain(|id, _| members.contains(id));
        for (id, _, _, info) in infos {
            if id == cluster.id() {
                continue;
            }
            if let Some(info) = info {
                let addrs: Vec<SocketAddr> = info
                    .smtp_addrs
                    .iter()
                    .filter_map(|a| a.parse().ok())
                    .collect();
                if known.get(&id) != Some(&addrs) {
                    tracing::info!(
                        node = id,
                        ?addrs,
                        "learned where a peer takes mail; delivery never sends there"
                    );
                    known.insert(id, addrs);
                }
            }
        }
        own.replace(local.iter().chain(known.values().flatten()).copied());
        let pause = if members
            .iter()
            .all(|id| *id == cluster.id() || known.contains_key(id))
        {
            REFRESH
        } else {
            RETRY
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_stand_for_every_address_of_the_host() {
        let l: Vec<SocketAddr> = vec![
            "0.0.0.0:25".parse().unwrap(),
            "127.0.0.9:587".parse().unwrap(),
        ];
        let e = expand(&l);
        assert!(e.contains(&"127.0.0.1:25".parse().unwrap()), "{e:?}");
        assert!(e.contains(&"127.0.0.9:587".parse().unwrap()));
        assert!(e.iter().all(|a| a.is_ipv4()), "0.0.0.0 is IPv4 only: {e:?}");
        assert!(!e.iter().any(|a| a.ip().is_unspecified()));
    }
}
