//! `skeinctl` as a real process, the way operators and scripts run it.

use std::net::SocketAddr;
use std::path::Path;

use serde_json::Value;

/// The path of the admin CLI binary, for integration tests of this
/// package: `skeinctl-under-test`, this package's own build of skeinctl.
#[macro_export]
macro_rules! skeinctl {
    () => {
        env!("CARGO_BIN_EXE_skeinctl-under-test")
    };
}

/// What one run printed and how it exited.
pub struct CtlOut {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl CtlOut {
    /// The JSON it printed, after checking it exited 0.
    pub fn json(&self) -> Value {
        assert_eq!(self.code, 0, "skeinctl failed: {}", self.stderr);
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.stdout))
    }
}

/// Run `binary` (pass `skeinctl!()`) against `node` with `token` (if any),
/// `ca` (if any) and `args`; the environment's SKEIN_* are ignored.
pub async fn run_ctl(
    binary: &str,
    node: SocketAddr,
    token: Option<&str>,
    ca: Option<&Path>,
    args: &[&str],
) -> CtlOut {
    let mut cmd = tokio::process::Command::new(binary);
    cmd.env_remove("SKEIN_TOKEN")
        .env_remove("SKEIN_NODE")
        .env_remove("SKEIN_CA")
        .arg("--node")
        .arg(node.to_string());
    if let Some(t) = token {
        cmd.arg("--token").arg(t);
    }
    if let Some(ca) = ca {
        cmd.arg("--ca").arg(ca);
    }
    let o = cmd.args(args).output().await.expect("run skeinctl");
    CtlOut {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}
