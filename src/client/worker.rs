//! [`Worker`]: async handlers per task type, run over a worker session.
//!
//! One background loop owns the session stream and every piece of state
//! (held leases, outcomes not yet acknowledged); handlers run as their own
//! tokio tasks and talk to the loop through channels. That keeps the rules
//! in one place:
//!
//! - A lease is held from its hand-out until its handler finishes, the
//!   server cancels it, or a heartbeat answers it lost. Only held leases are
//!   heartbeated, and a handler's result is sent only while its lease is
//!   held, so a stale attempt never reports.
//! - An outcome stays queued until the server acknowledges it. When the
//!   stream breaks, the next session re-attaches the held leases (an
//!   explicit heartbeat) and sends the queued outcomes again; repeating an
//!   outcome with the same token is harmless, so each task completes
//!   exactly once.

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use rand::Rng;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::Code;

use super::{endpoint, from_struct, to_struct, Error, Result};
use crate::proto::{
    self, connect_request, connect_response, worker_service_client::WorkerServiceClient, AckStatus,
    LeaseStatus, OutcomeKind,
};
use crate::wire::{convert, limit};

/// What a handler returns: the task's result (a JSON object; anything else
/// is stored as `{"value": ...}`), or why the attempt failed.
pub type HandlerResult = std::result::Result<serde_json::Value, TaskError>;

type BoxFuture = Pin<Box<dyn Future<Output = HandlerResult> + Send>>;
type Handler = Arc<dyn Fn(TaskContext) -> BoxFuture + Send + Sync>;

/// Why an attempt failed, and whether and when to try again.
///
/// Any error converts into a retryable `TaskError` with `?`, so handlers can
/// use their own error types; use [`TaskError::permanent`] for input that
/// will never work, and [`TaskError::retry_after`] when the cause says when
/// to come back (a rate limit, a locked file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskError {
    message: String,
    permanent: bool,
    retry_after: Option<Duration>,
}

impl TaskError {
    /// A failed attempt, retried with the server's backoff while attempts
    /// are left.
    pub fn retry(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            permanent: false,
            retry_after: None,
        }
    }

    /// A failed attempt, retried no sooner than `after` while attempts are
    /// left.
    pub fn retry_after(message: impl Into<String>, after: Duration) -> Self {
        Self {
            retry_after: Some(after),
            ..Self::retry(message)
        }
    }

    /// Fails the task for good, whatever attempts are left.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            permanent: true,
            ..Self::retry(message)
        }
    }

    /// The message, stored as the task's `last_error`.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// True if the task fails for good.
    pub fn is_permanent(&self) -> bool {
        self.permanent
    }

    /// The earliest retry, when set.
    pub fn retry_delay(&self) -> Option<Duration> {
        self.retry_after
    }
}

