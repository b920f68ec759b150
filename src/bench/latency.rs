//! `latency`: push latency, from the CreateTask call to the task arriving on
//! a worker's session stream, with tasks created one at a time at a steady
//! rate while idle worker sessions complete each pushed task at once.

use std::collections::HashMap;
use std::time::Duration;

use super::error::{Context, Error, Result};
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};

use super::db;
use super::producer::task_client;
use super::report::{anomalies_row, millis, received, JsonLine, Report, Summary};
use super::target::{Node, Target};
use super::workers::{Arrival, Event, WorkerStats, Workers};
use crate::proto;
use crate::proto::task_service_client::TaskServiceClient;

/// How long a run waits for the last created tasks to be pushed before it
/// gives up and reports them lost.
const ARRIVAL_TIMEOUT: Duration = Duration::from_secs(10);

/// Arguments of `leasehold bench latency`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct LatencyArgs {
    /// Which server to drive.
    #[command(flatten)]
    pub(crate) target: Target,

    /// Tasks measured (after 10 warm-up tasks that are not counted).
    #[arg(
        long,
        default_value_t = 200,
        value_parser = clap::value_parser!(u32).range(1..=1_000_000)
    )]
    pub(crate) tasks: u32,

    /// Tasks created per second, one CreateTask call at a time.
    #[arg(long, default_value_t = 20.0, value_parser = parse_rate)]
    pub(crate) rate: f64,

    /// Idle worker sessions waiting for the tasks.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub(crate) sessions: u32,

    /// Slots of each worker session.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(i32).range(1..=10_000))]
    pub(crate) slots: i32,
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

/// Result of the `latency` scenario.
#[derive(Debug, Clone)]
pub(crate) struct LatencyReport {
    /// The server driven, in a few words.
    pub(crate) server: String,
    /// The arguments of the run.
    pub(crate) args: LatencyArgs,
    /// Task type used by the run (unique to it).
    pub(crate) task_type: String,
    /// Push latency of the measured tasks.
    pub(crate) push: Summary,
    /// Round trip of their CreateTask calls.
    pub(crate) create: Summary,
    /// Tasks created per second, as achieved.
    pub(crate) achieved_rate: f64,
    /// Per session, in order: what it did (warm-up included).
    pub(crate) sessions: Vec<WorkerStats>,
    /// Tasks pushed more than once (a server bug if ever non-zero).
    pub(crate) duplicates: u64,
}

impl Report for LatencyReport {
    fn table(&self) -> String {
        let mut out = String::new();
        out.push_str("latency: CreateTask call -> task on a worker session stream\n");
        out.push_str(&format!("  server      {}\n", self.server));
        out.push_str(&format!("  task type   {}\n", self.task_type));
        out.push_str(&format!(
            "  tasks       {} at {}/s (achieved {:.1}/s), after {WARM_UP} warm-up tasks\n",
            self.push.count, self.args.rate, self.achieved_rate
        ));
        out.push_str(&format!(
            "  sessions    {} x {} slots, received {}\n",
            self.args.sessions,
            self.args.slots,
            received(&self.sessions, usize::MAX)
        ));
        out.push_str(&anomalies_row(&self.sessions, self.duplicates));
        out.push_str(Summary::HEADER);
        out.push_str(&self.push.row("push (ms)"));
        out.push_str(&self.create.row("CreateTask (ms)"));
        out
    }

    /// Keys in this order:
    /// `{"scenario":"latency","tasks":N,"p50_ms":..,"p90_ms":..,"p99_ms":..,"max_ms":..}`.
    fn json_line(&self) -> String {
        JsonLine::new("latency")
            .field("tasks", self.push.count)
            .field("p50_ms", millis(self.push.p50))
            .field("p90_ms", millis(self.push.p90))
            .field("p99_ms", millis(self.push.p99))
            .field("max_ms", millis(self.push.max))
            .finish()
    }
}

