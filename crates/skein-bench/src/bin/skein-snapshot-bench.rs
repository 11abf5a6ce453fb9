//! `skein-snapshot-bench`: a queue of gigabytes through a snapshot. Fills
//! one store with `--gib` of queued mail, builds its snapshot, streams it in
//! 4 MiB chunks into a second store (as openraft does for a follower) and
//! installs it, printing the time of each step and this process's peak
//! memory, which must stay far below the queue size.
//!
//! ```sh
//! cargo build --release -p skein-bench
//! target/release/skein-snapshot-bench --gib 2
//! ```

use std::time::Instant;

use bytes::Bytes;
use clap::Parser;
use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};
use skein_queue::{Command, MessageId, NewMessage, NewRecipient, Request};
use skein_smtp::{MailParams, Mailbox, RcptParams, ReversePath};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Parser)]
struct Args {
    /// Queue size in GiB.
    #[arg(long, default_value_t = 1.0)]
    gib: f64,
    /// Body size of each message in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    body: usize,
    /// Where the two stores live (default: a temporary directory).
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
}

fn peak_rss_mib() -> f64 {
    proc_status_mib("VmHWM:")
}

fn rss_mib() -> f64 {
    proc_status_mib("VmRSS:")
}

fn proc_status_mib(key: &str) -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let tmp = tempfile::tempdir()?;
    let base = a.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    let mut leader = skein_queue::open(&base.join("a"))?;
    let mut follower = skein_queue::open(&base.join("b"))?;
    let count = ((a.gib * (1u64 << 30) as f64) / a.body as f64).ceil() as u64;
    let body = Bytes::from(vec![b'x'; a.body]);
    let rcpt = Mailbox::parse("rcpt@example.org").map_err(|e| anyhow::anyhow!("{e:?}"))?;

    let t = Instant::now();
    for i in 0..count {
        let req = Request {
            now: 1_000 + i,
            cmd: Command::Enqueue(NewMessage {
                id: MessageId(i as u128 + 1),
                sender: ReversePath::Null,
                recipients: vec![NewRecipient {
                    address: rcpt.clone(),
                    params: RcptParams::default(),
                }],
                params: MailParams::default(),
                body: body.clone(),
                owner: 1,
                lease_ms: 30_000,
            }),
        };
        let e = Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), i + 1),
            payload: EntryPayload::Normal(req),
        };
        leader.state_machine.apply(vec![e]).await?;
        // A node flushes with every batch of log appends; do the same.
        if i % 32 == 31 {
            leader.reader.flush()?;
        }
    }
    println!(
        "queued {count} messages of {} bytes ({:.2} GiB) in {:.1?}",
        a.body,
        a.gib,
        t.elapsed()
    );
    println!("  memory now {:.0} MiB", rss_mib());

    let t = Instant::now();
    let snap = leader
        .state_machine
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await?;
    let mut src = leader
        .state_machine
        .get_current_snapshot()
        .await?
        .expect("snapshot")
        .snapshot;
    let size = src.metadata().await?.len();
    println!(
        "built a snapshot of {:.2} GiB in {:.1?}",
        size as f64 / (1u64 << 30) as f64,
        t.elapsed()
    );
    println!("  memory now {:.0} MiB", rss_mib());

    let t = Instant::now();
    let mut dst = follower.state_machine.begin_receiving_snapshot().await?;
    let mut chunk = vec![0u8; 4 << 20];
    loop {
        let n = src.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        dst.write_all(&chunk[..n]).await?;
    }
    dst.flush().await?;
    println!("streamed it in 4 MiB chunks in {:.1?}", t.elapsed());
    println!("  memory now {:.0} MiB", rss_mib());

    let t = Instant::now();
    follower
        .state_machine
        .install_snapshot(&snap.meta, dst)
        .await?;
    let installed = follower.reader.read().len() as u64;
    anyhow::ensure!(
        installed == count,
        "installed {installed} of {count} messages"
    );
    println!("installed {installed} messages in {:.1?}", t.elapsed());
    println!("peak memory of this process: {:.0} MiB", peak_rss_mib());
    Ok(())
}
