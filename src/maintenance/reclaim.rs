//! The reclaimer takes back leases that were not renewed.
//!
//! It sleeps until the earliest `locked_until` it knows of (asked of the
//! database, whose clock decides), but never longer than the sweep interval,
//! so a lease granted by another node, or one that shrank, is still taken
//! back within one interval of its expiry. Each pass reclaims in bounded
//! batches until none is left. The statement re-checks status and expiry on
//! the locked row, so a completion that committed a moment earlier wins.

use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::store::Store;
use crate::task::{LeaseRef, Status, Task};

/// Rows reclaimed per statement.
const BATCH: i64 = 500;

/// Reclaims expired leases until shutdown.
#[derive(Debug)]
pub struct Reclaimer {
    store: Store,
    interval: Duration,
    reclaimed: mpsc::UnboundedSender<Vec<(Task, LeaseRef)>>,
}

impl Reclaimer {
    /// A reclaimer that sweeps at least every `interval` and sends every
    /// batch of reclaimed tasks (as they are now, with the lease taken back)
    /// to `reclaimed`.
    pub fn new(
        store: Store,
        interval: Duration,
        reclaimed: mpsc::UnboundedSender<Vec<(Task, LeaseRef)>>,
    ) -> Self {
        Self {
            store,
            interval,
            reclaimed,
        }
    }

    /// Runs until `shutdown` turns true.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        loop {
            let sleep = match self.pass().await {
                Ok(next) => next.map_or(self.interval, |d| d.min(self.interval)),
                Err(err) => {
                    tracing::warn!(error = %err, "reclaim pass failed");
                    self.interval.max(Duration::from_secs(1))
                }
            };
            tokio::select! {
                // A few milliseconds past the expiry, so that `now()` in the
                // statement is past it too.
                _ = tokio::time::sleep(sleep + Duration::from_millis(2)) => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
        }
    }

    /// Reclaims every expired lease, then returns how long until the next
    /// one expires.
    async fn pass(&self) -> Result<Option<Duration>, crate::store::Error> {
        loop {
            let reclaimed = self.store.lease_reclaim_expired(BATCH).await?;
            for (task, _) in &reclaimed {
                if task.status == Status::Failed {
                    tracing::info!(task_id = %task.id, "lease expired, no attempts left: task failed");
                } else {
                    tracing::info!(task_id = %task.id, "lease expired: task pending again");
                }
            }
            let full = reclaimed.len() as i64 == BATCH;
            if !reclaimed.is_empty() {
                let _ = self.reclaimed.send(reclaimed);
            }
            if !full {
                break;
            }
        }
        self.store.lease_next_expiry().await
    }
}
