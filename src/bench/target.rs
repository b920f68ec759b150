//! Which server a scenario drives ([`Target`] on the command line) and the
//! running [`Node`]: a server given by address, a node started in this
//! process, or a node spawned as a child process (`leasehold serve`) so its
//! CPU time and memory can be measured apart from the bench clients.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use super::error::{Context, Error, Result};
use tokio::time::Instant;
use tonic::transport::Channel;

use super::system::Usage;
use crate::client::{Bearer, Tls};
use crate::config::Config;
use crate::model::{NewToken, Role};
use crate::server::Running;

/// Database of a node started for the run when neither `--database-url` nor
/// `DATABASE_URL` names one.
pub(crate) const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/leasehold_bench";

/// Drain grace of a node started for the run: the workers have closed their
/// sessions by the time it stops, so it never needs long.
const NODE_DRAIN_GRACE: Duration = Duration::from_secs(5);

/// How long a spawned node may take to print its address (it creates and
/// migrates the database first).
const SPAWN_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a spawned node may take to exit after SIGTERM before it is
/// killed.
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// Log filter of a spawned node: warnings, and the lines of `server` that
/// say where it listens and that it stopped.
const SPAWNED_LOG_FILTER: &str = "warn,leasehold::server=info";

/// Which server a scenario drives.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct Target {
    /// Drive the server running at this address (`http://host:port`)
    /// instead of starting a node for the run. Its CPU time and memory are
    /// then unknown.
    #[arg(long, value_name = "URL", conflicts_with_all = ["spawn", "in_process"])]
    pub(crate) server: Option<String>,

    /// Start the node as a child process (`leasehold serve` on a free port
    /// of 127.0.0.1), so that its CPU time and memory are its own. The
    /// default of `drain` and `sessions`.
    #[arg(long, conflicts_with = "in_process")]
    pub(crate) spawn: bool,

    /// Start the node inside the bench process (its CPU time and memory
    /// then include the bench clients). The default of the other scenarios.
    #[arg(long)]
    pub(crate) in_process: bool,

    /// Postgres URL of the node started for the run. With `--server`, the
    /// scenarios that read or tidy the database directly (`drain
    /// --preexisting-finished`, the count of finished rows, the clean-up of
    /// `enqueue`) use it too, so it must name that server's database. A
    /// missing database is created and migrated.
    #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL)]
    pub(crate) database_url: String,

    /// Serve the nodes started for the run over TLS with this PEM
    /// certificate (for 127.0.0.1; with `--tls-key`, and `--tls-ca` for the
    /// bench's clients).
    #[arg(long, requires_all = ["tls_key", "tls_ca"], conflicts_with = "server")]
    pub(crate) tls_cert: Option<PathBuf>,

    /// The PEM private key of `--tls-cert`.
    #[arg(long, requires = "tls_cert")]
    pub(crate) tls_key: Option<PathBuf>,

    /// PEM file of the CA the bench's clients trust: for `--tls-cert`, or
    /// for a `--server https://...`.
    #[arg(long)]
    pub(crate) tls_ca: Option<PathBuf>,

    /// Start the nodes with `--auth required`; the bench makes an admin
    /// token for its own clients on the database.
    #[arg(long, conflicts_with = "server")]
    pub(crate) auth: bool,

    /// Bearer token of the bench's clients, for a `--server` that requires
    /// tokens.
    #[arg(
        long,
        env = "LEASEHOLD_TOKEN",
        hide_env_values = true,
        requires = "server"
    )]
    pub(crate) token: Option<String>,
}

/// How the bench's clients reach the nodes of the run: TLS settings and a
/// bearer token, set once per bench process before any client connects
/// (every scenario's clients share them).
#[derive(Debug, Clone, Default)]
struct Access {
    tls: Option<Tls>,
    bearer: Bearer,
}

static ACCESS: OnceLock<Access> = OnceLock::new();

/// The bench's bearer token interceptor (empty without `--auth`/`--token`).
pub(crate) fn bearer() -> Bearer {
    ACCESS.get().map(|a| a.bearer.clone()).unwrap_or_default()
}

/// Sets the clients' access for `target` once its nodes run (the database
/// is migrated by then, so a token can be made in it).
async fn access_for(target: &Target) -> Result<()> {
    if ACCESS.get().is_some() {
        return Ok(());
    }
    let tls = match &target.tls_ca {
        Some(ca) => Some(
            Tls::new()
                .ca_file(ca)
                .map_err(|err| Error::Scenario(format!("--tls-ca: {err}")))?,
        ),
        None => None,
    };
    let secret = if target.auth {
        let store = super::db::connect(&target.database_url)?;
        let token = NewToken {
            role: Role::Admin,
            task_types: Vec::new(),
            description: "leasehold bench".into(),
            expires_at: Some(std::time::SystemTime::now() + Duration::from_secs(24 * 3600)),
        };
        let (_, secret) = crate::auth::create(&store, &token)
            .await
            .context("cannot make the bench's token")?;
        Some(secret)
    } else {
        target.token.clone()
    };
    let bearer = match secret {
        Some(secret) => {
            Bearer::new(&secret).map_err(|err| Error::Scenario(format!("--token: {err}")))?
        }
        None => Bearer::default(),
    };
    let _ = ACCESS.set(Access { tls, bearer });
    Ok(())
}

