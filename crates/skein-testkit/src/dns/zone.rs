//! The records a [`DnsServer`](super::DnsServer) serves, and how a query is
//! answered from them. Pure data: no IO, so the answer rules are easy to read
//! and to test.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr};

/// One configured record. Names are kept as the caller wrote them, lowercased
/// and without a trailing dot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rec {
    Mx { preference: u16, exchange: String },
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    Txt(String),
    Cname(String),
}

/// A DNS record type, as far as this server cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Mx,
    A,
    Aaaa,
    Txt,
    Cname,
    /// Any type this server never has records of (NS, SOA, SRV, ...).
    Other,
}

impl Rec {
    pub fn kind(&self) -> Kind {
        match self {
            Rec::Mx { .. } => Kind::Mx,
            Rec::A(_) => Kind::A,
            Rec::Aaaa(_) => Kind::Aaaa,
            Rec::Txt(_) => Kind::Txt,
            Rec::Cname(_) => Kind::Cname,
        }
    }
}

#[derive(Clone, Debug, Default)]
struct Node {
    records: Vec<Rec>,
    servfail: bool,
}

/// What the server says to one question.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// NOERROR with these records (never empty).
    Records(Vec<Rec>),
    /// NOERROR, no records: the name exists but has nothing of this type.
    NoData,
    NxDomain,
    ServFail,
}

/// All names the server knows.
#[derive(Clone, Debug, Default)]
pub struct Zone {
    nodes: HashMap<String, Node>,
}

/// Lowercase, no trailing dot: the one spelling used as a key.
pub fn normalize(name: &str) -> String {
    let name = name.trim_end_matches('.');
    name.to_ascii_lowercase()
}

impl Zone {
    pub fn add(&mut self, name: &str, rec: Rec) {
        let node = self.nodes.entry(normalize(name)).or_default();
        if !node.records.contains(&rec) {
            node.records.push(rec);
        }
    }

    /// Makes `name` exist without records, so every query for it is NODATA.
    pub fn touch(&mut self, name: &str) {
        self.nodes.entry(normalize(name)).or_default();
    }

    pub fn set_servfail(&mut self, name: &str, on: bool) {
        self.nodes.entry(normalize(name)).or_default().servfail = on;
    }

    /// Drops every record of `kind` at `name`; the name itself stays.
    pub fn clear(&mut self, name: &str, kind: Kind) {
        if let Some(node) = self.nodes.get_mut(&normalize(name)) {
            node.records.retain(|r| r.kind() != kind);
        }
    }

    /// Forgets `name` entirely: it answers NXDOMAIN from now on.
    pub fn remove(&mut self, name: &str) {
        self.nodes.remove(&normalize(name));
    }

    /// Answers one question. A CNAME at the name is returned for any type
    /// (the resolver follows it); there is no other chasing.
    pub fn answer(&self, name: &str, kind: Kind) -> Answer {
        let Some(node) = self.nodes.get(&normalize(name)) else {
            return Answer::NxDomain;
        };
        if node.servfail {
            return Answer::ServFail;
        }
        let matching: Vec<Rec> = node
            .records
            .iter()
            .filter(|r| r.kind() == kind || r.kind() == Kind::Cname)
            .cloned()
            .collect();
        if matching.is_empty() {
            Answer::NoData
        } else {
            Answer::Records(matching)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_follow_the_configured_names() {
        let mut zone = Zone::default();
        zone.add(
            "Example.org.",
            Rec::Mx {
                preference: 10,
                exchange: "mx1.example.org".into(),
            },
        );
        zone.add("mx1.example.org", Rec::A(Ipv4Addr::LOCALHOST));
        zone.set_servfail("broken.example", true);

        assert!(matches!(
            zone.answer("example.org", Kind::Mx),
            Answer::Records(r) if r.len() == 1
        ));
        assert_eq!(zone.answer("example.org", Kind::A), Answer::NoData);
        assert_eq!(zone.answer("nope.example", Kind::A), Answer::NxDomain);
        assert_eq!(zone.answer("broken.example", Kind::Mx), Answer::ServFail);

        zone.clear("mx1.example.org", Kind::A);
        assert_eq!(zone.answer("mx1.example.org", Kind::A), Answer::NoData);
        zone.remove("mx1.example.org");
        assert_eq!(zone.answer("mx1.example.org", Kind::A), Answer::NxDomain);
    }

    #[test]
    fn duplicate_records_are_kept_once() {
        let mut zone = Zone::default();
        zone.add("a.example", Rec::A(Ipv4Addr::LOCALHOST));
        zone.add("a.example", Rec::A(Ipv4Addr::LOCALHOST));
        assert_eq!(
            zone.answer("a.example", Kind::A),
            Answer::Records(vec![Rec::A(Ipv4Addr::LOCALHOST)])
        );
    }
}
