//! `skeind` as a real process: started from the built binary, killed with
//! SIGKILL or stopped with SIGTERM, restarted on the same data.

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};

use crate::config::TestConfig;

/// The path of the node binary, for integration tests of this package:
/// `skeind-under-test`, this package's own build of skeind, so that
/// `cargo test -p skein-tests` always runs the current code.
#[macro_export]
macro_rules! skeind {
    () => {
        env!("CARGO_BIN_EXE_skeind-under-test")
    };
}

pub struct ProcessNode {
    pub config: TestConfig,
    binary: PathBuf,
    config_path: PathBuf,
    log_path: PathBuf,
    child: Option<Child>,
    /// Extra environment for the process (a faked clock, say).
    env: Vec<(String, String)>,
}

impl ProcessNode {
    /// A process for each config, each waited for until it is ready.
    pub async fn start_all(
        binary: &str,
        configs: &[TestConfig],
    ) -> anyhow::Result<Vec<ProcessNode>> {
        let nodes = configs
            .iter()
            .map(|c| ProcessNode::start(binary, c.clone()))
            .collect::<anyhow::Result<Vec<_>>>()?;
        for n in &nodes {
            n.wait_ready(Duration::from_secs(30)).await?;
        }
        Ok(nodes)
    }

    /// Write the config next to the data directory and start `binary` on it
    /// (pass `skeind!()`).
    pub fn start(binary: &str, config: TestConfig) -> anyhow::Result<ProcessNode> {
        Self::start_with_env(binary, config, Vec::new())
    }

    /// Like [`ProcessNode::start`], with extra environment variables that
    /// stay for every restart.
    pub fn start_with_env(
        binary: &str,
        config: TestConfig,
        env: Vec<(String, String)>,
    ) -> anyhow::Result<ProcessNode> {
        let mut n = Self::start_stopped(binary, config)?;
        n.env = env;
        n.spawn()?;
        Ok(n)
    }

    fn start_stopped(binary: &str, config: TestConfig) -> anyhow::Result<ProcessNode> {
        let base = config
            .data_dir
            .parent()
            .context("data_dir has a parent")?
            .to_path_buf();
        let config_path = base.join(format!("node{}.toml", config.node_id));
        let log_path = base.join(format!("node{}.log", config.node_id));
        std::fs::write(&config_path, config.toml())?;
        Ok(ProcessNode {
            config,
            binary: binary.into(),
            config_path,
            log_path,
            child: None,
            env: Vec::new(),
        })
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)?;
        let child = Command::new(&self.binary)
            .arg("--config")
            .arg(&self.config_path)
            .env("SKEIN_LOG", "info,openraft=warn")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawn skeind")?;
        self.child = Some(child);
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Wait until the node answers SMTP with a 220.
    pub async fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let addr = self.config.smtp;
        let ok = skein_testkit::wait_until(tokio::time::Instant::now() + timeout, || async move {
            let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else { return false };
            let mut buf = [0u8; 3];
            use tokio::io::AsyncReadExt;
            matches!(tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut buf)).await, Ok(Ok(_)) if &buf == b"220")
        })
        .await;
        if !ok {
            bail!(
                "node {} not ready in {timeout:?}; log:\n{}",
                self.config.node_id,
                self.log()
            );
        }
        Ok(())
    }

    pub fn kill9(&mut self) {
        self.signal(libc::SIGKILL);
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait for the exit.
    pub fn terminate(&mut self) -> anyhow::Result<ExitStatus> {
        self.signal(libc::SIGTERM);
        let mut c = self.child.take().context("not running")?;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = c.try_wait()? {
                return Ok(status);
            }
            if std::time::Instant::now() > deadline {
                let _ = c.kill();
                bail!("node did not stop after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGSTOP: the process is frozen, its sockets open and silent.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// SIGCONT after [`ProcessNode::pause`].
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    /// Whether the process runs: started and not exited (an exit is reaped
    /// here, so that [`ProcessNode::start_again`] can follow).
    pub fn is_running(&mut self) -> bool {
        if let Some(c) = &mut self.child {
            if matches!(c.try_wait(), Ok(Some(_))) {
                self.child = None;
            }
        }
        self.child.is_some()
    }

    /// What the kernel says of the process — its state, threads and where
    /// it waits — for a failing test's output.
    pub fn proc_state(&self) -> String {
        let Some(pid) = self.pid() else {
            return "not running".into();
        };
        let read = |f: &str| std::fs::read_to_string(format!("/proc/{pid}/{f}"));
        let status = match read("status") {
            Ok(s) => s,
            Err(e) => return format!("pid {pid}: {e}"),
        };
        let keep = ["Name:", "State:", "Threads:", "VmRSS:"];
        let mut out: Vec<String> = status
            .lines()
            .filter(|l| keep.iter().any(|k| l.starts_with(k)))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        out.push(format!("wchan: {}", read("wchan").unwrap_or_default()));
        // A process that exited and was not reaped yet still tells how:
        // the last field of `stat` is its wait status.
        if let Some(code) = read("stat")
            .ok()
            .and_then(|s| s.split_whitespace().last()?.parse::<i32>().ok())
            .filter(|c| *c != 0 || status.contains("State:\tZ"))
        {
            out.push(match code & 0x7f {
                0 => format!("exited with status {}", (code >> 8) & 0xff),
                sig => format!("killed by signal {sig}"),
            });
        }
        format!("pid {pid}: {}", out.join(", "))
    }

    /// Resident memory of the process, in KiB.
    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
    }

    /// Start the process again after a kill or a SIGTERM.
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.child.is_none(),
            "node {} still runs",
            self.config.node_id
        );
        self.spawn()
    }

    pub fn restart(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            self.kill9();
        }
        self.spawn()
    }

    fn signal(&self, sig: i32) {
        if let Some(pid) = self.pid() {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe {
                libc::kill(pid as i32, sig);
            }
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for ProcessNode {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Bytes of the files under `path` (a data directory), recursively.
pub fn dir_size(path: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}