/// Where the node of a run lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NodeKind {
    /// A server that was already running (`--server`).
    Remote,
    /// Started inside the bench process (`--in-process`).
    InProcess,
    /// Started as a child process (`--spawn`).
    Spawned,
}

impl NodeKind {
    /// What the node's CPU and memory figures cover, as a note for report
    /// tables: empty for a spawned node (its own figures).
    pub(crate) fn caveat(self) -> &'static str {
        match self {
            NodeKind::InProcess => " (in-process: includes the bench clients)",
            NodeKind::Remote => " (running server: not measured)",
            NodeKind::Spawned => "",
        }
    }
}

/// Parses a `--lease` length: a humantime duration the server accepts
/// (1s to 1h).
pub(crate) fn parse_lease(text: &str) -> Result<Duration, String> {
    let lease = humantime::parse_duration(text).map_err(|err| err.to_string())?;
    if (crate::wire::limit::MIN_LEASE..=crate::wire::limit::MAX_LEASE).contains(&lease) {
        Ok(lease)
    } else {
        Err("the lease must be between 1s and 1h".into())
    }
}

impl Target {
    /// An in-process node over `database_url` (for the scenarios' tests).
    #[cfg(test)]
    pub(crate) fn in_process_at(database_url: String) -> Self {
        Self {
            server: None,
            spawn: false,
            in_process: true,
            database_url,
            tls_cert: None,
            tls_key: None,
            tls_ca: None,
            auth: false,
            token: None,
        }
    }

    /// The kind of node the flags ask for, `default` when they name none.
    pub(crate) fn kind(&self, default: NodeKind) -> NodeKind {
        if self.server.is_some() {
            NodeKind::Remote
        } else if self.spawn {
            NodeKind::Spawned
        } else if self.in_process {
            NodeKind::InProcess
        } else {
            default
        }
    }
}

/// The server a run talks to; [`Node::stop`] shuts down a node started for
/// the run.
#[derive(Debug)]
pub(crate) struct Node {
    endpoint: String,
    kind: NodeKind,
    running: Option<Running>,
    child: Option<ChildNode>,
}

impl Node {
    /// Connects to `--server`, or starts a node on a free port of 127.0.0.1
    /// over `--database-url`: in this process or as a child process, as the
    /// flags say or else as `default` says.
    pub(crate) async fn start(target: &Target, default: NodeKind) -> Result<Self> {
        let node = Self::start_node(target, default).await?;
        access_for(target).await?;
        Ok(node)
    }

    async fn start_node(target: &Target, default: NodeKind) -> Result<Self> {
        let scheme = if target.tls_cert.is_some() {
            "https"
        } else {
            "http"
        };
        match target.kind(default) {
            NodeKind::Remote => Ok(Self {
                endpoint: target.server.clone().expect("remote means --server"),
                kind: NodeKind::Remote,
                running: None,
                child: None,
            }),
            NodeKind::InProcess => {
                let mut config = Config::with_database_url(&target.database_url);
                config.drain_grace = NODE_DRAIN_GRACE;
                config.tls_cert = target.tls_cert.clone();
                config.tls_key = target.tls_key.clone();
                if target.auth {
                    config.auth = crate::config::Auth::Required;
                }
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .context("cannot listen on 127.0.0.1")?;
                config.listen = listener
                    .local_addr()
                    .context("cannot read the address of the in-process node")?;
                let running = crate::server::start(config, listener)
                    .await
                    .context("cannot start the in-process node")?;
                Ok(Self {
                    endpoint: format!("{scheme}://{}", running.addr()),
                    kind: NodeKind::InProcess,
                    running: Some(running),
                    child: None,
                })
            }
            NodeKind::Spawned => {
                let child = ChildNode::spawn(target).await?;
                Ok(Self {
                    endpoint: format!("{scheme}://{}", child.addr),
                    kind: NodeKind::Spawned,
                    running: None,
                    child: Some(child),
                })
            }
        }
    }

