//! `skeinctl`, the admin CLI of a Skein cluster.
//!
//! It talks to any node's admin API (gRPC on the cluster port, see
//! `proto/skein/v1/admin.proto`) with the admin token; the node forwards to
//! the leader where a change must be made there. Output is a readable table
//! by default and JSON with `--json`.
//!
//! Exit codes: 0 done; 1 the operation failed; 2 usage error; 3 the node is
//! unreachable or refused the token.

mod drill;
mod render;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use skein_proto::v1::admin_client::AdminClient;
use skein_proto::v1::{
    AddNodeRequest, BackupChunk, BackupRequest, DrainRequest, ListQueueRequest, MessageRequest,
    RecoverRequest, RemoveNodeRequest, RetryRequest, StatusRequest,
};
use tokio::io::AsyncWriteExt;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

/// Operate a Skein cluster: status, queue, membership, drain, backup.
#[derive(Debug, Parser)]
#[command(name = "skeinctl", version)]
pub struct Cli {
    /// The node to talk to (its cluster port). Any node answers any command.
    #[arg(
        long,
        global = true,
        env = "SKEIN_NODE",
        default_value = "127.0.0.1:7100"
    )]
    pub node: String,
    /// The cluster's admin token.
    #[arg(long, global = true, env = "SKEIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Read the admin token from FILE instead (trailing whitespace trimmed).
    #[arg(
        long,
        global = true,
        env = "SKEIN_TOKEN_FILE",
        conflicts_with = "token"
    )]
    pub token_file: Option<PathBuf>,
    /// Verify the node's TLS certificate against this CA (PEM); needed when
    /// the cluster port uses TLS.
    #[arg(long, global = true, env = "SKEIN_CA")]
    pub ca: Option<PathBuf>,
    /// Machine-readable output on stdout.
    #[arg(long, global = true)]
    pub json: bool,
    /// How long to wait for the node to answer a call (default 60s; 1h for
    /// `cluster add-node`, which returns once the new node has caught up).
    #[arg(long, global = true, value_parser = humantime::parse_duration)]
    pub timeout: Option<Duration>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Leader, term, every node and the queue at a glance.
    Status,
    /// Inspect and steer queued mail.
    #[command(subcommand)]
    Queue(QueueCommand),
    /// Change the cluster's membership.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Act on the node this command talks to.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Write a consistent snapshot of the whole queue to FILE.
    Backup { file: PathBuf },
    /// Queue every message of a backup FILE into this cluster (ids are kept;
    /// messages already present are left alone).
    Restore { file: PathBuf },
    /// What became of a message: accepted, attempts, takeovers, delivered
    /// or failed per recipient, bounces, operators' actions.
    Trace { id: String },
    /// A controlled failure on the live cluster, with canary mail: recovery
    /// times and a no-loss verdict (exit 0 only if it passed).
    Drill(drill::DrillArgs),
}

