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

use tokio::sync::watch;

use crate::store::Store;

/// How often the dead-row count is read (one cheap statistics query).
const CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// Vacuums the task table when it has `threshold` dead rows, until
/// shutdown.
#[derive(Debug)]
pub struct Vacuumer {
    store: Store,
    threshold: u64,
}

impl Vacuumer {
    /// A vacuumer that acts at `threshold` dead rows (0: never).
    pub fn new(store: Store, threshold: u64) -> Self {
        Self { store, threshold }
    }

    /// Runs until `shutdown` turns true.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        if self.threshold == 0 {
            return;
        }
        // The first check runs at start-up: a node started on a table
        // another node left dirty cleans it before its workers arrive.
        let mut check = tokio::time::interval(CHECK_INTERVAL);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = check.tick() => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
            if let Err(err) = self.pass().await {
                tracing::warn!(error = %err, "task table vacuum failed");
            }
        }
    }

    async fn pass(&self) -> Result<(), crate::store::Error> {
        let dead = self.store.task_dead_rows().await?;
        if u64::try_from(dead).unwrap_or(0) < self.threshold {
            return Ok(());
        }
        let started = Instant::now();
        self.store.task_vacuum().await?;
        tracing::info!(
            dead_rows = dead,
            took_ms = started.elapsed().as_millis() as u64,
            "vacuumed the task table"
        );
        Ok(())
    }
}
