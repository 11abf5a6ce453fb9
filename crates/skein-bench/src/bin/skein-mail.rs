//! `skein-mail`: send tokened messages to a host name the way an MTA does
//! with equal-preference MX records: resolve it for every message, try the
//! addresses in the order DNS gave them until one answers. Prints one line
//! per message: `ack <token> <node>` after a 250, `fail <token> <why>`.

use std::time::Duration;

use clap::Parser;
use skein_tests::mail::tokened;
use skein_tests::send;

#[derive(Parser)]
#[command(
    name = "skein-mail",
    about = "Send tokened test mail through a DNS name"
)]
struct Args {
    /// HOST:PORT; HOST may have several A records.
    #[arg(long)]
    to: String,
    #[arg(long, default_value_t = 100)]
    count: usize,
    /// Tokens are PREFIX-0, PREFIX-1, ...
    #[arg(long, default_value = "msg")]
    prefix: String,
    /// Pause between messages.
    #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
    interval: Duration,
    #[arg(long, default_value = "rcpt@example.org")]
    rcpt: String,
}

#[tokio::main]
async fn main() {
    let a = Args::parse();
    for i in 0..a.count {
        let token = format!("{}-{i}", a.prefix);
        let body = tokened(&token);
        let mut why = String::from("no address");
        let addrs: Vec<_> = match tokio::net::lookup_host(&a.to).await {
            Ok(it) => it.collect(),
            Err(e) => {
                why = format!("resolve {}: {e}", a.to);
                Vec::new()
            }
        };
        let mut acked = None;
        for addr in addrs {
            let r = tokio::time::timeout(
                Duration::from_secs(15),
                send(addr, "demo@client.test", &[&a.rcpt], &body),
            )
            .await;
            match r {
                Ok(Ok(s)) if s.accepted() => {
                    acked = Some(addr);
                    break;
                }
                Ok(Ok(s)) => why = format!("{addr}: {}", s.reply.code),
                Ok(Err(e)) => why = format!("{addr}: {e}"),
                Err(_) => why = format!("{addr}: timed out"),
            }
        }
        match acked {
            Some(addr) => println!("ack {token} {}", addr.ip()),
            None => println!("fail {token} {why}"),
        }
        if !a.interval.is_zero() {
            tokio::time::sleep(a.interval).await;
        }
    }
}
