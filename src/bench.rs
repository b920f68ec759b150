//! `leasehold bench`: load scenarios that drive a server over its public gRPC
//! contract and report what a client sees.
//!
//! This module owns the bench command line ([`BenchArgs`], one subcommand
//! per [`Scenario`]), the choice of server ([`Target`]: a running one, or a
//! node started in-process for the run), the simulated workers
//! ([`Workers`]: session streams that complete every pushed task at once),
//! the latency summary ([`Summary`]) and the reports, printed as a human
//! table followed by one JSON line.
//!
//! Scenarios:
//! - `latency` ([`latency`]): push latency, from the CreateTask call to the
//!   task arriving on a worker's session stream.
//!
//! Further scenarios are further [`Scenario`] variants that reuse
//! [`Target`], [`Workers`] and [`Summary`].

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tonic::transport::Channel;

use crate::config::Config;
use crate::proto::task_service_client::TaskServiceClient;
use crate::proto::worker_service_client::WorkerServiceClient;
use crate::proto::{self, connect_request, connect_response};
use crate::server::Running;

/// Database of the in-process node when neither `--database-url` nor
/// `DATABASE_URL` names one.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/leasehold_bench";

/// How long a run waits for the last created tasks to be pushed before it
/// gives up and reports them lost.
const ARRIVAL_TIMEOUT: Duration = Duration::from_secs(10);

/// How long closing the worker sessions may take at the end of a run.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Drain grace of the in-process node: the workers have closed their
/// sessions by the time it stops, so it never needs long.
const IN_PROCESS_DRAIN_GRACE: Duration = Duration::from_secs(5);

/// Arguments of `leasehold bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// The scenario to run.
    #[command(subcommand)]
    pub scenario: Scenario,
}

/// A benchmark scenario, one subcommand of `leasehold bench` each.
#[derive(Debug, clap::Subcommand)]
pub enum Scenario {
    /// Push latency: from the CreateTask call until the task arrives on a
    /// worker's session stream. Creates tasks one at a time at a steady rate
    /// while idle worker sessions complete each pushed task at once, then
    /// prints p50/p90/p99/max in milliseconds, as a table and then one JSON
    /// line (the last line on stdout; logs go to stderr).
    Latency(LatencyArgs),
}

/// Which server a scenario drives.
#[derive(Debug, Clone, clap::Args)]
pub struct Target {
    /// Drive the server running at this address (`http://host:port`). When
    /// absent, a node is started in-process on 127.0.0.1 (a free port) for
    /// the run and stopped at its end.
    #[arg(long, value_name = "URL")]
    pub server: Option<String>,

    /// Postgres URL of the in-process node (ignored with `--server`). The
    /// database is created if it does not exist and migrated.
    #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL)]
    pub database_url: String,
}

/// Arguments of `leasehold bench latency`.
#[derive(Debug, Clone, clap::Args)]
pub struct LatencyArgs {
    /// Which server to drive.
    #[command(flatten)]
    pub target: Target,

    /// Tasks measured (after 10 warm-up tasks that are not counted).
    #[arg(
        long,
        default_value_t = 200,
        value_parser = clap::value_parser!(u32).range(1..=1_000_000)
    )]
    pub tasks: u32,

    /// Tasks created per second, one CreateTask call at a time.
    #[arg(long, default_value_t = 20.0, value_parser = parse_rate)]
    pub rate: f64,

    /// Idle worker sessions waiting for the tasks.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub sessions: u32,

    /// Slots of each worker session.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(i32).range(1..=10_000))]
    pub slots: i32,
}

/// Parses a task rate: a positive number of tasks per second, at most
/// 100,000.
fn parse_rate(text: &str) -> Result<f64, String> {
    let rate: f64 = text
        .parse()
        .map_err(|_| format!("`{text}` is not a number"))?;
    if rate.is_finite() && rate > 0.0 && rate <= 100_000.0 {
        Ok(rate)
    } else {
        Err("the rate must be more than 0 and at most 100000 tasks per second".into())
    }
}

