//! `leasehold worker -- COMMAND ARGS...`: a worker in any language with no
//! stubs at all. Each task runs the command once:
//!
//! - stdin: the task as one JSON object (`id`, `task_type`, `params`,
//!   `attempt`, `max_attempts`, `priority`, and the library, series and book
//!   ids when set); environment: `LEASEHOLD_TASK_ID`, `LEASEHOLD_TASK_TYPE`,
//!   `LEASEHOLD_ATTEMPT`.
//! - exit 0: the task completes with the JSON printed on stdout (empty
//!   stdout means `{}`; a value that is not an object is stored as
//!   `{"value": ...}`; anything that is not JSON fails the attempt).
//! - any other exit: the attempt fails with the exit code and the tail of
//!   stderr, and is retried while attempts are left.
//! - cancelled task or lost lease: the command's process group gets SIGTERM,
//!   then whatever is left of it SIGKILL after `--kill-grace`. When the
//!   command exits, anything it left running in its process group is
//!   stopped the same way: a task's processes never outlive it.
//! - a command that is not an executable file (nor on `PATH`) stops the
//!   runner at start-up, before it takes any task.
//!
//! The command's stderr is copied to ours line by line, prefixed with the
//! task id, so its logs are not lost.

use std::collections::VecDeque;
use std::io::Write as _;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

use crate::client::{TaskContext, TaskError, Worker, DEFAULT_SERVER};

/// How much of stderr a failure keeps.
const STDERR_TAIL_BYTES: usize = 4096;

/// Longest piece of a stderr line relayed at once.
const STDERR_LINE_BYTES: u64 = 8192;

/// Largest stdout read as the result; more fails the attempt (the server
/// refuses results over its payload limit anyway).
const STDOUT_LIMIT_BYTES: u64 = 16 * 1024 * 1024;

/// Flags of `leasehold worker`.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerArgs {
    /// Server address(es), comma-separated; a broken session reconnects to
    /// the next one.
    #[arg(
        long,
        env = "LEASEHOLD_SERVER",
        default_value = DEFAULT_SERVER,
        value_delimiter = ','
    )]
    pub(crate) server: Vec<String>,

    /// PEM file of the certificate authorities to trust for `https://`
    /// servers instead of the system's (a bare `host:port` then means
    /// `https://`).
    #[arg(long, env = "LEASEHOLD_TLS_CA")]
    pub(crate) tls_ca: Option<std::path::PathBuf>,

    /// Bearer token of the session, for a node with `--auth required`.
    #[arg(long, env = "LEASEHOLD_TOKEN", hide_env_values = true)]
    pub(crate) token: Option<String>,

    /// Task type to run the command for (repeat for several).
    #[arg(long = "task-type", required = true)]
    pub(crate) task_types: Vec<String>,

    /// How many tasks (command processes) may run at once.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub(crate) slots: u32,

    /// Worker id, stored as `locked_by` (default: host name and process id).
    #[arg(long, env = "LEASEHOLD_WORKER_ID")]
    pub(crate) worker_id: Option<String>,

    /// Lease length (default: the server's); heartbeats go out at a third
    /// of it while the command runs.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) lease_duration: Option<Duration>,

    /// On SIGINT/SIGTERM, how long running commands may still finish before
    /// they are killed and their tasks released.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub(crate) drain_timeout: Duration,

    /// After SIGTERM to a cancelled command, how long until SIGKILL.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub(crate) kill_grace: Duration,

    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, num_args = 1..)]
    pub(crate) command: Vec<String>,
}

/// Runs the worker until SIGINT/SIGTERM, then drains.
pub async fn run(args: WorkerArgs) -> crate::client::Result<()> {
    let worker_id = args.worker_id.clone().unwrap_or_else(default_worker_id);
    let mut builder = Worker::builder(worker_id)
        .servers(args.server.iter().cloned())
        .slots(args.slots)
        .drain_timeout(args.drain_timeout)
        .label("command", args.command.join(" "));
    if let Some(lease) = args.lease_duration {
        builder = builder.lease_duration(lease);
    }
    if let Some(token) = &args.token {
        builder = builder.token(token.clone());
    }
    if let Some(ca) = &args.tls_ca {
        builder = builder.tls(crate::client::Tls::new().ca_file(ca)?);
    }
    if find_program(&args.command[0]).is_none() {
        return Err(crate::client::Error::InvalidConfig(format!(
            "command: {:?} is not an executable file, nor found on PATH",
            args.command[0]
        )));
    }
    let spec = std::sync::Arc::new(CommandSpec {
        program: args.command[0].clone(),
        args: args.command[1..].to_vec(),
        kill_grace: args.kill_grace,
    });
    for task_type in &args.task_types {
        let spec = spec.clone();
        builder = builder.handler(task_type.clone(), move |ctx| {
            let spec = spec.clone();
            async move { spec.run(ctx).await }
        });
    }
    builder.build()?.run_until_signal().await
}

fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "worker".to_owned());
    format!("{host}-{}", std::process::id())
}

/// The command to run per task.
struct CommandSpec {
    program: String,
    args: Vec<String>,
    kill_grace: Duration,
}

impl CommandSpec {
    async fn run(&self, ctx: TaskContext) -> Result<serde_json::Value, TaskError> {
        let input = task_json(&ctx);
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .env("LEASEHOLD_TASK_ID", ctx.id())
            .env("LEASEHOLD_TASK_TYPE", ctx.task_type())
            .env("LEASEHOLD_ATTEMPT", ctx.attempt().to_string())
            // The worker's token is the runner's, not the task's.
            .env_remove("LEASEHOLD_TOKEN")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so a cancel reaches what the command
            // started too (a shell script's children).
            .process_group(0)
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .map_err(|e| TaskError::retry(format!("cannot start {:?}: {e}", self.program)))?;

        let mut stdin = child.stdin.take().expect("stdin is piped");
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        // A command that never reads its input must not block us.
        tokio::spawn(async move {
            let _ = stdin.write_all(&input).await;
            let _ = stdin.shutdown().await;
        });
        let out = tokio::spawn(read_capped(stdout, STDOUT_LIMIT_BYTES));
        let task_id = ctx.id().to_owned();
        let err = tokio::spawn(copy_stderr(stderr, task_id));
        let group = child.id().and_then(|pid| i32::try_from(pid).ok());
        // If this future is dropped (the worker stops and aborts handlers
        // that outlast its wait), nothing of the command may live on.
        let mut guard = GroupGuard(group);

        let status = tokio::select! {
            status = child.wait() => status,
            () = ctx.cancelled() => {
                if let Some(group) = group {
                    self.stop_group(group, Some(&mut child)).await;
                }
                let _ = child.kill().await;
                return Err(TaskError::retry("cancelled: the command was stopped"));
            }
        }
        .map_err(|e| TaskError::retry(format!("waiting for the command: {e}")))?;
        // The task ends with its command: what it left running in its
        // process group is stopped too, or it would hold the pipes open and
        // run on outside the worker's slots.
        if let Some(group) = group {
            if group_alive(group) {
                self.stop_group(group, None).await;
            }
            // The group is gone (its leader reaped above): from now on its
            // id may be reused by an unrelated group, which the guard must
            // not signal.
            if !group_alive(group) {
                guard.disarm();
            }
        }
        // A process that left the group (setsid) may still hold a pipe:
        // wait for the output only so long.
        let (stdout, tail) = tokio::select! {
            output = async { (out.await, err.await) } => output,
            () = tokio::time::sleep(self.kill_grace.saturating_add(Duration::from_secs(1))) => {
                return Err(TaskError::retry(
                    "the command exited, but a process it started keeps its output open",
                ));
            }
            () = ctx.cancelled() => return Err(TaskError::retry("cancelled")),
        };
        let tail = tail.unwrap_or_default();
        let (stdout, over_limit) = stdout
            .map_err(|e| TaskError::retry(format!("reading stdout: {e}")))?
            .map_err(|e| TaskError::retry(format!("reading stdout: {e}")))?;

        // A failed command's exit status and stderr say more than the size
        // of what it printed.
        if !status.success() {
            let how = match (status.code(), exit_signal(&status)) {
                (Some(code), _) => format!("exit code {code}"),
                (None, Some(signal)) => format!("killed by signal {signal}"),
                (None, None) => "abnormal exit".to_owned(),
            };
            let tail = tail.trim_end();
            return Err(TaskError::retry(if tail.is_empty() {
                format!("command failed with {how}")
            } else {
                format!("command failed with {how}: {tail}")
            }));
        }
        if over_limit {
            return Err(TaskError::retry(format!(
                "stdout is larger than {STDOUT_LIMIT_BYTES} bytes"
            )));
        }
        if stdout.iter().all(u8::is_ascii_whitespace) {
            return Ok(serde_json::json!({}));
        }
        serde_json::from_slice(&stdout)
            .map_err(|e| TaskError::retry(format!("stdout is not JSON: {e}")))
    }

    /// SIGTERM to the command's process group; SIGKILL to whatever is left
    /// of it after the grace. `leader`, when still running, is waited for
    /// (and so reaped) meanwhile.
    async fn stop_group(&self, group: i32, leader: Option<&mut Child>) {
        signal_group(group, libc::SIGTERM);
        let now = tokio::time::Instant::now();
        // A grace too long for an Instant is as good as forever, not none.
        let deadline = now
            .checked_add(self.kill_grace)
            .unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600));
        if let Some(leader) = leader {
            let _ = tokio::time::timeout_at(deadline, leader.wait()).await;
        }
        while group_alive(group) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if group_alive(group) {
            signal_group(group, libc::SIGKILL);
        }
    }
}

