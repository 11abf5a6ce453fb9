//! The node's two shared secrets: the cluster secret every Raft call
//! carries, and the admin token `skeinctl` presents.
//!
//! Either comes from the config (inline or from a file) or, when the
//! config has none, is made at first start and kept in the data directory
//! (`cluster.secret`, `admin.token`, mode 0600), so that no node ever
//! serves its cluster port without one. A [`Secret`] never prints itself
//! through `Debug`, and is compared in constant time, leaking neither its
//! content nor its length.

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::config::Config;

/// The shortest secret or token accepted: 16 bytes.
pub const MIN_SECRET_LEN: usize = 16;

/// A secret string. `Debug` shows `Secret(…)`, never the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    /// The value, for where it must go: a header, a file.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `candidate` is this secret, in time independent of both
    /// values and of their lengths: both are hashed to a fixed length first.
    pub fn matches(&self, candidate: &[u8]) -> bool {
        let a = ring::digest::digest(&ring::digest::SHA256, self.0.as_bytes());
        let b = ring::digest::digest(&ring::digest::SHA256, candidate);
        a.as_ref()
            .iter()
            .zip(b.as_ref())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(…)")
    }
}

/// Where a secret the node uses came from.
#[derive(Debug, Clone)]
pub enum SecretSource {
    Config,
    /// Kept in the data directory; `true` when made at this start.
    File(PathBuf, bool),
}

/// The admin token from the config, or the one kept in
/// `<data_dir>/admin.token`, made at first start.
pub fn admin_token(config: &Config) -> anyhow::Result<(Secret, SecretSource)> {
    match &config.admin.token {
        Some(t) => Ok((t.clone(), SecretSource::Config)),
        None => kept(&config.data_dir.join("admin.token")),
    }
}

/// The cluster secret from the config, or the one kept in
/// `<data_dir>/cluster.secret`, made at first start. (The config requires
/// one whenever it names other nodes, so only a node that starts alone
/// makes its own; nodes added later are given a copy.)
pub fn cluster_secret(config: &Config) -> anyhow::Result<(Secret, SecretSource)> {
    match &config.cluster.secret {
        Some(s) => Ok((s.clone(), SecretSource::Config)),
        None => kept(&config.data_dir.join("cluster.secret")),
    }
}

/// The secret in `path`, or a new random one written there (mode 0600).
fn kept(path: &Path) -> anyhow::Result<(Secret, SecretSource)> {
    if let Ok(t) = std::fs::read_to_string(path) {
        if !t.trim().is_empty() {
            return Ok((
                Secret::new(t.trim()),
                SecretSource::File(path.to_owned(), false),
            ));
        }
    }
    use rand::Rng;
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let value: String = rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(32)
        .map(char::from)
        .collect();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    writeln!(f, "{value}")?;
    f.sync_all()?;
    Ok((
        Secret::new(value),
        SecretSource::File(path.to_owned(), true),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_by_value_and_never_print() {
        let s = Secret::new("0123456789abcdef");
        assert!(s.matches(b"0123456789abcdef"));
        assert!(!s.matches(b"0123456789abcdeF"));
        assert!(!s.matches(b"0123456789abcde"));
        assert!(!s.matches(b""));
        assert_eq!(format!("{s:?}"), "Secret(…)");
        assert!(!format!("{:?}", Some(s)).contains("0123"));
    }

    #[test]
    fn a_missing_secret_is_made_once_and_kept_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.secret");
        let (made, source) = kept(&path).unwrap();
        assert!(matches!(source, SecretSource::File(_, true)));
        assert!(made.expose().len() >= MIN_SECRET_LEN);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let (again, source) = kept(&path).unwrap();
        assert!(matches!(source, SecretSource::File(_, false)));
        assert_eq!(again, made);
    }
}