#[derive(Debug, Subcommand)]
pub enum QueueCommand {
    /// Queued messages.
    List {
        /// ready, leased, deferred, held or all.
        #[arg(long, default_value = "all")]
        state: String,
        /// Only messages with a pending recipient in this domain.
        #[arg(long)]
        domain: Option<String>,
        /// At most this many messages.
        #[arg(long)]
        limit: Option<u64>,
    },
    /// One message: envelope, size, per-recipient state, attempts, last error.
    Show { id: String },
    /// Make deferred mail due now.
    Retry {
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<String>,
        /// Every deferred message.
        #[arg(long)]
        all: bool,
    },
    /// Stop delivery of a message.
    Hold { id: String },
    /// Resume delivery of a held message.
    Release { id: String },
    /// Remove a message without bouncing it.
    Delete { id: String },
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Add a node: a learner first, a voter once it has caught up.
    AddNode {
        id: u64,
        /// host:port where the cluster reaches the node.
        addr: String,
        /// Leave it a learner: a non-voting replica (a second site) that
        /// never counts toward a commit, so adds no latency to a 250.
        #[arg(long)]
        learner: bool,
    },
    /// Remove a node (voter or learner) from the cluster.
    RemoveNode { id: u64 },
    /// Make a caught-up learner a voter.
    Promote { id: u64 },
    /// Make a voter a learner.
    Demote { id: u64 },
    /// After a majority of the voters is lost for good: make the node
    /// asked (--node) the single voter of a new configuration holding
    /// everything it has. Without --force, only says what that would lose.
    Recover {
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Stop accepting, hand back leases and give up leadership.
    Drain,
}

/// What went wrong, and so which exit code.
#[derive(Debug)]
pub enum Failure {
    /// The node could not be reached or refused the token: exit 3.
    Unreachable(String),
    /// The operation failed: exit 1.
    Failed(String),
}

impl Failure {
    fn code(&self) -> u8 {
        match self {
            Failure::Unreachable(_) => 3,
            Failure::Failed(_) => 1,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Unreachable(m) | Failure::Failed(m) => f.write_str(m),
        }
    }
}

fn from_status(node: &str, ca: Option<&Path>, s: tonic::Status) -> Failure {
    use tonic::Code;
    // A status with a cause is the transport's (the connection broke, or
    // the two ends disagree on TLS); one without came from the node itself
    // (Unavailable: no quorum).
    if std::error::Error::source(&s).is_some() {
        return Failure::Unreachable(connect_failure(node, ca, &s));
    }
    match s.code() {
        Code::Unauthenticated | Code::PermissionDenied => Failure::Unreachable(format!(
            "{node} refused the admin token ({}); pass --token or set SKEIN_TOKEN",
            s.message()
        )),
        _ => Failure::Failed(s.message().to_string()),
    }
}

/// Run `skeinctl` with the process's arguments.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("skeinctl: cannot start: {e}");
            return ExitCode::from(1);
        }
    };
    let mut out = std::io::stdout();
    match rt.block_on(run(cli, &mut out)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("skeinctl: {f}");
            ExitCode::from(f.code())
        }
    }
}

struct Admin {
    client: AdminClient<Channel>,
    node: String,
    ca: Option<PathBuf>,
    token: Option<String>,
}

/// How to reach any node's admin API: the CA, the token, the timeout.
pub struct Conn {
    pub ca: Option<PathBuf>,
    pub token: Option<String>,
    pub timeout: Duration,
}

impl Conn {
    fn of(cli: &Cli) -> Result<Self, Failure> {
        let token = match (&cli.token, &cli.token_file) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(f)) => Some(
                std::fs::read_to_string(f)
                    .map_err(|e| Failure::Failed(format!("--token-file {}: {e}", f.display())))?
                    .trim()
                    .to_string(),
            ),
            (None, None) => None,
        };
        let default = match cli.command {
            Command::Cluster(ClusterCommand::AddNode { .. }) => Duration::from_secs(3600),
            _ => Duration::from_secs(60),
        };
        Ok(Conn {
            ca: cli.ca.clone(),
            token,
            timeout: cli.timeout.unwrap_or(default),
        })
    }

    /// The admin API of the node at `node` (host:port).
    async fn admin(&self, node: &str) -> Result<Admin, Failure> {
        let scheme = if self.ca.is_some() { "https" } else { "http" };
        let mut endpoint = Channel::from_shared(format!("{scheme}://{node}"))
            .map_err(|e| Failure::Failed(format!("--node {node:?}: {e}")))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(self.timeout);
        if let Some(ca) = &self.ca {
            let pem = std::fs::read(ca)
                .map_err(|e| Failure::Failed(format!("--ca {}: {e}", ca.display())))?;
            let host = node.rsplit_once(':').map_or(node, |(h, _)| h);
            let tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(pem))
                .domain_name(host.trim_start_matches('[').trim_end_matches(']'));
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| Failure::Failed(format!("--ca {}: {e}", ca.display())))?;
        }
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| Failure::Unreachable(connect_failure(node, self.ca.as_deref(), &e)))?;
        Ok(Admin {
            client: AdminClient::new(channel)
                .max_decoding_message_size(256 << 20)
                .max_encoding_message_size(256 << 20),
            node: node.to_string(),
            ca: self.ca.clone(),
            token: self.token.clone(),
        })
    }
}

