//! `skein-sink`: a receiving MTA for demos and the Docker tier. Answers 250
//! to everything and prints one line per message received:
//! `delivered <X-Token or Message-ID or -> <bytes> <unix time received>`
//! (seconds, to the microsecond: when the sink answered its end of data,
//! not when the line is printed, so that a harness timing the last arrival
//! measures the MTA and not this program's or its own polling).

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use skein_testkit::SinkMta;

#[derive(Parser)]
#[command(
    name = "skein-sink",
    about = "An SMTP sink that prints what it receives"
)]
struct Args {
    #[arg(long, default_value = "0.0.0.0:25")]
    listen: SocketAddr,
    /// Answer every recipient 451 (try again later): mail stays queued at
    /// the sender, to measure a full queue.
    #[arg(long)]
    defer: bool,
    /// Do not offer CHUNKING (BDAT): senders that use it then send DATA.
    /// Offered by default, as Postfix 3.4 and later and the large mailbox
    /// providers do.
    #[arg(long)]
    no_chunking: bool,
}

fn header(data: &[u8], name: &str) -> Option<String> {
    let text = String::from_utf8_lossy(data);
    text.lines().take_while(|l| !l.is_empty()).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
    })
}

/// The wall-clock time of `at`, in seconds since the epoch.
fn unix_time(at: Instant) -> String {
    let t = SystemTime::now() - at.elapsed();
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    format!("{}.{:06}", d.as_secs(), d.subsec_micros())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let mut builder = SinkMta::builder()
        .ip(a.listen.ip())
        .port(a.listen.port())
        .forget_commands();
    if !a.no_chunking {
        builder = builder.chunking();
    }
    if a.defer {
        builder = builder.defer_all();
    }
    let sink = builder.start().await?;
    println!("skein-sink listening on {}", sink.addr());
    // Print and forget: a long run keeps no bodies.
    loop {
        for m in sink.take_messages() {
            let id = header(&m.data, "X-Token")
                .or_else(|| header(&m.data, "Message-ID"))
                .unwrap_or_else(|| "-".into());
            println!("delivered {id} {} {}", m.data.len(), unix_time(m.at));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
