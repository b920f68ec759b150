//! `sql-only`: the ceiling our own SQL allows. Drives the very statements
//! the server uses to hand out and complete tasks (the store's
//! `task_claim` and `task_complete_many`) from inside this process, with no
//! gRPC, no sessions and no events, batched the way the server batches
//! them:
//!
//! - a claim deals the free slots of W sessions of S slots round-robin from
//!   a rotating start, at most 1,000 per statement, and claims again at once
//!   when it got all it asked for, else when a completion frees a slot (the
//!   dispatch loop);
//! - every claimed task is completed at once; completions queue up and are
//!   written up to 1,000 per statement with at most 4 statements in flight
//!   (the group commit of completions).
//!
//! Measured from the first claim that returned tasks to the last completion
//! written, over a pool of the server's default size, with the node's
//! vacuumer running beside it as it does in a node.

use std::time::Duration;

use super::error::{Context, Error, Result};
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;

use super::db;
use super::drain::Workload;
use super::producer::{unique_task_type, SETUP_BATCH};
use super::report::{drained_row, or_unknown, per_1k, per_second, round, JsonLine, Report};
use super::system::{cpu_between, Usage};
use super::target::DEFAULT_DATABASE_URL;
use crate::config::Config;
use crate::maintenance::{Supervisor, Vacuumer};
use crate::model::{Claim, LeaseRef, NewTask};
use crate::store::{Fenced, Store};

/// Most tasks claimed by one statement (as the dispatcher's `MAX_CLAIM`).
pub(crate) const MAX_CLAIM: usize = 1000;
/// Most completions written by one statement (as the dispatcher's
/// `MAX_BATCH`).
pub(crate) const MAX_COMPLETE: usize = 1000;
/// Completion statements in flight at once (as the dispatcher's batcher of
/// completions).
pub(crate) const COMPLETE_PARALLEL: usize = 4;

/// Lease length of the claims: the server's default.
const LEASE: Duration = Duration::from_secs(30);

/// How long the loop may go without a completion before it is declared
/// stuck.
const STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Arguments of `leasehold bench sql-only`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct SqlOnlyArgs {
    /// Postgres URL. The database is created if it does not exist and
    /// migrated.
    #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL)]
    pub(crate) database_url: String,

    /// How many tasks, simulated sessions (each a worker id of the claims)
    /// and slots: the same flags and defaults as `drain`.
    #[command(flatten)]
    pub(crate) workload: Workload,
}

/// Result of the `sql-only` scenario.
#[derive(Debug, Clone)]
pub(crate) struct SqlOnlyReport {
    /// The arguments of the run.
    pub(crate) args: SqlOnlyArgs,
    /// Task type used by the run (unique to it).
    pub(crate) task_type: String,
    /// Finished rows in the table when the run started.
    pub(crate) preexisting_finished_rows: Option<u64>,
    /// From the first claim that returned tasks to the last completion
    /// written.
    pub(crate) elapsed: Duration,
    /// Claim statements run, and tasks they returned.
    pub(crate) claims: (u64, u64),
    /// Completion statements run, and completions they wrote.
    pub(crate) completes: (u64, u64),
    /// Completions that were not applied (zero unless something is wrong).
    pub(crate) refused: u64,
    /// This process's CPU time over the run.
    pub(crate) cpu: Option<Duration>,
}

impl SqlOnlyReport {
    /// Tasks completed per second.
    pub(crate) fn rate(&self) -> f64 {
        per_second(u64::from(self.args.workload.tasks), self.elapsed)
    }
}

impl Report for SqlOnlyReport {
    fn table(&self) -> String {
        let args = &self.args;
        let mean = |(statements, rows): (u64, u64)| {
            if statements == 0 {
                0.0
            } else {
                rows as f64 / statements as f64
            }
        };
        let mut out = String::new();
        out.push_str("sql-only: the server's claim and complete statements, no gRPC\n");
        out.push_str(&format!(
            "  database    {}\n",
            redact(&self.args.database_url)
        ));
        out.push_str(&format!("  task type   {}\n", self.task_type));
        out.push_str(&format!(
            "  history     {} finished rows in the table\n",
            self.preexisting_finished_rows
                .map_or("unknown".to_owned(), |n| n.to_string())
        ));
        out.push_str(&format!(
            "  slots       {} sessions x {} slots; claims of up to {MAX_CLAIM}, \
             completions of up to {MAX_COMPLETE}, {COMPLETE_PARALLEL} in flight\n",
            args.workload.sessions, args.workload.slots
        ));
        out.push_str(&format!(
            "  statements  {} claims of {:.1} tasks on average, {} completes of {:.1}\n",
            self.claims.0,
            mean(self.claims),
            self.completes.0,
            mean(self.completes)
        ));
        if self.refused > 0 {
            out.push_str(&format!(
                "  anomalies   {} completions not applied\n",
                self.refused
            ));
        }
        out.push('\n');
        out.push_str(&drained_row(
            args.workload.tasks,
            self.elapsed,
            "first claim to last complete",
        ));
        out.push_str(&format!(
            "  bench CPU   {} s per 1,000 tasks (this process, Postgres excluded)\n",
            or_unknown(per_1k(self.cpu, args.workload.tasks), 4)
        ));
        out
    }

