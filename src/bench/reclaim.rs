//! `reclaim`: how soon an abandoned lease reaches another worker. A session
//! takes N leases and goes silent (it keeps its stream open but never
//! heartbeats, and asks for nothing new); a second worker waits for the
//! same task type. Measured per task from the lease's `locked_until` to the
//! task arriving on the second worker's stream.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use super::error::{Context, Error, Result};
use tokio::task::JoinHandle;

use super::db;
use super::producer::set_up_tasks;
use super::report::{millis, JsonLine, Report, Summary};
use super::target::{parse_lease, Node, Target};
use super::workers::{system_time, Event, SessionStream, Workers};
use crate::proto::{self, connect_request, connect_response};

/// How long the silent session may take to receive its tasks.
const TAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long after the last lease expires the tasks may take to reach the
/// second worker before the run fails.
const RESCUE_TIMEOUT: Duration = Duration::from_secs(30);

/// Arguments of `leasehold bench reclaim`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ReclaimArgs {
    /// Which server to drive.
    #[command(flatten)]
    pub(crate) target: Target,

    /// Tasks leased by the silent session.
    #[arg(
        long,
        default_value_t = 50,
        value_parser = clap::value_parser!(u32).range(1..=10_000)
    )]
    pub(crate) tasks: u32,

    /// Lease length of the silent session's tasks (1s to 1h).
    #[arg(long, default_value = "1s", value_parser = parse_lease)]
    pub(crate) lease: Duration,
}

/// Result of the `reclaim` scenario.
#[derive(Debug, Clone)]
pub(crate) struct ReclaimReport {
    /// The server driven, in a few words.
    pub(crate) server: String,
    /// The arguments of the run.
    pub(crate) args: ReclaimArgs,
    /// Task type used by the run (unique to it).
    pub(crate) task_type: String,
    /// Per task, from `locked_until` to the task arriving on the second
    /// worker.
    pub(crate) rescue: Summary,
    /// Per task, from `locked_until` to `cancel` arriving on the silent
    /// session; `None` if none arrived.
    pub(crate) cancel: Option<Summary>,
    /// Tasks that reached the second worker before their lease ran out (a
    /// server bug if ever non-zero; they count as 0 ms above).
    pub(crate) early: u64,
    /// True when the second worker registered only after the first lease
    /// had run out (the figures then include its start-up).
    pub(crate) late_start: bool,
}

impl Report for ReclaimReport {
    fn table(&self) -> String {
        let mut out = String::new();
        out.push_str("reclaim: lease runs out on a silent session -> task on another worker\n");
        out.push_str(&format!("  server      {}\n", self.server));
        out.push_str(&format!("  task type   {}\n", self.task_type));
        out.push_str(&format!(
            "  tasks       {} leased for {} by a session that then went silent\n",
            self.args.tasks,
            humantime::format_duration(self.args.lease)
        ));
        if self.early > 0 || self.late_start {
            out.push_str(&format!(
                "  anomalies   {} tasks handed out again before their lease ran out{}\n",
                self.early,
                if self.late_start {
                    "; the second worker registered after the first expiry"
                } else {
                    ""
                }
            ));
        }
        out.push_str(Summary::HEADER);
        out.push_str(&self.rescue.row("re-pushed (ms)"));
        match &self.cancel {
            Some(cancel) => out.push_str(&cancel.row("cancel (ms)")),
            None => out.push_str("  cancel (ms)     none arrived on the silent session\n"),
        }
        out.push_str("  (from locked_until, by the database clock, to arrival on the stream)\n");
        out
    }

    /// `{"scenario":"reclaim","tasks":N,"p50_ms":..,"max_ms":..}`.
    fn json_line(&self) -> String {
        JsonLine::new("reclaim")
            .field("tasks", self.rescue.count)
            .field("p50_ms", millis(self.rescue.p50))
            .field("max_ms", millis(self.rescue.max))
            .finish()
    }
}

/// The `reclaim` scenario against `node`. Should the run fail, the tasks
/// of the run still unfinished are deleted through `--database-url`.
pub(crate) async fn run(node: &Node, args: &ReclaimArgs) -> Result<ReclaimReport> {
    db::with_own_task_type(
        "reclaim",
        &args.target.database_url,
        |task_type| async move { measure(node, args, &task_type).await },
    )
    .await
}

