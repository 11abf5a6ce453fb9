//! The test DNS server answers a real resolver, over UDP and over TCP.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{RData, RecordType};
use hickory_resolver::TokioResolver;
use skein_testkit::{DnsServer, RecordKind};

fn resolver(dns: &DnsServer, tcp_only: bool) -> TokioResolver {
    let addr = dns.addr();
    let mut conn = if tcp_only {
        ConnectionConfig::tcp()
    } else {
        ConnectionConfig::udp()
    };
    conn.port = addr.port();
    let ns = NameServerConfig::new(addr.ip(), true, vec![conn]);
    let mut builder = TokioResolver::builder_with_config(
        ResolverConfig::from_name_servers(vec![ns]),
        TokioRuntimeProvider::default(),
    );
    builder.options_mut().attempts = 1;
    builder.build().expect("resolver")
}

async fn mx_set(resolver: &TokioResolver, name: &str) -> Result<Vec<(u16, String)>, NetError> {
    let lookup = resolver.lookup(name, RecordType::MX).await?;
    let mut set: Vec<(u16, String)> = lookup
        .answers()
        .iter()
        .filter_map(|r| match &r.data {
            RData::MX(mx) => Some((mx.preference, mx.exchange.to_ascii())),
            _ => None,
        })
        .collect();
    set.sort();
    Ok(set)
}

fn response_code(err: &NetError) -> Option<ResponseCode> {
    match err {
        NetError::Dns(DnsError::NoRecordsFound(nr)) => Some(nr.response_code),
        NetError::Dns(DnsError::ResponseCode(code)) => Some(*code),
        _ => None,
    }
}

async fn server() -> DnsServer {
    DnsServer::builder()
        .mx("example.org", 10, "mx1.example.org")
        .mx("example.org", 20, "mx2.example.org")
        .a("mx1.example.org", Ipv4Addr::LOCALHOST)
        .aaaa("v6.example.org", Ipv6Addr::LOCALHOST)
        .null_mx("nullmx.example")
        .servfail("broken.example")
        .start()
        .await
        .expect("dns server")
}

#[tokio::test]
async fn resolver_sees_the_mx_set_over_udp_and_tcp() {
    let dns = server().await;
    for tcp in [false, true] {
        let r = resolver(&dns, tcp);
        let set = mx_set(&r, "example.org.").await.expect("mx lookup");
        assert_eq!(
            set,
            vec![
                (10, "mx1.example.org.".to_string()),
                (20, "mx2.example.org.".to_string())
            ],
            "tcp={tcp}"
        );
    }
    assert!(dns.queries() >= 2);
}

#[tokio::test]
async fn addresses_null_mx_and_errors() {
    let dns = server().await;
    let r = resolver(&dns, false);

    let ips: Vec<IpAddr> = r
        .lookup_ip("mx1.example.org.")
        .await
        .unwrap()
        .iter()
        .collect();
    assert_eq!(ips, vec![IpAddr::V4(Ipv4Addr::LOCALHOST)]);
    let v6 = r.lookup("v6.example.org.", RecordType::AAAA).await.unwrap();
    assert!(matches!(v6.answers()[0].data, RData::AAAA(a) if a.0 == Ipv6Addr::LOCALHOST));

    assert_eq!(
        mx_set(&r, "nullmx.example.").await.unwrap(),
        vec![(0, ".".to_string())]
    );

    let nx = mx_set(&r, "nowhere.example.").await.unwrap_err();
    assert_eq!(response_code(&nx), Some(ResponseCode::NXDomain), "{nx:?}");
    assert!(nx.is_nx_domain());

    let nodata = mx_set(&r, "mx1.example.org.").await.unwrap_err();
    assert_eq!(
        response_code(&nodata),
        Some(ResponseCode::NoError),
        "{nodata:?}"
    );

    let servfail = mx_set(&r, "broken.example.").await.unwrap_err();
    assert_eq!(
        response_code(&servfail),
        Some(ResponseCode::ServFail),
        "{servfail:?}"
    );
}

#[tokio::test]
async fn records_change_while_running() {
    let dns = server().await;
    let r = resolver(&dns, false);
    dns.set_a("mx1.example.org", &[Ipv4Addr::new(127, 0, 0, 2)]);
    let ips: Vec<IpAddr> = r
        .lookup_ip("mx1.example.org.")
        .await
        .unwrap()
        .iter()
        .collect();
    assert_eq!(ips, vec![IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))]);

    dns.clear("example.org", RecordKind::Mx);
    dns.add_mx("example.org", 5, "mx9.example.org");
    assert_eq!(
        mx_set(&r, "example.org.").await.unwrap(),
        vec![(5, "mx9.example.org.".to_string())]
    );

    dns.set_servfail("example.org", true);
    let err = mx_set(&r, "example.org.").await.unwrap_err();
    assert_eq!(response_code(&err), Some(ResponseCode::ServFail));

    dns.remove("example.org");
    assert!(mx_set(&r, "example.org.").await.unwrap_err().is_nx_domain());
}
