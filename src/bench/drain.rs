//! `drain`: throughput of the push path. N tasks are created up front, then
//! W worker sessions of S slots each drain them over real session streams,
//! completing every task the moment it arrives. Measured from the first
//! task arriving on any stream to the last completion acknowledged, with
//! the server's CPU time per 1,000 tasks.

use std::collections::HashSet;
use std::time::Duration;

use super::error::{Error, Result};
use tokio::time::Instant;

use super::db::{self, UpdateCounts};
use super::producer::set_up_tasks;
use super::report::{
    anomalies_row, drained_row, or_unknown, per_1k, per_second, received, round, JsonLine, Report,
};
use super::system::{cpu_between, Usage};
use super::target::{Node, NodeKind, Target};
use super::workers::{Event, WorkerStats, Workers};

/// How long a drain may go without any task arriving or being acknowledged
/// before it is declared stuck.
const STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Arguments of `leasehold bench drain`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct DrainArgs {
    /// Which server to drive (by default a spawned node).
    #[command(flatten)]
    pub(crate) target: Target,

    /// How many tasks, sessions and slots.
    #[command(flatten)]
    pub(crate) workload: Workload,

    /// The workers read one task per message and send one completion per
    /// message, as clients that predate batches do (by default several
    /// tasks pushed at once come in one message and completions ready
    /// together go in one).
    #[arg(long)]
    pub(crate) single_messages: bool,

    /// Nodes started on the database, the sessions spread over them in
    /// turn; their CPU figures are summed.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub(crate) nodes: u32,
}

/// The size of a drain, shared by `drain` and `sql-only` so that their
/// figures compare.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct Workload {
    /// Tasks created up front and drained.
    #[arg(
        long,
        default_value_t = 100_000,
        value_parser = clap::value_parser!(u32).range(1..=10_000_000)
    )]
    pub(crate) tasks: u32,

    /// Worker sessions draining them, each on its own connection (in
    /// `sql-only`, simulated: one worker id of the claims each).
    #[arg(
        long,
        default_value_t = 4,
        value_parser = clap::value_parser!(u32).range(1..=10_000)
    )]
    pub(crate) sessions: u32,

    /// Slots of each worker session.
    #[arg(
        long,
        default_value_t = 250,
        value_parser = clap::value_parser!(i32).range(1..=10_000)
    )]
    pub(crate) slots: i32,

    /// First insert this many completed tasks (of a type of their own) with
    /// one SQL statement through `--database-url`, then VACUUM ANALYZE, to
    /// measure the drain with a large history present. They are kept.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub(crate) preexisting_finished: u64,
}

/// Result of the `drain` scenario.
#[derive(Debug, Clone)]
pub(crate) struct DrainReport {
    /// The server driven, in a few words.
    pub(crate) server: String,
    /// Where the node lives (what its CPU figure covers).
    pub(crate) node_kind: NodeKind,
    /// The arguments of the run.
    pub(crate) args: DrainArgs,
    /// Task type used by the run (unique to it).
    pub(crate) task_type: String,
    /// Finished rows in the table when the drain started (`None` when the
    /// database could not be read).
    pub(crate) preexisting_finished_rows: Option<u64>,
    /// From the first task arriving on any stream to the last completion
    /// acknowledged.
    pub(crate) elapsed: Duration,
    /// The node's CPU time over the drain (sessions opening included).
    pub(crate) server_cpu: Option<Duration>,
    /// The node's resident memory at the end of the drain, in bytes.
    pub(crate) server_rss: Option<u64>,
    /// This process's CPU time over the drain (the bench clients; the node
    /// too when it runs in-process).
    pub(crate) bench_cpu: Option<Duration>,
    /// Per session, in order: what it did.
    pub(crate) sessions: Vec<WorkerStats>,
    /// Tasks pushed more than once (a server bug if ever non-zero).
    pub(crate) duplicates: u64,
    /// Updates of the live table during the run, and how many were HOT.
    pub(crate) updates: Option<UpdateCounts>,
}

impl DrainReport {
    /// Tasks completed per second.
    pub(crate) fn rate(&self) -> f64 {
        per_second(u64::from(self.args.workload.tasks), self.elapsed)
    }

    /// The node's CPU seconds per 1,000 tasks.
    pub(crate) fn server_cpu_per_1k(&self) -> Option<f64> {
        per_1k(self.server_cpu, self.args.workload.tasks)
    }

    fn bench_cpu_per_1k(&self) -> Option<f64> {
        per_1k(self.bench_cpu, self.args.workload.tasks)
    }
}

