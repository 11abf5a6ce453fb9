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

    fn signers_config(file: &Path) -> DkimConfig {
        DkimConfig {
            domain: "example.com".into(),
            selector: "s".into(),
            key_file: file.to_path_buf(),
            headers: vec!["From".into()],
            header_canon: Canon::Relaxed,
            body_canon: Canon::Relaxed,
            expire: None,
        }
    }

    #[test]
    fn a_key_replaced_on_disk_signs_from_the_next_look_on() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("k.pem");
        let new_key = || {
            rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)
                .unwrap()
                .serialize_pem()
        };
        std::fs::write(&file, new_key()).unwrap();
        let signers = Signers::load(&[signers_config(&file)]).unwrap();
        let msg = b"From: a@example.com\r\n\r\nbody\r\n";
        std::fs::write(&file, new_key()).unwrap();
        // A coarse clock could give both writes one mtime: move it on.
        let later = std::time::SystemTime::now() + Duration::from_secs(2);
        std::fs::File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_modified(later)
            .unwrap();
        assert!(signers.tables[0].signer.reload_if_changed().unwrap());
        // Signed as a signer freshly loaded from the new file signs (Ed25519
        // is deterministic; t= is the second, so compare within one).
        let fresh = Signers::load(&[signers_config(&file)]).unwrap();
        let t = |f: &str| f.split("t=").nth(1).map(|r| r[..10].to_string());
        let same = (0..5).any(|_| {
            let (a, b) = (signers.sign(msg).0.remove(0), fresh.sign(msg).0.remove(0));
            t(&a) == t(&b) && {
                assert_eq!(a, b, "the reloaded key signs");
                true
            }
        });
        assert!(same, "never signed within one second");
        // A broken file keeps the last good key.
        std::fs::write(&file, "not a key").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_modified(later + Duration::from_secs(2))
            .unwrap();
        assert!(signers.tables[0].signer.reload_if_changed().is_err());
        assert_eq!(signers.sign(msg).0.len(), 1);
    }

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