impl std::fmt::Display for TaskError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Lets `?` turn any error into a retryable failure. (`TaskError` itself is
/// not a `std::error::Error`, or this blanket conversion would overlap with
/// the reflexive `From`.)
impl<E: std::error::Error> From<E> for TaskError {
    fn from(error: E) -> Self {
        TaskError::retry(error.to_string())
    }
}

/// Progress of one task, from a handler to the session loop.
struct ProgressReport {
    task_id: String,
    lease_token: String,
    current: i64,
    total: i64,
    message: String,
}

/// What a handler gets: the task, its parameters, a cancellation token and
/// a way to report progress.
pub struct TaskContext {
    task: proto::Task,
    lease: proto::Lease,
    params: serde_json::Value,
    cancel: CancellationToken,
    progress: mpsc::Sender<ProgressReport>,
}

impl TaskContext {
    /// The task id (UUID).
    pub fn id(&self) -> &str {
        &self.task.id
    }

    /// The task type.
    pub fn task_type(&self) -> &str {
        &self.task.task_type
    }

    /// Which attempt this is (1 for the first).
    pub fn attempt(&self) -> i32 {
        self.lease.attempt
    }

    /// The task's parameters, a JSON object.
    pub fn params(&self) -> &serde_json::Value {
        &self.params
    }

    /// The whole task as the server handed it out.
    pub fn task(&self) -> &proto::Task {
        &self.task
    }

    /// The lease: token, worker id, expiry at hand-out.
    pub fn lease(&self) -> &proto::Lease {
        &self.lease
    }

    /// Fires when the work should stop: the task was cancelled, its lease
    /// was lost, or the worker's drain deadline passed. Whatever the handler
    /// returns afterwards is dropped.
    pub fn cancellation(&self) -> &CancellationToken {
        &self.cancel
    }

    /// Completes when the work should stop (see [`Self::cancellation`]).
    pub async fn cancelled(&self) {
        self.cancel.cancelled().await
    }

    /// True once the work should stop.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Reports progress, shown by `GetTask`, `WatchTasks` and `leasehold
    /// watch`. Never blocks: progress is advisory, so a report that finds
    /// the session's queue full is dropped (the next one carries the news).
    pub fn progress(&self, current: i64, total: i64, message: impl Into<String>) {
        let _ = self.progress.try_send(ProgressReport {
            task_id: self.task.id.clone(),
            lease_token: self.lease.lease_token.clone(),
            current,
            total,
            message: message.into(),
        });
    }
}

/// Stops a running [`Worker`] gracefully: no new tasks, in-flight ones may
/// finish until the drain timeout, the rest are released.
#[derive(Debug, Clone)]
pub struct Shutdown(CancellationToken);

impl Shutdown {
    /// Starts the drain. Idempotent.
    pub fn shutdown(&self) {
        self.0.cancel();
    }

    /// True once shutdown was asked for.
    pub fn is_shutdown(&self) -> bool {
        self.0.is_cancelled()
    }
}

/// Configures a [`Worker`]; see [`Worker::builder`].
pub struct WorkerBuilder {
    worker_id: String,
    servers: Vec<String>,
    slots: u32,
    lease_duration: Option<Duration>,
    labels: HashMap<String, String>,
    handlers: HashMap<String, Handler>,
    drain_timeout: Duration,
    backoff_initial: Duration,
    backoff_max: Duration,
}

impl WorkerBuilder {
    /// Adds a server address (`host:port` or `http://host:port`). With
    /// several, a broken session reconnects to the next one in turn.
    pub fn server(mut self, address: impl Into<String>) -> Self {
        self.servers.push(address.into());
        self
    }

    /// Adds several server addresses.
    pub fn servers<I, S>(mut self, addresses: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.servers.extend(addresses.into_iter().map(Into::into));
        self
    }

    /// How many tasks may run at once (default 1; the server allows 1 to
    /// 10,000).
    pub fn slots(mut self, slots: u32) -> Self {
        self.slots = slots;
        self
    }

    /// Lease length of this worker's tasks (default: the server's). The
    /// worker heartbeats at the interval the server recommends for it.
    pub fn lease_duration(mut self, lease: Duration) -> Self {
        self.lease_duration = Some(lease);
        self
    }

    /// A label shown by `ListWorkers` (e.g. host, version).
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// Runs `handler` for tasks of `task_type`. The worker asks only for the
    /// types it has handlers for.
    pub fn handler<F, Fut>(mut self, task_type: impl Into<String>, handler: F) -> Self
    where
        F: Fn(TaskContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
    {
        let handler: Handler = Arc::new(move |ctx| Box::pin(handler(ctx)));
        self.handlers.insert(task_type.into(), handler);
        self
    }

    /// On shutdown, how long in-flight tasks may still run before they are
    /// cancelled and released (default 30 s).
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = timeout;
        self
    }

    /// Reconnect delays: the first, doubled per failed attempt up to `max`,
    /// each scaled by a random factor in [0.5, 1) so a fleet does not
    /// reconnect in lockstep (default 100 ms to 10 s).
    pub fn reconnect_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.backoff_initial = initial;
        self.backoff_max = max.max(initial);
        self
    }

    /// Checks the configuration and builds the worker. Connections are made
    /// when it runs.
    pub fn build(self) -> Result<Worker> {
        let invalid = |message: &str| Error::InvalidConfig(message.to_owned());
        if self.servers.is_empty() {
            return Err(invalid("servers: give at least one server address"));
        }
        if self.handlers.is_empty() {
            return Err(invalid("handlers: register at least one task type"));
        }
        if self.slots == 0 {
            return Err(invalid("slots: must be at least 1"));
        }
        let channels = self
            .servers
            .iter()
            .map(|address| Ok((address.clone(), endpoint(address)?.connect_lazy())))
            .collect::<Result<Vec<_>>>()?;
        let mut task_types: Vec<String> = self.handlers.keys().cloned().collect();
        task_types.sort();
        let register = proto::RegisterWorker {
            worker_id: self.worker_id,
            task_types,
            slots: i32::try_from(self.slots).unwrap_or(i32::MAX),
            lease_duration: self.lease_duration.map(convert::duration),
            labels: self.labels,
        };
        // The server's own checks of a registration, so that a worker id,
        // slot count, lease or label it would refuse fails here and not at
        // the first connection. (The default lease is only a placeholder:
        // the server picks its own when none is given.)
        crate::wire::request::register(&register, limit::MIN_LEASE)
            .map_err(|err| Error::InvalidConfig(err.to_string()))?;
        Ok(Worker {
            register,
            channels,
            handlers: self.handlers,
            drain_timeout: self.drain_timeout,
            backoff_initial: self.backoff_initial,
            backoff_max: self.backoff_max,
            shutdown: CancellationToken::new(),
        })
    }
}

/// Runs handlers for tasks pushed over a worker session.
///
/// ```no_run
/// use leasehold::client::{TaskError, Worker};
///
/// # async fn demo() -> Result<(), leasehold::client::Error> {
/// let worker = Worker::builder("thumbnailer-1")
///     .server("http://127.0.0.1:50051")
///     .slots(4)
///     .handler("generate_thumbnail", |task| async move {
///         let book = task.params()["book_id"].as_str().unwrap_or_default().to_owned();
///         if book.is_empty() {
///             return Err(TaskError::permanent("params.book_id: required"));
///         }
///         task.progress(1, 2, "rendering");
///         tokio::select! {
///             _ = task.cancelled() => Err(TaskError::retry("cancelled")),
///             _ = tokio::time::sleep(std::time::Duration::from_millis(50)) => {
///                 Ok(serde_json::json!({ "thumbnail": format!("{book}.webp") }))
///             }
///         }
///     })
///     .build()?;
/// // Runs until Ctrl-C or SIGTERM, then drains.
/// worker.run_until_signal().await
/// # }
/// ```
///
/// Heartbeats go out automatically at the interval the server recommends;
/// a broken stream reconnects with jittered exponential backoff (to the next
/// server when several are given) and re-attaches the leases still held; a
/// handler that panics fails its attempt with the panic message and the
/// worker goes on.
pub struct Worker {
    register: proto::RegisterWorker,
    channels: Vec<(String, Channel)>,
    handlers: HashMap<String, Handler>,
    drain_timeout: Duration,
    backoff_initial: Duration,
    backoff_max: Duration,
    shutdown: CancellationToken,
}