impl Report for DrainReport {
    fn table(&self) -> String {
        let args = &self.args;
        let mut out = String::new();
        out.push_str(
            "drain: tasks created up front, pushed to sessions that complete them at once\n",
        );
        out.push_str(&format!("  server      {}\n", self.server));
        out.push_str(&format!("  task type   {}\n", self.task_type));
        out.push_str(&format!(
            "  history     {} finished rows in the table{}\n",
            self.preexisting_finished_rows
                .map_or("unknown".to_owned(), |n| n.to_string()),
            if args.workload.preexisting_finished > 0 {
                format!(
                    " ({} inserted for this run)",
                    args.workload.preexisting_finished
                )
            } else {
                String::new()
            }
        ));
        out.push_str(&format!(
            "  sessions    {} x {} slots ({}), received {}\n",
            args.workload.sessions,
            args.workload.slots,
            if args.single_messages {
                "one task or completion per message"
            } else {
                "batched messages"
            },
            received(&self.sessions, 8)
        ));
        out.push_str(&anomalies_row(&self.sessions, self.duplicates));
        out.push('\n');
        out.push_str(&drained_row(
            args.workload.tasks,
            self.elapsed,
            "first hand-out to last ack",
        ));
        let whose = self.node_kind.caveat();
        let summed = if args.nodes > 1 {
            format!(", {} nodes summed", args.nodes)
        } else {
            String::new()
        };
        out.push_str(&format!(
            "  server CPU  {} s per 1,000 tasks{whose}{summed}\n",
            or_unknown(self.server_cpu_per_1k(), 4)
        ));
        if let Some(rss) = self.server_rss {
            out.push_str(&format!(
                "  server RSS  {:.1} MiB at the end\n",
                super::report::mib(rss)
            ));
        }
        if self.node_kind != NodeKind::InProcess {
            out.push_str(&format!(
                "  bench CPU   {} s per 1,000 tasks (the worker sessions)\n",
                or_unknown(self.bench_cpu_per_1k(), 4)
            ));
        }
        out.push_str(&format!(
            "  updates     {} of the live table\n",
            UpdateCounts::describe(self.updates)
        ));
        out
    }

    /// `{"scenario":"drain","tasks":N,"sessions":W,"slots":S,"tls":..,"auth":..,
    /// "tasks_per_s":..,"server_cpu_s_per_1k":..,"preexisting_finished_rows":M}`.
    fn json_line(&self) -> String {
        JsonLine::new("drain")
            .field("tasks", self.args.workload.tasks)
            .field("sessions", self.args.workload.sessions)
            .field("slots", self.args.workload.slots)
            .field("batched", !self.args.single_messages)
            .field("nodes", self.args.nodes)
            .field("tls", self.args.target.tls_cert.is_some())
            .field("auth", self.args.target.auth)
            .field("tasks_per_s", round(self.rate(), 1))
            .field(
                "server_cpu_s_per_1k",
                self.server_cpu_per_1k().map(|v| round(v, 4)),
            )
            .field("preexisting_finished_rows", self.preexisting_finished_rows)
            .field("live_updates", self.updates.map(|u| u.updates))
            .field("live_hot_updates", self.updates.map(|u| u.hot))
            .finish()
    }
}

/// The nodes' CPU time and memory summed; `None` unless every node's is
/// known. (In-process nodes share this process: its figures, once.)
fn usage(nodes: &[Node]) -> Option<Usage> {
    if nodes.first()?.kind() == NodeKind::InProcess {
        return nodes[0].usage();
    }
    nodes.iter().try_fold(
        Usage {
            cpu: Duration::ZERO,
            rss_bytes: 0,
            peak_rss_bytes: 0,
        },
        |sum, node| {
            let usage = node.usage()?;
            Some(Usage {
                cpu: sum.cpu + usage.cpu,
                rss_bytes: sum.rss_bytes + usage.rss_bytes,
                peak_rss_bytes: sum.peak_rss_bytes + usage.peak_rss_bytes,
            })
        },
    )
}

/// The `drain` scenario against `node`. Should the run fail, the tasks of the run still unfinished are deleted
/// through `--database-url`.
pub(crate) async fn run(nodes: &[Node], args: &DrainArgs) -> Result<DrainReport> {
    db::with_own_task_type("drain", &args.target.database_url, |task_type| async move {
        measure(nodes, args, &task_type).await
    })
    .await
}

