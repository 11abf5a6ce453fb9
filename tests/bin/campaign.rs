//! `skein-campaign`: the fault campaign. Real `skeind` processes on their
//! own addresses behind the test fabric, mail with a unique token and body
//! driven through all of them, a recording MTA behind, and faults from a
//! seeded schedule meanwhile: SIGKILL and restart, SIGSTOP pauses, graceful
//! restarts, an isolated leader or follower, a node that can send but not
//! receive, a majority paused at once, clocks offset between nodes (with
//! libfaketime). After the faults stop and the cluster heals, the checker
//! counts lost, phantom, corrupted and duplicate messages, availability and
//! takeover times, and exits 1 on any loss, phantom or corruption.
//!
//! `skein-campaign --seed 7 --duration 60s` (see `docs/reliability.md`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use skein_smtp::{EnhancedCode, Reply};
use skein_testkit::SinkMta;
use skein_tests::mail::example_org_dns;
use skein_tests::{dir_size, list_queue, send, status, wait_for_leader, ClusterPlan, ProcessNode};

#[derive(Debug, Parser)]
#[command(name = "skein-campaign")]
struct Args {
    /// Seeds the fault schedule, the clock offsets, the bodies and the load.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// How long faults are injected.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    duration: Duration,
    #[arg(long, default_value_t = 3)]
    nodes: u64,
    /// Concurrent senders.
    #[arg(long, default_value_t = 6)]
    workers: usize,
    /// Clock offsets are drawn from [-max, +max] (0: none). Needs libfaketime.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    max_clock_offset: Duration,
    /// The skeind binary (default: skeind-under-test next to this binary).
    #[arg(long)]
    skeind: Option<PathBuf>,
}

const FAKETIME_LIB: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    Kill,
    Pause,
    GracefulRestart,
    IsolateLeader,
    IsolateFollower,
    CanSendNotReceive,
    MajorityPaused,
    /// Every fsync of one node takes 100–600 ms longer.
    SlowDisk,
    /// One node's writes fail with ENOSPC; a node whose storage failed
    /// exits, and is started again once there is space (its supervisor's job).
    DiskFull,
}

const FAULTS: [Fault; 9] = [
    Fault::Kill,
    Fault::Pause,
    Fault::GracefulRestart,
    Fault::IsolateLeader,
    Fault::IsolateFollower,
    Fault::CanSendNotReceive,
    Fault::MajorityPaused,
    Fault::SlowDisk,
    Fault::DiskFull,
];

/// Set a node's disk fault through its control file (see `tests/faultfs`):
/// 0 none, 1 full, n ≥ 2 each fsync n ms slower.
fn set_disk(control: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    std::fs::OpenOptions::new()
        .write(true)
        .open(control)?
        .write_all_at(&mode.to_le_bytes(), 0)
}

/// One message submission: every node tried in turn, as an MTA with equal
/// MX records would, until one answers.
#[derive(Debug, Clone)]
struct Attempt {
    token: String,
    started: Instant,
    ended: Instant,
    accepted: bool,
    id: Option<String>,
}