/// Runs the chosen scenario and prints its report: a human table, then one
/// JSON line.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.scenario {
        Scenario::Latency(args) => {
            let node = Node::start(&args.target).await?;
            let outcome = latency(node.endpoint(), &args).await;
            let stopped = node.stop().await;
            let report = outcome?;
            stopped?;
            print!("{}", report.table());
            println!("{}", report.json_line());
            Ok(())
        }
    }
}

/// The server a run talks to: a running one, or a node started in-process
/// that [`Node::stop`] shuts down.
#[derive(Debug)]
pub struct Node {
    endpoint: String,
    running: Option<Running>,
}

impl Node {
    /// Connects to `--server`, or starts a node in-process on a free port of
    /// 127.0.0.1 over `--database-url`.
    pub async fn start(target: &Target) -> anyhow::Result<Self> {
        if let Some(server) = &target.server {
            return Ok(Self {
                endpoint: server.clone(),
                running: None,
            });
        }
        let mut config = Config::with_database_url(&target.database_url);
        config.drain_grace = IN_PROCESS_DRAIN_GRACE;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        config.listen = listener.local_addr()?;
        let running = crate::server::start(config, listener)
            .await
            .context("cannot start the in-process node")?;
        Ok(Self {
            endpoint: format!("http://{}", running.addr()),
            running: Some(running),
        })
    }

    /// The address of the server, `http://host:port`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Shuts the in-process node down gracefully; does nothing to a server
    /// given by `--server`.
    pub async fn stop(self) -> anyhow::Result<()> {
        if let Some(running) = self.running {
            running
                .shutdown()
                .await
                .context("the in-process node failed")?;
        }
        Ok(())
    }
}

/// A connected channel to `endpoint` (`http://host:port`).
pub async fn channel_to(endpoint: &str) -> anyhow::Result<Channel> {
    Channel::from_shared(endpoint.to_owned())
        .with_context(|| format!("`{endpoint}` is not a valid server address"))?
        .connect()
        .await
        .with_context(|| format!("cannot connect to {endpoint}"))
}

/// Latency figures of a set of samples, by nearest rank.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    /// Number of samples.
    pub count: usize,
    /// Median.
    pub p50: Duration,
    /// 90th percentile.
    pub p90: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Largest sample.
    pub max: Duration,
    /// Smallest sample.
    pub min: Duration,
    /// Arithmetic mean.
    pub mean: Duration,
}

impl Summary {
    /// Summarises `samples`; `None` when there are none.
    pub fn of(mut samples: Vec<Duration>) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let count = samples.len();
        // Nearest rank: the smallest sample with at least p of all samples
        // at or below it.
        let rank = |p: f64| samples[((p * count as f64).ceil() as usize).clamp(1, count) - 1];
        let total: Duration = samples.iter().sum();
        Some(Self {
            count,
            p50: rank(0.50),
            p90: rank(0.90),
            p99: rank(0.99),
            max: samples[count - 1],
            min: samples[0],
            mean: total / count as u32,
        })
    }
}