    /// `{"scenario":"sql-only","tasks":N,"tasks_per_s":..}`.
    fn json_line(&self) -> String {
        JsonLine::new("sql-only")
            .field("tasks", self.args.workload.tasks)
            .field("tasks_per_s", round(self.rate(), 1))
            .finish()
    }
}

/// A database URL without its password, for reports.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let user = &url[scheme + 3..at];
            let user = user.split(':').next().unwrap_or_default();
            format!("{}{user}{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

/// Completion statements finished: which sessions got slots back, how
/// many were applied, and when.
struct Written {
    sessions: Vec<usize>,
    applied: u64,
    at: Instant,
}

/// The `sql-only` scenario.
pub(crate) async fn run(args: &SqlOnlyArgs) -> Result<SqlOnlyReport> {
    // The server's own pool settings, and its migrations.
    let config = Config::with_database_url(&args.database_url);
    let store = crate::server::prepare_database(&config)
        .await
        .context("cannot prepare the database")?;
    let preexisting_finished_rows =
        db::history(&args.database_url, args.workload.preexisting_finished).await?;

    let task_type = unique_task_type("sql-only");
    let total = args.workload.tasks as usize;
    let started = Instant::now();
    let mut left = total;
    while left > 0 {
        let n = left.min(SETUP_BATCH);
        let news: Vec<NewTask> = (0..n)
            .map(|_| NewTask {
                id: uuid::Uuid::now_v7(),
                task_type: task_type.clone(),
                params: serde_json::Value::Object(Default::default()),
                priority: 0,
                max_attempts: crate::wire::limit::DEFAULT_MAX_ATTEMPTS,
                scheduled_for: None,
                library_id: None,
                series_id: None,
                book_id: None,
                dedup_key: None,
            })
            .collect();
        let created = store
            .task_insert_many(&news, None)
            .await
            .context("cannot insert the tasks of the run")?;
        if created.len() != n {
            return Err(Error::Scenario(format!(
                "inserted {} of {n}",
                created.len()
            )));
        }
        left -= n;
    }
    tracing::info!(
        tasks = total,
        took_ms = super::report::millis(started.elapsed()),
        "tasks inserted"
    );

    // The node's vacuumer, as a node runs it: without it the dead row
    // versions of the run (and of earlier runs) pile up in the indexes the
    // claims walk, and the figure would be that of a table no node keeps.
    let mut maintenance = Supervisor::new();
    maintenance.spawn(Vacuumer::new(store.clone(), config.vacuum_threshold));
    let before = Usage::of(None).ok();
    let outcome = claim_and_complete(&store, &task_type, args).await;
    let after = Usage::of(None).ok();
    maintenance.stop().await;
    let (elapsed, claims, completes, refused) = outcome?;
    Ok(SqlOnlyReport {
        args: args.clone(),
        task_type,
        preexisting_finished_rows,
        elapsed,
        claims,
        completes,
        refused,
        cpu: cpu_between(before, after),
    })
}

type Outcome = (Duration, (u64, u64), (u64, u64), u64);

/// The claim loop, with the completion writer beside it.
async fn claim_and_complete(store: &Store, task_type: &str, args: &SqlOnlyArgs) -> Result<Outcome> {
    let total = args.workload.tasks as usize;
    let sessions = args.workload.sessions as usize;
    let run = uuid::Uuid::new_v4().simple().to_string();
    let worker_ids: Vec<String> = (0..sessions)
        .map(|i| format!("bench-sql-{}-{i}", &run[..8]))
        .collect();
    let mut free: Vec<usize> = vec![args.workload.slots as usize; sessions];

    let (complete_tx, complete_rx) = mpsc::unbounded_channel::<(LeaseRef, usize)>();
    let (written_tx, mut written_rx) = mpsc::unbounded_channel::<Result<Written>>();
    let writer = tokio::spawn(write_completions(store.clone(), complete_rx, written_tx));

    let mut rotation = 0usize;
    let mut claimed = 0usize;
    let mut completed = 0usize;
    let mut claims = (0u64, 0u64);
    let mut completes = (0u64, 0u64);
    let mut refused = 0u64;
    let mut first: Option<Instant> = None;
    let mut last: Option<Instant> = None;
    let mut apply = |written: Written,
                     free: &mut Vec<usize>,
                     completed: &mut usize,
                     last: &mut Option<Instant>| {
        completes.0 += 1;
        completes.1 += written.applied;
        refused += written.sessions.len() as u64 - written.applied;
        *completed += written.sessions.len();
        for session in written.sessions {
            free[session] += 1;
        }
        *last = Some(written.at);
    };
    while completed < total {
        let mut wait = true;
        if claimed < total && free.iter().any(|f| *f > 0) {
            // Deal the free slots round-robin from a rotating start.
            let start = rotation % sessions;
            rotation += 1;
            let mut left = free.clone();
            let mut owners = Vec::new();
            let mut slots = Vec::new();
            'deal: while left.iter().any(|f| *f > 0) {
                for k in 0..sessions {
                    let i = (start + k) % sessions;
                    if left[i] > 0 {
                        left[i] -= 1;
                        owners.push(i);
                        slots.push(worker_ids[i].clone());
                        if owners.len() == MAX_CLAIM {
                            break 'deal;
                        }
                    }
                }
            }
            let asked = slots.len();
            let claim = Claim {
                task_types: vec![task_type.to_owned()],
                slots,
                lease_duration: LEASE,
            };
            let got = store
                .task_claim(&claim, None)
                .await
                .context("claim failed")?;
            claims.0 += 1;
            claims.1 += got.len() as u64;
            if !got.is_empty() {
                first.get_or_insert_with(Instant::now);
            }
            claimed += got.len();
            // All it asked for: more may be due, claim again at once.
            wait = got.len() < asked;
            for (slot, task) in got {
                let session = owners[slot];
                free[session] -= 1;
                let lease_token = task
                    .lease_token
                    .context("a claimed task has no lease token")?;
                let lease = LeaseRef {
                    task_id: task.id,
                    lease_token,
                };
                if complete_tx.send((lease, session)).is_err() {
                    return Err(Error::Scenario("the completion writer stopped".into()));
                }
            }
        }
        if wait || claimed >= total {
            match tokio::time::timeout(STALL_TIMEOUT, written_rx.recv()).await {
                Ok(Some(written)) => apply(written?, &mut free, &mut completed, &mut last),
                Ok(None) => return Err(Error::Scenario("the completion writer stopped".into())),
                Err(_) => {
                    return Err(Error::Scenario(format!(
                        "no completion for {STALL_TIMEOUT:?}: {claimed} claimed, {completed} of \
                     {total} completed"
                    )))
                }
            }
        }
        while let Ok(written) = written_rx.try_recv() {
            apply(written?, &mut free, &mut completed, &mut last);
        }
    }
    drop(complete_tx);
    let _ = writer.await;
    let (Some(first), Some(last)) = (first, last) else {
        return Err(Error::Scenario("nothing was claimed".into()));
    };
    Ok((
        last.saturating_duration_since(first),
        claims,
        completes,
        refused,
    ))
}

