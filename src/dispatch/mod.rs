//! Matches waiting workers with claimable tasks and wakes them when tasks
//! arrive.
//!
//! One LISTEN connection per node receives the `task_wake` notifications of
//! every node and bumps a wake counter that waiting claimers watch. Waiters
//! also wake when the earliest pending task becomes due, and on a slow
//! safety poll. This module never writes SQL: claims go through the store.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::store::{self, Store, WAKE_CHANNEL};
use crate::task::{Claim, Task};

/// Hands out tasks, waiting for them when asked to.
#[derive(Debug, Clone)]
pub struct Dispatcher {
    store: Store,
    wake: watch::Sender<u64>,
    shutdown: watch::Receiver<bool>,
    poll_interval: Duration,
}

impl Dispatcher {
    /// Starts the node's listener on the wake channel. It reconnects by
    /// itself when the database goes away, and stops when `shutdown` turns
    /// true.
    pub fn start(store: Store, poll_interval: Duration, shutdown: watch::Receiver<bool>) -> Self {
        let (wake, _) = watch::channel(0u64);
        let dispatcher = Self {
            store,
            wake,
            shutdown,
            poll_interval,
        };
        tokio::spawn(dispatcher.clone().listen());
        dispatcher
    }

    /// Wakes every local waiter, as a notification would.
    pub fn wake(&self) {
        self.wake.send_modify(|n| *n = n.wrapping_add(1));
    }

    async fn listen(self) {
        let mut shutdown = self.shutdown.clone();
        let mut backoff = Duration::from_millis(100);
        loop {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let client = match self.store.connect_dedicated(Some(tx)).await {
                Ok(client) => client,
                Err(err) => {
                    tracing::warn!(error = %err, "cannot open listen connection, retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.wait_for(|stop| *stop) => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            if let Err(err) = client
                .batch_execute(&format!("LISTEN {WAKE_CHANNEL}"))
                .await
            {
                tracing::warn!(error = %err, "listen failed, retrying");
                continue;
            }
            backoff = Duration::from_millis(100);
            tracing::debug!("listening for task notifications");
            // Anything may have arrived while we were not listening.
            self.wake();
            loop {
                tokio::select! {
                    message = rx.recv() => match message {
                        Some(_) => {
                            // Fold a burst of notifications into one wake-up.
                            while rx.try_recv().is_ok() {}
                            self.wake();
                        }
                        None => break,
                    },
                    _ = shutdown.wait_for(|stop| *stop) => return,
                }
            }
            tracing::warn!("listen connection lost, reconnecting");
        }
    }

    /// Claims due tasks for `claim`. With a `wait`, when nothing is due it
    /// waits for a wake-up (a notification, the next task becoming due, or
    /// the safety poll) and tries again until `wait` runs out; it returns
    /// empty at the deadline or when the node shuts down.
    pub async fn acquire(&self, claim: &Claim, wait: Duration) -> store::Result<Vec<Task>> {
        let deadline = Instant::now() + wait;
        let mut wake = self.wake.subscribe();
        let mut shutdown = self.shutdown.clone();
        loop {
            // Mark the current wake-up as seen before claiming, so one that
            // arrives during the claim is not lost.
            wake.mark_unchanged();
            let tasks = self.store.task_claim(claim).await?;
            if !tasks.is_empty() || Instant::now() >= deadline || *shutdown.borrow() {
                return Ok(tasks);
            }
            let mut until = deadline.min(Instant::now() + self.poll_interval);
            if let Some(due) = self.store.task_next_due(&claim.task_types).await? {
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