/// Milliseconds rounded to the microsecond, for reports.
pub fn millis(duration: Duration) -> f64 {
    (duration.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

/// A pushed task as a worker saw it.
#[derive(Debug, Clone)]
pub struct Arrival {
    /// Id of the task.
    pub task_id: String,
    /// When the worker read it off its stream.
    pub at: Instant,
    /// Which session (index) received it.
    pub session: usize,
}

/// What one worker session did during a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerStats {
    /// Tasks pushed to it.
    pub received: u64,
    /// Completions the server acknowledged as recorded.
    pub completed: u64,
    /// Completions the server refused (any acknowledgement other than OK).
    pub refused: u64,
}

/// Worker sessions that take one task type and complete every pushed task
/// at once over the stream, so their slots never fill. Each arrival is
/// reported, timestamped when read off the stream.
#[derive(Debug)]
pub struct Workers {
    stop: watch::Sender<bool>,
    handles: Vec<JoinHandle<anyhow::Result<WorkerStats>>>,
}

impl Workers {
    /// Opens `sessions` sessions of `slots` slots on `endpoint`, each on its
    /// own connection, taking only `task_type`; returns once every one is
    /// registered, with the receiver of their arrivals.
    pub async fn open(
        endpoint: &str,
        task_type: &str,
        sessions: usize,
        slots: i32,
    ) -> anyhow::Result<(Self, mpsc::UnboundedReceiver<Arrival>)> {
        let (arrivals, arrivals_rx) = mpsc::unbounded_channel();
        let (stop, stop_rx) = watch::channel(false);
        let mut handles = Vec::with_capacity(sessions);
        let run = uuid::Uuid::new_v4().simple().to_string();
        for index in 0..sessions {
            let register = proto::RegisterWorker {
                worker_id: format!("bench-{}-{index}", &run[..8]),
                task_types: vec![task_type.to_owned()],
                slots,
                ..Default::default()
            };
            let session = WorkerSession::open(endpoint, register, index)
                .await
                .with_context(|| format!("cannot open worker session {index}"))?;
            handles.push(tokio::spawn(session.run(arrivals.clone(), stop_rx.clone())));
        }
        Ok((Self { stop, handles }, arrivals_rx))
    }

    /// Waits for the acknowledgements of the completions sent so far, closes
    /// every session and returns what each did, in session order.
    pub async fn close(self) -> anyhow::Result<Vec<WorkerStats>> {
        let _ = self.stop.send(true);
        let mut stats = Vec::with_capacity(self.handles.len());
        for (index, mut handle) in self.handles.into_iter().enumerate() {
            match tokio::time::timeout(CLOSE_TIMEOUT, &mut handle).await {
                Ok(joined) => stats.push(
                    joined
                        .context("worker task panicked")?
                        .with_context(|| format!("worker session {index} failed"))?,
                ),
                Err(_) => {
                    handle.abort();
                    bail!("worker session {index} did not close within {CLOSE_TIMEOUT:?}");
                }
            }
        }
        Ok(stats)
    }
}

/// One registered session stream.
struct WorkerSession {
    index: usize,
    tx: mpsc::Sender<proto::ConnectRequest>,
    rx: tonic::Streaming<proto::ConnectResponse>,
}

impl WorkerSession {
    async fn open(
        endpoint: &str,
        register: proto::RegisterWorker,
        index: usize,
    ) -> anyhow::Result<Self> {
        let (tx, rx) = mpsc::channel(1024);
        tx.send(proto::ConnectRequest {
            kind: Some(connect_request::Kind::Register(register)),
        })
        .await
        .context("session channel closed")?;
        let outbound = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        let mut client = WorkerServiceClient::new(channel_to(endpoint).await?);
        let mut rx = client
            .connect(outbound)
            .await
            .context("Connect refused")?
            .into_inner();
        match rx.message().await.context("session stream failed")? {
            Some(proto::ConnectResponse {
                kind: Some(connect_response::Kind::Registered(_)),
            }) => Ok(Self { index, tx, rx }),
            other => bail!("expected `registered` first, got {other:?}"),
        }
    }

    /// Completes every pushed task at once until told to stop; then waits
    /// for the outstanding acknowledgements, closes its side and reads the
    /// stream to its end.
    async fn run(
        self,
        arrivals: mpsc::UnboundedSender<Arrival>,
        mut stop: watch::Receiver<bool>,
    ) -> anyhow::Result<WorkerStats> {
        let Self { index, tx, mut rx } = self;
        let mut tx = Some(tx);
        let mut stats = WorkerStats::default();
        let mut outstanding = 0u64;
        let mut stopping = false;
        loop {
            if stopping && outstanding == 0 {
                // Closing our side makes the server end the stream.
                tx = None;
            }
            let message = tokio::select! {
                message = rx.message() => message,
                _ = stop.changed(), if !stopping => {
                    stopping = true;
                    continue;
                }
            };
            let at = Instant::now();
            let kind = match message {
                Ok(Some(message)) => message.kind,
                Ok(None) => break,
                Err(status) if tx.is_none() => {
                    tracing::debug!(session = index, %status, "session ended while closing");
                    break;
                }
                Err(status) => bail!("the server ended the session: {status}"),
            };
            match kind {
                Some(connect_response::Kind::Task(leased)) => {
                    let lease = leased
                        .lease
                        .context("a task was pushed without its lease")?;
                    stats.received += 1;
                    let _ = arrivals.send(Arrival {
                        task_id: lease.task_id.clone(),
                        at,
                        session: index,
                    });
                    if let Some(tx) = &tx {
                        let complete = proto::CompleteTaskRequest {
                            task_id: lease.task_id,
                            lease_token: lease.lease_token,
                            result: None,
                        };
                        tx.send(proto::ConnectRequest {
                            kind: Some(connect_request::Kind::Complete(complete)),
                        })
                        .await
                        .context("session stream closed")?;
                        outstanding += 1;
                    }
                }
                Some(connect_response::Kind::Ack(ack)) => {
                    outstanding = outstanding.saturating_sub(1);
                    if ack.status == proto::AckStatus::Ok as i32 {
                        stats.completed += 1;
                    } else {
                        stats.refused += 1;
                        tracing::warn!(
                            session = index,
                            task_id = %ack.task_id,
                            status = ack.status,
                            message = %ack.message,
                            "completion refused"
                        );
                    }
                }
                Some(connect_response::Kind::Drain(_)) => {
                    tracing::warn!(session = index, "the server is draining this session");
                }
                Some(connect_response::Kind::Cancel(cancel)) => {
                    tracing::warn!(
                        session = index,
                        task_id = %cancel.task_id,
                        reason = cancel.reason,
                        "lease taken back"
                    );
                }
                Some(connect_response::Kind::Registered(_))
                | Some(connect_response::Kind::HeartbeatAck(_))
                | None => {}
            }
        }
        Ok(stats)
    }
}

/// Result of the `latency` scenario.
#[derive(Debug, Clone)]
pub struct LatencyReport {
    /// Address of the server driven.
    pub endpoint: String,
    /// True when the node was started in-process for the run.
    pub in_process: bool,
    /// The arguments of the run.
    pub args: LatencyArgs,
    /// Task type used by the run (unique to it).
    pub task_type: String,
    /// Push latency of the measured tasks.
    pub push: Summary,
    /// Round trip of their CreateTask calls.
    pub create: Summary,
    /// Tasks created per second, as achieved.
    pub achieved_rate: f64,
    /// Per session, in order: what it did (warm-up included).
    pub sessions: Vec<WorkerStats>,
    /// Tasks pushed more than once (a server bug if ever non-zero).
    pub duplicates: u64,
}

impl LatencyReport {
    /// The report as a human table (several lines, each ending in `\n`).
    pub fn table(&self) -> String {
        let where_ = if self.in_process {
            "in-process node"
        } else {
            "running server"
        };
        let received: Vec<String> = self
            .sessions
            .iter()
            .map(|s| s.received.to_string())
            .collect();
        let refused: u64 = self.sessions.iter().map(|s| s.refused).sum();
        let mut out = String::new();
        out.push_str("latency: CreateTask call -> task on a worker session stream\n");
        out.push_str(&format!("  server      {} ({where_})\n", self.endpoint));
        out.push_str(&format!("  task type   {}\n", self.task_type));
        out.push_str(&format!(
            "  tasks       {} at {}/s (achieved {:.1}/s), after {WARM_UP} warm-up tasks\n",
            self.push.count, self.args.rate, self.achieved_rate
        ));
        out.push_str(&format!(
            "  sessions    {} x {} slots, received {}\n",
            self.args.sessions,
            self.args.slots,
            received.join(" / ")
        ));
        if refused > 0 || self.duplicates > 0 {
            out.push_str(&format!(
                "  anomalies   {refused} completions refused, {} tasks pushed twice\n",
                self.duplicates
            ));
        }
        out.push_str(
            "\n                     p50       p90       p99       max       min      mean\n",
        );
        for (name, s) in [("push (ms)", &self.push), ("CreateTask (ms)", &self.create)] {
            out.push_str(&format!(
                "  {name:<15} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}\n",
                millis(s.p50),
                millis(s.p90),
                millis(s.p99),
                millis(s.max),
                millis(s.min),
                millis(s.mean),
            ));
        }
        out
    }

    /// The report as one line of JSON, keys in this order:
    /// `{"scenario":"latency","tasks":N,"p50_ms":..,"p90_ms":..,"p99_ms":..,"max_ms":..}`.
    pub fn json_line(&self) -> String {
        let number = |d: Duration| serde_json::Value::from(millis(d)).to_string();
        format!(
            r#"{{"scenario":"latency","tasks":{},"p50_ms":{},"p90_ms":{},"p99_ms":{},"max_ms":{}}}"#,
            self.push.count,
            number(self.push.p50),
            number(self.push.p90),
            number(self.push.p99),
            number(self.push.max),
        )
    }
}

/// Warm-up tasks of the `latency` scenario, created and pushed before the
/// measured ones and not counted.
pub const WARM_UP: u32 = 10;

/// The `latency` scenario against the server at `endpoint`: opens the
/// worker sessions, runs the warm-up, measures `args.tasks` tasks and
/// closes the sessions.
pub async fn latency(endpoint: &str, args: &LatencyArgs) -> anyhow::Result<LatencyReport> {
    let task_type = format!("bench.latency.{}", uuid::Uuid::new_v4().simple());
    let mut tasks = TaskServiceClient::new(channel_to(endpoint).await?);
    let (workers, mut arrivals) =
        Workers::open(endpoint, &task_type, args.sessions as usize, args.slots).await?;
    let measured = async {
        let warm_up = paced(
            "warm-up",
            &mut tasks,
            &task_type,
            WARM_UP,
            args.rate,
            &mut arrivals,
        )
        .await
        .context("warm-up")?;
        let measured = paced(
            "measured",
            &mut tasks,
            &task_type,
            args.tasks,
            args.rate,
            &mut arrivals,
        )
        .await?;
        anyhow::Ok(Phase {
            duplicates: warm_up.duplicates + measured.duplicates,
            ..measured
        })
    }
    .await;
    let closed = workers.close().await;
    let measured = measured?;
    let sessions = closed?;
    Ok(LatencyReport {
        endpoint: endpoint.to_owned(),
        in_process: args.target.server.is_none(),
        args: args.clone(),
        task_type,
        push: Summary::of(measured.push).context("no task was measured")?,
        create: Summary::of(measured.create).context("no task was measured")?,
        achieved_rate: measured.achieved_rate,
        sessions,
        duplicates: measured.duplicates,
    })
}

/// Samples of one paced phase.
struct Phase {
    push: Vec<Duration>,
    create: Vec<Duration>,
    achieved_rate: f64,
    duplicates: u64,
}

/// Creates `count` tasks of `task_type` one at a time, `rate` per second,
/// and waits until every one has arrived on some session (`phase` names
/// the phase in debug logs). The send time is
/// taken before each CreateTask call and the arrival time by the worker
/// that read the task, so a task that arrives before its CreateTask answer
/// is measured right: the two are joined by task id at the end.
async fn paced(
    phase: &str,
    client: &mut TaskServiceClient<Channel>,
    task_type: &str,
    count: u32,
    rate: f64,
    arrivals: &mut mpsc::UnboundedReceiver<Arrival>,
) -> anyhow::Result<Phase> {
    let count = count as usize;
    // Per task id: when its CreateTask call started, and how long it took.
    let mut sent: HashMap<String, (Instant, Duration)> = HashMap::with_capacity(count);
    let mut arrived: HashMap<String, Instant> = HashMap::with_capacity(count);
    let mut duplicates = 0u64;
    let mut record = |arrival: Arrival, arrived: &mut HashMap<String, Instant>| {
        if arrived
            .insert(arrival.task_id.clone(), arrival.at)
            .is_some()
        {
            duplicates += 1;
            tracing::warn!(
                task_id = %arrival.task_id,
                session = arrival.session,
                "task pushed twice"
            );
        }
    };

    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let first = Instant::now();
    let mut last = first;
    tracing::debug!(phase, count, rate, "phase started");
    for _ in 0..count {
        ticker.tick().await;
        let started = Instant::now();
        last = started;
        let response = client
            .create_task(proto::CreateTaskRequest {
                task_type: task_type.to_owned(),
                ..Default::default()
            })
            .await
            .context("CreateTask failed")?
            .into_inner();
        let took = started.elapsed();
        let task = response
            .task
            .context("CreateTask answered without a task")?;
        sent.insert(task.id, (started, took));
        while let Ok(arrival) = arrivals.try_recv() {
            record(arrival, &mut arrived);
        }
    }
    // The calls started over `count - 1` intervals.
    let span = last.saturating_duration_since(first);
    let achieved_rate = if count > 1 && !span.is_zero() {
        (count - 1) as f64 / span.as_secs_f64()
    } else {
        rate
    };

    let deadline = Instant::now() + ARRIVAL_TIMEOUT;
    let mut missing = sent.keys().filter(|id| !arrived.contains_key(*id)).count();
    while missing > 0 {
        match tokio::time::timeout_at(deadline, arrivals.recv()).await {
            Ok(Some(arrival)) => {
                let id = &arrival.task_id;
                if sent.contains_key(id) && !arrived.contains_key(id) {
                    missing -= 1;
                }
                record(arrival, &mut arrived);
            }
            Ok(None) => bail!("every worker session ended; {missing} tasks were not pushed"),
            Err(_) => bail!(
                "{missing} of {count} tasks were not pushed within {ARRIVAL_TIMEOUT:?} \
                 of the last CreateTask"
            ),
        }
    }

    let mut push = Vec::with_capacity(count);
    let mut create = Vec::with_capacity(count);
    for (id, (started, took)) in &sent {
        let latency = arrived[id].saturating_duration_since(*started);
        tracing::debug!(
            phase,
            task_id = %id,
            offset_ms = millis(started.saturating_duration_since(first)),
            create_ms = millis(*took),
            push_ms = millis(latency),
            "task measured"
        );
        push.push(latency);
        create.push(*took);
    }
    Ok(Phase {
        push,
        create,
        achieved_rate,
        duplicates,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        bench: Bench,
    }

    #[derive(Debug, clap::Subcommand)]
    enum Bench {
        Bench(BenchArgs),
    }

    fn parse(args: &[&str]) -> Result<BenchArgs, clap::Error> {
        let Bench::Bench(bench) =
            Cli::try_parse_from(std::iter::once("leasehold").chain(args.iter().copied()))?.bench;
        Ok(bench)
    }

    #[test]
    fn latency_arguments_have_documented_defaults() {
        let Scenario::Latency(args) = parse(&["bench", "latency"]).unwrap().scenario;
        assert_eq!(args.tasks, 200);
        assert_eq!(args.rate, 20.0);
        assert_eq!(args.sessions, 1);
        assert_eq!(args.slots, 10);
        assert_eq!(args.target.server, None);
    }

    #[test]
    fn latency_arguments_are_parsed_and_checked() {
        let Scenario::Latency(args) = parse(&[
            "bench",
            "latency",
            "--server",
            "http://127.0.0.1:50111",
            "--tasks",
            "5",
            "--rate",
            "2.5",
            "--sessions",
            "3",
            "--slots",
            "7",
        ])
        .unwrap()
        .scenario;
        assert_eq!(
            args.target.server.as_deref(),
            Some("http://127.0.0.1:50111")
        );
        assert_eq!(
            (args.tasks, args.rate, args.sessions, args.slots),
            (5, 2.5, 3, 7)
        );
        for bad in [
            &["bench", "latency", "--rate", "0"][..],
            &["bench", "latency", "--rate", "fast"],
            &["bench", "latency", "--tasks", "0"],
            &["bench", "latency", "--slots", "0"],
            &["bench", "latency", "--sessions", "0"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} is refused");
        }
    }

    #[test]
    fn summary_uses_nearest_rank() {
        let samples: Vec<Duration> = (1..=100).rev().map(Duration::from_millis).collect();
        let s = Summary::of(samples).unwrap();
        assert_eq!(s.count, 100);
        assert_eq!(s.p50, Duration::from_millis(50));
        assert_eq!(s.p90, Duration::from_millis(90));
        assert_eq!(s.p99, Duration::from_millis(99));
        assert_eq!(s.max, Duration::from_millis(100));
        assert_eq!(s.min, Duration::from_millis(1));
        assert_eq!(s.mean, Duration::from_micros(50_500));

        let one = Summary::of(vec![Duration::from_millis(7)]).unwrap();
        assert_eq!(
            (one.p50, one.p99, one.max),
            (
                Duration::from_millis(7),
                Duration::from_millis(7),
                Duration::from_millis(7)
            )
        );
        assert!(Summary::of(Vec::new()).is_none());
    }

    #[test]
    fn millis_rounds_to_microseconds() {
        assert_eq!(millis(Duration::from_nanos(2_345_678)), 2.346);
        assert_eq!(millis(Duration::ZERO), 0.0);
    }

    /// Runs the scenario end to end against an in-process node over a fresh
    /// database. Checks counts and shape only: no figure is asserted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn latency_runs_end_to_end_in_process() {
        let admin = std::env::var("LEASEHOLD_TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned());
        let db_name = format!("leasehold_test_{}", uuid::Uuid::new_v4().simple());
        let args = LatencyArgs {
            target: Target {
                server: None,
                database_url: format!("{admin}/{db_name}"),
            },
            tasks: 12,
            rate: 200.0,
            sessions: 2,
            slots: 3,
        };
        let node = Node::start(&args.target).await.unwrap();
        let report = latency(node.endpoint(), &args).await;
        node.stop().await.unwrap();

        let (client, connection) =
            tokio_postgres::connect(&format!("{admin}/postgres"), tokio_postgres::NoTls)
                .await
                .unwrap();
        tokio::spawn(connection);
        client
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS \"{db_name}\" WITH (FORCE)"
            ))
            .await
            .unwrap();

        let report = report.unwrap();
        assert_eq!(report.push.count, 12);
        assert_eq!(report.create.count, 12);
        assert_eq!(report.sessions.len(), 2);
        let received: u64 = report.sessions.iter().map(|s| s.received).sum();
        let completed: u64 = report.sessions.iter().map(|s| s.completed).sum();
        assert_eq!(received, 12 + u64::from(WARM_UP));
        assert_eq!(completed, received, "every pushed task was completed");
        assert_eq!(report.duplicates, 0);
        let line = report.json_line();
        assert!(
            line.starts_with(r#"{"scenario":"latency","tasks":12,"p50_ms":"#),
            "{line}"
        );
        let json: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(json["scenario"], "latency");
        assert_eq!(json["tasks"], 12);
        for key in ["p50_ms", "p90_ms", "p99_ms", "max_ms"] {
            assert!(json[key].is_f64(), "{key} is a number");
        }
        assert!(report.table().contains("push (ms)"));
    }
}
