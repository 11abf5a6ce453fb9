//! [`SignedDns`]: a real authoritative DNS server (hickory-server's in-memory
//! zones) serving one DNSSEC-signed zone, and optionally unsigned ones, on
//! 127.0.0.1.
//!
//! The signed zone has a single ECDSA P-256 key (flags 257: it signs both
//! the DNSKEY RRset and the zone's data) and NSEC records, so a validating
//! resolver given [`SignedDns::trust_anchor`] proves its answers, including
//! the absence of a name or type, secure without asking anyone else. Names
//! in unsigned zones have no chain to that anchor: a resolver finds them
//! insecure (or unprovable), never secure.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use hickory_server::proto::dnssec::crypto::EcdsaSigningKey;
use hickory_server::proto::dnssec::rdata::{DNSSECRData, DNSKEY};
use hickory_server::proto::dnssec::{Algorithm, DnssecSigner, SigningKey as _};
use hickory_server::proto::rr::rdata::{A, CNAME, MX, NS, SOA, TLSA};
use hickory_server::proto::rr::{LowerName, Name, RData, Record, RecordSet, RrKey};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneHandler, ZoneType};
use hickory_server::{dnssec::NxProofKind, Server};

use super::serve;

/// TTL of every record: long enough for a validation to use, short enough
/// to play no part in a test.
const TTL: u32 = 60;

/// Builds a [`SignedDns`]. Names are absolute or relative to nothing: give
/// them in full, with or without the trailing dot.
#[must_use]
pub struct SignedDnsBuilder {
    signed: Zone,
    unsigned: Vec<Zone>,
}

struct Zone {
    origin: Name,
    records: Vec<Record>,
}

impl Zone {
    fn new(origin: &str) -> Self {
        Zone {
            origin: name(origin),
            records: Vec::new(),
        }
    }
}

fn name(s: &str) -> Name {
    let mut n = Name::from_ascii(s).unwrap_or_else(|e| panic!("{s:?} is not a DNS name: {e}"));
    n.set_fqdn(true);
    n
}

impl SignedDnsBuilder {
    /// The zone the records of [`Self::mx`], [`Self::a`] and [`Self::tlsa`]
    /// go in when their name is under `origin`.
    pub fn new(origin: &str) -> Self {
        SignedDnsBuilder {
            signed: Zone::new(origin),
            unsigned: Vec::new(),
        }
    }

    /// Serves `origin` as well, unsigned.
    pub fn unsigned_zone(mut self, origin: &str) -> Self {
        self.unsigned.push(Zone::new(origin));
        self
    }

    fn add(mut self, owner: &str, data: RData) -> Self {
        let owner = name(owner);
        let zone = std::iter::once(&mut self.signed)
            .chain(self.unsigned.iter_mut())
            .filter(|z| z.origin.zone_of(&owner))
            .max_by_key(|z| z.origin.num_labels())
            .unwrap_or_else(|| panic!("{owner} is in no zone of this server"));
        zone.records.push(Record::from_rdata(owner, TTL, data));
        self
    }

    pub fn mx(self, owner: &str, preference: u16, exchange: &str) -> Self {
        self.add(owner, RData::MX(MX::new(preference, name(exchange))))
    }

    pub fn a(self, owner: &str, ip: Ipv4Addr) -> Self {
        self.add(owner, RData::A(A(ip)))
    }

    pub fn cname(self, owner: &str, target: &str) -> Self {
        self.add(owner, RData::CNAME(CNAME(name(target))))
    }

    /// A TLSA record (RFC 6698): `usage selector matching data`.
    pub fn tlsa(self, owner: &str, usage: u8, selector: u8, matching: u8, data: &[u8]) -> Self {
        let tlsa = TLSA::new(
            usage.into(),
            selector.into(),
            matching.into(),
            data.to_vec(),
        );
        self.add(owner, RData::TLSA(tlsa))
    }