/// SIGKILLs what is left of a command's process group when dropped,
/// unless disarmed.
struct GroupGuard(Option<i32>);

impl GroupGuard {
    /// The group is known to be gone: signal nothing.
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(group) = self.0.filter(|group| group_alive(*group)) {
            signal_group(group, libc::SIGKILL);
        }
    }
}

/// Sends `signal` to every process of `group`.
fn signal_group(group: i32, signal: i32) {
    // SAFETY: kill(2) with a negative pid signals the process group we
    // created for a command; it touches no memory.
    unsafe {
        libc::kill(-group, signal);
    }
}

/// True while any process of `group` exists.
fn group_alive(group: i32) -> bool {
    // SAFETY: signal 0 only checks that the group exists.
    unsafe { libc::kill(-group, 0) == 0 }
}

/// Reads `reader` to its end, keeping at most `limit` bytes (and saying if
/// there was more). It never stops reading early: a command blocked on a
/// full pipe would never exit.
async fn read_capped(
    mut reader: impl tokio::io::AsyncRead + Unpin,
    limit: u64,
) -> std::io::Result<(Vec<u8>, bool)> {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let mut kept = Vec::new();
    let mut over = false;
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = reader.read(&mut chunk).await?;
        if n == 0 {
            return Ok((kept, over));
        }
        let room = limit - kept.len();
        if n > room {
            over = true;
        }
        kept.extend_from_slice(&chunk[..n.min(room)]);
    }
}

/// Finds `program` as `execve` would: a path with a slash as it is, a bare
/// name on `PATH`. Checked once at start-up so that a mistyped command
/// stops the worker instead of failing every task it takes.
fn find_program(program: &str) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |path: &std::path::Path| {
        std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        let path = std::path::PathBuf::from(program);
        return executable(&path).then_some(path);
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|path| executable(path))
}

#[cfg(unix)]
fn exit_signal(status: &std::process::ExitStatus) -> Option<i32> {
    use std::os::unix::process::ExitStatusExt;
    status.signal()
}

#[cfg(not(unix))]
fn exit_signal(_: &std::process::ExitStatus) -> Option<i32> {
    None
}

/// Copies the command's stderr to ours, each line prefixed with the task
/// id, and returns its last few kilobytes.
async fn copy_stderr(stderr: tokio::process::ChildStderr, task_id: String) -> String {
    // Split on bytes, not lines: output that is not UTF-8 must still be
    // read to the end, or the command would block on a full pipe. A line
    // longer than STDERR_LINE_BYTES is relayed in pieces, so a command that
    // never writes a newline holds no more than that in memory.
    let mut reader = BufReader::new(stderr);
    let mut bytes = Vec::new();
    let mut tail: VecDeque<String> = VecDeque::new();
    let mut tail_len = 0;
    loop {
        bytes.clear();
        match (&mut reader)
            .take(STDERR_LINE_BYTES)
            .read_until(b'\n', &mut bytes)
            .await
        {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        if bytes.last() == Some(&b'\n') {
            bytes.pop();
        }
        let line = String::from_utf8_lossy(&bytes).into_owned();
        // Not eprintln!: it panics when our stderr is closed, and this task
        // must keep reading or the command blocks on its pipe.
        let _ = writeln!(std::io::stderr().lock(), "[{task_id}] {line}");
        tail_len += line.len() + 1;
        tail.push_back(line);
        while tail_len > STDERR_TAIL_BYTES && tail.len() > 1 {
            if let Some(old) = tail.pop_front() {
                tail_len -= old.len() + 1;
            }
        }
    }
    let mut text = tail.into_iter().collect::<Vec<_>>().join("\n");
    if text.len() > STDERR_TAIL_BYTES {
        let mut cut = text.len() - STDERR_TAIL_BYTES;
        while !text.is_char_boundary(cut) {
            cut += 1;
        }
        text = text.split_off(cut);
    }
    text
}

/// The task as the command reads it on stdin.
fn task_json(ctx: &TaskContext) -> Vec<u8> {
    let task = ctx.task();
    let mut json = serde_json::json!({
        "id": task.id,
        "task_type": task.task_type,
        "params": ctx.params(),
        "attempt": ctx.attempt(),
        "max_attempts": task.max_attempts,
        "priority": task.priority,
    });
    for (key, value) in [
        ("library_id", &task.library_id),
        ("series_id", &task.series_id),
        ("book_id", &task.book_id),
    ] {
        if let Some(value) = value {
            json[key] = serde_json::Value::String(value.clone());
        }
    }
    let mut bytes = serde_json::to_vec(&json).unwrap_or_default();
    bytes.push(b'\n');
    bytes
}
