//! The history's days: each node keeps a week of them ahead, so that a
//! task finishing at any moment has its day's partition, and drops the
//! days older than their status' retention, whole (`--retain-finished`,
//! `--retain-completed`, `--retain-failed`, `--retain-cancelled`). Finished
//! tasks are never deleted row by row here; `PurgeTasks` is the finer cut.

use std::time::Duration;

use super::Job;
use crate::model::Status;
use crate::store::{self, Store};

/// Days of partitions kept ready after today.
pub(crate) const DAYS_AHEAD: i64 = 7;

/// How often the days are looked after (they are made a week ahead).
const INTERVAL: Duration = Duration::from_secs(3600);

/// Keeps the history's days.
pub(crate) struct History {
    store: Store,
    retention: Box<dyn Fn(Status) -> Option<Duration> + Send + Sync>,
}

impl std::fmt::Debug for History {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("History").finish_non_exhaustive()
    }
}

impl History {
    /// The job, keeping finished tasks of each status for
    /// `retention(status)` (`None`: forever).
    pub(crate) fn new(
        store: Store,
        retention: impl Fn(Status) -> Option<Duration> + Send + Sync + 'static,
    ) -> Self {
        Self {
            store,
            retention: Box::new(retention),
        }
    }
}

impl Job for History {
    const NAME: &'static str = "history";

    async fn pass(&mut self) -> Result<Duration, store::Error> {
        let dropped = self
            .store
            .history_upkeep(DAYS_AHEAD, &self.retention, false)
            .await?;
        if !dropped.is_empty() {
            tracing::info!(
                days = dropped.len(),
                "history days past their retention dropped"
            );
        }
        Ok(INTERVAL)
    }
}