/// Group commit of completions: takes everything queued (up to
/// [`MAX_COMPLETE`]) as one statement, with at most [`COMPLETE_PARALLEL`]
/// statements in flight, and reports each statement as it finishes.
async fn write_completions(
    store: Store,
    mut queue: mpsc::UnboundedReceiver<(LeaseRef, usize)>,
    written: mpsc::UnboundedSender<Result<Written>>,
) {
    let permits = std::sync::Arc::new(Semaphore::new(COMPLETE_PARALLEL));
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = queue.recv().await else {
            // Let the statements in flight finish.
            drop(permit);
            let _ = permits.acquire_many(COMPLETE_PARALLEL as u32).await;
            return;
        };
        let mut batch = vec![first];
        while batch.len() < MAX_COMPLETE {
            match queue.try_recv() {
                Ok(item) => batch.push(item),
                Err(_) => break,
            }
        }
        let store = store.clone();
        let written = written.clone();
        tokio::spawn(async move {
            let items: Vec<(LeaseRef, serde_json::Value)> = batch
                .iter()
                .map(|(lease, _)| (*lease, serde_json::Value::Object(Default::default())))
                .collect();
            let outcome = store
                .task_complete_many(&items)
                .await
                .context("complete failed")
                .map(|outcomes| Written {
                    applied: outcomes
                        .iter()
                        .filter(|o| matches!(o, Fenced::Applied(_)))
                        .count() as u64,
                    sessions: batch.iter().map(|(_, session)| *session).collect(),
                    at: Instant::now(),
                });
            let _ = written.send(outcome);
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::testing::FreshDatabase;

    /// Claims and completes a few tasks on a fresh database. Counts only.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sql_only_runs_end_to_end() {
        let db = FreshDatabase::new();
        let args = SqlOnlyArgs {
            database_url: db.url(),
            workload: Workload {
                tasks: 25,
                sessions: 2,
                slots: 3,
                preexisting_finished: 0,
            },
        };
        let report = run(&args).await;
        db.drop_it().await;

        let report = report.unwrap();
        assert_eq!(report.claims.1, 25, "every task is claimed once");
        assert_eq!(report.completes.1, 25, "and completed once");
        assert_eq!(report.refused, 0);
        assert_eq!(report.preexisting_finished_rows, Some(0));
        let line = report.json_line();
        assert!(
            line.starts_with(r#"{"scenario":"sql-only","tasks":25,"tasks_per_s":"#),
            "{line}"
        );
    }

    #[test]
    fn passwords_are_not_shown() {
        assert_eq!(
            redact("postgres://bench:secret@db:5432/x"),
            "postgres://bench@db:5432/x"
        );
        assert_eq!(
            redact("postgres://postgres@127.0.0.1/x"),
            "postgres://postgres@127.0.0.1/x"
        );
        assert_eq!(redact("host=db dbname=x"), "host=db dbname=x");
    }
}
