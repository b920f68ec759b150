//! `enqueue`: how fast producers can create tasks, through CreateTasks in
//! batches (one call at a time) and through single CreateTask calls from a
//! few concurrent clients, each on a connection of its own.

use std::time::Duration;

use super::error::{Context, Error, Result};
use tokio::time::Instant;

use super::db;
use super::producer::{create_tasks, task_client, unique_task_type};
use super::report::{per_second, round, JsonLine, Report, Summary};
use super::target::{Node, Target};
use crate::proto;

/// Arguments of `leasehold bench enqueue`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct EnqueueArgs {
    /// Which server to drive.
    #[command(flatten)]
    pub(crate) target: Target,

    /// Tasks created by each of the two phases (batched, then single).
    #[arg(
        long,
        default_value_t = 20_000,
        value_parser = clap::value_parser!(u32).range(1..=10_000_000)
    )]
    pub(crate) tasks: u32,

    /// Tasks per CreateTasks call in the batched phase.
    #[arg(
        long,
        default_value_t = 1000,
        value_parser = clap::value_parser!(u32).range(1..=10_000)
    )]
    pub(crate) batch: u32,

    /// Concurrent clients of the single-call phase, each calling CreateTask
    /// one task at a time on its own connection.
    #[arg(
        long,
        default_value_t = 4,
        value_parser = clap::value_parser!(u32).range(1..=1000)
    )]
    pub(crate) clients: u32,
}

/// Result of the `enqueue` scenario.
#[derive(Debug, Clone)]
pub(crate) struct EnqueueReport {
    /// The server driven, in a few words.
    pub(crate) server: String,
    /// The arguments of the run.
    pub(crate) args: EnqueueArgs,
    /// Task type used by the run (unique to it).
    pub(crate) task_type: String,
    /// Wall time of the batched phase.
    pub(crate) batch_elapsed: Duration,
    /// Round trip of each CreateTasks call.
    pub(crate) batch_calls: Summary,
    /// Wall time of the single-call phase.
    pub(crate) single_elapsed: Duration,
    /// Round trip of each CreateTask call.
    pub(crate) single_calls: Summary,
    /// Tasks of the run deleted afterwards; `None` when the database could
    /// not be reached (the tasks were left pending).
    pub(crate) deleted: Option<u64>,
}

impl EnqueueReport {
    /// Tasks per second of the batched phase.
    pub(crate) fn batch_rate(&self) -> f64 {
        per_second(u64::from(self.args.tasks), self.batch_elapsed)
    }

    /// Tasks per second of the single-call phase.
    pub(crate) fn single_rate(&self) -> f64 {
        per_second(u64::from(self.args.tasks), self.single_elapsed)
    }
}

impl Report for EnqueueReport {
    fn table(&self) -> String {
        let args = &self.args;
        let mut out = String::new();
        out.push_str("enqueue: creating tasks through the API\n");
        out.push_str(&format!("  server      {}\n", self.server));
        out.push_str(&format!("  task type   {}\n", self.task_type));
        out.push_str(&format!(
            "  batched     {} tasks, CreateTasks x {} per call, one call at a time: \
             {:.0} tasks/s ({:.2} s)\n",
            args.tasks,
            args.batch,
            self.batch_rate(),
            self.batch_elapsed.as_secs_f64()
        ));
        out.push_str(&format!(
            "  single      {} tasks, CreateTask from {} concurrent clients: \
             {:.0} tasks/s ({:.2} s)\n",
            args.tasks,
            args.clients,
            self.single_rate(),
            self.single_elapsed.as_secs_f64()
        ));
        match self.deleted {
            Some(n) => out.push_str(&format!("  clean-up    {n} tasks of the run deleted\n")),
            None => out.push_str(&format!(
                "  clean-up    database unreachable: the tasks of {} are left pending\n",
                self.task_type
            )),
        }
        out.push_str(Summary::HEADER);
        out.push_str(&self.batch_calls.row("CreateTasks (ms)"));
        out.push_str(&self.single_calls.row("CreateTask (ms)"));
        out
    }

    /// `{"scenario":"enqueue","tasks":N,"batch":B,"batch_tasks_per_s":..,
    /// "single_clients":C,"single_tasks_per_s":..}`.
    fn json_line(&self) -> String {
        JsonLine::new("enqueue")
            .field("tasks", self.args.tasks)
            .field("batch", self.args.batch)
            .field("batch_tasks_per_s", round(self.batch_rate(), 1))
            .field("single_clients", self.args.clients)
            .field("single_tasks_per_s", round(self.single_rate(), 1))
            .finish()
    }
}

