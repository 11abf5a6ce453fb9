//! Errors of setting up delivery. Delivering itself has no error type:
//! every problem becomes a [`RcptResult`](crate::RcptResult).

/// Why a [`Deliverer`](crate::Deliverer) could not be built.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("reading the system resolver configuration: {0}")]
    SystemResolver(String),
    #[error("building the DNS resolver: {0}")]
    Resolver(String),
    #[error("delivery.nameservers is empty")]
    NoNameservers,
    #[error("outbound TLS: {0}")]
    Tls(String),
    #[error("DNSSEC trust anchors: {0}")]
    TrustAnchors(String),
}