impl Worker {
    /// A worker identified as `worker_id` (1 to 100 characters; stored as
    /// `locked_by` of its tasks).
    pub fn builder(worker_id: impl Into<String>) -> WorkerBuilder {
        WorkerBuilder {
            worker_id: worker_id.into(),
            servers: Vec::new(),
            slots: 1,
            lease_duration: None,
            labels: HashMap::new(),
            handlers: HashMap::new(),
            drain_timeout: Duration::from_secs(30),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
        }
    }

    /// A handle that stops this worker gracefully.
    pub fn shutdown_handle(&self) -> Shutdown {
        Shutdown(self.shutdown.clone())
    }

    /// Runs until shut down through [`Self::shutdown_handle`], then drains.
    /// Returns an error only when the server refuses the registration
    /// itself (e.g. too many slots): retrying could not help. Every other
    /// failure (a broken stream, a node going away) reconnects.
    pub async fn run(self) -> Result<()> {
        Runner::new(self).run().await
    }

    /// Runs until `signal` completes, then drains.
    pub async fn run_until(self, signal: impl Future<Output = ()>) -> Result<()> {
        let shutdown = self.shutdown_handle();
        let run = self.run();
        tokio::pin!(run);
        tokio::select! {
            result = &mut run => return result,
            () = signal => shutdown.shutdown(),
        }
        run.await
    }

    /// Runs until Ctrl-C or SIGTERM, then drains.
    pub async fn run_until_signal(self) -> Result<()> {
        self.run_until(crate::signal::shutdown()).await
    }
}

/// A lease whose handler is running.
struct Held {
    lease_token: String,
    /// The handler's token is a child of this one: a handler that cancels
    /// its own token (say, through a drop guard) stops nothing here.
    cancel: CancellationToken,
}

/// A handler ready to start.
struct Ready {
    task_id: String,
    lease_token: String,
    handler: Handler,
    ctx: TaskContext,
}

/// How a handler ended.
struct Finished {
    task_id: String,
    lease_token: String,
    result: HandlerResult,
}

/// An outcome waiting for the server's acknowledgement.
struct Pending {
    kind: OutcomeKind,
    message: connect_request::Kind,
    /// The lease the outcome is about; answers name it.
    lease_token: String,
    /// Whether this is already the stand-in for an outcome the server
    /// refused as invalid (so a second refusal gives up).
    fallback: bool,
}

/// How one session ended.
enum SessionEnd {
    /// Drained: nothing held, nothing unacknowledged.
    Done,
    /// The server ended the stream or it broke; reconnect.
    Broken(String),
    /// The server refused the registration in a way reconnecting cannot
    /// fix.
    Fatal(Box<tonic::Status>),
}

/// The session loop's state, which outlives each stream.
struct Runner {
    worker: Worker,
    slots: usize,
    held: HashMap<String, Held>,
    pending: HashMap<String, Pending>,
    running: JoinSet<Finished>,
    /// Handlers of held leases waiting for a free slot, in arrival order.
    waiting: std::collections::VecDeque<Ready>,
    progress_tx: mpsc::Sender<ProgressReport>,
    progress_rx: mpsc::Receiver<ProgressReport>,
    /// Set once shutdown began: when the remaining work must be released.
    drain_deadline: Option<Instant>,
}

/// How long releases sent at the drain deadline may wait for their answers.
const RELEASE_ANSWER_WAIT: Duration = Duration::from_secs(5);

/// After telling the server it drains, how long an idle worker keeps
/// reading: a task pushed just before the server saw `drain` is given back
/// at once instead of waiting out its lease.
const DRAIN_LINGER: Duration = Duration::from_millis(300);

/// When the worker stops, how long it waits for cancelled handlers to
/// return (a command runner kills its processes in that time) before it
/// aborts them.
const HANDLER_EXIT_WAIT: Duration = Duration::from_secs(10);

/// The server's limit on a fail message, in characters.
const MAX_ERROR_CHARS: usize = limit::ERROR_MAX_CHARS;

/// The server's limit on leases per heartbeat.
const MAX_HEARTBEAT_LEASES: usize = limit::MAX_HEARTBEAT_LEASES;

/// The longest heartbeat interval honoured, whatever the server says.
const MAX_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(3600);

impl Runner {
    fn new(worker: Worker) -> Self {
        let (progress_tx, progress_rx) = mpsc::channel(1024);
        let slots = usize::try_from(worker.register.slots).unwrap_or(1).max(1);
        Self {
            worker,
            slots,
            held: HashMap::new(),
            pending: HashMap::new(),
            running: JoinSet::new(),
            waiting: std::collections::VecDeque::new(),
            progress_tx,
            progress_rx,
            drain_deadline: None,
        }
    }