/// The `enqueue` scenario against `node`. The run's tasks are deleted at
/// the end through `--database-url`: left pending, every later claim would
/// have to step over them.
pub(crate) async fn run(node: &Node, args: &EnqueueArgs) -> Result<EnqueueReport> {
    let endpoint = node.endpoint();
    let task_type = unique_task_type("enqueue");
    let tasks = args.tasks as usize;
    let measured = async {
        // Batched: one client, one call at a time.
        let mut client = task_client(endpoint).await?;
        let started = Instant::now();
        let batch_calls = create_tasks(&mut client, &task_type, tasks, args.batch as usize).await?;
        let batch_elapsed = started.elapsed();
        tracing::info!(tasks, elapsed = ?batch_elapsed, "batched phase done");

        // Single calls: `clients` clients, each on its own connection.
        let clients = (args.clients as usize).min(tasks);
        let mut connected = Vec::with_capacity(clients);
        for _ in 0..clients {
            connected.push(task_client(endpoint).await?);
        }
        let started = Instant::now();
        let mut handles = Vec::with_capacity(clients);
        for (index, mut client) in connected.into_iter().enumerate() {
            // Spread the tasks as evenly as possible.
            let share = tasks / clients + usize::from(index < tasks % clients);
            let task_type = task_type.clone();
            handles.push(tokio::spawn(async move {
                let mut calls = Vec::with_capacity(share);
                for _ in 0..share {
                    let call = Instant::now();
                    let response = client
                        .create_task(proto::CreateTaskRequest {
                            task_type: task_type.clone(),
                            ..Default::default()
                        })
                        .await
                        .context("CreateTask failed")?
                        .into_inner();
                    calls.push(call.elapsed());
                    if response.task.is_none() {
                        return Err(Error::Scenario("CreateTask answered no task".into()));
                    }
                }
                Ok::<_, Error>(calls)
            }));
        }
        let mut single_calls = Vec::with_capacity(tasks);
        for handle in handles {
            single_calls.extend(handle.await.context("client task panicked")??);
        }
        let single_elapsed = started.elapsed();
        tracing::info!(tasks, elapsed = ?single_elapsed, "single-call phase done");
        Ok::<_, Error>((batch_calls, batch_elapsed, single_calls, single_elapsed))
    }
    .await;
    let deleted = clean_up(&args.target.database_url, &task_type).await;
    let (batch_calls, batch_elapsed, single_calls, single_elapsed) = measured?;
    Ok(EnqueueReport {
        server: node.describe(),
        args: args.clone(),
        task_type,
        batch_elapsed,
        batch_calls: Summary::of(batch_calls).context("no CreateTasks call was made")?,
        single_elapsed,
        single_calls: Summary::of(single_calls).context("no CreateTask call was made")?,
        deleted,
    })
}

/// Deletes the run's tasks; `None` (and a warning) if the database cannot
/// be reached.
async fn clean_up(database_url: &str, task_type: &str) -> Option<u64> {
    let deleted = db::delete_type(database_url, task_type).await;
    match deleted {
        Ok(n) => Some(n),
        Err(err) => {
            tracing::warn!(
                error = err.to_string(),
                task_type,
                "cannot delete the tasks of the run: they stay pending"
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::testing::{on_node, FreshDatabase};
    use crate::bench::NodeKind;

    /// Both phases against an in-process node; the run's tasks are deleted
    /// afterwards. Counts only.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn enqueue_runs_end_to_end_in_process() {
        let db = FreshDatabase::new();
        let args = EnqueueArgs {
            target: Target::in_process_at(db.url()),
            tasks: 12,
            batch: 5,
            clients: 3,
        };
        let report = on_node(db, &args.target, NodeKind::InProcess, async |node| {
            run(node, &args).await
        })
        .await;

        let report = report.unwrap();
        assert_eq!(report.batch_calls.count, 3, "12 tasks in calls of 5");
        assert_eq!(report.single_calls.count, 12);
        assert_eq!(report.deleted, Some(24), "both phases' tasks are deleted");
        let line = report.json_line();
        assert!(
            line.starts_with(r#"{"scenario":"enqueue","tasks":12,"batch":5,"batch_tasks_per_s":"#),
            "{line}"
        );
        let json: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(json["single_clients"], 3);
        assert!(json["single_tasks_per_s"].is_f64());
    }
}
