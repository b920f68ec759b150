//! `leasehold bench`: load scenarios that drive a server over its public gRPC
//! contract (or, for `sql-only`, its statements directly) and report what
//! they measured, as a human table followed by one JSON line (the last line
//! on stdout; logs go to stderr).
//!
//! Scenarios, one module and one subcommand each:
//! - `enqueue`: tasks created per second, through CreateTasks in batches
//!   and through single CreateTask calls from a few concurrent clients.
//! - `drain`: tasks handed out and completed per second by worker
//!   sessions over real streams, and the server's CPU time per 1,000 tasks.
//! - `latency`: push latency, from the CreateTask call to the task on a
//!   worker's stream.
//! - `reclaim`: from a silent session's `locked_until` to the task
//!   reaching another worker.
//! - `sessions`: the server's memory and CPU with many idle sessions
//!   heartbeating their leases.
//! - `sql_only`: the claim and complete statements driven without gRPC,
//!   the ceiling the server can approach.
//!
//! Shared pieces: `target` (a running server, a node in this process, or a
//! node spawned as a child process so its CPU time and memory are its own),
//! `workers` (simulated workers), `report` (figures and output), `system`
//! (`/proc`), `db` (the SQL a scenario runs itself), `producer` (creating
//! tasks) and [`Error`] (why a run failed).
//! Every run uses task types unique to it, so rows of earlier runs never
//! take part.

mod db;
mod drain;
mod enqueue;
mod error;
mod latency;
mod producer;
mod reclaim;
mod report;
mod sessions;
mod sql_only;
mod system;
mod target;
mod workers;

pub use error::{Error, StoreError};

use drain::DrainArgs;
use enqueue::EnqueueArgs;
use latency::LatencyArgs;
use reclaim::ReclaimArgs;
use report::Report;
use sessions::SessionsArgs;
use sql_only::SqlOnlyArgs;
use target::Node;
pub(crate) use target::NodeKind;

/// Arguments of `leasehold bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// The scenario to run.
    #[command(subcommand)]
    pub(crate) scenario: Scenario,
}

/// A benchmark scenario, one subcommand of `leasehold bench` each.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum Scenario {
    /// Enqueue rate: N tasks through CreateTasks in batches (one call at a
    /// time), then N through single CreateTask calls from a few concurrent
    /// clients; tasks per second of each. The run's tasks are deleted
    /// afterwards.
    Enqueue(EnqueueArgs),
    /// Drain rate: N tasks created up front, drained by W worker sessions of
    /// S slots that complete each task at once; tasks per second from the
    /// first hand-out to the last acknowledgement, and the server's CPU
    /// seconds per 1,000 tasks. Spawns the node as a child process unless
    /// told otherwise.
    Drain(DrainArgs),
    /// Push latency: from the CreateTask call until the task arrives on a
    /// worker's session stream. Creates tasks one at a time at a steady rate
    /// while idle worker sessions complete each pushed task at once, then
    /// prints p50/p90/p99/max in milliseconds.
    Latency(LatencyArgs),
    /// Reclaim delay: a session takes N leases and goes silent; p50/max of
    /// the time from each lease's `locked_until` to the task reaching
    /// another worker.
    Reclaim(ReclaimArgs),
    /// Idle sessions: K sessions held open, each heartbeating L leases at
    /// the recommended interval; the server's RSS and CPU use over a
    /// window. Spawns the node as a child process unless told otherwise.
    Sessions(SessionsArgs),
    /// The ceiling of our own SQL: the server's claim and complete
    /// statements driven from this process with no gRPC, batched as the
    /// server batches them, with the same N and slots as `drain`.
    SqlOnly(SqlOnlyArgs),
}

/// Runs the chosen scenario and prints its report: a human table, then one
/// JSON line. A run whose report says it failed (its figures printed first)
/// ends with [`Error::Scenario`].
pub async fn run(args: BenchArgs) -> Result<(), Error> {
    let report: Box<dyn Report> = match args.scenario {
        Scenario::Enqueue(args) => {
            let node = Node::start(&args.target, NodeKind::InProcess).await?;
            let outcome = enqueue::run(&node, &args).await;
            Box::new(finish(node, outcome).await?)
        }
        Scenario::Drain(args) => {
            system::ensure_open_files(u64::from(args.workload.sessions) * 2 + 256)?;
            let nodes = Node::start_many(&args.target, NodeKind::Spawned, args.nodes).await?;
            let outcome = drain::run(&nodes, &args).await;
            Box::new(finish_all(nodes, outcome).await?)
        }
        Scenario::Latency(args) => {
            let node = Node::start(&args.target, NodeKind::InProcess).await?;
            let outcome = latency::run(&node, &args).await;
            Box::new(finish(node, outcome).await?)
        }
        Scenario::Reclaim(args) => {
            let node = Node::start(&args.target, NodeKind::InProcess).await?;
            let outcome = reclaim::run(&node, &args).await;
            Box::new(finish(node, outcome).await?)
        }
        Scenario::Sessions(args) => {
            // Before the node starts, so that a spawned node inherits it.
            system::ensure_open_files(args.open_files_needed())?;
            let node = Node::start(&args.target, NodeKind::Spawned).await?;
            let outcome = sessions::run(&node, &args).await;
            Box::new(finish(node, outcome).await?)
        }
        Scenario::SqlOnly(args) => Box::new(sql_only::run(&args).await?),
    };
    print!("{}", report.table());
    println!("{}", report.json_line());
    match report.failure() {
        Some(failure) => Err(Error::Scenario(failure)),
        None => Ok(()),
    }
}