    fn idle(&self) -> bool {
        self.held.is_empty() && self.pending.is_empty()
    }

    async fn run(mut self) -> Result<()> {
        let result = self.serve().await;
        // Handlers cancelled at the end get a moment to clean up (a command
        // runner kills its processes) before they are aborted.
        let _ = tokio::time::timeout(HANDLER_EXIT_WAIT, async {
            while self.running.join_next().await.is_some() {}
        })
        .await;
        self.running.abort_all();
        result
    }

    async fn serve(&mut self) -> Result<()> {
        let mut server = 0;
        // Sessions in a row that ended without registering; a session that
        // registers resets it, so a healthy fleet reconnects quickly.
        let mut failures: u32 = 0;
        loop {
            let (address, channel) = self.worker.channels[server].clone();
            match self.session(&address, channel, &mut failures).await {
                SessionEnd::Done => return Ok(()),
                SessionEnd::Fatal(status) => {
                    tracing::error!(%address, code = ?status.code(), message = status.message(), "server refused the worker");
                    self.abandon();
                    return Err(Error::Status(status));
                }
                SessionEnd::Broken(why) => {
                    tracing::warn!(%address, %why, "worker session ended; reconnecting");
                }
            }
            server = (server + 1) % self.worker.channels.len();
            let delay = self.backoff(failures);
            failures = failures.saturating_add(1);
            if !self.wait_offline(delay).await {
                self.abandon();
                return Ok(());
            }
        }
    }

    /// Jittered exponential delay before reconnect number `failures`.
    fn backoff(&self, failures: u32) -> Duration {
        let exp = self
            .worker
            .backoff_initial
            .saturating_mul(2u32.saturating_pow(failures.min(20)));
        let capped = exp.min(self.worker.backoff_max);
        capped.mul_f64(rand::rng().random_range(0.5..1.0))
    }

    /// Waits `delay` while disconnected, still collecting finished handlers
    /// and honouring shutdown. False when the worker should give up: it is
    /// shutting down and either has nothing left or its drain deadline
    /// passed.
    async fn wait_offline(&mut self, delay: Duration) -> bool {
        let until = after(delay);
        loop {
            if self.worker.shutdown.is_cancelled() {
                let deadline = *self
                    .drain_deadline
                    .get_or_insert_with(|| after(self.worker.drain_timeout));
                if self.idle() || Instant::now() >= deadline {
                    return false;
                }
            }
            tokio::select! {
                () = tokio::time::sleep_until(until) => return true,
                Some(joined) = self.running.join_next(), if !self.running.is_empty() => {
                    if let Ok(finished) = joined {
                        self.finished(finished);
                    }
                    self.start_waiting();
                }
                () = self.worker.shutdown.cancelled(), if self.drain_deadline.is_none() => {}
                () = sleep_until_opt(self.drain_deadline) => {}
            }
        }
    }

    /// Gives up on everything held (shutdown with no server reachable, or a
    /// refused registration): handlers are cancelled; the leases expire and
    /// the server hands the tasks out again, so nothing is lost.
    fn abandon(&mut self) {
        for (_, held) in self.held.drain() {
            held.cancel.cancel();
        }
        if !self.pending.is_empty() {
            tracing::warn!(
                outcomes = self.pending.len(),
                "stopping with unacknowledged outcomes; their leases will expire and the tasks run again"
            );
        }
        self.pending.clear();
    }

    /// Takes a lease out of `held`.
    fn forget(&mut self, task_id: &str) -> Option<Held> {
        self.held.remove(task_id)
    }

    /// Queues an outcome until the server acknowledges it, and returns the
    /// message to send.
    fn queue(
        &mut self,
        task_id: String,
        kind: OutcomeKind,
        message: connect_request::Kind,
    ) -> connect_request::Kind {
        self.pending.insert(
            task_id,
            Pending {
                kind,
                message: message.clone(),
                lease_token: lease_token_of(&message).unwrap_or_default().to_owned(),
                fallback: false,
            },
        );
        message
    }

    /// Records a finished handler: its outcome is queued if the lease is
    /// still held by that very attempt.
    fn finished(&mut self, finished: Finished) -> Option<connect_request::Kind> {
        let held = self.held.get(&finished.task_id)?;
        if held.lease_token != finished.lease_token {
            return None;
        }
        self.forget(&finished.task_id);
        let task_id = finished.task_id;
        let lease_token = finished.lease_token;
        let (kind, message) = match finished.result {
            Ok(result) => (
                OutcomeKind::Complete,
                connect_request::Kind::Complete(proto::CompleteTaskRequest {
                    task_id: task_id.clone(),
                    lease_token,
                    result: Some(result_struct(result)),
                }),
            ),
            Err(error) => (
                OutcomeKind::Fail,
                connect_request::Kind::Fail(proto::FailTaskRequest {
                    task_id: task_id.clone(),
                    lease_token,
                    error: clean_error(error.message, MAX_ERROR_CHARS),
                    permanent: error.permanent,
                    // The server refuses a longer delay; the longest it
                    // takes is closer to what was asked than its backoff.
                    retry_after: error
                        .retry_after
                        .map(|d| convert::duration(d.min(limit::MAX_RETRY_AFTER))),
                }),
            ),
        };
        Some(self.queue(task_id, kind, message))
    }