    /// Signs the zone, binds UDP and TCP on one random 127.0.0.1 port and
    /// starts serving.
    pub async fn start(self) -> anyhow::Result<SignedDns> {
        let pkcs8 = EcdsaSigningKey::generate_pkcs8(Algorithm::ECDSAP256SHA256)
            .map_err(|e| anyhow::anyhow!("zone key: {e}"))?;
        let key = EcdsaSigningKey::from_pkcs8(&pkcs8, Algorithm::ECDSAP256SHA256)
            .map_err(|e| anyhow::anyhow!("zone key: {e}"))?;
        let public = key
            .to_public_key()
            .map_err(|e| anyhow::anyhow!("zone key: {e}"))?;
        let dnskey = DNSKEY::from_key(&public);
        let anchor = Record::from_rdata(
            self.signed.origin.clone(),
            TTL,
            RData::DNSSEC(DNSSECRData::DNSKEY(dnskey.clone())),
        )
        .to_string();
        let signer = DnssecSigner::new(
            dnskey,
            Box::new(key),
            self.signed.origin.clone(),
            Duration::from_secs(86_400),
        );

        let mut catalog = Catalog::new();
        let origin = self.signed.origin.clone();
        let mut signed = zone_handler(self.signed, Some(NxProofKind::Nsec))?;
        signed
            .add_zone_signing_key_mut(signer)
            .map_err(|e| anyhow::anyhow!("adding the zone key: {e}"))?;
        signed
            .secure_zone_mut()
            .map_err(|e| anyhow::anyhow!("signing {origin}: {e}"))?;
        catalog.upsert(LowerName::new(&origin), vec![Arc::new(signed)]);
        for zone in self.unsigned {
            let origin = zone.origin.clone();
            let handler: Arc<dyn ZoneHandler> = Arc::new(zone_handler(zone, None)?);
            catalog.upsert(LowerName::new(&origin), vec![handler]);
        }

        let (addr, server) = serve(catalog).await?;
        Ok(SignedDns {
            addr,
            anchor,
            _server: server,
        })
    }
}

/// A primary zone with an SOA and an NS record at its apex besides `zone`'s.
fn zone_handler(zone: Zone, nx_proof: Option<NxProofKind>) -> anyhow::Result<InMemoryZoneHandler> {
    let origin = zone.origin;
    let ns = name("ns.invalid.");
    let soa = SOA::new(
        ns.clone(),
        name("hostmaster.invalid."),
        1,
        3600,
        600,
        86_400,
        TTL,
    );
    let mut records: BTreeMap<RrKey, RecordSet> = BTreeMap::new();
    let apex = [
        Record::from_rdata(origin.clone(), TTL, RData::SOA(soa)),
        Record::from_rdata(origin.clone(), TTL, RData::NS(NS(ns))),
    ];
    for record in apex.into_iter().chain(zone.records) {
        let key = RrKey::new(LowerName::new(&record.name), record.record_type());
        records
            .entry(key)
            .or_insert_with(|| RecordSet::new(record.name.clone(), record.record_type(), 1))
            .insert(record, 1);
    }
    InMemoryZoneHandler::new(
        origin.clone(),
        records,
        ZoneType::Primary,
        AxfrPolicy::Deny,
        nx_proof,
    )
    .map_err(|e| anyhow::anyhow!("zone {origin}: {e}"))
    .context("building a test zone")
}

/// A running signed DNS server. Dropping it stops it.
pub struct SignedDns {
    addr: SocketAddr,
    anchor: String,
    _server: Server<Catalog>,
}

impl SignedDns {
    pub fn builder(origin: &str) -> SignedDnsBuilder {
        SignedDnsBuilder::new(origin)
    }

    /// The address, the same port on UDP and TCP.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The signed zone's DNSKEY as a zone-file line: what a validating
    /// resolver's trust-anchor file holds.
    pub fn trust_anchor(&self) -> &str {
        &self.anchor
    }
}
