//! Background upkeep that every node runs, one file per job:
//!
//! - `reclaim`: takes back leases that were not renewed;
//! - `vacuum`: keeps the task table's dead row versions few;
//! - `directory`: keeps this node's row and its sessions' rows fresh for
//!   ListWorkers, and expires the rows of nodes that died;
//! - `history`: creates the history's days ahead and drops the days past
//!   their retention.
//!
//! Every job is a [`Job`]: a pass, repeated, with the wait between passes
//! chosen by the job. One [`Supervisor`] runs them all: it starts them,
//! retries a failed or panicking pass after the job's back-off, records
//! each job's [`Health`], and stops them when the node stops. Adding a job
//! is one file here and one `spawn` line where the node is wired.
//!
//! Jobs use the store only, and every statement they run is safe on
//! several nodes at once (bounded batches, `SKIP LOCKED`, re-checks in the
//! `WHERE`), so no leader is needed.

mod directory;
mod history;
mod reclaim;
mod supervisor;
mod vacuum;

use std::future::Future;
use std::time::Duration;

pub(crate) use directory::{Directory, NodeState};
pub(crate) use history::{History, DAYS_AHEAD};
pub(crate) use reclaim::Reclaimer;
pub(crate) use supervisor::{Health, HealthBoard, Supervisor};
pub(crate) use vacuum::Vacuumer;

/// A maintenance job: a pass, run again and again until the node stops.
pub(crate) trait Job: Send + 'static {
    /// The job's name in logs and health reports (`reclaimer`).
    const NAME: &'static str;

    /// One pass. Returns how long to wait before the next one.
    fn pass(&mut self) -> impl Future<Output = Result<Duration, crate::store::Error>> + Send;

    /// How long to wait after `failures` failed passes in a row (1 for the
    /// first): by default 1 s, doubling up to a minute.
    fn retry_after(&self, failures: u32) -> Duration {
        Duration::from_secs(1)
            .saturating_mul(2u32.saturating_pow(failures.saturating_sub(1).min(6)))
            .min(Duration::from_secs(60))
    }

    /// Waits `delay` before the next pass. A job that can tell when it has
    /// work sooner (the directory, when sessions change) wakes up early.
    fn wait(&mut self, delay: Duration) -> impl Future<Output = ()> + Send {
        tokio::time::sleep(delay)
    }

    /// Runs once when the node stops, after the last pass.
    fn stop(&mut self) -> impl Future<Output = ()> + Send {
        async {}
    }
}
