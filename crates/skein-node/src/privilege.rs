//! Least privilege at start: what in the node's setup gives away more than
//! it must. Each finding is a warning in the log; none stops the node.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::Context;

use crate::config::Config;

/// Permission bits that let other users in.
fn mode(path: &Path) -> Option<u32> {
    std::fs::metadata(path).ok().map(|m| m.permissions().mode())
}

fn readable_by_others(path: &Path) -> bool {
    mode(path).is_some_and(|m| m & 0o004 != 0)
}

/// Everything about this process and its files that is more open than it
/// should be, as messages for the log.
pub fn findings(config: &Config, config_path: Option<&Path>, euid: u32) -> Vec<String> {
    let mut out = Vec::new();
    if euid == 0 {
        out.push(
            "skeind runs as root: run it as an unprivileged user and grant \
             CAP_NET_BIND_SERVICE to bind port 25 (see docs/deploy.md)"
                .to_string(),
        );
    }
    if let Some(path) = config_path {
        if !config.secrets.inline.is_empty() && readable_by_others(path) {
            out.push(format!(
                "{} is readable by every user and holds {}: chmod o-r it, or move them to \
                 files (cluster.secret_file, admin.token_file, auth_password_file)",
                path.display(),
                config.secrets.inline.join(", ")
            ));
        }
    }
    let key = config.cluster.tls.as_ref().map(|t| t.key.as_path());
    for file in config
        .secrets
        .files
        .iter()
        .map(|p| p.as_path())
        .chain(key)
        .chain(config.smtp.tls_key.as_deref())
    {
        if readable_by_others(file) {
            out.push(format!(
                "{} is readable by every user: chmod 600 it (or 640 to skeind's group)",
                file.display()
            ));
        }
    }
    // An open data directory of our own is closed at start; one owned by
    // another user cannot be.
    if let Ok(meta) = std::fs::metadata(&config.data_dir) {
        use std::os::unix::fs::MetadataExt;
        let m = meta.permissions().mode();
        if m & 0o077 != 0 && meta.uid() != euid {
            out.push(format!(
                "the data directory {} belongs to uid {} and is open to other users (mode {:o}): \
                 chown it to skeind's user and chmod 700 it",
                config.data_dir.display(),
                meta.uid(),
                m & 0o777
            ));
        }
    }
    out
}

/// The effective user id of this process.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Without TLS, mail bodies and Raft entries cross the network in clear:
/// fine on loopback, a warning anywhere else.
pub fn warn_if_exposed(config: &Config) {
    let exposed = exposed_addresses(config);
    if !exposed.is_empty() {
        tracing::warn!(
            addresses = ?exposed,
            "CLUSTER TRAFFIC IS NOT ENCRYPTED: mail bodies and Raft entries cross the network \
             in clear to peers off loopback; set cluster.tls_cert, cluster.tls_key and cluster.tls_ca"
        );
    }
}

/// The cluster addresses (peers' and this node's advertised one) that are
/// not on loopback, when there are peers to talk to.
fn exposed_addresses(config: &Config) -> Vec<&str> {
    if config.is_single_node() {
        return Vec::new();
    }
    config
        .cluster
        .peers
        .iter()
        .filter(|(id, _)| **id != config.node_id)
        .map(|(_, addr)| addr.as_str())
        .chain(std::iter::once(config.cluster.advertise.as_str()))
        .filter(|addr| !is_loopback(crate::tls::host_of(addr)))
        .collect()
}

fn is_loopback(host: &str) -> bool {
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => host.eq_ignore_ascii_case("localhost"),
    }
}

/// The data directory is the queue: readable by this user alone. One that
/// exists, belongs to this user and is open to others (a fresh container
/// volume, say) is closed; one owned by someone else is left as it is, and
/// reported at start (`crate::privilege`).
pub fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create the data directory {}", dir.display()))?;
        return Ok(());
    }
    let meta = std::fs::metadata(dir)?;
    if meta.uid() == crate::privilege::euid() && meta.permissions().mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot make {} private", dir.display()))?;
        tracing::info!(dir = %dir.display(), "data directory made private (mode 700)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::Permissions;

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn open_files_and_root_are_reported_and_private_ones_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        chmod(&data, 0o700);
        let token = dir.path().join("admin.token");
        std::fs::write(&token, "t0ken-0123456789abcdef\n").unwrap();
        chmod(&token, 0o600);
        let text = format!(
            "data_dir = {:?}\n[cluster]\nsecret = \"s3cret-0123456789ab\"\n[admin]\ntoken_file = {:?}\n",
            data.display().to_string(),
            token.display().to_string()
        );
        let path = dir.path().join("skein.toml");
        std::fs::write(&path, &text).unwrap();
        chmod(&path, 0o600);
        let config = Config::parse(&text).unwrap();
        assert_eq!(config.secrets.inline, vec!["cluster.secret"]);
        assert!(findings(&config, Some(&path), 1000).is_empty());

        chmod(&path, 0o644);
        chmod(&token, 0o644);
        chmod(&data, 0o755);
        use std::os::unix::fs::MetadataExt;
        let owner = std::fs::metadata(&data).unwrap().uid();
        let as_root = findings(&config, Some(&path), 0).join("\n");
        assert!(as_root.contains("runs as root"), "{as_root}");
        let found = findings(&config, Some(&path), owner).join("\n");
        assert!(!found.contains("runs as root") || owner == 0, "{found}");
        assert!(found.contains("holds cluster.secret"), "{found}");
        assert!(
            found.contains("admin.token is readable by every user"),
            "{found}"
        );
        // Open, but ours: the node closes it at start, nothing to report...
        assert!(!found.contains("data directory"), "{found}");
        // ...while another user's open directory is reported.
        let as_other = findings(&config, Some(&path), owner + 1).join("\n");
        assert!(as_other.contains("mode 755"), "{as_other}");
    }

    #[test]
    fn a_world_readable_config_without_secrets_is_fine() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("skein.toml");
        let text = format!(
            "data_dir = {:?}\n",
            dir.path().join("d").display().to_string()
        );
        std::fs::write(&path, &text).unwrap();
        chmod(&path, 0o644);
        let config = Config::parse(&text).unwrap();
        assert!(findings(&config, Some(&path), 1000).is_empty());
    }

    fn with_peers(peers: &str) -> Config {
        Config::parse(&format!(
            "node_id = 1\n[cluster]\nsecret = \"s-0123456789abcdef\"\n[cluster.peers]\n{peers}"
        ))
        .unwrap()
    }

    #[test]
    fn an_open_data_directory_of_our_own_is_closed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
        create_private_dir(&data).unwrap();
        let mode = std::fs::metadata(&data).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        create_private_dir(&dir.path().join("new/deeper")).unwrap();
        let mode = std::fs::metadata(dir.path().join("new/deeper"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    #[test]
    fn peers_off_loopback_without_tls_are_named() {
        let local =
            with_peers("1 = \"127.0.0.1:7100\"\n2 = \"127.0.0.2:7100\"\n3 = \"localhost:7100\"\n");
        assert!(exposed_addresses(&local).is_empty());
        let lan = with_peers(
            "1 = \"127.0.0.1:7100\"\n2 = \"10.0.0.2:7100\"\n3 = \"node3.example.com:7100\"\n",
        );
        assert_eq!(
            exposed_addresses(&lan),
            vec!["10.0.0.2:7100", "node3.example.com:7100"]
        );
        assert!(exposed_addresses(&Config::defaults()).is_empty());
    }
}
