//! The cluster's own SMTP listeners, so delivery never sends mail back to
//! the cluster it came from (RFC 5321 §5.1: "the SMTP client MUST ... not
//! send to itself").
//!
//! The node fills the set with every address and port its own listeners
//! serve (wildcards expanded to the host's interface addresses) and those
//! its peers report; the [`Deliverer`](crate::Deliverer) consults it for
//! every MX host, implicit MX and relay before connecting.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

/// Addresses and ports at which this cluster itself takes mail. Cheap to
/// clone; clones share the set.
#[derive(Clone, Debug, Default)]
pub struct OwnAddrs {
    inner: Arc<RwLock<HashSet<SocketAddr>>>,
}

impl OwnAddrs {
    pub fn new() -> Self {
        OwnAddrs::default()
    }

    /// Replaces the whole set.
    pub fn replace(&self, addrs: impl IntoIterator<Item = SocketAddr>) {
        let set = addrs.into_iter().map(canonical).collect();
        *self.inner.write().unwrap_or_else(|p| p.into_inner()) = set;
    }

    /// Whether mail sent to `addr` would reach this cluster.
    pub fn contains(&self, addr: SocketAddr) -> bool {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&canonical(addr))
    }

    pub fn len(&self) -> usize {
        self.inner.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// IPv4-mapped IPv6 addresses compare as the IPv4 address they are.
fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_addresses_match_their_ipv4_form() {
        let own = OwnAddrs::new();
        own.replace(["[::ffff:192.0.2.1]:25".parse().unwrap()]);
        assert!(own.contains("192.0.2.1:25".parse().unwrap()));
        assert!(!own.contains("192.0.2.1:2525".parse().unwrap()));
        assert!(!own.contains("192.0.2.2:25".parse().unwrap()));
    }
}
