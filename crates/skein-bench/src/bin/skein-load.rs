//! `skein-load`: drive SMTP load at one or more servers and report accepted
//! messages per second and acceptance latency (end of DATA to 250).

use std::net::SocketAddr;

use clap::Parser;
use skein_bench::load::{ms, run, LoadSpec};

#[derive(Parser)]
#[command(name = "skein-load", about = "SMTP load generator")]
struct Args {
    /// SMTP server HOST:PORT; repeat to spread sessions over several nodes.
    #[arg(long = "target", required = true)]
    targets: Vec<SocketAddr>,
    /// Concurrent sessions.
    #[arg(long, default_value_t = 50)]
    sessions: usize,
    /// Messages in all.
    #[arg(long, default_value_t = 10_000)]
    messages: usize,
    /// Message size in bytes.
    #[arg(long, default_value_t = 10_240)]
    size: usize,
    #[arg(long, default_value = "load@bench.test")]
    from: String,
    #[arg(long, default_value = "sink@example.org")]
    rcpt: String,
    /// Offered load in messages per second over all sessions (open loop);
    /// without it each session sends as fast as it is answered.
    #[arg(long)]
    rate: Option<f64>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Write every accepted message to this file, one line each in the
    /// order of time: seconds since the start at its end of DATA, latency
    /// in ms, and the index of its target.
    #[arg(long)]
    timeline: Option<std::path::PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let r = run(LoadSpec {
        targets: a.targets,
        sessions: a.sessions,
        messages: a.messages,
        size: a.size,
        from: a.from,
        rcpt: a.rcpt,
        rate: a.rate,
    })
    .await?;
    if let Some(path) = &a.timeline {
        use std::fmt::Write;
        let mut out = String::new();
        for s in &r.timeline {
            let _ = writeln!(
                out,
                "{:.4} {} {}",
                s.at.as_secs_f64(),
                ms(s.latency),
                s.target
            );
        }
        std::fs::write(path, out)?;
    }
    if a.json {
        println!("{}", r.json());
    } else {
        println!(
            "accepted {} refused {} errors {} in {:.2}s: {:.0} msg/s; latency p50 {} ms, p99 {} ms, max {} ms",
            r.accepted,
            r.refused,
            r.errors,
            r.elapsed.as_secs_f64(),
            r.rate(),
            ms(r.percentile(50.0)),
            ms(r.percentile(99.0)),
            ms(r.percentile(100.0))
        );
    }
    Ok(())
}
