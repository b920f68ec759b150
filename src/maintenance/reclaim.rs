//! The reclaimer takes back leases that were not renewed.
//!
//! It sleeps until the earliest `reclaim_at` it knows of (asked of the
//! database, whose clock decides), but never longer than the sweep interval,
//! so a lease granted by another node, or one that shrank, is still taken
//! back within one interval of its expiry. A claim sets `reclaim_at` to the
//! lease's expiry; heartbeats move only the expiry (`locked_until`), so that
//! they are updates in place, and a lease found renewed when the reclaimer
//! looks gets its `reclaim_at` moved to its new expiry. Each pass works in
//! bounded batches until none is left. The reclaim statement re-checks
//! status and expiry on the locked row, so a completion or a renewal that
//! committed a moment earlier wins.

use std::time::Duration;

use tokio::sync::mpsc;

use super::Job;
use crate::model::{Reclaimed, Status};
use crate::store::{self, Store};

/// Rows reclaimed per statement.
const BATCH: i64 = 500;

/// Reclaims expired leases.
#[derive(Debug)]
pub(crate) struct Reclaimer {
    store: Store,
    interval: Duration,
    reclaimed: mpsc::UnboundedSender<Vec<Reclaimed>>,
}

impl Reclaimer {
    /// A reclaimer that sweeps at least every `interval` and sends every
    /// batch of reclaimed tasks (as they are now, with the lease taken back)
    /// to `reclaimed`.
    pub(crate) fn new(
        store: Store,
        interval: Duration,
        reclaimed: mpsc::UnboundedSender<Vec<Reclaimed>>,
    ) -> Self {
        Self {
            store,
            interval,
            reclaimed,
        }
    }
}

impl Job for Reclaimer {
    const NAME: &'static str = "reclaimer";

    /// Reclaims every expired lease, then waits until the next one expires.
    async fn pass(&mut self) -> Result<Duration, store::Error> {
        loop {
            let rechecked = self.store.lease_recheck(BATCH).await?;
            let reclaimed = self.store.lease_reclaim_expired(BATCH).await?;
            for Reclaimed { task, .. } in &reclaimed {
                if task.status == Status::Failed {
                    tracing::info!(task_id = %task.id, "lease expired, no attempts left: task failed");
                } else {
                    tracing::info!(task_id = %task.id, "lease expired: task pending again");
                }
            }
            let full = reclaimed.len() as i64 == BATCH || rechecked as i64 == BATCH;
            if !reclaimed.is_empty() {
                let _ = self.reclaimed.send(reclaimed);
            }
            if !full {
                break;
            }
        }
        let next = self.store.lease_next_expiry().await?;
        // A few milliseconds past the expiry, so that `now()` in the
        // statement is past it too.
        Ok(next.map_or(self.interval, |d| d.min(self.interval)) + Duration::from_millis(2))
    }

    /// Leases keep expiring while the database is away: try again soon,
    /// without backing off further.
    fn retry_after(&self, _failures: u32) -> Duration {
        self.interval.max(Duration::from_secs(1))
    }
}