async fn measure(node: &Node, args: &ReclaimArgs, task_type: &str) -> Result<ReclaimReport> {
    let endpoint = node.endpoint();
    let task_type = task_type.to_owned();
    let count = args.tasks as usize;
    set_up_tasks(endpoint, &task_type, count).await?;

    // The silent session takes every task.
    let run = uuid::Uuid::new_v4().simple().to_string();
    let register = proto::RegisterWorker {
        worker_id: format!("bench-silent-{}", &run[..8]),
        task_types: vec![task_type.clone()],
        slots: args.tasks as i32,
        lease_duration: Some(crate::wire::convert::duration(args.lease)),
        ..Default::default()
    };
    let mut silent = SessionStream::open(endpoint, register, 0)
        .await
        .context("cannot open the silent session")?;
    let mut expiry: HashMap<String, SystemTime> = HashMap::with_capacity(count);
    tokio::time::timeout(TAKE_TIMEOUT, async {
        while expiry.len() < count {
            let message = silent
                .rx
                .message()
                .await
                .context("silent session failed")?
                .context("silent session ended")?;
            if let Some(connect_response::Kind::Task(leased)) = message.kind {
                let lease = leased
                    .lease
                    .context("a task was pushed without its lease")?;
                let until = lease
                    .locked_until
                    .as_ref()
                    .map(system_time)
                    .context("a lease came without locked_until")?;
                expiry.insert(lease.task_id, until);
            }
        }
        Ok::<_, Error>(())
    })
    .await
    .with_context(|| {
        format!("the silent session did not get {count} tasks in {TAKE_TIMEOUT:?}")
    })??;
    // From now on it asks for nothing new and says nothing more, but keeps
    // reading: the server tells it which leases it took back.
    silent
        .tx
        .send(proto::ConnectRequest {
            kind: Some(connect_request::Kind::Drain(proto::DrainSession {})),
        })
        .await
        .context("silent session closed")?;
    let SessionStream {
        tx: silent_tx, rx, ..
    } = silent;
    let cancels: JoinHandle<Vec<(String, SystemTime)>> = tokio::spawn(read_cancels(rx));

    let first_expiry = expiry.values().min().copied().expect("at least one task");
    let (workers, mut events) =
        Workers::open(&[endpoint], &task_type, 1, args.tasks as i32, false).await?;
    let late_start = SystemTime::now() > first_expiry;
    if late_start {
        tracing::warn!("the second worker registered after the first lease ran out");
    }

    let last_expiry = expiry.values().max().copied().expect("at least one task");
    let deadline = tokio::time::Instant::now()
        + last_expiry
            .duration_since(SystemTime::now())
            .unwrap_or_default()
        + RESCUE_TIMEOUT;
    let rescued = async {
        let mut delays = Vec::with_capacity(count);
        let mut early = 0u64;
        let mut seen = 0usize;
        while seen < count {
            match tokio::time::timeout_at(deadline, events.recv()).await {
                Ok(Some(Event::Arrived(arrival))) => {
                    let Some(until) = expiry.get(&arrival.task_id) else {
                        continue;
                    };
                    seen += 1;
                    match arrival.wall.duration_since(*until) {
                        Ok(delay) => delays.push(delay),
                        Err(_) => {
                            early += 1;
                            delays.push(Duration::ZERO);
                            tracing::warn!(task_id = %arrival.task_id, "handed out before its lease ran out");
                        }
                    }
                }
                Ok(Some(Event::Acked(_))) => {}
                Ok(None) => {
                    return Err(Error::Scenario(
                        "the second worker's session ended".into(),
                    ))
                }
                Err(_) => {
                    return Err(Error::Scenario(format!(
                        "only {seen} of {count} tasks reached the second worker"
                    )))
                }
            }
        }
        Ok::<_, Error>((delays, early))
    }
    .await;
    let closed = workers.close().await;
    // Closing its side ends the silent session.
    drop(silent_tx);
    let cancels = tokio::time::timeout(super::workers::CLOSE_TIMEOUT, cancels)
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    let (delays, early) = rescued?;
    closed?;
    let cancel_delays: Vec<Duration> = cancels
        .iter()
        .filter_map(|(id, at)| Some(at.duration_since(*expiry.get(id)?).unwrap_or_default()))
        .collect();
    Ok(ReclaimReport {
        server: node.describe(),
        args: args.clone(),
        task_type,
        rescue: Summary::of(delays).context("no task was measured")?,
        cancel: Summary::of(cancel_delays),
        early,
        late_start,
    })
}

/// Reads the silent session to its end; returns each `cancel` with the
/// wall time it arrived.
async fn read_cancels(
    mut rx: tonic::Streaming<proto::ConnectResponse>,
) -> Vec<(String, SystemTime)> {
    let mut cancels = Vec::new();
    while let Ok(Some(message)) = rx.message().await {
        if let Some(connect_response::Kind::Cancel(cancel)) = message.kind {
            cancels.push((cancel.task_id, SystemTime::now()));
        }
    }
    cancels
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::testing::{on_node, FreshDatabase};
    use crate::bench::NodeKind;

    /// A silent session's leases reach the second worker after they run
    /// out. Counts only.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reclaim_runs_end_to_end_in_process() {
        let db = FreshDatabase::new();
        let args = ReclaimArgs {
            target: Target::in_process_at(db.url()),
            tasks: 3,
            lease: Duration::from_secs(1),
        };
        let report = on_node(db, &args.target, NodeKind::InProcess, async |node| {
            run(node, &args).await
        })
        .await;

        let report = report.unwrap();
        assert_eq!(report.rescue.count, 3);
        assert_eq!(
            report.early, 0,
            "no task is handed out before its lease runs out"
        );
        let json: serde_json::Value = serde_json::from_str(&report.json_line()).unwrap();
        assert_eq!(json["scenario"], "reclaim");
        assert_eq!(json["tasks"], 3);
        assert!(json["p50_ms"].is_f64() && json["max_ms"].is_f64());
    }
}