impl Admin {
    fn request<T>(&self, msg: T) -> Result<tonic::Request<T>, Failure> {
        let mut r = tonic::Request::new(msg);
        if let Some(t) = &self.token {
            let v = format!("Bearer {t}")
                .parse()
                .map_err(|_| Failure::Failed("the token is not a valid header value".into()))?;
            r.metadata_mut().insert(skein_proto::AUTH_HEADER, v);
        }
        Ok(r)
    }

    fn fail(&self, s: tonic::Status) -> Failure {
        from_status(&self.node, self.ca.as_deref(), s)
    }
}

/// Why the node could not be reached, with what to do about TLS when the
/// two ends disagree on it.
fn connect_failure(node: &str, ca: Option<&Path>, e: &dyn std::error::Error) -> String {
    // The innermost cause says it best ("Connection refused").
    let mut cause: &dyn std::error::Error = e;
    while let Some(inner) = cause.source() {
        cause = inner;
    }
    let cause = cause.to_string();
    let down = ["refused", "timed out", "unreachable", "No route"]
        .iter()
        .any(|s| cause.contains(s));
    let hint = match ca {
        _ if down => String::new(),
        Some(ca) if cause.contains("certificate") || cause.contains("UnknownIssuer") => format!(
            " (the node's certificate is not trusted: is {} the cluster's CA, and does the \
             certificate name {node}?)",
            ca.display()
        ),
        Some(_) if cause.contains("corrupt message") || cause.contains("InvalidContentType") => {
            " (the node does not speak TLS on this port: leave out --ca and SKEIN_CA)".to_string()
        }
        Some(_) => String::new(),
        None => " (if the node's cluster port uses TLS, pass --ca or set SKEIN_CA)".to_string(),
    };
    format!("{node} is unreachable: {cause}{hint}")
}

fn io_failed(what: &str, e: std::io::Error) -> Failure {
    Failure::Failed(format!("{what}: {e}"))
}

/// One unary admin call: the request with the token, then the answer, or
/// return the failure from the calling function.
macro_rules! call {
    ($a:expr, $method:ident, $msg:expr) => {{
        let request = $a.request($msg)?;
        match $a.client.$method(request).await {
            Ok(reply) => reply.into_inner(),
            Err(e) => return Err($a.fail(e)),
        }
    }};
}

