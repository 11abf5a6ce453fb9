//! `skeinctl drill`: a controlled failure on the live cluster, measured.
//!
//! It refuses an unhealthy cluster. Then canary mail flows over SMTP,
//! round-robin to every node (a sender that finds a node down tries the
//! next, as an MTA does with MX hosts); the target node is asked to fail as
//! a crash would for the outage (it comes back by itself, whether or not
//! this command is still there); and the command measures what an operator
//! wants to know: time to a new leader, the longest gap a sender saw
//! between acceptances, time until the target's leased mail was delivered
//! by the others, time until the target rejoined and caught up — and
//! whether every accepted canary was delivered.
//!
//! Canaries go by default to the cluster's own discard domain
//! (`skein_delivery::canary`), with a MAC made from the admin token, so
//! nothing leaves the cluster; `--canary-to` sends them to a real mailbox.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use skein_delivery::{canary, Session, Stage};
use skein_proto::v1::{
    FaultRequest, ListQueueRequest, MessageRequest, NodeStatus, StatusReply, StatusRequest,
};
use skein_smtp::{
    Command as SmtpCommand, ForwardPath, MailParams, Mailbox, RcptParams, ReversePath,
};
use tokio::time::Instant;

use crate::{Admin, Conn, Failure};

#[derive(Debug, clap::Args)]
pub struct DrillArgs {
    /// The node to fail: `leader`, or a node id.
    #[arg(long, default_value = "leader")]
    pub target: String,
    /// Instead: fail every node at this site (`cluster.site`) at once. If
    /// the site holds a majority of the voters, mail is refused until it
    /// is back; the drill then measures how long the cluster took to
    /// recover.
    #[arg(long, conflicts_with = "target")]
    pub site: Option<String>,
    /// How long the target stays down.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub outage: Duration,
    /// Canary messages a second, round-robin to every node.
    #[arg(long, default_value_t = 5)]
    pub rate: u32,
    /// Send the canaries to this mailbox instead of the cluster's own
    /// discard: the drill then covers the outbound path too.
    #[arg(long)]
    pub canary_to: Option<String>,
    /// Also write the report as Markdown to FILE.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// After the target is back, how long every accepted canary has to be
    /// delivered before it counts as lost.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub settle: Duration,
}

/// What a drill measured.
pub struct Report {
    /// The nodes failed (one, or a site's).
    pub targets: Vec<u64>,
    pub site: Option<String>,
    /// The targets held a majority of the voters: nothing could commit
    /// until they were back.
    pub majority_lost: bool,
    pub was_leader: bool,
    pub outage_ms: u64,
    pub new_leader_ms: Option<u64>,
    pub acceptance_gap_ms: u64,
    pub takeover_ms: Option<u64>,
    pub takeover_messages: usize,
    pub rejoin_ms: Option<u64>,
    pub sent: usize,
    pub accepted: usize,
    pub delivered: usize,
    pub lost: Vec<String>,
    pub healed: bool,
    pub passed: bool,
    pub notes: Vec<String>,
}

/// How long the cluster may take to show itself healthy, before and after.
const HEALTHY_WITHIN: Duration = Duration::from_secs(15);
/// Canaries before the fault, and after the target has caught up.
const BEFORE: Duration = Duration::from_secs(2);
const AFTER: Duration = Duration::from_secs(2);
/// How often the cluster is looked at while things happen.
const POLL: Duration = Duration::from_millis(100);

async fn status(a: &mut Admin) -> Result<StatusReply, Failure> {
    let r = a.request(StatusRequest {})?;
    a.client
        .status(r)
        .await
        .map(|r| r.into_inner())
        .map_err(|e| a.fail(e))
}

/// What is wrong with the cluster, if anything: no leader, a voter out of
/// reach or behind.
fn unhealthy(s: &StatusReply) -> Option<String> {
    if s.leader == 0 {
        return Some("no leader".into());
    }
    let mut why = Vec::new();
    for n in s.nodes.iter().filter(|n| n.voter) {
        if !n.reachable {
            why.push(format!("node {} is unreachable", n.id));
        } else if n.lag != Some(0) {
            why.push(format!(
                "node {} is {} entries behind",
                n.id,
                n.lag
                    .map_or("an unknown number of".into(), |l| l.to_string())
            ));
        }
    }
    (!why.is_empty()).then(|| why.join("; "))
}

