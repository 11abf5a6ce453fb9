//! What a config names on disk: certificates, keys and CA files must be
//! readable and fit together, so that a config `check-config` calls valid
//! also starts. Checked for configs read from a file (`Config::load`).

use super::validate::Checker;
use super::{ClusterConfig, DeliveryConfig, SmtpConfig};

pub(super) fn check(
    c: &mut Checker,
    smtp: &SmtpConfig,
    cluster: &ClusterConfig,
    d: &DeliveryConfig,
) {
    if let (Some(cert), Some(key)) = (&smtp.tls_cert, &smtp.tls_key) {
        if let Err(e) = crate::tls::load_key(cert, key) {
            c.problem("smtp.tls_cert", format!("{e:#}"));
        }
    }
    if let Some(t) = &cluster.tls {
        let host = crate::tls::host_of(&cluster.advertise);
        if let Err(e) = crate::tls::check_cluster_files(&t.cert, &t.key, &t.ca, host) {
            c.problem("cluster.tls_cert", format!("{e:#}"));
        }
    }
    if let Some(ca) = &d.tls_ca_file {
        if let Err(e) = crate::tls::load_certs(ca) {
            c.problem("delivery.tls_ca_file", format!("{e:#}"));
        }
    }
    if let Some(anchors) = &d.dnssec_trust_anchors {
        if let Err(e) = skein_delivery::dane::load_trust_anchors(anchors) {
            c.problem("delivery.dnssec_trust_anchors", e);
        }
    }
}
