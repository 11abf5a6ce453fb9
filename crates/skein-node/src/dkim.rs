//! DKIM signing (RFC 6376; Ed25519 by RFC 8463) with `mail-auth`.
//!
//! Mail from a trusted client (in `smtp.relay_networks`, or authenticated)
//! whose `From:` is at a `[[dkim]]` domain is signed once by the node that
//! accepts it, before the commit: the signed bytes are what replicates, so
//! every node delivers the same message and a takeover never signs again.
//! Several tables for one domain sign once per key (RSA and Ed25519 side by
//! side). Keys reload when their files change, like certificates. Signing
//! never costs a message: a failure is logged and counted, and the message
//! goes out unsigned.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use mail_auth::common::crypto::{DkimKey, Ed25519Key, RsaKey, Sha256};
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::{Canonicalization, DkimSigner, Done};
use ring::signature::{Ed25519KeyPair, RsaKeyPair};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::PrivateKeyDer;

use crate::config::{Canon, DkimConfig};
use crate::tls::Reloading;

/// RSA keys below this are refused (ring's floor too): RFC 8301 wants at
/// least 1024 bits, and the large mailbox providers 2048.
pub const MIN_RSA_BITS: usize = 2048;

/// Headers signed when a table names none: RFC 6376 5.4.1's list. One
/// listed but absent is signed as empty, so it cannot be added later.
pub const DEFAULT_HEADERS: &[&str] = &[
    "From",
    "Reply-To",
    "Subject",
    "Date",
    "To",
    "Cc",
    "Resent-Date",
    "Resent-From",
    "Resent-To",
    "Resent-Cc",
    "In-Reply-To",
    "References",
    "List-Id",
    "List-Help",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
    "List-Subscribe",
    "List-Post",
    "List-Owner",
    "List-Archive",
    "Message-ID",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
];

type Ready = DkimSigner<DkimKey, Done>;

/// Read a DKIM private key: PEM, PKCS#8 (RSA or Ed25519) or PKCS#1 (RSA).
pub fn load_key(path: &Path) -> anyhow::Result<DkimKey> {
    let file = path.display();
    let pem = std::fs::read(path).with_context(|| format!("reading {file}"))?;
    let der = PrivateKeyDer::from_pem_slice(&pem)
        .with_context(|| format!("{file}: no PEM private key"))?;
    let rsa = |checked: Result<RsaKeyPair, ring::error::KeyRejected>| match checked {
        Ok(k) if k.public().modulus_len() * 8 >= MIN_RSA_BITS => Ok(DkimKey::from(
            RsaKey::<Sha256>::from_key_der(der.clone_key())?,
        )),
        Ok(k) => bail!(
            "{file}: an RSA key of {} bits; DKIM keys need at least {MIN_RSA_BITS}",
            k.public().modulus_len() * 8
        ),
        Err(e) if e.to_string() == "TooSmall" => {
            bail!("{file}: an RSA key under {MIN_RSA_BITS} bits; DKIM keys need at least {MIN_RSA_BITS}")
        }
        Err(e) => bail!("{file}: not a usable RSA key ({e})"),
    };
    match &der {
        PrivateKeyDer::Pkcs1(k) => rsa(RsaKeyPair::from_der(k.secret_pkcs1_der())),
        PrivateKeyDer::Pkcs8(k) => {
            let bytes = k.secret_pkcs8_der();
            match RsaKeyPair::from_pkcs8(bytes) {
                Err(e) if e.to_string() == "WrongAlgorithm" => {
                    // PKCS#8 v1 (OpenSSL's) carries no public key: ring
                    // derives it, so "unchecked" only means "not compared".
                    Ed25519KeyPair::from_pkcs8_maybe_unchecked(bytes).map_err(|e| {
                        anyhow::anyhow!("{file}: neither an RSA nor an Ed25519 key ({e})")
                    })?;
                    Ok(DkimKey::from(Ed25519Key::from_pkcs8_maybe_unchecked_der(
                        bytes,
                    )?))
                }
                checked => rsa(checked),
            }
        }
        _ => bail!("{file}: an EC (SEC1) key; DKIM signs with RSA or Ed25519"),
    }
}