async fn measure(nodes: &[Node], args: &DrainArgs, task_type: &str) -> Result<DrainReport> {
    let endpoints: Vec<&str> = nodes.iter().map(Node::endpoint).collect();
    let endpoint = endpoints[0];
    let task_type = task_type.to_owned();
    let preexisting_finished_rows = db::history(
        &args.target.database_url,
        args.workload.preexisting_finished,
    )
    .await?;
    set_up_tasks(endpoint, &task_type, args.workload.tasks as usize).await?;

    let updates_before = db::update_counts(&args.target.database_url).await;
    let server_before = usage(nodes);
    let bench_before = Usage::of(None).ok();
    let (workers, mut events) = Workers::open(
        &endpoints,
        &task_type,
        args.workload.sessions as usize,
        args.workload.slots,
        !args.single_messages,
    )
    .await?;
    let drained = async {
        let total = args.workload.tasks as usize;
        let mut arrived: HashSet<String> = HashSet::with_capacity(total);
        let mut duplicates = 0u64;
        let mut completed = 0usize;
        let mut first: Option<Instant> = None;
        let mut last = None;
        while completed < total {
            match tokio::time::timeout(STALL_TIMEOUT, events.recv()).await {
                Ok(Some(Event::Arrived(arrival))) => {
                    first.get_or_insert(arrival.at);
                    if !arrived.insert(arrival.task_id) {
                        duplicates += 1;
                    }
                }
                Ok(Some(Event::Acked(ack))) => {
                    if ack.ok {
                        completed += 1;
                        last = Some(ack.at);
                    }
                }
                Ok(None) => {
                    return Err(Error::Scenario(format!(
                        "every worker session ended; {completed} of {total} completed"
                    )))
                }
                Err(_) => {
                    return Err(Error::Scenario(format!(
                        "no progress for {STALL_TIMEOUT:?}: {} arrived and {completed} of {total} \
                     completed",
                        arrived.len()
                    )))
                }
            }
        }
        let (Some(first), Some(last)) = (first, last) else {
            return Err(Error::Scenario("nothing was drained".into()));
        };
        Ok::<_, Error>((last.saturating_duration_since(first), duplicates))
    }
    .await;
    let server_after = usage(nodes);
    let bench_after = Usage::of(None).ok();
    let closed = workers.close().await;
    let (elapsed, duplicates) = drained?;
    let sessions = closed?;
    // Each backend publishes its table statistics within about a second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let updates = UpdateCounts::between(
        updates_before,
        db::update_counts(&args.target.database_url).await,
    );
    Ok(DrainReport {
        server: nodes
            .iter()
            .map(Node::describe)
            .collect::<Vec<_>>()
            .join(", "),
        node_kind: nodes[0].kind(),
        args: args.clone(),
        task_type,
        preexisting_finished_rows,
        elapsed,
        server_cpu: cpu_between(server_before, server_after),
        server_rss: server_after.map(|u| u.rss_bytes),
        bench_cpu: cpu_between(bench_before, bench_after),
        sessions,
        duplicates,
        updates,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::testing::{on_node, FreshDatabase};

    /// Drains a few tasks over real streams from an in-process node on a
    /// fresh database with a few finished rows first. Counts only.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn drain_runs_end_to_end_in_process() {
        let db = FreshDatabase::new();
        let args = DrainArgs {
            target: Target::in_process_at(db.url()),
            workload: Workload {
                tasks: 30,
                sessions: 2,
                slots: 4,
                preexisting_finished: 5,
            },
            single_messages: false,
            nodes: 1,
        };
        let report = on_node(db, &args.target, NodeKind::Spawned, async |node| {
            assert_eq!(node.kind(), NodeKind::InProcess);
            run(std::slice::from_ref(node), &args).await
        })
        .await;

        let report = report.unwrap();
        let received: u64 = report.sessions.iter().map(|s| s.received).sum();
        let completed: u64 = report.sessions.iter().map(|s| s.completed).sum();
        assert_eq!(received, 30);
        assert_eq!(completed, 30);
        assert_eq!(report.duplicates, 0);
        assert_eq!(report.preexisting_finished_rows, Some(5));
        assert!(
            report.server_cpu.is_some(),
            "an in-process node is measured"
        );
        let json: serde_json::Value = serde_json::from_str(&report.json_line()).unwrap();
        assert_eq!(json["scenario"], "drain");
        assert_eq!(json["tasks"], 30);
        assert_eq!(json["sessions"], 2);
        assert_eq!(json["slots"], 4);
        assert_eq!(json["preexisting_finished_rows"], 5);
        assert!(json["tasks_per_s"].is_f64());
        assert!(json["server_cpu_s_per_1k"].is_f64());
        assert!(report.table().contains("drained"));
    }
}
