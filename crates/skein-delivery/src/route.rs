//! Where mail for a domain goes (RFC 5321 §5.1, RFC 7505): the MX hosts in
//! the order to try them, or the reason there is nowhere to go.
//!
//! The ordering rules ([`order_mx`]) are pure; the lookups use the
//! hickory resolver the [`Deliverer`](crate::Deliverer) holds.

use std::net::IpAddr;

use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{Name, RData, RecordType};
use hickory_resolver::TokioResolver;
use rand::seq::SliceRandom;
use rand::Rng;
use skein_smtp::{AddressLiteral, Domain};

/// One host to try.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Host {
    /// The MX exchange name without trailing dot, or the literal as written.
    pub name: String,
    /// Its MX preference (0 for an implicit MX, a literal or a relay).
    pub pref: u16,
    /// Known addresses (literals, implicit MX); `None`: look them up when
    /// this host's turn comes, so a dead secondary costs nothing when the
    /// primary answers.
    pub addrs: Option<Vec<IpAddr>>,
}

/// The route for one domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Route {
    Hosts(Vec<Host>),
    /// Nowhere to deliver, for good: every recipient fails with this text.
    Fail(String),
    /// Nowhere to deliver for now: every recipient is deferred with this.
    Defer(String),
}

/// What the MX records say, before any address lookup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum MxPlan {
    /// Exchange names with their preference, most preferred first.
    Hosts(Vec<(u16, String)>),
    /// RFC 7505: the domain accepts no mail.
    NullMx,
    /// No usable MX: use the domain itself (RFC 5321 §5.1 implicit MX).
    Implicit,
}

/// Sorts MX records by preference, shuffling equal preferences (RFC 5321
/// §5.1), dropping duplicates. A lone `MX 0 .` (or any set of only root
/// exchanges) is a null MX; a root exchange among real ones is ignored.
pub(crate) fn order_mx(records: &[(u16, String)], rng: &mut impl Rng) -> MxPlan {
    let normal = |name: &str| name.trim_end_matches('.').to_ascii_lowercase();
    if !records.is_empty() && records.iter().all(|(_, n)| normal(n).is_empty()) {
        return MxPlan::NullMx;
    }
    let mut records: Vec<(u16, String)> = records
        .iter()
        .map(|(p, n)| (*p, normal(n)))
        .filter(|(_, n)| !n.is_empty())
        .collect();
    if records.is_empty() {
        return MxPlan::Implicit;
    }
    records.shuffle(rng);
    // Stable: the shuffle decides the order within one preference.
    records.sort_by_key(|(p, _)| *p);
    // A name listed twice keeps its best preference (it sorts first).
    let mut hosts: Vec<(u16, String)> = Vec::with_capacity(records.len());
    for (pref, name) in records {
        if !hosts.iter().any(|(_, n)| *n == name) {
            hosts.push((pref, name));
        }
    }
    MxPlan::Hosts(hosts)
}

/// Finds the hosts for `domain` (lowercase name or address literal).
pub(crate) async fn route(resolver: &TokioResolver, domain: &str) -> Route {
    let name = match Domain::parse(domain) {
        Ok(Domain::Literal(AddressLiteral::V4(ip))) => return literal(domain, ip.into()),
        Ok(Domain::Literal(AddressLiteral::V6(ip))) => return literal(domain, ip.into()),
        Ok(Domain::Literal(AddressLiteral::General { .. })) => {
            return Route::Fail(format!("550 5.1.2 unsupported address literal {domain}"))
        }
        Ok(Domain::Name(name)) => name,
        Err(e) => return Route::Fail(format!("550 5.1.2 invalid domain {domain}: {}", e.reason())),
    };
    let Some(fqdn) = fqdn(&name) else {
        return Route::Fail(format!("550 5.1.2 invalid domain {domain}"));
    };
    let records = match resolver.lookup(fqdn, RecordType::MX).await {
        Ok(lookup) => lookup
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::MX(mx) => Some((mx.preference, mx.exchange.to_ascii())),
                _ => None,
            })
            .collect(),
        Err(e) => match classify(&e) {
            Failure::NoData => Vec::new(),
            Failure::NxDomain => {
                return Route::Fail(format!(
                    "550 5.1.2 domain {name} does not exist (DNS NXDOMAIN)"
                ))
            }
            Failure::Other(why) => {
                return Route::Defer(format!(
                    "451 4.4.3 DNS lookup of MX for {name} failed: {why}"
                ))
            }
        },
    };
    // The thread-local RNG must not live across an await: order first.
    let plan = order_mx(&records, &mut rand::rng());
    match plan {
        MxPlan::Hosts(names) => Route::Hosts(
            names
                .into_iter()
                .map(|(pref, name)| Host {
                    name,
                    pref,
                    addrs: None,
                })
                .collect(),
        ),
        MxPlan::NullMx => Route::Fail(format!(
            "556 5.1.10 domain {name} does not accept mail (null MX)"
        )),
        // With no MX, a missing address record means the domain has no
        // mail service at all: that is permanent, unlike an MX host whose
        // name does not resolve (which may be a transient mistake).
        MxPlan::Implicit => match host_addrs(resolver, &name).await {
            Ok(addrs) => Route::Hosts(vec![Host {
                name,
                pref: 0,
                addrs: Some(addrs),
            }]),
            Err(AddrError::None(why)) => Route::Fail(format!("550 5.1.2 {why}")),
            Err(AddrError::Lookup(why)) => Route::Defer(format!("451 4.4.3 {why}")),
        },
    }
}