    /// `count` nodes on one database, as [`Node::start`] starts one (the
    /// first migrates it); a server given by `--server` is one node only.
    pub(crate) async fn start_many(
        target: &Target,
        default: NodeKind,
        count: u32,
    ) -> Result<Vec<Self>> {
        if count > 1 && target.kind(default) == NodeKind::Remote {
            return Err(Error::Scenario(
                "--nodes starts the nodes itself: leave out --server".into(),
            ));
        }
        let mut nodes = Vec::with_capacity(count as usize);
        for _ in 0..count.max(1) {
            match Self::start(target, default).await {
                Ok(node) => nodes.push(node),
                Err(err) => {
                    for node in nodes {
                        let _ = node.stop().await;
                    }
                    return Err(err);
                }
            }
        }
        Ok(nodes)
    }

    /// The address of the server, `http://host:port`.
    pub(crate) fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Where the node lives.
    pub(crate) fn kind(&self) -> NodeKind {
        self.kind
    }

    /// The node in a few words, for report tables.
    pub(crate) fn describe(&self) -> String {
        match (&self.kind, &self.child) {
            (NodeKind::Remote, _) => format!("{} (running server)", self.endpoint),
            (NodeKind::InProcess, _) => format!("{} (in-process node)", self.endpoint),
            (NodeKind::Spawned, Some(child)) => {
                format!("{} (spawned node, pid {})", self.endpoint, child.pid)
            }
            (NodeKind::Spawned, None) => format!("{} (spawned node)", self.endpoint),
        }
    }

    /// The node's CPU time and memory now: the child's for a spawned node,
    /// this process's (bench clients included) for an in-process node, and
    /// `None` for a server given by `--server` or when `/proc` cannot be
    /// read.
    pub(crate) fn usage(&self) -> Option<Usage> {
        let pid = match (&self.kind, &self.child) {
            (NodeKind::Remote, _) => return None,
            (NodeKind::InProcess, _) => None,
            (NodeKind::Spawned, Some(child)) => Some(child.pid),
            (NodeKind::Spawned, None) => return None,
        };
        match Usage::of(pid) {
            Ok(usage) => Some(usage),
            Err(err) => {
                tracing::warn!(error = %err, "cannot read the node's CPU time and memory");
                None
            }
        }
    }

    /// Shuts a node started for the run down gracefully (SIGTERM for a
    /// spawned one); does nothing to a server given by `--server`.
    pub(crate) async fn stop(mut self) -> Result<()> {
        if let Some(running) = self.running.take() {
            running
                .shutdown()
                .await
                .context("the in-process node failed")?;
        }
        if let Some(child) = self.child.take() {
            child.stop().await?;
        }
        Ok(())
    }
}

/// A connected channel to `endpoint` (`http://host:port`, or `https://`
/// with the run's CA).
pub(crate) async fn channel_to(endpoint: &str) -> Result<Channel> {
    let tls = ACCESS.get().and_then(|access| access.tls.as_ref());
    let tls = tls.filter(|_| endpoint.starts_with("https://"));
    crate::client::endpoint_with(endpoint, tls)
        .map_err(|err| Error::Scenario(format!("{endpoint}: {err}")))?
        .connect()
        .await
        .with_context(|| format!("cannot connect to {endpoint}"))
}

/// `leasehold serve` running as a child of the bench. Its log goes to the
/// bench's standard error, each line prefixed with `node| `. Killed if
/// dropped without [`ChildNode::stop`] (and, on Linux, when the bench dies).
#[derive(Debug)]
struct ChildNode {
    child: Option<Child>,
    pid: u32,
    addr: String,
}

