//! Long polls: unary AcquireTasks with a `wait`.

use std::time::Duration;

use tokio::time::Instant;

use super::Dispatcher;
use crate::model::{Claim, Task};
use crate::store;

impl Dispatcher {
    /// Claims due tasks for one worker. With a `wait`, when nothing is due it
    /// waits for a wake-up (a notification, the next task becoming due, or
    /// the safety poll) and tries again until `wait` runs out; it returns
    /// empty at the deadline or when the node drains or shuts down.
    pub(crate) async fn acquire(&self, claim: &Claim, wait: Duration) -> store::Result<Vec<Task>> {
        let deadline = Instant::now() + wait;
        let mut wake = self.inner.wake.subscribe();
        let mut shutdown = self.inner.shutdown.clone();
        loop {
            // Mark the current wake-up as seen before claiming, so one that
            // arrives during the claim is not lost.
            wake.mark_unchanged();
            let stopping = self.stopping();
            let tasks: Vec<Task> = if stopping {
                Vec::new()
            } else {
                self.claim_counted(claim)
                    .await?
                    .into_iter()
                    .map(|(_, task)| task)
                    .collect()
            };
            if !tasks.is_empty() || Instant::now() >= deadline || stopping {
                return Ok(tasks);
            }
            let mut until = deadline.min(Instant::now() + self.inner.poll_interval);
            if let Some(due) = self.inner.store.task_next_due(&claim.task_types).await? {
                // A due task we could not claim is locked by another claimer
                // that will commit within moments: check back shortly.
                until = until.min(Instant::now() + due.max(Duration::from_millis(5)));
            }
            tokio::select! {
                _ = wake.changed() => {}
                _ = tokio::time::sleep_until(until) => {}
                _ = shutdown.wait_for(|stop| *stop) => return Ok(Vec::new()),
            }
        }
    }
}