struct Injected {
    fault: Fault,
    nodes: Vec<u64>,
    start: Instant,
    end: Instant,
    /// A killed node's leased messages at the kill (ids).
    leased: Vec<String>,
    /// The node stopped itself on the fault (a full disk) and was restarted.
    stopped: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("runtime");
    match rt.block_on(run(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("skein-campaign: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// A body of its own for every token: headers, then 0.5–16 KB of text
/// drawn from the token, so a body mixed up or cut short is caught.
fn body_for(token: &str) -> Vec<u8> {
    let mut h = 0xcbf29ce484222325u64;
    for b in token.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x100000001b3);
    }
    let mut rng = StdRng::seed_from_u64(h);
    let len = rng.random_range(500..16_000);
    let mut out = format!("Subject: {token}\r\nX-Token: {token}\r\n\r\n").into_bytes();
    let mut line = 0;
    while out.len() < len {
        out.push(rng.random_range(b'a'..=b'z'));
        line += 1;
        if line == 76 {
            out.extend_from_slice(b"\r\n");
            line = 0;
        }
    }
    out.extend_from_slice(b"\r\n");
    out
}

fn token_of(data: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(data);
    text.lines()
        .find_map(|l| l.strip_prefix("X-Token: "))
        .map(str::to_string)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

async fn run(args: Args) -> anyhow::Result<bool> {
    let skeind = match &args.skeind {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("skeind-under-test"),
    };
    anyhow::ensure!(
        skeind.exists(),
        "{} not found: build it first (cargo build -p skein-tests)",
        skeind.display()
    );
    let mut rng = StdRng::seed_from_u64(args.seed);
    let n = args.nodes;
    anyhow::ensure!(n >= 3, "a campaign needs at least 3 nodes");

    // Every 25th recipient is deferred once by the sink: retries run too.
    let rcpts = Arc::new(AtomicU64::new(0));
    let sink = SinkMta::builder()
        .on_rcpt(move |_| {
            if rcpts.fetch_add(1, Ordering::Relaxed) % 25 == 24 {
                Reply::new(451, Some(EnhancedCode::new(4, 3, 0)), "try again later")
            } else {
                Reply::new(250, Some(EnhancedCode::new(2, 1, 5)), "ok")
            }
        })
        .start()
        .await?;
    let dns = example_org_dns().await;
    let plan = ClusterPlan::new(n, dns.addr(), sink.addr().port(), |c| {
        c.lease = "3s".into();
        c.commit_timeout = "3s".into();
        c.retry_schedule = vec!["1s".into(), "2s".into()];
        c.snapshot_every = 2000;
    })
    .await?;

    let faketime = Path::new(FAKETIME_LIB).exists() && !args.max_clock_offset.is_zero();
    // Disk faults need the preload library built beside this binary.
    let faultfs = std::env::current_exe()?.with_file_name("libskein_faultfs.so");
    let disk_faults = faultfs.exists();
    let faults: Vec<Fault> = FAULTS
        .into_iter()
        .filter(|f| disk_faults || !matches!(f, Fault::SlowDisk | Fault::DiskFull))
        .collect();
    let mut controls: BTreeMap<u64, PathBuf> = BTreeMap::new();
    let mut offsets = BTreeMap::new();
    let mut nodes: BTreeMap<u64, ProcessNode> = BTreeMap::new();
    for c in &plan.configs {
        let mut env = Vec::new();
        let mut preload = Vec::new();
        if faketime {
            let max = args.max_clock_offset.as_millis() as i64;
            let off = rng.random_range(-max..=max);
            offsets.insert(c.node_id, off);
            preload.push(FAKETIME_LIB.to_string());
            env.extend([
                ("FAKETIME".to_string(), format!("{:+}", off as f64 / 1000.0)),
                ("FAKETIME_DONT_FAKE_MONOTONIC".to_string(), "1".to_string()),
                ("FAKETIME_DONT_RESET".to_string(), "1".to_string()),
            ]);
        }
        if disk_faults {
            let control = c.data_dir.with_file_name(format!("faultfs-{}", c.node_id));
            std::fs::write(&control, [0u8; 4096])?;
            preload.push(faultfs.to_string_lossy().into_owned());
            env.push((
                "SKEIN_FAULTFS".to_string(),
                control.to_string_lossy().into_owned(),
            ));
            env.push((
                "SKEIN_FAULTFS_DIR".to_string(),
                c.data_dir.to_string_lossy().into_owned(),
            ));
            controls.insert(c.node_id, control);
        }
        if !preload.is_empty() {
            env.push(("LD_PRELOAD".to_string(), preload.join(":")));
        }
        let node = ProcessNode::start_with_env(&skeind.to_string_lossy(), c.clone(), env)?;
        nodes.insert(c.node_id, node);
    }
    for node in nodes.values() {
        node.wait_ready(Duration::from_secs(30)).await?;
    }
    let admins = plan.admins();
    wait_for_leader(&admins, Duration::from_secs(30)).await?;
    let admin_of = |id: u64| plan.config(id).admin_addr();
    let start_sizes: BTreeMap<u64, u64> = plan
        .configs
        .iter()
        .map(|c| (c.node_id, dir_size(&c.data_dir)))
        .collect();
    println!(
        "campaign: seed {}, {} nodes, {} senders, faults for {}, clock offsets {}, disk faults {}",
        args.seed,
        n,
        args.workers,
        humantime::format_duration(args.duration),
        if faketime {
            format!("{offsets:?} ms")
        } else {
            "off (no libfaketime)".into()
        },
        if disk_faults {
            "on"
        } else {
            "off (no libskein_faultfs.so)"
        }
    );

    // The load.
    let stop = Arc::new(AtomicBool::new(false));
    let attempts: Arc<Mutex<Vec<Attempt>>> = Arc::default();
    let smtp: Vec<SocketAddr> = plan.configs.iter().map(|c| c.smtp).collect();
    let mut senders = Vec::new();
    for w in 0..args.workers {
        let (stop, attempts, smtp) = (stop.clone(), attempts.clone(), smtp.clone());
        let seed = args.seed;
        let mut wrng = StdRng::seed_from_u64(args.seed ^ ((w as u64 + 1) * 0x9e37_79b9));
        senders.push(tokio::spawn(async move {
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let token = format!("s{seed}-w{w}-m{k}");
                k += 1;
                let body = body_for(&token);
                let first = wrng.random_range(0..smtp.len());
                let started = Instant::now();
                let mut outcome = (false, None);
                for i in 0..smtp.len() {
                    let target = smtp[(first + i) % smtp.len()];
                    let r = tokio::time::timeout(
                        Duration::from_secs(10),
                        send(target, "campaign@client.test", &["rcpt@example.org"], &body),
                    )
                    .await;
                    match r {
                        Ok(Ok(s)) if s.accepted() => {
                            outcome = (true, s.id.map(|id| id.to_string()));
                            break;
                        }
                        // Refused or unreachable: the next MX, as an MTA would.
                        _ => continue,
                    }
                }
                attempts.lock().unwrap().push(Attempt {
                    token,
                    started,
                    ended: Instant::now(),
                    accepted: outcome.0,
                    id: outcome.1,
                });
                if !outcome.0 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }));
    }

    // Memory, sampled while everything runs.
    let rss: Arc<Mutex<BTreeMap<u64, u64>>> = Arc::default();
    let disk: Arc<Mutex<BTreeMap<u64, u64>>> = Arc::default();
    let dirs: Vec<(u64, PathBuf)> = plan
        .configs
        .iter()
        .map(|c| (c.node_id, c.data_dir.clone()))
        .collect();
    let nodes = Arc::new(tokio::sync::Mutex::new(nodes));
    let sampler = {
        let (rss, disk, nodes) = (rss.clone(), disk.clone(), nodes.clone());
        tokio::spawn(async move {
            loop {
                for (id, dir) in &dirs {
                    let size = dir_size(dir);
                    let mut m = disk.lock().unwrap();
                    let e = m.entry(*id).or_insert(0);
                    *e = (*e).max(size);
                }
                for (id, node) in nodes.lock().await.iter() {
                    if let Some(kib) = node.rss_kib() {
                        let mut m = rss.lock().unwrap();
                        let e = m.entry(*id).or_insert(0);
                        *e = (*e).max(kib);
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };

    // The faults.
    let ids: Vec<u64> = plan.ids();
    let mut injected: Vec<Injected> = Vec::new();
    let began = Instant::now();
    while began.elapsed() < args.duration {
        tokio::time::sleep(Duration::from_millis(rng.random_range(1000..3000))).await;
        let fault = faults[rng.random_range(0..faults.len())];
        let hold = Duration::from_millis(rng.random_range(1500..6000));
        let leader = status(admin_of(ids[0]))
            .await
            .map(|s| s.leader)
            .unwrap_or(0);
        let leader = if ids.contains(&leader) {
            leader
        } else {
            ids[0]
        };
        let follower = *ids
            .iter()
            .filter(|&&i| i != leader)
            .nth(rng.random_range(0..ids.len() - 1))
            .unwrap();
        let any = ids[rng.random_range(0..ids.len())];
        let mut record = Injected {
            fault,
            nodes: Vec::new(),
            start: Instant::now(),
            end: Instant::now(),
            leased: Vec::new(),
            stopped: false,
        };
        match fault {
            Fault::Kill => {
                let other = *ids.iter().find(|&&i| i != any).unwrap();
                record.leased = list_queue(admin_of(other), "leased")
                    .await
                    .map(|q| {
                        q.into_iter()
                            .filter(|m| m.owner == any)
                            .map(|m| m.id)
                            .collect()
                    })
                    .unwrap_or_default();
                record.nodes = vec![any];
                record.start = Instant::now();
                nodes.lock().await.get_mut(&any).unwrap().kill9();
                tokio::time::sleep(hold).await;
                nodes.lock().await.get_mut(&any).unwrap().start_again()?;
            }
            Fault::Pause => {
                record.nodes = vec![any];
                record.start = Instant::now();
                nodes.lock().await[&any].pause();
                tokio::time::sleep(hold).await;
                nodes.lock().await[&any].resume();
            }
            Fault::GracefulRestart => {
                record.nodes = vec![any];
                record.start = Instant::now();
                let mut all = nodes.lock().await;
                let node = all.get_mut(&any).unwrap();
                let _ = node.terminate();
                node.start_again()?;
            }
            Fault::IsolateLeader | Fault::IsolateFollower => {
                let victim = if fault == Fault::IsolateLeader {
                    leader
                } else {
                    follower
                };
                record.nodes = vec![victim];
                record.start = Instant::now();
                plan.fabric.isolate(victim, &ids);
                tokio::time::sleep(hold).await;
                plan.fabric.heal();
            }
            Fault::CanSendNotReceive => {
                record.nodes = vec![any];
                record.start = Instant::now();
                for &o in ids.iter().filter(|&&o| o != any) {
                    plan.fabric.block(o, any);
                }
                tokio::time::sleep(hold).await;
                plan.fabric.heal();
            }
            Fault::SlowDisk => {
                record.nodes = vec![any];
                record.start = Instant::now();
                set_disk(&controls[&any], rng.random_range(100..600))?;
                tokio::time::sleep(hold).await;
                set_disk(&controls[&any], 0)?;
            }
            Fault::DiskFull => {
                record.nodes = vec![any];
                record.start = Instant::now();
                set_disk(&controls[&any], 1)?;
                tokio::time::sleep(hold).await;
                set_disk(&controls[&any], 0)?;
                // A node that stopped on the failed writes may still be on
                // its way out: give it a moment, then start it again.
                let until = Instant::now() + Duration::from_secs(3);
                loop {
                    let mut all = nodes.lock().await;
                    let node = all.get_mut(&any).unwrap();
                    if !node.is_running() {
                        record.stopped = true;
                        node.start_again()?;
                        break;
                    }
                    drop(all);
                    if Instant::now() > until {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            Fault::MajorityPaused => {
                let mut victims = ids.clone();
                while victims.len() > ids.len() / 2 + 1 {
                    victims.remove(rng.random_range(0..victims.len()));
                }
                record.nodes = victims.clone();
                record.start = Instant::now();
                let hold = hold.min(Duration::from_secs(3));
                for v in &victims {
                    nodes.lock().await[v].pause();
                }
                tokio::time::sleep(hold).await;
                for v in &victims {
                    nodes.lock().await[v].resume();
                }
            }
        }
        record.end = Instant::now();
        println!(
            "  {:>6.1}s {:?} on {:?} for {:.1}s{}",
            (record.start - began).as_secs_f64(),
            record.fault,
            record.nodes,
            (record.end - record.start).as_secs_f64(),
            if record.stopped {
                " (the node stopped on it and was started again)"
            } else {
                ""
            }
        );
        injected.push(record);
    }

    // Heal: every node up, connected, one leader.
    let faults_over = Instant::now();
    plan.fabric.heal();
    for node in nodes.lock().await.values_mut() {
        node.resume();
        if !node.is_running() {
            node.start_again()?;
        }
    }
    for node in nodes.lock().await.values() {
        node.wait_ready(Duration::from_secs(30)).await?;
    }
    if let Err(e) = wait_for_leader(&admins, Duration::from_secs(30)).await {
        // What each node believes, and what it logged last: enough to see
        // why the cluster did not settle.
        for (id, node) in nodes.lock().await.iter() {
            match status(plan.config(*id).admin_addr()).await {
                Ok(s) => eprintln!("node {id}: leader {}, term {}", s.leader, s.term),
                Err(e) => eprintln!("node {id}: no status: {e}"),
            }
            let log = node.log();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("--- node {id}, last log lines");
            for l in tail.into_iter().rev() {
                eprintln!("{l}");
            }
        }
        return Err(e);
    }
    let healed = faults_over.elapsed();
    // A little clean load after the storm, then stop sending.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    for s in senders {
        let _ = s.await;
    }
    let attempts = attempts.lock().unwrap().clone();
    let acked: Vec<&Attempt> = attempts.iter().filter(|a| a.accepted).collect();

    // Everything acknowledged must arrive; then the queues must empty.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let got: HashSet<String> = sink
            .messages()
            .iter()
            .filter_map(|m| token_of(&m.data))
            .collect();
        if acked.iter().all(|a| got.contains(&a.token)) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let drain_deadline = Instant::now() + Duration::from_secs(60);
    let mut drained = false;
    while Instant::now() < drain_deadline {
        let mut empty = true;
        for a in &admins {
            match status(*a).await {
                Ok(s) if s.queue.as_ref().is_some_and(|q| q.messages == 0) => {}
                _ => empty = false,
            }
        }
        if empty {
            drained = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    sampler.abort();

    // The checker.
    let sent: HashMap<&str, &Attempt> = attempts.iter().map(|a| (a.token.as_str(), a)).collect();
    let received = sink.messages();
    let mut deliveries: HashMap<String, Vec<Instant>> = HashMap::new();
    let mut phantom = Vec::new();
    let mut corrupted = Vec::new();
    for m in &received {
        let Some(token) = token_of(&m.data) else {
            phantom.push("(no token)".to_string());
            continue;
        };
        if !sent.contains_key(token.as_str()) {
            phantom.push(token.clone());
            continue;
        }
        if !m.data.ends_with(&body_for(&token)) {
            corrupted.push(token.clone());
        }
        deliveries.entry(token).or_default().push(m.at);
    }
    let lost: Vec<&str> = acked
        .iter()
        .filter(|a| !deliveries.contains_key(&a.token))
        .map(|a| a.token.as_str())
        .collect();
    let distinct = deliveries.len();
    let duplicates: usize = deliveries.values().map(|v| v.len() - 1).sum();
    let unacked_delivered = deliveries
        .keys()
        .filter(|t| sent.get(t.as_str()).is_some_and(|a| !a.accepted))
        .count();

    // Availability: submissions that began and ended while a majority of
    // nodes was up (not killed, paused or cut off).
    let majority = (n / 2 + 1) as usize;
    let majority_down: Vec<(Instant, Instant)> = injected
        .iter()
        .filter(|f| ids.len() - f.nodes.len() < majority)
        .map(|f| (f.start, f.end))
        .collect();
    let during_majority: Vec<&Attempt> = attempts
        .iter()
        .filter(|a| {
            !majority_down
                .iter()
                .any(|(s, e)| a.started < *e && a.ended > *s)
        })
        .collect();
    let available = during_majority.iter().filter(|a| a.accepted).count();

    // Takeover: for each killed lease holder, from the kill to the first
    // delivery after it of each message it held.
    let token_of_id: HashMap<&str, &str> = attempts
        .iter()
        .filter_map(|a| Some((a.id.as_deref()?, a.token.as_str())))
        .collect();
    let mut takeovers = Vec::new();
    for f in injected
        .iter()
        .filter(|f| f.fault == Fault::Kill && !f.leased.is_empty())
    {
        let times: Vec<Duration> = f
            .leased
            .iter()
            .filter_map(|id| token_of_id.get(id.as_str()))
            .filter_map(|t| deliveries.get(*t))
            .filter_map(|at| at.iter().filter(|&&x| x > f.start).min())
            .map(|at| *at - f.start)
            .collect();
        if let Some(max) = times.iter().max() {
            takeovers.push((f.nodes[0], f.leased.len(), *max));
        }
    }

    // Soak: quiet nodes compact (a snapshot, a log purge, body segments
    // unlinked). The end size is taken once no data directory has changed
    // for 15 s (at most 90 s after the queues drained).
    let sizes = || -> BTreeMap<u64, u64> {
        plan.configs
            .iter()
            .map(|c| (c.node_id, dir_size(&c.data_dir)))
            .collect()
    };
    let settle_start = Instant::now();
    let mut end_sizes = sizes();
    let mut changed = Instant::now();
    while changed.elapsed() < Duration::from_secs(15)
        && settle_start.elapsed() < Duration::from_secs(90)
    {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = sizes();
        if now != end_sizes {
            end_sizes = now;
            changed = Instant::now();
        }
    }
    let settled = changed.duration_since(settle_start);
    let mut counts: BTreeMap<Fault, usize> = BTreeMap::new();
    for f in &injected {
        *counts.entry(f.fault).or_default() += 1;
    }

    println!("\n| measure | value |\n|---|---|");
    println!("| seed | {} |", args.seed);
    println!("| nodes | {n} |");
    println!(
        "| faults injected | {} ({}) |",
        injected.len(),
        counts
            .iter()
            .map(|(f, c)| format!("{f:?} {c}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "| clock offsets (ms) | {} |",
        if faketime {
            format!("{offsets:?}")
        } else {
            "none".into()
        }
    );
    println!("| submissions | {} |", attempts.len());
    println!("| acknowledged (250) | {} |", acked.len());
    println!("| **lost** | **{}** |", lost.len());
    println!("| **phantom** | **{}** |", phantom.len());
    println!("| **corrupted** | **{}** |", corrupted.len());
    println!("| delivered distinct | {distinct} (of them not acknowledged: {unacked_delivered}) |");
    println!(
        "| duplicate deliveries | {duplicates} ({:.2} %) |",
        100.0 * duplicates as f64 / distinct.max(1) as f64
    );
    println!(
        "| availability with a majority up | {:.1} % ({available} of {}) |",
        100.0 * available as f64 / during_majority.len().max(1) as f64,
        during_majority.len()
    );
    for (node, held, t) in &takeovers {
        println!(
            "| takeover after killing node {node} ({held} leased) | {:.1} s |",
            t.as_secs_f64()
        );
    }
    println!(
        "| healed after the last fault | {:.1} s |",
        healed.as_secs_f64()
    );
    println!("| queues empty at the end | {drained} |");
    println!(
        "| data directories settled after the drain | {:.0} s |",
        settled.as_secs_f64()
    );
    for c in &plan.configs {
        let id = c.node_id;
        println!(
            "| node {id}: data dir start → peak → end; peak RSS | {} → {} → {}; {} |",
            mib(start_sizes[&id]),
            mib(disk.lock().unwrap().get(&id).copied().unwrap_or(0)),
            mib(end_sizes[&id]),
            mib(rss.lock().unwrap().get(&id).copied().unwrap_or(0) * 1024)
        );
    }
    if std::env::var_os("CAMPAIGN_SHOW_FILES").is_some() {
        let dir = &plan.configs[0].data_dir;
        let mut files = Vec::new();
        let mut stack = vec![dir.clone()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d)?.flatten() {
                let m = e.metadata()?;
                if m.is_dir() {
                    stack.push(e.path());
                } else {
                    files.push((e.path(), m.len()));
                }
            }
        }
        for (p, len) in files {
            println!(
                "{:>12} {}",
                len,
                p.strip_prefix(dir).unwrap_or(&p).display()
            );
        }
    }
    if !lost.is_empty() {
        println!("\nlost: {:?}", &lost[..lost.len().min(20)]);
        for node in nodes.lock().await.values() {
            let log = node.log();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            println!(
                "--- node {} log tail ---\n{}",
                node.config.node_id,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }
    if !phantom.is_empty() {
        println!("phantom: {:?}", &phantom[..phantom.len().min(20)]);
    }
    if !corrupted.is_empty() {
        println!("corrupted: {:?}", &corrupted[..corrupted.len().min(20)]);
    }
    let ok = lost.is_empty() && phantom.is_empty() && corrupted.is_empty();
    println!(
        "\n{}",
        if ok {
            "PASS: no acknowledged message lost, none invented, none corrupted"
        } else {
            "FAIL"
        }
    );
    for node in nodes.lock().await.values_mut() {
        let _ = node.terminate();
    }
    Ok(ok)
}
