//! The vacuumer keeps the task table's dead row versions few.
//!
//! Every task is inserted and then updated at least twice, and none of
//! these updates can be HOT (each changes `status`, which the partial
//! indexes depend on), so a busy queue leaves two dead row versions per
//! finished task. Until they are vacuumed, their entries stay in the
//! indexes, and a claim that finds no due task walks all of them: after a
//! burst of 100,000 tasks an idle worker's push latency grows by half.
//! Autovacuum does this job when it is on and tuned (the migrations set
//! per-table thresholds), but many servers run it off or far too lazily for
//! a queue table. So each node checks the dead-row count every few seconds
//! and vacuums past a threshold; `SKIP_LOCKED` makes a node skip while
//! another node, or autovacuum, is at it.

use std::time::{Duration, Instant};

use super::Job;
use crate::store::{self, Store};

/// How often the dead-row count is read (one cheap statistics query).
const CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// Longest pause after vacuums that could not bring the count down.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// Vacuums the task table when it has `threshold` dead rows.
#[derive(Debug)]
pub(crate) struct Vacuumer {
    store: Store,
    threshold: u64,
    /// The pause after the last pass: grows while vacuums are in vain.
    backoff: Duration,
}

impl Vacuumer {
    /// A vacuumer that acts at `threshold` dead rows (a node with
    /// `--vacuum-threshold 0` runs none).
    pub(crate) fn new(store: Store, threshold: u64) -> Self {
        Self {
            store,
            threshold,
            backoff: Duration::ZERO,
        }
    }

    async fn check(&self) -> Result<Pass, store::Error> {
        let dead = self.store.task_dead_rows().await?;
        if u64::try_from(dead).unwrap_or(0) < self.threshold {
            return Ok(Pass::Clean);
        }
        let started = Instant::now();
        self.store.task_vacuum().await?;
        let left = self.store.task_dead_rows().await?;
        tracing::info!(
            dead_rows = dead,
            left,
            took_ms = started.elapsed().as_millis() as u64,
            "task table vacuum pass"
        );
        // Judged against the count before, not the threshold: on a busy
        // queue new dead rows pile up while the vacuum runs.
        if left.saturating_mul(2) < dead {
            Ok(Pass::Clean)
        } else {
            Ok(Pass::Stuck)
        }
    }
}

impl Job for Vacuumer {
    const NAME: &'static str = "vacuumer";

    /// The first pass runs at start-up: a node started on a table another
    /// node left dirty cleans it before its workers arrive.
    async fn pass(&mut self) -> Result<Duration, store::Error> {
        self.backoff = match self.check().await? {
            Pass::Clean => CHECK_INTERVAL,
            // Vacuuming did not bring the count under the threshold:
            // something holds the dead rows (a long transaction, a
            // replication slot) or the role may not vacuum the table. Back
            // off instead of vacuuming again and again in vain.
            Pass::Stuck => (self.backoff * 2).clamp(CHECK_INTERVAL * 2, MAX_BACKOFF),
        };
        Ok(self.backoff)
    }

    fn retry_after(&self, failures: u32) -> Duration {
        (CHECK_INTERVAL * 2)
            .saturating_mul(2u32.saturating_pow(failures.saturating_sub(1).min(8)))
            .min(MAX_BACKOFF)
    }
}

/// What a check found.
enum Pass {
    /// Under the threshold, or a vacuum removed most dead rows.
    Clean,
    /// A vacuum left most dead rows in place (or another session's vacuum
    /// made ours skip the table).
    Stuck,
}
