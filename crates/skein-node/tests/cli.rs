//! The `skeind` command line: check-config and a clean start and stop.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn skeind() -> Command {
    Command::new(env!("CARGO_BIN_EXE_skeind"))
}

fn port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn check_config_accepts_a_valid_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("skein.toml");
    std::fs::write(
        &path,
        "node_id = 3\n[smtp]\nlisten = [\"127.0.0.1:2526\"]\n",
    )
    .unwrap();
    let out = skeind()
        .arg("check-config")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("valid"));
}

#[test]
fn check_config_lists_every_problem_with_its_key_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("skein.toml");
    std::fs::write(
        &path,
        "node_id = 0\ncolour = 1\n[delivery]\nlease = \"forever\"\n[smtp]\nlisten = [\"x\"]\n",
    )
    .unwrap();
    let out = skeind()
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for key in ["node_id:", "colour:", "delivery.lease:", "smtp.listen[0]:"] {
        assert!(err.contains(key), "{key} missing from:\n{err}");
    }
    // SKEIN_CONFIG works too, and a missing file is a clear error.
    let out = skeind()
        .arg("check-config")
        .env("SKEIN_CONFIG", dir.path().join("nope.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));
}

#[test]
fn starts_prints_where_it_listens_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let (smtp, cluster, metrics) = (port(), port(), port());
    let path = dir.path().join("skein.toml");
    std::fs::write(
        &path,
        format!(
            "data_dir = {:?}\n[smtp]\nlisten = [\"127.0.0.1:{smtp}\"]\n[cluster]\nlisten = \"127.0.0.1:{cluster}\"\n[metrics]\nlisten = \"127.0.0.1:{metrics}\"\n",
            dir.path().join("data").display().to_string()
        ),
    )
    .unwrap();
    let ready = || {
        skeind()
            .arg("ready")
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap()
    };
    let down = ready();
    assert_eq!(down.status.code(), Some(1), "ready with nothing running");
    assert!(String::from_utf8_lossy(&down.stdout).contains("not ready"));
    let mut child = skeind()
        .arg("--config")
        .arg(&path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut banner = String::new();
    while let Some(Ok(l)) = lines.next() {
        banner.push_str(&l);
        banner.push('\n');
        if l.contains("skeinctl authenticates") {
            break;
        }
    }
    assert!(banner.contains(&format!("127.0.0.1:{smtp}")), "{banner}");
    assert!(banner.contains(&format!("127.0.0.1:{cluster}")), "{banner}");
    assert!(banner.contains("admin.token"), "{banner}");
    let token = std::fs::read_to_string(dir.path().join("data/admin.token")).unwrap();
    assert_eq!(token.trim().len(), 32);
    // Least privilege: the queue and the token are the node user's alone.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir.path().join("data")), 0o700);
    assert_eq!(mode(&dir.path().join("data/admin.token")), 0o600);
    // The container health check turns healthy once the node is ready.
    let deadline = Instant::now() + Duration::from_secs(20);
    while ready().status.code() != Some(0) {
        assert!(Instant::now() < deadline, "skeind ready never succeeded");
        std::thread::sleep(Duration::from_millis(100));
    }

    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "skeind did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
}
