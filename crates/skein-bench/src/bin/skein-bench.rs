//! `skein-bench`: start Skein clusters of release `skeind` processes on this
//! machine with a real DNS server and a receiving MTA, drive load at every
//! node, and print accepted messages/s, acceptance latency, end-to-end
//! throughput and memory per node.
//!
//! ```sh
//! cargo build --release -p skein-node -p skein-bench
//! target/release/skein-bench --nodes 1 --nodes 3 --sessions 50 --messages 5000 --size 10240
//! ```

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use skein_bench::load::{ms, run, LoadSpec};
use skein_testkit::{DnsServer, SinkMta};
use skein_tests::{dir_size, wait_for_leader, ProcessNode, TestConfig};

#[derive(Parser)]
#[command(name = "skein-bench", about = "Measure Skein clusters on this machine")]
struct Args {
    /// Cluster sizes to measure (repeat).
    #[arg(long = "nodes", default_values_t = vec![1, 3])]
    nodes: Vec<u64>,
    #[arg(long, default_value_t = 50)]
    sessions: usize,
    #[arg(long, default_value_t = 5000)]
    messages: usize,
    #[arg(long, default_value_t = 10_240)]
    size: usize,
    /// The skeind binary (default: next to this one).
    #[arg(long)]
    skeind: Option<PathBuf>,
    /// Print one JSON object per cluster size.
    #[arg(long)]
    json: bool,
    /// Keep the whole load queued (the receiving MTA defers every
    /// recipient, the next retry is an hour away) and report each node's
    /// memory and disk with it queued.
    #[arg(long)]
    hold: bool,
    /// Instead: kill the leader of a fresh 3-node cluster (default Raft
    /// timings) under load this many times and print, for each run, how
    /// soon a survivor answered 250 again.
    #[arg(long)]
    failover: Option<usize>,
    /// Sessions per node during `--failover`.
    #[arg(long, default_value_t = 8)]
    failover_sessions: usize,
    /// Instead: clusters spread over sites (3 voters and 2 learners at a
    /// second site; voters over 2 sites; over 3), with these round trips
    /// between sites, in ms (repeat).
    #[arg(long)]
    placement: bool,
    #[arg(long = "rtt-ms", default_values_t = vec![1, 10, 40])]
    rtt_ms: Vec<u64>,
    /// Instead: time syncs of appended records in a file under this
    /// directory, on a file that grows, over zeros, over fallocate'd space
    /// (what spare segments of zeros would buy on that file system).
    #[arg(long)]
    sync: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    if let Some(dir) = &a.sync {
        return syncs(dir);
    }
    let skeind = match &a.skeind {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("skeind"),
    };
    anyhow::ensure!(
        skeind.exists(),
        "{} not found: cargo build --release -p skein-node",
        skeind.display()
    );
    if let Some(runs) = a.failover {
        return failovers(&a, &skeind, runs).await;
    }
    if a.placement {
        return placements(&a, &skeind).await;
    }
    if !a.json {
        println!(
            "{} sessions, {} messages of {} bytes, every message replicated to a majority before its 250\n",
            a.sessions, a.messages, a.size
        );
        println!(
            "{:>5} | {:>12} | {:>8} | {:>8} | {:>8} | {:>14} | {:>12}",
            "nodes", "accepted/s", "p50 ms", "p99 ms", "max ms", "end-to-end/s", "max RSS MiB"
        );
    }
    for n in &a.nodes {
        measure(&a, &skeind, *n).await?;
    }
    Ok(())
}

