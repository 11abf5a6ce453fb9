//! The hickory-server request handler: turns a question into a [`Zone`]
//! answer and writes the DNS response.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{Edns, Header, HeaderCounts, Metadata, ResponseCode};
use hickory_server::proto::rr::rdata::{A, AAAA, CNAME, MX, SOA, TXT};
use hickory_server::proto::rr::{Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;

use super::zone::{Answer, Kind, Rec, Zone};

/// Every record is served with TTL 0 so a resolver never answers a test from
/// a cache after the test changed the zone.
const TTL: u32 = 0;

pub struct Handler {
    pub zone: Arc<RwLock<Zone>>,
    pub queries: Arc<AtomicUsize>,
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        self.queries.fetch_add(1, Ordering::Relaxed);
        let edns = request.edns.as_ref().map(|req| {
            let mut edns = Edns::new();
            edns.set_max_payload(req.max_payload().max(512));
            edns
        });
        let mut builder = MessageResponseBuilder::from_message_request(request);
        if let Some(edns) = &edns {
            builder.edns(edns);
        }

        let Ok(info) = request.request_info() else {
            let response = builder.error_msg(&request.metadata, ResponseCode::FormErr);
            return send(&mut response_handle, response, &request.metadata).await;
        };
        let qname = info.query.original().name().clone();
        let answer = {
            let zone = self.zone.read().unwrap_or_else(|e| e.into_inner());
            zone.answer(&qname.to_ascii(), kind_of(info.query.query_type()))
        };
        tracing::debug!(name = %qname, qtype = %info.query.query_type(), ?answer, "dns query");

        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.authoritative = true;
        let (code, answers, soa) = match answer {
            Answer::Records(recs) => (
                ResponseCode::NoError,
                recs.iter().map(|r| to_record(&qname, r)).collect(),
                Vec::new(),
            ),
            Answer::NoData => (ResponseCode::NoError, Vec::new(), vec![soa_for(&qname)]),
            Answer::NxDomain => (ResponseCode::NXDomain, Vec::new(), vec![soa_for(&qname)]),
            Answer::ServFail => (ResponseCode::ServFail, Vec::new(), Vec::new()),
        };
        metadata.response_code = code;
        let response = builder.build(
            metadata,
            answers.iter(),
            std::iter::empty(),
            soa.iter(),
            std::iter::empty(),
        );
        send(&mut response_handle, response, &request.metadata).await
    }
}

async fn send<'a, R: ResponseHandler>(
    handle: &mut R,
    response: hickory_server::zone_handler::MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
    request: &Metadata,
) -> ResponseInfo {
    match handle.send_response(response).await {
        Ok(info) => info,
        Err(error) => {
            tracing::warn!(%error, "dns response not sent");
            let mut metadata = Metadata::response_from_request(request);
            metadata.response_code = ResponseCode::ServFail;
            ResponseInfo::from(Header {
                metadata,
                counts: HeaderCounts::default(),
            })
        }
    }
}

fn kind_of(rtype: RecordType) -> Kind {
    match rtype {
        RecordType::MX => Kind::Mx,
        RecordType::A => Kind::A,
        RecordType::AAAA => Kind::Aaaa,
        RecordType::TXT => Kind::Txt,
        RecordType::CNAME => Kind::Cname,
        _ => Kind::Other,
    }
}

/// A name as given to the builder; `.` or an empty string is the root.
pub fn fqdn(name: &str) -> Name {
    let trimmed = name.trim_end_matches('.');
    if trimmed.is_empty() {
        return Name::root();
    }
    // Builder input is test code: a name hickory cannot parse is a bug in
    // the test, and the root is a harmless stand-in that keeps serving.
    Name::from_ascii(format!("{trimmed}.")).unwrap_or_else(|_| Name::root())
}

fn to_record(owner: &Name, rec: &Rec) -> Record {
    let rdata = match rec {
        Rec::Mx {
            preference,
            exchange,
        } => RData::MX(MX::new(*preference, fqdn(exchange))),
        Rec::A(ip) => RData::A(A(*ip)),
        Rec::Aaaa(ip) => RData::AAAA(AAAA(*ip)),
        // One character-string holds at most 255 bytes: longer text (a DKIM
        // key) goes in several, which readers join.
        Rec::Txt(text) => RData::TXT(TXT::new(
            text.as_bytes()
                .chunks(255)
                .map(|c| String::from_utf8_lossy(c).into_owned())
                .collect(),
        )),
        Rec::Cname(target) => RData::CNAME(CNAME(fqdn(target))),
    };
    Record::from_rdata(owner.clone(), TTL, rdata)
}

/// Negative answers carry an SOA, as a real authority's do, so resolvers see
/// a negative TTL of zero and cache nothing.
fn soa_for(owner: &Name) -> Record {
    let soa = SOA::new(
        fqdn("ns.testkit.invalid"),
        fqdn("hostmaster.testkit.invalid"),
        1,
        3600,
        600,
        86400,
        TTL,
    );
    Record::from_rdata(owner.clone(), TTL, RData::SOA(soa))
}