/// Run one command, writing its output to `out`.
pub async fn run(cli: Cli, out: &mut dyn std::io::Write) -> Result<(), Failure> {
    let conn = Conn::of(&cli)?;
    let mut a = conn.admin(&cli.node).await?;
    let json = cli.json;
    let text = match cli.command {
        Command::Status => render::status(&call!(a, status, StatusRequest {}), json),
        Command::Queue(QueueCommand::List {
            state,
            domain,
            limit,
        }) => {
            let request = ListQueueRequest {
                state,
                domain: domain.unwrap_or_default(),
                limit: limit.unwrap_or(0),
            };
            render::queue_list(&call!(a, list_queue, request).messages, json)
        }
        Command::Queue(QueueCommand::Show { id }) => {
            render::message(&call!(a, show_message, MessageRequest { id }), json)
        }
        Command::Queue(QueueCommand::Retry { id, all: _ }) => {
            let request = RetryRequest {
                id: id.unwrap_or_default(),
            };
            let c = call!(a, retry_messages, request);
            render::changed("made due now", c.changed, json)
        }
        Command::Queue(QueueCommand::Hold { id }) => {
            let c = call!(a, hold_message, MessageRequest { id });
            render::changed("held", c.changed, json)
        }
        Command::Queue(QueueCommand::Release { id }) => {
            let c = call!(a, release_message, MessageRequest { id });
            render::changed("released", c.changed, json)
        }
        Command::Queue(QueueCommand::Delete { id }) => {
            let c = call!(a, delete_message, MessageRequest { id });
            render::changed("deleted", c.changed, json)
        }
        Command::Cluster(ClusterCommand::AddNode { id, addr, learner }) => {
            let request = AddNodeRequest { id, addr, learner };
            render::membership(&call!(a, add_node, request), json)
        }
        Command::Cluster(ClusterCommand::RemoveNode { id }) => {
            render::membership(&call!(a, remove_node, RemoveNodeRequest { id }), json)
        }
        Command::Cluster(ClusterCommand::Promote { id }) => {
            render::membership(&call!(a, promote_node, RemoveNodeRequest { id }), json)
        }
        Command::Cluster(ClusterCommand::Demote { id }) => {
            render::membership(&call!(a, demote_node, RemoveNodeRequest { id }), json)
        }
        Command::Cluster(ClusterCommand::Recover { force }) => {
            let reply = call!(a, recover, RecoverRequest { force });
            let text = render::recover(&reply, json);
            out.write_all(text.as_bytes())
                .and_then(|()| out.flush())
                .map_err(|e| io_failed("stdout", e))?;
            return if reply.recovering {
                Ok(())
            } else {
                Err(Failure::Failed(
                    "not recovered: run again with --force to accept what the report says".into(),
                ))
            };
        }
        Command::Node(NodeCommand::Drain) => render::drain(&call!(a, drain, DrainRequest {}), json),
        Command::Trace { id } => render::trace(&call!(a, trace, MessageRequest { id }), json),
        Command::Drill(args) => {
            let report = drill::run(&conn, &mut a, args).await?;
            let text = report.render(json);
            out.write_all(text.as_bytes())
                .and_then(|()| out.flush())
                .map_err(|e| io_failed("stdout", e))?;
            return if report.passed {
                Ok(())
            } else {
                Err(Failure::Failed("the drill did not pass".into()))
            };
        }
        Command::Backup { file } => {
            let bytes = backup(&mut a, &file).await?;
            render::backup(&file, bytes, json)
        }
        Command::Restore { file } => {
            let f = tokio::fs::File::open(&file)
                .await
                .map_err(|e| io_failed(&file.display().to_string(), e))?;
            let read_error = std::sync::Arc::default();
            let r = a.request(file_chunks(f, std::sync::Arc::clone(&read_error)))?;
            let reply = a.client.restore(r).await;
            if let Some(e) = read_error.lock().unwrap_or_else(|p| p.into_inner()).take() {
                return Err(io_failed(&file.display().to_string(), e));
            }
            let reply = reply.map_err(|e| a.fail(e))?.into_inner();
            render::restore(&reply, json)
        }
    };
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| io_failed("stdout", e))
}

/// Stream the backup into `FILE.partial`, fsync it, then rename it into
/// place: FILE is either absent or a whole backup.
async fn backup(a: &mut Admin, file: &std::path::Path) -> Result<u64, Failure> {
    use futures::StreamExt;
    let r = a.request(BackupRequest {})?;
    let mut stream = a
        .client
        .backup(r)
        .await
        .map_err(|e| a.fail(e))?
        .into_inner();
    let mut partial = file.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let name = partial.display().to_string();
    // A backup holds every queued message: readable by its owner only.
    let mut f = tokio::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&partial)
        .await
        .map_err(|e| io_failed(&name, e))?;
    let mut total = 0u64;
    let result = async {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| a.fail(e))?;
            total += chunk.data.len() as u64;
            f.write_all(&chunk.data)
                .await
                .map_err(|e| io_failed(&name, e))?;
        }
        f.sync_all().await.map_err(|e| io_failed(&name, e))?;
        tokio::fs::rename(&partial, file)
            .await
            .map_err(|e| io_failed(&file.display().to_string(), e))
    }
    .await;
    if result.is_err() {
        let _ = tokio::fs::remove_file(&partial).await;
    }
    result.map(|()| total)
}

/// A file as a stream of 1 MiB backup chunks. A read error ends the stream
/// and is left in `error` for the caller to report.
fn file_chunks(
    f: tokio::fs::File,
    error: std::sync::Arc<std::sync::Mutex<Option<std::io::Error>>>,
) -> impl futures::Stream<Item = BackupChunk> + Send + 'static {
    futures::stream::unfold(Some(f), move |f| {
        let error = error.clone();
        async move {
            use tokio::io::AsyncReadExt;
            let mut f = f?;
            let mut buf = Vec::with_capacity(1 << 20);
            match (&mut f).take(1 << 20).read_to_end(&mut buf).await {
                Ok(0) => None,
                Ok(_) => Some((BackupChunk { data: buf.into() }, Some(f))),
                Err(e) => {
                    *error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                    None
                }
            }
        }
    })
}