    /// One session: register, then serve until the stream ends.
    async fn session(&mut self, address: &str, channel: Channel, failures: &mut u32) -> SessionEnd {
        let (tx, rx) = mpsc::channel::<proto::ConnectRequest>(256);
        let outbound = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|message| (message, rx))
        });
        // The register message is queued before the call, so the server
        // finds it as soon as the stream opens.
        let _ = tx
            .send(request(connect_request::Kind::Register(
                self.worker.register.clone(),
            )))
            .await;
        let mut client = WorkerServiceClient::new(channel);
        let mut inbound = match client.connect(outbound).await {
            Ok(response) => response.into_inner(),
            Err(status) => return refused(status),
        };
        let registered = match inbound.message().await {
            Ok(Some(proto::ConnectResponse {
                kind: Some(connect_response::Kind::Registered(registered)),
            })) => registered,
            Ok(Some(other)) => {
                return SessionEnd::Broken(format!("expected `registered` first, got {other:?}"))
            }
            Ok(None) => return SessionEnd::Broken("stream ended before `registered`".into()),
            Err(status) => return refused(status),
        };
        *failures = 0;
        tracing::info!(
            %address,
            session_id = %registered.session_id,
            node_id = %registered.node_id,
            held = self.held.len(),
            "worker session registered"
        );
        let interval = registered
            .heartbeat_interval
            .and_then(|d| Duration::try_from(d).ok())
            .filter(|d| !d.is_zero())
            .unwrap_or(Duration::from_secs(10))
            .min(MAX_HEARTBEAT_INTERVAL);

        // Drain first: registering wakes the dispatcher, and a draining
        // worker wants nothing pushed.
        let mut opening = Vec::new();
        let mut drain_sent_at = None;
        if self.drain_deadline.is_some() {
            opening.push(connect_request::Kind::Drain(proto::DrainSession {}));
            drain_sent_at = Some(Instant::now());
        }
        if !self.held.is_empty() {
            opening.extend(self.heartbeat());
        }
        opening.extend(self.pending.values().map(|p| p.message.clone()));
        if !self.send_all(&tx, opening).await {
            return SessionEnd::Broken("stream closed while re-attaching".into());
        }

        let mut heartbeat = tokio::time::interval_at(Instant::now() + interval, interval);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut resend = tokio::time::interval(Duration::from_secs(1));
        resend.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut unavailable: Vec<String> = Vec::new();
        let mut node_draining = false;

        loop {
            let linger_until = drain_sent_at.map(|at: Instant| at + DRAIN_LINGER);
            if self.idle() && linger_until.is_some_and(|until| Instant::now() >= until) {
                return SessionEnd::Done;
            }
            if node_draining && self.idle() {
                // Nothing left for the draining node: move on now rather
                // than wait for it to close the stream.
                return SessionEnd::Broken("node is draining".into());
            }
            let mut out: Vec<connect_request::Kind> = Vec::new();
            tokio::select! {
                message = inbound.message() => match message {
                    Ok(Some(proto::ConnectResponse { kind: Some(kind) })) => {
                        match kind {
                            connect_response::Kind::Task(leased) => out.extend(self.start(leased)),
                            connect_response::Kind::HeartbeatAck(ack) => self.heartbeat_ack(ack),
                            connect_response::Kind::Ack(ack) => match self.ack(ack) {
                                AckNext::Nothing => {}
                                AckNext::Later(task_id) => unavailable.push(task_id),
                                AckNext::Send(message) => out.push(message),
                            },
                            connect_response::Kind::Cancel(cancel) => {
                                let current = self.holds(&cancel.task_id, &cancel.lease_token);
                                if let Some(held) = current.then(|| self.forget(&cancel.task_id)).flatten() {
                                    tracing::info!(task_id = %cancel.task_id, reason = ?cancel.reason(), "task taken away; cancelling its handler");
                                    held.cancel.cancel();
                                }
                            }
                            connect_response::Kind::Drain(_) => {
                                tracing::info!(%address, "node is draining; finishing held tasks, then reconnecting");
                                node_draining = true;
                            }
                            connect_response::Kind::Registered(_) => {
                                return SessionEnd::Broken("a second `registered`".into());
                            }
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => return SessionEnd::Broken("server closed the session".into()),
                    Err(status) => {
                        return SessionEnd::Broken(format!("{}: {}", status.code(), status.message()))
                    }
                },
                Some(joined) = self.running.join_next(), if !self.running.is_empty() => {
                    // Progress the handler reported before it returned goes
                    // out before its outcome.
                    while let Ok(report) = self.progress_rx.try_recv() {
                        out.extend(self.progress(report));
                    }
                    if let Ok(finished) = joined {
                        out.extend(self.finished(finished));
                    }
                    self.start_waiting();
                }
                Some(report) = self.progress_rx.recv() => out.extend(self.progress(report)),
                _ = heartbeat.tick() => {
                    if !self.held.is_empty() {
                        out.extend(self.heartbeat());
                    }
                }
                _ = resend.tick(), if !unavailable.is_empty() => {
                    for task_id in unavailable.drain(..) {
                        if let Some(pending) = self.pending.get(&task_id) {
                            out.push(pending.message.clone());
                        }
                    }
                }
                () = self.worker.shutdown.cancelled(), if self.drain_deadline.is_none() => {
                    tracing::info!(held = self.held.len(), "worker shutting down: draining");
                    self.drain_deadline = Some(after(self.worker.drain_timeout));
                    drain_sent_at = Some(Instant::now());
                    out.push(connect_request::Kind::Drain(proto::DrainSession {}));
                    out.extend(self.release_waiting());
                }
                () = sleep_until_opt(linger_until), if self.idle() => {}
                () = sleep_until_opt(self.drain_deadline), if !self.held.is_empty() => {
                    // A handler that finished just now keeps its result.
                    while let Some(joined) = self.running.try_join_next() {
                        if let Ok(finished) = joined {
                            out.extend(self.finished(finished));
                        }
                    }
                    out.extend(self.release_all());
                }
                // Releases sent but never answered: stop anyway; the leases
                // expire on their own.
                () = sleep_until_opt(self.drain_deadline.and_then(|d| d.checked_add(RELEASE_ANSWER_WAIT))) => {
                    self.abandon();
                    return SessionEnd::Done;
                }
            }
            if !self.send_all(&tx, out).await {
                return SessionEnd::Broken("stream closed".into());
            }
        }
    }

    /// Sends `messages` in order. False if the stream is closed.
    async fn send_all(
        &mut self,
        tx: &mpsc::Sender<proto::ConnectRequest>,
        messages: Vec<connect_request::Kind>,
    ) -> bool {
        for message in messages {
            if tx.send(request(message)).await.is_err() {
                return false;
            }
        }
        true
    }

    /// Starts the handler of a pushed task, or queues it until a slot is
    /// free. Answers with a release when the worker is draining or far over
    /// its slots, and with a fail when the task cannot be run at all.
    fn start(&mut self, leased: proto::LeasedTask) -> Option<connect_request::Kind> {
        let (task, lease) = match (leased.task, leased.lease) {
            (Some(task), Some(lease)) => (task, lease),
            _ => {
                tracing::warn!("pushed task without its task or lease; ignored");
                return None;
            }
        };
        if let Some(held) = self.held.get(&task.id) {
            if held.lease_token == lease.lease_token {
                return None;
            }
            // A newer lease of a task we still run: the old attempt is stale.
            if let Some(old) = self.forget(&task.id) {
                old.cancel.cancel();
            }
        }
        // The server handed the task out again, so the outcome of an old
        // lease is moot (answers name their lease, so a late one settles
        // nothing of the new lease).
        self.pending.remove(&task.id);
        if self.drain_deadline.is_some() || self.held.len() >= 2 * self.slots {
            // Pushed while draining, or far beyond the slots (a new session
            // is dealt tasks before it has re-attached the leases it still
            // runs): give it back at once, without using an attempt.
            let message = connect_request::Kind::Release(proto::ReleaseTaskRequest {
                task_id: task.id.clone(),
                lease_token: lease.lease_token,
            });
            return Some(self.queue(task.id, OutcomeKind::Release, message));
        }
        let Some(handler) = self.worker.handlers.get(&task.task_type).cloned() else {
            let error = format!(
                "no handler for task type {:?} on this worker",
                task.task_type
            );
            return Some(self.fail_at_once(task.id, lease.lease_token, error));
        };
        let params = match task.params.as_ref().map(from_struct).transpose() {
            Ok(params) => params.unwrap_or_else(|| serde_json::json!({})),
            Err(error) => {
                return Some(self.fail_at_once(
                    task.id,
                    lease.lease_token,
                    format!("params: {error}"),
                ))
            }
        };
        let cancel = CancellationToken::new();
        self.held.insert(
            task.id.clone(),
            Held {
                lease_token: lease.lease_token.clone(),
                cancel: cancel.clone(),
            },
        );
        let ready = Ready {
            task_id: task.id.clone(),
            lease_token: lease.lease_token.clone(),
            handler,
            ctx: TaskContext {
                task,
                lease,
                params,
                cancel: cancel.child_token(),
                progress: self.progress_tx.clone(),
            },
        };
        if self.running.len() < self.slots {
            self.spawn(ready);
        } else {
            // Every slot runs a handler (perhaps a cancelled one still
            // winding down): the lease is held and heartbeated, and its
            // handler starts when one of them returns.
            self.waiting.push_back(ready);
        }
        None
    }

    fn spawn(&mut self, ready: Ready) {
        let Ready {
            task_id,
            lease_token,
            handler,
            ctx,
        } = ready;
        self.running.spawn(async move {
            // A panic becomes a failed attempt; the worker goes on. The
            // handler is called inside the guarded future, so a panic
            // before it returns its future is caught too.
            let run = async move { handler(ctx).await };
            let result = match AssertUnwindSafe(run).catch_unwind().await {
                Ok(result) => result,
                Err(panic) => Err(TaskError::retry(format!(
                    "handler panicked: {}",
                    panic_message(panic.as_ref())
                ))),
            };
            Finished {
                task_id,
                lease_token,
                result,
            }
        });
    }

    /// Starts waiting handlers while slots are free, skipping leases that
    /// were taken away meanwhile.
    fn start_waiting(&mut self) {
        while self.running.len() < self.slots {
            let Some(ready) = self.waiting.pop_front() else {
                return;
            };
            let current = self.holds(&ready.task_id, &ready.lease_token);
            if current {
                self.spawn(ready);
            }
        }
    }

    /// Gives back the leases whose handlers have not started (on shutdown:
    /// they would only wait out the drain).
    fn release_waiting(&mut self) -> Vec<connect_request::Kind> {
        let mut out = Vec::new();
        while let Some(ready) = self.waiting.pop_front() {
            let current = self.holds(&ready.task_id, &ready.lease_token);
            if current {
                self.forget(&ready.task_id);
                let message = connect_request::Kind::Release(proto::ReleaseTaskRequest {
                    task_id: ready.task_id.clone(),
                    lease_token: ready.lease_token,
                });
                out.push(self.queue(ready.task_id, OutcomeKind::Release, message));
            }
        }
        out
    }

    /// The message for a progress report, if its lease is still held.
    fn progress(&self, report: ProgressReport) -> Option<connect_request::Kind> {
        let current = self.holds(&report.task_id, &report.lease_token);
        current.then_some(connect_request::Kind::Progress(proto::ReportProgress {
            task_id: report.task_id,
            lease_token: report.lease_token,
            current: report.current,
            total: report.total,
            message: report.message,
        }))
    }

    /// Fails a pushed task for good without running it, and queues that
    /// outcome until it is acknowledged.
    fn fail_at_once(
        &mut self,
        task_id: String,
        lease_token: String,
        error: String,
    ) -> connect_request::Kind {
        let message = connect_request::Kind::Fail(proto::FailTaskRequest {
            task_id: task_id.clone(),
            lease_token,
            error: clean_error(error, MAX_ERROR_CHARS),
            permanent: true,
            retry_after: None,
        });
        self.queue(task_id, OutcomeKind::Fail, message)
    }

    /// Heartbeats naming every held lease explicitly, so that leases taken
    /// on an earlier session are re-attached to this one; split to the
    /// server's per-heartbeat limit.
    fn heartbeat(&self) -> Vec<connect_request::Kind> {
        let leases: Vec<proto::LeaseRenewal> = self
            .held
            .iter()
            .map(|(task_id, held)| proto::LeaseRenewal {
                task_id: task_id.clone(),
                lease_token: held.lease_token.clone(),
            })
            .collect();
        leases
            .chunks(MAX_HEARTBEAT_LEASES)
            .map(|chunk| {
                connect_request::Kind::Heartbeat(proto::SessionHeartbeat {
                    leases: chunk.to_vec(),
                })
            })
            .collect()
    }

    /// Stops the handlers of leases a heartbeat found gone. Each answer
    /// names its lease, so one about an earlier lease of a task (answers
    /// may arrive in any order) leaves a newer lease alone.
    fn heartbeat_ack(&mut self, ack: proto::HeartbeatResponse) {
        for lease in ack.leases {
            let status = LeaseStatus::try_from(lease.status).unwrap_or(LeaseStatus::Unspecified);
            if !matches!(status, LeaseStatus::Lost | LeaseStatus::Cancelled) {
                continue;
            }
            if self.holds(&lease.task_id, &lease.lease_token) {
                if let Some(held) = self.forget(&lease.task_id) {
                    tracing::warn!(task_id = %lease.task_id, ?status, "lease gone; cancelling its handler");
                    held.cancel.cancel();
                }
            }
        }
    }

    /// Whether `lease_token` is the lease held on `task_id`.
    fn holds(&self, task_id: &str, lease_token: &str) -> bool {
        self.held
            .get(task_id)
            .is_some_and(|held| held.lease_token == lease_token)
    }

    /// Settles an acknowledged outcome.
    fn ack(&mut self, ack: proto::OutcomeAck) -> AckNext {
        let kind = OutcomeKind::try_from(ack.kind).unwrap_or(OutcomeKind::Unspecified);
        let status = AckStatus::try_from(ack.status).unwrap_or(AckStatus::Unspecified);
        if kind == OutcomeKind::Progress {
            tracing::debug!(task_id = %ack.task_id, ?status, message = %ack.message, "progress refused");
            return AckNext::Nothing;
        }
        let Some(pending) = self.pending.get_mut(&ack.task_id) else {
            return AckNext::Nothing;
        };
        // An answer about another message (an earlier lease's outcome, or
        // the outcome this one replaced) settles nothing.
        if pending.kind != kind || pending.lease_token != ack.lease_token {
            return AckNext::Nothing;
        }
        match status {
            AckStatus::Unavailable => return AckNext::Later(ack.task_id),
            AckStatus::Ok => {}
            AckStatus::Invalid if !pending.fallback => {
                // The server refused the outcome itself (a result over its
                // size limit, say): the lease is still ours. Fail the task
                // instead of letting the lease run out and the task run
                // again to the same end.
                if let Some(message) = fallback(&pending.message, &ack.message) {
                    tracing::warn!(task_id = %ack.task_id, kind = ?kind, message = %ack.message, "outcome refused as invalid; failing the task instead");
                    pending.kind = OutcomeKind::Fail;
                    pending.message = message.clone();
                    pending.fallback = true;
                    return AckNext::Send(message);
                }
            }
            other => {
                tracing::warn!(task_id = %ack.task_id, status = ?other, message = %ack.message, "outcome not recorded")
            }
        }
        self.pending.remove(&ack.task_id);
        AckNext::Nothing
    }

    /// The drain deadline passed: cancel the handlers still running and
    /// give their leases back (the attempts do not count).
    fn release_all(&mut self) -> Vec<connect_request::Kind> {
        let task_ids: Vec<String> = self.held.keys().cloned().collect();
        let mut out = Vec::new();
        for task_id in task_ids {
            let Some(held) = self.forget(&task_id) else {
                continue;
            };
            held.cancel.cancel();
            let message = connect_request::Kind::Release(proto::ReleaseTaskRequest {
                task_id: task_id.clone(),
                lease_token: held.lease_token,
            });
            out.push(self.queue(task_id, OutcomeKind::Release, message));
        }
        if !out.is_empty() {
            tracing::warn!(
                released = out.len(),
                "drain timeout: released the tasks still running"
            );
        }
        out
    }
}