fn literal(domain: &str, ip: IpAddr) -> Route {
    Route::Hosts(vec![Host {
        name: domain.to_string(),
        pref: 0,
        addrs: Some(vec![ip]),
    }])
}

/// Why a host has no addresses to try.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum AddrError {
    /// The name does not exist or has no A/AAAA records.
    None(String),
    /// The lookup itself failed (SERVFAIL, timeout).
    Lookup(String),
}

impl AddrError {
    pub fn text(&self) -> &str {
        match self {
            AddrError::None(t) | AddrError::Lookup(t) => t,
        }
    }
}

/// The A and AAAA addresses of `host`, IPv4 first.
pub(crate) async fn host_addrs(
    resolver: &TokioResolver,
    host: &str,
) -> Result<Vec<IpAddr>, AddrError> {
    let fqdn = fqdn(host).ok_or_else(|| AddrError::None(format!("invalid host name {host}")))?;
    match resolver.lookup_ip(fqdn).await {
        Ok(lookup) => {
            let addrs: Vec<IpAddr> = lookup.iter().collect();
            if addrs.is_empty() {
                Err(AddrError::None(format!("{host} has no address records")))
            } else {
                Ok(addrs)
            }
        }
        Err(e) => match classify(&e) {
            Failure::NxDomain => Err(AddrError::None(format!(
                "host {host} does not exist (DNS NXDOMAIN)"
            ))),
            Failure::NoData => Err(AddrError::None(format!("{host} has no address records"))),
            Failure::Other(why) => Err(AddrError::Lookup(format!(
                "DNS lookup of addresses for {host} failed: {why}"
            ))),
        },
    }
}

/// The absolute form, so no search domain is ever appended. UTF-8 names
/// (SMTPUTF8 domains) become their A-label form.
pub(crate) fn fqdn(name: &str) -> Option<Name> {
    let mut name = Name::from_utf8(name).ok()?;
    name.set_fqdn(true);
    Some(name)
}

enum Failure {
    NxDomain,
    NoData,
    Other(String),
}

fn classify(e: &NetError) -> Failure {
    match e {
        NetError::Dns(DnsError::NoRecordsFound(nr))
            if nr.response_code == ResponseCode::NXDomain =>
        {
            Failure::NxDomain
        }
        NetError::Dns(DnsError::NoRecordsFound(nr))
            if nr.response_code == ResponseCode::NoError =>
        {
            Failure::NoData
        }
        NetError::Dns(DnsError::NoRecordsFound(nr)) => Failure::Other(rcode(nr.response_code)),
        NetError::Dns(DnsError::ResponseCode(code)) => Failure::Other(rcode(*code)),
        NetError::Timeout => Failure::Other("timed out".to_string()),
        other => Failure::Other(other.to_string()),
    }
}

/// Response codes as operators know them from dig.
fn rcode(code: ResponseCode) -> String {
    match code {
        ResponseCode::ServFail => "SERVFAIL".to_string(),
        ResponseCode::Refused => "REFUSED".to_string(),
        ResponseCode::FormErr => "FORMERR".to_string(),
        ResponseCode::NotImp => "NOTIMP".to_string(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn mx(list: &[(u16, &str)]) -> Vec<(u16, String)> {
        list.iter().map(|(p, n)| (*p, n.to_string())).collect()
    }

    #[test]
    fn mx_plan_table() {
        let mut rng = StdRng::seed_from_u64(1);
        let cases: Vec<(Vec<(u16, String)>, MxPlan)> = vec![
            (mx(&[]), MxPlan::Implicit),
            (mx(&[(0, ".")]), MxPlan::NullMx),
            (mx(&[(0, "")]), MxPlan::NullMx),
            (
                mx(&[(20, "b.example."), (10, "A.example.")]),
                MxPlan::Hosts(vec![(10, "a.example".into()), (20, "b.example".into())]),
            ),
            (
                mx(&[(0, "."), (10, "a.example.")]),
                MxPlan::Hosts(vec![(10, "a.example".into())]),
            ),
            (
                mx(&[(10, "a.example."), (5, "a.example.")]),
                MxPlan::Hosts(vec![(5, "a.example".into())]),
            ),
        ];
        for (records, want) in cases {
            assert_eq!(order_mx(&records, &mut rng), want, "{records:?}");
        }
    }

    #[test]
    fn equal_preferences_are_shuffled_but_stay_behind_better_ones() {
        let records = mx(&[
            (20, "z.example"),
            (10, "a.example"),
            (10, "b.example"),
            (10, "c.example"),
        ]);
        let mut rng = StdRng::seed_from_u64(7);
        let mut firsts = std::collections::HashSet::new();
        for _ in 0..200 {
            let MxPlan::Hosts(hosts) = order_mx(&records, &mut rng) else {
                panic!("hosts expected")
            };
            assert_eq!(hosts.len(), 4);
            assert_eq!(hosts[3], (20, "z.example".to_string()));
            firsts.insert(hosts[0].1.clone());
        }
        assert_eq!(
            firsts.len(),
            3,
            "each equal-preference host comes first sometimes"
        );
    }
}