/// Poll until the cluster is healthy, or say why it is not.
async fn wait_healthy(a: &mut Admin, within: Duration) -> Result<StatusReply, String> {
    let deadline = Instant::now() + within;
    loop {
        let why = match status(a).await {
            Ok(s) => match unhealthy(&s) {
                None => return Ok(s),
                Some(why) => why,
            },
            Err(e) => e.to_string(),
        };
        if Instant::now() >= deadline {
            return Err(why);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// One canary as the sender saw it.
#[derive(Clone)]
struct Canary {
    accepted_at: Option<Instant>,
    id: Option<String>,
}

/// Sends canaries at `rate`, round-robin, until told to stop.
struct Sender {
    log: Arc<Mutex<BTreeMap<u64, Canary>>>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

fn sender(
    targets: Vec<std::net::SocketAddr>,
    rate: u32,
    to: Arc<dyn Fn(u64) -> String + Send + Sync>,
) -> Sender {
    let log: Arc<Mutex<BTreeMap<u64, Canary>>> = Arc::default();
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let every = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let l = log.clone();
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        let mut sends = tokio::task::JoinSet::new();
        for n in 0.. {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stopped.wait_for(|s| *s) => break,
            }
            l.lock().unwrap_or_else(|p| p.into_inner()).insert(
                n,
                Canary {
                    accepted_at: None,
                    id: None,
                },
            );
            let (targets, l, rcpt) = (targets.clone(), l.clone(), to(n));
            sends.spawn(async move {
                // Round-robin, and on to the next node when one fails.
                for k in 0..targets.len() {
                    let addr = targets[(n as usize + k) % targets.len()];
                    if let Some(id) = send_one(addr, &rcpt, n).await {
                        let mut l = l.lock().unwrap_or_else(|p| p.into_inner());
                        l.insert(
                            n,
                            Canary {
                                accepted_at: Some(Instant::now()),
                                id: Some(id),
                            },
                        );
                        return;
                    }
                }
            });
        }
        while sends.join_next().await.is_some() {}
    });
    Sender { log, stop, task }
}

/// One canary to one node; its queue id on a 250.
async fn send_one(addr: std::net::SocketAddr, rcpt: &str, n: u64) -> Option<String> {
    let t = Duration::from_secs(10);
    let tcp = tokio::time::timeout(Duration::from_secs(3), tokio::net::TcpStream::connect(addr))
        .await
        .ok()?
        .ok()?;
    let mut s = Session::new(tcp);
    let ok = |r: &skein_smtp::Reply, code: u16| r.code == code;
    if !ok(&s.read_reply(Stage::Greeting, t).await.ok()?, 220) {
        return None;
    }
    if !ok(
        &s.command(&SmtpCommand::Ehlo("skeinctl.drill".into()), Stage::Ehlo, t)
            .await
            .ok()?,
        250,
    ) {
        return None;
    }
    let mail = SmtpCommand::Mail {
        from: ReversePath::Null,
        params: MailParams::default(),
    };
    if !ok(&s.command(&mail, Stage::Mail, t).await.ok()?, 250) {
        return None;
    }
    let to = SmtpCommand::Rcpt {
        to: ForwardPath::Mailbox(Mailbox::parse(rcpt).ok()?),
        params: RcptParams::default(),
    };
    if !s.command(&to, Stage::Rcpt, t).await.ok()?.is_success() {
        return None;
    }
    if !ok(
        &s.command(&SmtpCommand::Data, Stage::Data, t).await.ok()?,
        354,
    ) {
        return None;
    }
    let body =
        format!("Subject: skein drill canary {n}\r\nX-Skein-Drill: {n}\r\n\r\ncanary {n}\r\n");
    s.send_body(body.as_bytes(), t).await.ok()?;
    let r = s
        .read_reply(Stage::EndOfData, Duration::from_secs(30))
        .await
        .ok()?;
    let _ = s
        .command(&SmtpCommand::Quit, Stage::Quit, Duration::from_secs(2))
        .await;
    r.is_success()
        .then(|| {
            r.text()
                .strip_prefix("Ok: queued as ")
                .map(|id| id.trim().to_string())
        })
        .flatten()
}

/// Whether the history of `id`, asked of `a`, shows it delivered.
async fn delivered(a: &mut Admin, id: &str) -> bool {
    let Ok(r) = a.request(MessageRequest { id: id.into() }) else {
        return false;
    };
    match a.client.trace(r).await {
        Ok(t) => {
            let t = t.into_inner();
            let ev = |name: &str| t.events.iter().filter(|e| e.event == name).count();
            // Every recipient of a canary delivered (there is one).
            ev("delivered") > 0 && ev("failed") + ev("expired") == 0
        }
        Err(_) => false,
    }
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

pub async fn run(conn: &Conn, a: &mut Admin, args: DrillArgs) -> Result<Report, Failure> {
    let token = conn
        .token
        .clone()
        .ok_or_else(|| Failure::Failed("a drill needs the admin token (--token or SKEIN_TOKEN): canaries carry a MAC made with it".into()))?;
    let s = wait_healthy(a, HEALTHY_WITHIN)
        .await
        .map_err(|why| Failure::Failed(format!("the cluster is not healthy, no drill: {why}")))?;
    let member = |id: u64| s.nodes.iter().find(|n| n.id == id).cloned();
    let targets: Vec<NodeStatus> = match &args.site {
        Some(site) => {
            let at: Vec<NodeStatus> = s
                .nodes
                .iter()
                .filter(|n| &n.site == site)
                .cloned()
                .collect();
            if at.is_empty() {
                return Err(Failure::Failed(format!(
                    "no node is at site {site:?} (cluster.site)"
                )));
            }
            at
        }
        None => {
            let id = match args.target.as_str() {
                "leader" => s.leader,
                id => id.parse().map_err(|_| {
                    Failure::Failed(format!("--target {id:?}: leader or a node id"))
                })?,
            };
            vec![member(id).ok_or_else(|| {
                Failure::Failed(format!("node {id} is not a member of this cluster"))
            })?]
        }
    };
    let ids: BTreeSet<u64> = targets.iter().map(|t| t.id).collect();
    let was_leader = ids.contains(&s.leader);
    let survivors: Vec<NodeStatus> = s
        .nodes
        .iter()
        .filter(|n| !ids.contains(&n.id))
        .cloned()
        .collect();
    if survivors.is_empty() {
        return Err(Failure::Failed(
            "every node would be down: nobody left to watch, no drill".into(),
        ));
    }
    let voters = s.nodes.iter().filter(|n| n.voter).count();
    let remaining = survivors.iter().filter(|n| n.voter).count();
    let majority_lost = remaining * 2 <= voters;
    if majority_lost && args.site.is_none() {
        return Err(Failure::Failed(
            "without the target no majority of voters is left: no drill".into(),
        ));
    }
    let smtp: Vec<std::net::SocketAddr> = s
        .nodes
        .iter()
        .filter_map(|n| n.smtp_addrs.first()?.parse().ok())
        .collect();
    if smtp.is_empty() {
        return Err(Failure::Failed(
            "no node says where it takes SMTP mail".into(),
        ));
    }
    // Watch from a survivor: the node asked may be the target.
    let mut observer = None;
    for n in &survivors {
        if let Ok(c) = conn.admin(&n.addr).await {
            observer = Some(c);
            break;
        }
    }
    let mut obs = observer.ok_or_else(|| Failure::Unreachable("no other node answers".into()))?;
    let mut faulted = Vec::new();
    for t in &targets {
        faulted.push(conn.admin(&t.addr).await?);
    }

    let run = format!("{:x}", rand_run());
    let to: Arc<dyn Fn(u64) -> String + Send + Sync> = match &args.canary_to {
        Some(addr) => {
            let addr = addr.clone();
            Arc::new(move |_| addr.clone())
        }
        None => {
            let key = token.clone();
            let run = run.clone();
            Arc::new(move |n| {
                format!(
                    "{}@{}",
                    canary::local_part(key.as_bytes(), &run, n),
                    canary::DOMAIN
                )
            })
        }
    };
    let mut notes = Vec::new();
    let canaries = sender(smtp, args.rate, to);
    tokio::time::sleep(BEFORE).await;

    // The target's leased mail when it fails: its peers must take it over.
    let leased: BTreeSet<String> = {
        let r = obs.request(ListQueueRequest {
            state: "leased".into(),
            domain: String::new(),
            limit: 0,
        })?;
        match obs.client.list_queue(r).await {
            Ok(l) => l
                .into_inner()
                .messages
                .into_iter()
                .filter(|m| ids.contains(&m.owner))
                .map(|m| m.id)
                .collect(),
            Err(_) => BTreeSet::new(),
        }
    };
    if majority_lost {
        notes.push(format!(
            "{} of the {voters} voters down at once: no majority, mail refused with 451 until they are back",
            voters - remaining
        ));
    }
    for f in &mut faulted {
        let r = f.request(FaultRequest {
            outage_ms: ms(args.outage),
        })?;
        f.client.fault(r).await.map_err(|e| f.fail(e))?;
    }
    let t0 = Instant::now();
    let back_at = t0 + args.outage;

    let mut new_leader_ms = None;
    let mut takeover_ms = None;
    let mut rejoin_ms = None;
    let mut left = leased.clone();
    let deadline = back_at + args.settle;
    loop {
        let now = Instant::now();
        if let Ok(st) = status(&mut obs).await {
            // A leader that answers as one (a survivor's view of the old
            // one may linger). Without a majority, none can come before
            // the failed nodes are back.
            let leads = st.leader != 0
                && st
                    .nodes
                    .iter()
                    .any(|n| n.id == st.leader && n.reachable && n.role == "leader");
            let new = if majority_lost {
                now >= back_at
            } else {
                !ids.contains(&st.leader)
            };
            if (was_leader || majority_lost) && new_leader_ms.is_none() && leads && new {
                new_leader_ms = Some(ms(now - t0));
            }
            if now >= back_at && rejoin_ms.is_none() {
                let back = ids.iter().all(|id| {
                    st.nodes
                        .iter()
                        .any(|n| n.id == *id && n.reachable && n.lag == Some(0))
                });
                if back {
                    rejoin_ms = Some(ms(now.saturating_duration_since(back_at)));
                }
            }
        }
        if !left.is_empty() {
            let r = obs.request(ListQueueRequest {
                state: "all".into(),
                domain: String::new(),
                limit: 0,
            })?;
            if let Ok(l) = obs.client.list_queue(r).await {
                let queued: BTreeSet<String> =
                    l.into_inner().messages.into_iter().map(|m| m.id).collect();
                left.retain(|id| queued.contains(id));
                if left.is_empty() {
                    takeover_ms = Some(ms(Instant::now() - t0));
                }
            }
        }
        let leader_done = !(was_leader || majority_lost) || new_leader_ms.is_some();
        if rejoin_ms.is_some() && leader_done && left.is_empty() {
            break;
        }
        if now >= deadline {
            if rejoin_ms.is_none() {
                notes.push(format!(
                    "{} did not rejoin and catch up within {:?} of the return",
                    node_list(&ids),
                    args.settle
                ));
            }
            if !left.is_empty() {
                notes.push(format!(
                    "{} of the {} leased messages of the failed nodes were not delivered",
                    left.len(),
                    leased.len()
                ));
            }
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    tokio::time::sleep(AFTER).await;
    canaries.stop.send_replace(true);
    let _ = canaries.task.await;
    let log: Vec<(u64, Canary)> = canaries
        .log
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .into_iter()
        .collect();

    // The longest a round-robin sender waited between two acceptances.
    let mut times: Vec<Instant> = log.iter().filter_map(|(_, c)| c.accepted_at).collect();
    times.sort();
    let acceptance_gap_ms = times.windows(2).map(|w| ms(w[1] - w[0])).max().unwrap_or(0);

    // Every accepted canary delivered?
    let mut waiting: BTreeSet<String> = log.iter().filter_map(|(_, c)| c.id.clone()).collect();
    let accepted = waiting.len();
    let settle_by = Instant::now().max(back_at) + args.settle;
    loop {
        let mut done = Vec::new();
        for id in &waiting {
            if delivered(&mut obs, id).await {
                done.push(id.clone());
            }
        }
        for id in done {
            waiting.remove(&id);
        }
        if waiting.is_empty() || Instant::now() >= settle_by {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let healed = match wait_healthy(&mut obs, HEALTHY_WITHIN).await {
        Ok(_) => true,
        Err(why) => {
            notes.push(format!("not healed: {why}"));
            false
        }
    };
    let lost: Vec<String> = waiting.into_iter().collect();
    let passed = healed && lost.is_empty() && accepted > 0;
    if accepted == 0 {
        notes.push("no canary was accepted".into());
    }
    Ok(Report {
        targets: ids.iter().copied().collect(),
        site: args.site.clone(),
        majority_lost,
        was_leader,
        outage_ms: ms(args.outage),
        new_leader_ms,
        acceptance_gap_ms,
        takeover_ms,
        takeover_messages: leased.len(),
        rejoin_ms,
        sent: log.len(),
        accepted,
        delivered: accepted - lost.len(),
        lost,
        healed,
        passed,
        notes,
    })
    .inspect(|r| {
        if let Some(path) = &args.report {
            if let Err(e) = std::fs::write(path, r.markdown()) {
                eprintln!("skeinctl: --report {}: {e}", path.display());
            }
        }
    })
}

/// A run id that keeps this drill's canaries apart from any other's.
fn rand_run() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (t.as_nanos() as u64) ^ (u64::from(std::process::id()) << 32)
}

fn node_list(ids: &BTreeSet<u64>) -> String {
    let list: Vec<String> = ids.iter().map(u64::to_string).collect();
    match list.len() {
        1 => format!("node {}", list[0]),
        _ => format!("nodes {}", list.join(", ")),
    }
}

fn opt_ms(v: Option<u64>) -> String {
    v.map_or("—".into(), |ms| format!("{:.2} s", ms as f64 / 1000.0))
}

impl Report {
    pub fn json(&self) -> serde_json::Value {
        json!({
            "target": self.targets.first(),
            "targets": self.targets,
            "site": self.site,
            "majority_lost": self.majority_lost,
            "was_leader": self.was_leader,
            "outage_ms": self.outage_ms,
            "new_leader_ms": self.new_leader_ms,
            "acceptance_gap_ms": self.acceptance_gap_ms,
            "takeover_ms": self.takeover_ms,
            "takeover_messages": self.takeover_messages,
            "rejoin_ms": self.rejoin_ms,
            "canaries": {
                "sent": self.sent,
                "accepted": self.accepted,
                "delivered": self.delivered,
                "lost": self.lost.len(),
            },
            "lost": self.lost,
            "healed": self.healed,
            "passed": self.passed,
            "notes": self.notes,
        })
    }

    fn rows(&self) -> Vec<(&'static str, String)> {
        vec![
            (
                "target",
                format!(
                    "{}{}{}",
                    self.site
                        .as_ref()
                        .map(|s| format!("site {s}: "))
                        .unwrap_or_default(),
                    node_list(&self.targets.iter().copied().collect()),
                    match (self.was_leader, self.targets.len()) {
                        (false, _) => "",
                        (true, 1) => " (the leader)",
                        (true, _) => " (the leader among them)",
                    }
                ),
            ),
            ("outage", opt_ms(Some(self.outage_ms))),
            (
                if self.majority_lost {
                    "leading again after"
                } else {
                    "new leader after"
                },
                if self.was_leader || self.majority_lost {
                    opt_ms(self.new_leader_ms)
                } else {
                    "— (not the leader)".into()
                },
            ),
            (
                "longest acceptance gap",
                opt_ms(Some(self.acceptance_gap_ms)),
            ),
            (
                "takeover of its leased mail",
                match self.takeover_ms {
                    Some(t) => format!("{} ({} messages)", opt_ms(Some(t)), self.takeover_messages),
                    None if self.takeover_messages == 0 => "— (it held no leases)".into(),
                    None => "not done".into(),
                },
            ),
            ("rejoined and caught up after", opt_ms(self.rejoin_ms)),
            (
                "canaries",
                format!(
                    "{} sent, {} accepted, {} delivered, {} lost",
                    self.sent,
                    self.accepted,
                    self.delivered,
                    self.lost.len()
                ),
            ),
            (
                "verdict",
                if self.passed {
                    "PASSED".into()
                } else {
                    "FAILED".into()
                },
            ),
        ]
    }

    pub fn render(&self, json: bool) -> String {
        if json {
            let mut s = serde_json::to_string_pretty(&self.json()).unwrap_or_default();
            s.push('\n');
            return s;
        }
        let mut out = String::new();
        for (k, v) in self.rows() {
            out.push_str(&format!("{k:<30} {v}\n"));
        }
        for n in &self.notes {
            out.push_str(&format!("note: {n}\n"));
        }
        for id in &self.lost {
            out.push_str(&format!("lost: {id} (skeinctl trace {id})\n"));
        }
        out
    }

    pub fn markdown(&self) -> String {
        let mut out = String::from("# Skein failure drill\n\n| measure | result |\n|---|---|\n");
        for (k, v) in self.rows() {
            out.push_str(&format!("| {k} | {v} |\n"));
        }
        if !self.notes.is_empty() || !self.lost.is_empty() {
            out.push('\n');
        }
        for n in &self.notes {
            out.push_str(&format!("- {n}\n"));
        }
        for id in &self.lost {
            out.push_str(&format!("- lost: `{id}` (`skeinctl trace {id}`)\n"));
        }
        out
    }
}