fn canonicalization(c: Canon) -> Canonicalization {
    match c {
        Canon::Simple => Canonicalization::Simple,
        Canon::Relaxed => Canonicalization::Relaxed,
    }
}

fn build(table: &DkimConfig) -> anyhow::Result<Ready> {
    let key = load_key(&table.key_file)?;
    let mut signer = DkimSigner::from_key(key)
        .domain(table.domain.clone())
        .selector(table.selector.clone())
        .headers(table.headers.clone())
        .header_canonicalization(canonicalization(table.header_canon))
        .body_canonicalization(canonicalization(table.body_canon));
    if let Some(expire) = table.expire {
        signer = signer.expiration(expire.as_secs());
    }
    Ok(signer)
}

struct Table {
    domain: String,
    selector: String,
    signer: Arc<Reloading<Ready>>,
}

/// Every `[[dkim]]` table, keys loaded.
#[derive(Clone, Default)]
pub struct Signers {
    tables: Arc<Vec<Table>>,
}

/// Why a message went out unsigned.
#[derive(Debug, thiserror::Error)]
#[error("DKIM signing with {domain} selector {selector} failed: {reason}")]
pub struct SignError {
    pub domain: String,
    pub selector: String,
    pub reason: String,
}

impl Signers {
    pub fn load(tables: &[DkimConfig]) -> anyhow::Result<Self> {
        let tables = tables
            .iter()
            .map(|t| {
                let config = t.clone();
                let signer = Reloading::load(vec![t.key_file.clone()], move |_: &[PathBuf]| {
                    build(&config)
                })
                .with_context(|| format!("[[dkim]] {} selector {}", t.domain, t.selector))?;
                Ok(Table {
                    domain: t.domain.clone(),
                    selector: t.selector.clone(),
                    signer,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Signers {
            tables: Arc::new(tables),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }

    /// Look for changed key files every `every`, until the tasks are aborted.
    pub fn watch(&self, every: Duration) -> Vec<tokio::task::JoinHandle<()>> {
        self.tables
            .iter()
            .map(|t| t.signer.watch(every, "DKIM key"))
            .collect()
    }

    /// The `DKIM-Signature` fields to put in front of `message`, one per
    /// table whose domain is that of the first `From:` mailbox; empty when
    /// none is. CPU work (an RSA signature, a hash of the whole body): run
    /// it off the async threads.
    pub fn sign(&self, message: &[u8]) -> (Vec<String>, Vec<SignError>) {
        let mut fields = Vec::new();
        let mut errors = Vec::new();
        let Some(domain) = from_domain(message) else {
            return (fields, errors);
        };
        for t in self.tables.iter().filter(|t| t.domain == domain) {
            match t.signer.current().sign(message) {
                Ok(sig) => fields.push(sig.to_header()),
                Err(e) => errors.push(SignError {
                    domain: t.domain.clone(),
                    selector: t.selector.clone(),
                    reason: e.to_string(),
                }),
            }
        }
        (fields, errors)
    }
}

/// The domain of the first mailbox in the header section's `From:`,
/// lowercased; `None` without one.
fn from_domain(message: &[u8]) -> Option<String> {
    let parsed = mail_parser::MessageParser::new().parse_headers(message)?;
    let address = parsed.from()?.first()?.address()?;
    let (_, domain) = address.rsplit_once('@')?;
    Some(domain.trim_end_matches('.').to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_from_domain_is_the_first_mailbox_of_the_header_section() {
        let m = b"Received: x\r\nFrom: \"A, B\" <a@Example.COM>, c@other.test\r\n\r\nFrom: x@body.test\r\n";
        assert_eq!(from_domain(m).as_deref(), Some("example.com"));
        assert_eq!(
            from_domain(b"Subject: none\r\n\r\nFrom: a@b.test\r\n"),
            None
        );
        assert_eq!(from_domain(b"From: undisclosed\r\n\r\n"), None);
    }
}