async fn failovers(a: &Args, skeind: &std::path::Path, runs: usize) -> anyhow::Result<()> {
    println!(
        "3 nodes at default Raft timings, {} sessions per node, {} bytes per message; the leader is SIGKILLed after 3 s\n",
        a.failover_sessions, a.size
    );
    let mut resumed = Vec::new();
    for i in 1..=runs {
        let r = skein_bench::failover::run_once(skeind, a.failover_sessions, a.size).await?;
        println!(
            "run {i}: first 250 from a survivor {:>4} ms after the kill ({} accepted before it, {} leader changes before it)",
            r.resumed.as_millis(),
            r.accepted_before,
            r.elections_before
        );
        resumed.push(r.resumed);
    }
    resumed.sort();
    println!(
        "\nmedian {} ms, min {} ms, max {} ms over {runs} runs",
        resumed[resumed.len() / 2].as_millis(),
        resumed[0].as_millis(),
        resumed[resumed.len() - 1].as_millis()
    );
    Ok(())
}

fn syncs(dir: &std::path::Path) -> anyhow::Result<()> {
    let (record, count) = (20_480, 1000);
    println!(
        "{count} appends of {record} bytes, each synced, in {}\n",
        dir.display()
    );
    println!("| under the appends | wall per sync | CPU per sync |");
    println!("|---|---:|---:|");
    for round in 0..2 {
        for under in skein_bench::sync::ALL {
            let c = skein_bench::sync::measure(dir, under, record, count)?;
            println!(
                "| {under:?} (round {}) | {} µs | {} µs |",
                round + 1,
                c.wall.as_micros(),
                c.cpu.as_micros()
            );
        }
    }
    Ok(())
}

async fn placements(a: &Args, skeind: &std::path::Path) -> anyhow::Result<()> {
    let rate = 100.0;
    println!(
        "release skeind at default settings; SMTP clients local to the voters they send to; \
         throughput: {} sessions, {} messages of {} bytes; latency: {rate} messages/s for 10 s\n",
        a.sessions, a.messages, a.size
    );
    println!(
        "| layout | RTT between sites | leader at | accepted/s | p50 ms at {rate}/s | p99 ms at {rate}/s |"
    );
    println!("|---|---:|---|---:|---:|---:|");
    let bin = skeind.to_str().expect("utf-8 path");
    for layout in skein_bench::placement::LAYOUTS {
        for rtt in &a.rtt_ms {
            let m = skein_bench::placement::measure(
                bin,
                layout,
                Duration::from_millis(*rtt),
                a.sessions,
                a.messages,
                a.size,
                rate,
            )
            .await?;
            println!(
                "| {} | {rtt} ms | {} | {:.0} | {} | {} |",
                layout.name,
                m.leader_site,
                m.throughput.rate(),
                ms(m.latency.percentile(50.0)),
                ms(m.latency.percentile(99.0)),
            );
        }
    }
    Ok(())
}