/// What an acknowledgement asks of the session loop.
enum AckNext {
    Nothing,
    /// The server could not record it now: send it again in a moment.
    Later(String),
    /// Send this instead.
    Send(connect_request::Kind),
}

/// The fail that stands in for an outcome refused as invalid: for a
/// complete, a permanent fail naming the reason; for a fail, the same fail
/// without the parts that can be refused (a long message, `retry_after`).
fn fallback(refused: &connect_request::Kind, reason: &str) -> Option<connect_request::Kind> {
    let fail = match refused {
        connect_request::Kind::Complete(complete) => proto::FailTaskRequest {
            task_id: complete.task_id.clone(),
            lease_token: complete.lease_token.clone(),
            error: clean_error(
                format!("the server refused the result: {reason}"),
                MAX_ERROR_CHARS,
            ),
            permanent: true,
            retry_after: None,
        },
        connect_request::Kind::Fail(fail) => proto::FailTaskRequest {
            error: clean_error(fail.error.clone(), MAX_ERROR_CHARS / 2),
            retry_after: None,
            ..fail.clone()
        },
        _ => return None,
    };
    Some(connect_request::Kind::Fail(fail))
}

/// An error message as the server accepts it: control characters other
/// than line breaks and tabs (terminal colour codes, say) replaced, and cut
/// to at most `max` characters, marked when cut.
fn clean_error(text: String, max: usize) -> String {
    const MARK: &str = " [truncated]";
    let clean = |c: char| {
        if c.is_control() && !matches!(c, '\n' | '\r' | '\t') {
            char::REPLACEMENT_CHARACTER
        } else {
            c
        }
    };
    if text.chars().count() <= max {
        return text.chars().map(clean).collect();
    }
    let keep = max.saturating_sub(MARK.chars().count());
    let mut cut: String = text.chars().take(keep).map(clean).collect();
    cut.push_str(MARK);
    cut
}