/// Stops the nodes whatever the outcome; the scenario's error wins over
/// theirs.
async fn finish_all<R>(nodes: Vec<Node>, outcome: error::Result<R>) -> error::Result<R> {
    let mut stopped = Ok(());
    for node in nodes {
        let result = node.stop().await;
        if stopped.is_ok() {
            stopped = result;
        }
    }
    let report = outcome?;
    stopped?;
    Ok(report)
}

/// Stops the node whatever the outcome; the scenario's error wins over the
/// node's.
async fn finish<R>(node: Node, outcome: error::Result<R>) -> error::Result<R> {
    let stopped = node.stop().await;
    let report = outcome?;
    stopped?;
    Ok(report)
}

/// Parsing the command line in tests, and a fresh database per test.
#[cfg(test)]
pub(crate) mod testing {
    use clap::Parser;

    use super::error::Result;
    use super::target::{Node, NodeKind, Target};
    use super::BenchArgs;
    pub(crate) use crate::testing::FreshDatabase;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        bench: Bench,
    }

    #[derive(Debug, clap::Subcommand)]
    enum Bench {
        Bench(BenchArgs),
    }

    /// Parses `leasehold <args>`, which must start with `bench`.
    pub(crate) fn parse(args: &[&str]) -> Result<BenchArgs, clap::Error> {
        let Bench::Bench(bench) =
            Cli::try_parse_from(std::iter::once("leasehold").chain(args.iter().copied()))?.bench;
        Ok(bench)
    }

    /// Runs `scenario` against a node of `kind` started as `target` says, then
    /// stops the node and drops `db`; returns what the scenario returned.
    /// Panics if the node cannot start or stop.
    pub(crate) async fn on_node<R>(
        db: FreshDatabase,
        target: &Target,
        kind: NodeKind,
        scenario: impl AsyncFnOnce(&Node) -> Result<R>,
    ) -> Result<R> {
        let node = Node::start(target, kind).await.unwrap();
        let outcome = scenario(&node).await;
        node.stop().await.unwrap();
        db.drop_it().await;
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::testing::parse;
    use super::*;

    #[test]
    fn every_scenario_has_its_documented_defaults() {
        let Scenario::Enqueue(enqueue) = parse(&["bench", "enqueue"]).unwrap().scenario else {
            panic!("enqueue")
        };
        assert_eq!(
            (enqueue.tasks, enqueue.batch, enqueue.clients),
            (20_000, 1000, 4)
        );
        assert_eq!(
            enqueue.target.kind(NodeKind::InProcess),
            NodeKind::InProcess
        );

        let Scenario::Drain(drain) = parse(&["bench", "drain"]).unwrap().scenario else {
            panic!("drain")
        };
        assert_eq!(
            (
                drain.workload.tasks,
                drain.workload.sessions,
                drain.workload.slots,
                drain.workload.preexisting_finished
            ),
            (100_000, 4, 250, 0)
        );
        assert!(!drain.target.spawn && !drain.target.in_process && drain.target.server.is_none());

        let Scenario::Reclaim(reclaim) = parse(&["bench", "reclaim"]).unwrap().scenario else {
            panic!("reclaim")
        };
        assert_eq!(
            (reclaim.tasks, reclaim.lease),
            (50, std::time::Duration::from_secs(1))
        );

        let Scenario::Sessions(sessions) = parse(&["bench", "sessions"]).unwrap().scenario else {
            panic!("sessions")
        };
        assert_eq!((sessions.sessions, sessions.leases), (1000, 2));
        assert_eq!(sessions.lease, std::time::Duration::from_secs(30));
        assert_eq!(sessions.open_files_needed(), 1000 + 256);

        let Scenario::SqlOnly(sql) = parse(&["bench", "sql-only"]).unwrap().scenario else {
            panic!("sql-only")
        };
        assert_eq!(
            (
                sql.workload.tasks,
                sql.workload.sessions,
                sql.workload.slots
            ),
            (
                drain.workload.tasks,
                drain.workload.sessions,
                drain.workload.slots
            ),
            "sql-only uses the sizes of drain"
        );
    }

    #[test]
    fn node_flags_are_parsed_and_checked() {
        let Scenario::Drain(drain) = parse(&["bench", "drain", "--in-process", "--tasks", "7"])
            .unwrap()
            .scenario
        else {
            panic!("drain")
        };
        assert_eq!(drain.target.kind(NodeKind::Spawned), NodeKind::InProcess);
        let Scenario::Enqueue(enqueue) = parse(&["bench", "enqueue", "--spawn"]).unwrap().scenario
        else {
            panic!("enqueue")
        };
        assert_eq!(enqueue.target.kind(NodeKind::InProcess), NodeKind::Spawned);
        for bad in [
            &["bench", "drain", "--spawn", "--in-process"][..],
            &["bench", "drain", "--spawn", "--server", "http://x:1"],
            &["bench", "drain", "--slots", "0"],
            &["bench", "enqueue", "--batch", "10001"],
            &["bench", "reclaim", "--lease", "500ms"],
            &["bench", "sessions", "--lease", "2h"],
            &["bench", "sessions", "--sessions", "0"],
            &["bench", "sql-only", "--tasks", "0"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} is refused");
        }
    }
}