async fn measure(a: &Args, skeind: &std::path::Path, n: u64) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let dns = DnsServer::builder()
        .mx("example.org", 10, "mx.example.org")
        .a("mx.example.org", Ipv4Addr::LOCALHOST)
        .start()
        .await?;
    // A receiving MTA as today's large ones are: PIPELINING and CHUNKING.
    let mut sink = SinkMta::builder().chunking().forget_commands();
    if a.hold {
        sink = sink.defer_all();
    }
    let sink = sink.start().await?;
    let mut configs: Vec<TestConfig> = (1..=n)
        .map(|id| {
            let mut c = TestConfig::new(
                id,
                dir.path().join(format!("node{id}")),
                dns.addr(),
                sink.port(),
            )
            .with_fixed_ports();
            c.lease = "30s".into();
            // The product's Raft timings and commit timeout, not the
            // tests' quick ones.
            c.raft_timings = None;
            c.commit_timeout = "10s".into();
            if a.hold {
                // A queue at rest, as between retries: the test kit's
                // one-second retries would have every node claiming and
                // re-sending the whole queue all through the measurement.
                c.retry_schedule = vec!["1h".into()];
            }
            c
        })
        .collect();
    if n > 1 {
        let peers: Vec<(u64, SocketAddr)> =
            configs.iter().map(|c| (c.node_id, c.cluster)).collect();
        for c in &mut configs {
            c.peers = peers.clone();
        }
    }
    let bin = skeind.to_str().expect("utf-8 path");
    let nodes = ProcessNode::start_all(bin, &configs).await?;
    let admins: Vec<SocketAddr> = configs.iter().map(|c| c.cluster).collect();
    wait_for_leader(&admins, Duration::from_secs(30)).await?;

    let changes_at_start = skein_bench::failover::leader_changes(&configs).await;
    let started = Instant::now();
    let report = run(LoadSpec {
        targets: configs.iter().map(|c| c.smtp).collect(),
        sessions: a.sessions,
        messages: a.messages,
        size: a.size,
        from: "load@bench.test".into(),
        rcpt: "sink@example.org".into(),
        rate: None,
    })
    .await?;
    if a.hold {
        return report_held(&report, &nodes, &configs, n).await;
    }
    // End to end: first byte sent to the last accepted message at the sink.
    let deadline = Instant::now() + Duration::from_secs(300);
    while sink.message_count() < report.accepted && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let delivered = sink.message_count();
    let e2e = delivered as f64 / started.elapsed().as_secs_f64();
    // A busy machine must not cost elections: each is a pause in commits.
    let elections = skein_bench::failover::leader_changes(&configs).await - changes_at_start;
    let rss = nodes
        .iter()
        .filter_map(|p| p.pid())
        .filter_map(max_rss_mib)
        .fold(0.0, f64::max);
    for mut node in nodes {
        let _ = node.terminate();
    }
    if a.json {
        let mut j = report.json();
        j["nodes"] = n.into();
        j["delivered"] = delivered.into();
        j["end_to_end_per_second"] = e2e.into();
        j["max_rss_mib"] = rss.into();
        j["leader_changes"] = elections.into();
        println!("{j}");
    } else {
        println!(
            "{:>5} | {:>12.0} | {:>8} | {:>8} | {:>8} | {:>14.0} | {:>12.1}",
            n,
            report.rate(),
            ms(report.percentile(50.0)),
            ms(report.percentile(99.0)),
            ms(report.percentile(100.0)),
            e2e,
            rss
        );
        if elections > 0.0 {
            println!("      ({elections} leader changes during the run)");
        }
        if report.refused + report.errors > 0 || delivered < report.accepted {
            println!(
                "      ({} refused, {} session errors, {} of {} accepted delivered)",
                report.refused, report.errors, delivered, report.accepted
            );
        }
    }
    Ok(())
}

/// With `--hold`: every accepted message is still queued; report each
/// node's resident memory (now and peak) and data directory.
async fn report_held(
    report: &skein_bench::load::LoadReport,
    nodes: &[ProcessNode],
    configs: &[TestConfig],
    n: u64,
) -> anyhow::Result<()> {
    // Let the first delivery attempts finish (each is deferred).
    tokio::time::sleep(Duration::from_secs(5)).await;
    println!(
        "{n} node(s): {} messages accepted and held in the queue ({} refused, {} errors)",
        report.accepted, report.refused, report.errors
    );
    let admins: Vec<SocketAddr> = configs.iter().map(|c| c.cluster).collect();
    let leader = wait_for_leader(&admins, Duration::from_secs(10)).await.ok();
    for (node, c) in nodes.iter().zip(configs) {
        let pid = node.pid().unwrap_or(0);
        println!(
            "  node {}{}: RSS {:.1} MiB now, {:.1} MiB peak; data dir {:.1} MiB",
            c.node_id,
            if leader == Some(c.node_id) {
                " (leader)"
            } else {
                ""
            },
            proc_mib(pid, "VmRSS:").unwrap_or(0.0),
            proc_mib(pid, "VmHWM:").unwrap_or(0.0),
            dir_size(&c.data_dir) as f64 / (1 << 20) as f64
        );
    }
    // The caller drops the nodes, which stops them.
    Ok(())
}

/// Peak resident memory of a process, from /proc.
fn max_rss_mib(pid: u32) -> Option<f64> {
    proc_mib(pid, "VmHWM:")
}

/// A memory figure of a process from /proc, in MiB.
fn proc_mib(pid: u32, field: &str) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = s
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}