/// The instant `delay` from now; a delay too long to represent means a
/// century (a "never" given as `Duration::MAX` must not panic).
fn after(delay: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(delay)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}

/// The lease an outcome message is about.
fn lease_token_of(message: &connect_request::Kind) -> Option<&str> {
    match message {
        connect_request::Kind::Complete(m) => Some(&m.lease_token),
        connect_request::Kind::Fail(m) => Some(&m.lease_token),
        connect_request::Kind::Release(m) => Some(&m.lease_token),
        _ => None,
    }
}

fn request(kind: connect_request::Kind) -> proto::ConnectRequest {
    proto::ConnectRequest { kind: Some(kind) }
}

/// How a session whose registration failed with `status` goes on: a
/// refusal reconnecting cannot fix ends the worker, anything else is
/// retried.
fn refused(status: tonic::Status) -> SessionEnd {
    match status.code() {
        Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::PermissionDenied
        | Code::Unauthenticated
        | Code::Unimplemented => SessionEnd::Fatal(Box::new(status)),
        _ => SessionEnd::Broken(format!("{}: {}", status.code(), status.message())),
    }
}

/// A result as the `Struct` the server stores: objects as they are, any
/// other value under `"value"`.
fn result_struct(result: serde_json::Value) -> prost_types::Struct {
    match result {
        serde_json::Value::Object(_) => to_struct(&result),
        other => to_struct(&serde_json::json!({ "value": other })),
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(message) = panic.downcast_ref::<&str>() {
        (*message).to_owned()
    } else if let Some(message) = panic.downcast_ref::<String>() {
        message.clone()
    } else {
        "(no message)".to_owned()
    }
}

/// Sleeps until `deadline`, or forever when there is none.
async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn builder(worker_id: &str) -> WorkerBuilder {
        Worker::builder(worker_id)
            .server("http://127.0.0.1:1")
            .handler("scan_library", |_| async { Ok(serde_json::json!({})) })
    }

    fn refused(builder: WorkerBuilder) -> String {
        match builder.build() {
            Err(Error::InvalidConfig(message)) => message,
            Err(other) => panic!("expected InvalidConfig, got {other:?}"),
            Ok(_) => panic!("built a worker the server would refuse"),
        }
    }

    /// What the server would refuse at registration is refused when the
    /// worker is built, naming the field.
    #[tokio::test]
    async fn build_runs_the_servers_registration_checks() {
        assert!(builder("thumbnailer-1").build().is_ok());
        assert!(refused(builder("")).starts_with("register.worker_id:"));
        assert!(refused(builder("w").slots(20_000)).starts_with("register.slots:"));
        let lease = refused(builder("w").lease_duration(Duration::from_millis(1)));
        assert!(lease.starts_with("register.lease_duration:"), "{lease}");
    }
}