/// Warm-up tasks of the `latency` scenario, created and pushed before the
/// measured ones and not counted.
pub(crate) const WARM_UP: u32 = 10;

/// The `latency` scenario against `node`: opens the worker sessions, runs
/// the warm-up, measures `args.tasks` tasks and closes the sessions.
/// Should the run fail, the tasks of the run still unfinished are deleted
/// through `--database-url`.
pub(crate) async fn run(node: &Node, args: &LatencyArgs) -> Result<LatencyReport> {
    db::with_own_task_type(
        "latency",
        &args.target.database_url,
        |task_type| async move { measure(node, args, &task_type).await },
    )
    .await
}

async fn measure(node: &Node, args: &LatencyArgs, task_type: &str) -> Result<LatencyReport> {
    let endpoint = node.endpoint();
    let task_type = task_type.to_owned();
    let mut tasks = task_client(endpoint).await?;
    let (workers, mut events) = Workers::open(
        &[endpoint],
        &task_type,
        args.sessions as usize,
        args.slots,
        false,
    )
    .await?;
    let measured = async {
        let warm_up = paced(
            "warm-up",
            &mut tasks,
            &task_type,
            WARM_UP,
            args.rate,
            &mut events,
        )
        .await
        .context("warm-up")?;
        let measured = paced(
            "measured",
            &mut tasks,
            &task_type,
            args.tasks,
            args.rate,
            &mut events,
        )
        .await?;
        Ok::<_, Error>(Phase {
            duplicates: warm_up.duplicates + measured.duplicates,
            ..measured
        })
    }
    .await;
    let closed = workers.close().await;
    let measured = measured?;
    let sessions = closed?;
    Ok(LatencyReport {
        server: node.describe(),
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
    client: &mut TaskServiceClient<crate::client::AuthChannel>,
    task_type: &str,
    count: u32,
    rate: f64,
    events: &mut mpsc::UnboundedReceiver<Event>,
) -> Result<Phase> {
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
        while let Ok(event) = events.try_recv() {
            if let Event::Arrived(arrival) = event {
                record(arrival, &mut arrived);
            }
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
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(Event::Acked(_))) => {}
            Ok(Some(Event::Arrived(arrival))) => {
                let id = &arrival.task_id;
                if sent.contains_key(id) && !arrived.contains_key(id) {
                    missing -= 1;
                }
                record(arrival, &mut arrived);
            }
            Ok(None) => {
                return Err(Error::Scenario(format!(
                    "every worker session ended; {missing} tasks were not pushed"
                )))
            }
            Err(_) => {
                return Err(Error::Scenario(format!(
                    "{missing} of {count} tasks were not pushed within {ARRIVAL_TIMEOUT:?} \
                 of the last CreateTask"
                )))
            }
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
    use crate::bench::testing::{on_node, parse, FreshDatabase};
    use crate::bench::{NodeKind, Scenario};

    #[test]
    fn latency_arguments_have_documented_defaults() {
        let Scenario::Latency(args) = parse(&["bench", "latency"]).unwrap().scenario else {
            panic!("latency")
        };
        assert_eq!(args.tasks, 200);
        assert_eq!(args.rate, 20.0);
        assert_eq!(args.sessions, 1);
        assert_eq!(args.slots, 10);
        assert_eq!(args.target.server, None);
        assert_eq!(args.target.kind(NodeKind::InProcess), NodeKind::InProcess);
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
        .scenario
        else {
            panic!("latency")
        };
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

    /// Runs the scenario end to end against an in-process node over a fresh
    /// database. Checks counts and shape only: no figure is asserted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn latency_runs_end_to_end_in_process() {
        let db = FreshDatabase::new();
        let args = LatencyArgs {
            target: Target::in_process_at(db.url()),
            tasks: 12,
            rate: 200.0,
            sessions: 2,
            slots: 3,
        };
        let report = on_node(db, &args.target, NodeKind::InProcess, async |node| {
            run(node, &args).await
        })
        .await;

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