impl ChildNode {
    /// Runs this same executable as `serve --listen 127.0.0.1:0` and waits
    /// for the `listening ... addr=` line on its standard error.
    async fn spawn(target: &Target) -> Result<Self> {
        let database_url = &target.database_url;
        let exe = std::env::current_exe().context("cannot find the leasehold executable")?;
        let mut command = Command::new(&exe);
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--database-url"])
            .arg(database_url)
            .arg("--drain-grace")
            .arg(humantime::format_duration(NODE_DRAIN_GRACE).to_string())
            .env_remove("LEASEHOLD_CONFIG")
            .env("RUST_LOG", SPAWNED_LOG_FILTER)
            .env("NO_COLOR", "1")
            .env_remove("LEASEHOLD_LOG_JSON")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::process::CommandExt;
            // SAFETY: only prctl, which is async-signal-safe, runs between
            // fork and exec. The signal goes to the child when the thread
            // that forked it exits; tokio's worker threads live as long as
            // the runtime, so in practice when the bench exits.
            unsafe {
                command.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                    Ok(())
                });
            }
        }
        if let (Some(cert), Some(key)) = (&target.tls_cert, &target.tls_key) {
            command
                .arg("--tls-cert")
                .arg(cert)
                .arg("--tls-key")
                .arg(key);
        }
        if target.auth {
            command.args(["--auth", "required"]);
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start {}", exe.display()))?;
        let pid = child.id();
        let stderr = child.stderr.take().expect("stderr is piped");
        let (addr_tx, addr_rx) = tokio::sync::oneshot::channel::<Result<String, String>>();
        std::thread::Builder::new()
            .name("node-log".into())
            .spawn(move || forward_log(stderr, addr_tx))
            .context("cannot start the log reader of the spawned node")?;
        let mut node = Self {
            child: Some(child),
            pid,
            addr: String::new(),
        };
        match tokio::time::timeout(SPAWN_TIMEOUT, addr_rx).await {
            Ok(Ok(Ok(addr))) => {
                tracing::info!(pid, %addr, "spawned node listening");
                node.addr = addr;
                Ok(node)
            }
            Ok(Ok(Err(log))) => {
                let status = node.child.as_mut().and_then(|c| c.wait().ok());
                Err(Error::Scenario(format!(
                    "the spawned node exited ({status:?}) before listening; its log:\n{log}"
                )))
            }
            Ok(Err(_)) => Err(Error::Scenario(
                "the log reader of the spawned node stopped".into(),
            )),
            Err(_) => Err(Error::Scenario(format!(
                "the spawned node did not listen within {SPAWN_TIMEOUT:?}"
            ))),
        }
    }

    /// SIGTERM, then waits for a graceful exit (SIGKILL after
    /// [`EXIT_TIMEOUT`]). Fails if the node exited with an error.
    async fn stop(mut self) -> Result<()> {
        let mut child = self.child.take().expect("a child node is stopped once");
        if let Some(status) = child
            .try_wait()
            .context("cannot wait for the spawned node")?
        {
            return Err(Error::Scenario(format!(
                "the spawned node had already exited with {status}"
            )));
        }
        // SAFETY: kill sends a signal to the child we started and reap only
        // below, so the pid cannot have been reused.
        unsafe {
            libc::kill(self.pid as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + EXIT_TIMEOUT;
        loop {
            if let Some(status) = child
                .try_wait()
                .context("cannot wait for the spawned node")?
            {
                if status.success() {
                    return Ok(());
                }
                return Err(Error::Scenario(format!(
                    "the spawned node exited with {status}"
                )));
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::Scenario(format!(
                    "the spawned node did not stop within {EXIT_TIMEOUT:?} of SIGTERM: killed"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for ChildNode {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Reads the spawned node's log: sends its address once the `listening`
/// line shows it (or, at end of file, the lines read so far), then copies
/// every line to this process's standard error.
fn forward_log(
    stderr: std::process::ChildStderr,
    addr_tx: tokio::sync::oneshot::Sender<Result<String, String>>,
) {
    let mut addr_tx = Some(addr_tx);
    let mut early = Vec::new();
    for line in BufReader::new(stderr).lines() {
        let Ok(line) = line else { break };
        if let Some(tx) = addr_tx.take() {
            match listening_addr(&line) {
                Some(addr) => {
                    let _ = tx.send(Ok(addr));
                }
                None => {
                    addr_tx = Some(tx);
                    early.push(line.clone());
                }
            }
        }
        eprintln!("node| {line}");
    }
    if let Some(tx) = addr_tx {
        let _ = tx.send(Err(early.join("\n")));
    }
}

/// The address of a `listening ... addr=host:port ...` log line.
pub(crate) fn listening_addr(line: &str) -> Option<String> {
    if !line.contains("listening") {
        return None;
    }
    let addr = line.split("addr=").nth(1)?.split_whitespace().next()?;
    Some(addr.trim_matches('"').to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listening_line_gives_the_address() {
        let line = "2026-05-01T10:00:00.000000Z  INFO leasehold::server: listening \
                    addr=127.0.0.1:40123 node_id=0196-abc";
        assert_eq!(listening_addr(line).as_deref(), Some("127.0.0.1:40123"));
        assert_eq!(
            listening_addr("INFO leasehold::server: database reachable: serving"),
            None
        );
    }

    #[test]
    fn the_flags_choose_the_node() {
        let target = |server: Option<&str>, spawn, in_process| Target {
            server: server.map(str::to_owned),
            spawn,
            in_process,
            database_url: DEFAULT_DATABASE_URL.into(),
            tls_cert: None,
            tls_key: None,
            tls_ca: None,
            auth: false,
            token: None,
        };
        let spawned = NodeKind::Spawned;
        let in_process = NodeKind::InProcess;
        assert_eq!(target(None, false, false).kind(spawned), spawned);
        assert_eq!(target(None, false, false).kind(in_process), in_process);
        assert_eq!(target(None, true, false).kind(in_process), spawned);
        assert_eq!(target(None, false, true).kind(spawned), in_process);
        assert_eq!(
            target(Some("http://x:1"), false, false).kind(spawned),
            NodeKind::Remote
        );
    }
}
