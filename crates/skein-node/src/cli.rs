//! The `skeind` command line: run one Skein node, or check a config
//! without starting anything. The binary's `main` is only a call to [`main`].

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use crate::config::{Config, ConfigError, LogFormat};
use crate::node::Restart;
use crate::secrets::SecretSource;
use crate::Node;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "skeind",
    version,
    about = "Skein: an active-active clustered mail transfer agent"
)]
struct Cli {
    /// Config file (TOML). Without one, a single-node cluster on loopback.
    #[arg(long, env = "SKEIN_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Validate the config and print every problem with its key; start nothing.
    CheckConfig,
    /// Read a password on stdin and print its argon2 hash for [smtp.users].
    HashPassword,
    /// Exit 0 if the node of this config answers 200 on /readyz (its
    /// metrics listener), 1 if not: a container health check without curl.
    Ready,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Cmd::HashPassword) = cli.command {
        return hash_password();
    }
    let config = match &cli.config {
        Some(path) => match Config::load(path) {
            Ok(c) => c,
            Err(ConfigError::Invalid(problems)) => {
                eprintln!("{}: {} problem(s):", path.display(), problems.len());
                for p in problems {
                    eprintln!("  {p}");
                }
                return ExitCode::from(2);
            }
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(2);
            }
        },
        None => Config::defaults(),
    };
    if let Some(Cmd::Ready) = cli.command {
        return ready(&config);
    }
    if let Some(Cmd::CheckConfig) = cli.command {
        match &cli.config {
            Some(p) => println!("{}: valid", p.display()),
            None => println!("no config given: the embedded defaults are valid"),
        }
        return ExitCode::SUCCESS;
    }
    init_logging(&config);
    for finding in
        crate::privilege::findings(&config, cli.config.as_deref(), crate::privilege::euid())
    {
        tracing::warn!("{finding}");
    }
    let drill_back_at = take_drill_back_at();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("skeind: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config, drill_back_at)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("skeind: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Set in the environment of a process that replaced a node failed by a
/// drill: when (ms since the epoch) it may start again.
const DRILL_BACK_AT: &str = "SKEIN_DRILL_BACK_AT";

/// Replace this process with a fresh run of the same program, arguments
/// and environment, told to stay down until `back_at`: every socket and
/// file closes at once, as in a crash. Returns only on failure.
///
/// `execve` itself, not `Command::exec`: before its exec, std sets SIGPIPE
/// back to its default in this process, and a thread writing to a closed
/// connection in that window kills it with SIGPIPE instead of getting
/// EPIPE. That happened in a whole-site drill: the leader's peers went
/// down with it, its replication wrote to their closed connections, and it
/// died instead of coming back. Ignored signals stay ignored across
/// `execve`.
fn restart_after(back_at: u64) -> std::io::Error {
    use std::ffi::{CString, OsStr};
    use std::os::unix::ffi::OsStrExt;
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return e,
    };
    let c = |s: &OsStr| {
        CString::new(s.as_bytes())
            .map_err(|_| std::io::Error::other("a NUL byte in an argument or the environment"))
    };
    let prepared = (|| {
        let path = c(exe.as_os_str())?;
        let mut argv = vec![path.clone()];
        for a in std::env::args_os().skip(1) {
            argv.push(c(&a)?);
        }
        let mut envp = Vec::new();
        for (k, v) in std::env::vars_os() {
            if k != DRILL_BACK_AT {
                let mut kv = k;
                kv.push("=");
                kv.push(v);
                envp.push(c(&kv)?);
            }
        }
        envp.push(c(OsStr::new(&format!("{DRILL_BACK_AT}={back_at}")))?);
        Ok::<_, std::io::Error>((path, argv, envp))
    })();
    let (path, argv, envp) = match prepared {
        Ok(p) => p,
        Err(e) => return e,
    };
    let ptrs = |v: &[CString]| {
        v.iter()
            .map(|s| s.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect::<Vec<_>>()
    };
    let (argv, envp) = (ptrs(&argv), ptrs(&envp));
    // SAFETY: every pointer is to a NUL-terminated string alive until
    // execve returns, and both arrays end in a null pointer.
    unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    std::io::Error::last_os_error()
}

/// When a process started by [`restart_after`] may start; the variable
/// is taken out of the environment (so the next restart does not wait).
/// Called before any thread is started.
fn take_drill_back_at() -> Option<u64> {
    let v = std::env::var(DRILL_BACK_AT).ok()?;
    // SAFETY: called from `main` before the runtime or any other thread
    // exists, so nothing reads the environment meanwhile.
    unsafe { std::env::remove_var(DRILL_BACK_AT) };
    v.parse().ok()
}

/// A process started by [`restart_after`] waits out the drill's outage.
async fn wait_out_a_drill(back_at: Option<u64>, term: &mut tokio::signal::unix::Signal) -> bool {
    let Some(back_at) = back_at else {
        return true;
    };
    let wait = Duration::from_millis(back_at.saturating_sub(crate::clock::now_ms()));
    tracing::warn!(for_ = ?wait, "restarted by a drill: down until the outage ends");
    tokio::select! {
        _ = tokio::time::sleep(wait) => true,
        _ = term.recv() => false,
        _ = tokio::signal::ctrl_c() => false,
    }
}

async fn run(config: Config, drill_back_at: Option<u64>) -> anyhow::Result<()> {
    // Listen for signals before anything starts, so that a SIGTERM at any
    // moment after the banner is a graceful stop.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    if !wait_out_a_drill(drill_back_at, &mut term).await {
        return Ok(());
    }
    let node = Node::start(config.clone()).await?;
    let list = |v: &[std::net::SocketAddr]| {
        v.iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "skeind: node {} of a {}-node cluster",
        config.node_id,
        config.cluster.peers.len()
    );
    println!("  smtp       {}", list(&node.smtp_addrs));
    if !node.submission_addrs.is_empty() {
        println!("  submission {}", list(&node.submission_addrs));
    }
    println!("  cluster    {} (Raft and admin gRPC)", node.cluster_addr);
    println!(
        "  metrics    http://{}/metrics  /healthz  /readyz",
        node.metrics_addr
    );
    println!("  data       {}", config.data_dir.display());
    match &node.token_source {
        SecretSource::Config => {
            println!("  skeinctl authenticates with admin.token from the config")
        }
        SecretSource::File(p, _) => println!(
            "  skeinctl authenticates with the token in {p}: export SKEIN_TOKEN=$(cat {p})",
            p = p.display()
        ),
    }
    match &node.secret_source {
        SecretSource::Config => {}
        SecretSource::File(p, made) => {
            println!(
                "  cluster    secret in {p}: nodes added later need a copy (cluster.secret_file)",
                p = p.display()
            );
            if *made {
                tracing::info!(path = %p.display(), "made a cluster secret: nodes added to this cluster need a copy of it (cluster.secret_file)");
            }
        }
    }

    let mut node = node;
    let failed = loop {
        let mut faults = node.take_faults();
        let cluster = node.cluster().clone();
        let fault = async {
            match faults.as_mut() {
                Some(f) => f.recv().await,
                None => std::future::pending().await,
            }
        };
        let restart = tokio::select! {
            _ = term.recv() => break None,
            _ = tokio::signal::ctrl_c() => break None,
            why = cluster.failed() => break Some(why),
            Some(restart) = fault => restart,
        };
        // This process is replaced by a fresh one, which (after a drill's
        // outage) starts from the data directory — whether or not skeinctl
        // is still there.
        let outage = match restart {
            Restart::Drill(outage) => {
                tracing::warn!(outage = ?outage, "down for a drill: restarting as after a crash");
                outage
            }
            Restart::Recover => {
                tracing::warn!("restarting to become the single voter of a new configuration");
                Duration::ZERO
            }
        };
        let back_at = crate::clock::now_ms() + outage.as_millis() as u64;
        let e = restart_after(back_at);
        // Only if the process could not be replaced: the same in-process.
        tracing::warn!(error = %e, "could not restart the process; halting in place");
        node.halt().await;
        tokio::select! {
            _ = tokio::time::sleep(outage) => {}
            _ = term.recv() => return Ok(()),
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
        node = Node::start(config.clone()).await?;
        tracing::warn!("back after the drill's outage");
    };
    if let Some(why) = &failed {
        // Crash-only: a node whose storage failed stops, and its supervisor
        // starts it again (recovering from what is on disk) once it can.
        tracing::error!(error = %why, "Raft stopped on a storage error; exiting");
    }
    node.shutdown(Duration::from_secs(if failed.is_some() { 1 } else { 10 }))
        .await;
    match failed {
        Some(why) => anyhow::bail!("storage failed, node stopped: {why}"),
        None => Ok(()),
    }
}

/// `GET /readyz` on the node's own metrics listener.
fn ready(config: &Config) -> ExitCode {
    let mut addr = config.metrics.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    let probe = || -> std::io::Result<String> {
        use std::io::{Read, Write};
        let timeout = Duration::from_secs(3);
        let mut s = std::net::TcpStream::connect_timeout(&addr, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.write_all(b"GET /readyz HTTP/1.0\r\nHost: skeind\r\n\r\n")?;
        let mut answer = String::new();
        s.take(4096).read_to_string(&mut answer)?;
        Ok(answer)
    };
    match probe() {
        Ok(a) if a.starts_with("HTTP/1.1 200") || a.starts_with("HTTP/1.0 200") => {
            println!("ready");
            ExitCode::SUCCESS
        }
        Ok(a) => {
            println!("not ready: {}", a.lines().next().unwrap_or(""));
            ExitCode::from(1)
        }
        Err(e) => {
            println!("not ready: http://{addr}/readyz: {e}");
            ExitCode::from(1)
        }
    }
}

fn init_logging(config: &Config) {
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("SKEIN_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .or_else(|| config.log_level.clone())
        .unwrap_or_else(|| "info,openraft=warn".to_string());
    let filter = EnvFilter::try_new(&filter).unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match config.log_format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

fn hash_password() -> ExitCode {
    let mut line = String::new();
    if std::io::stdin().read_line(&mut line).is_err() {
        eprintln!("skeind: cannot read the password from stdin");
        return ExitCode::from(2);
    }
    let password = line.trim_end_matches(['\r', '\n']);
    if password.is_empty() {
        eprintln!("skeind: empty password");
        return ExitCode::from(2);
    }
    match crate::smtp::hash_password(password) {
        Ok(h) => {
            println!("{h}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("skeind: {e}");
            ExitCode::FAILURE
        }
    }
}
