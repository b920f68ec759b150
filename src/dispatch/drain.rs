//! Draining: a node that shuts down stops handing out work, tells every
//! session to finish or give back what it holds, accepts their outcomes for
//! a grace period, then closes the streams. Workers reconnect elsewhere; no
//! lease is dropped on the floor.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use super::{Dispatcher, Push};

impl Dispatcher {
    /// Drains the node: nothing new is handed out, every session is told to
    /// finish or release its tasks, outcomes are accepted until the sessions
    /// hold nothing or `grace` ends, then every session stream is closed.
    pub(crate) async fn drain(&self, grace: Duration) {
        self.inner.draining.store(true, Ordering::Relaxed);
        // Let the claims in flight finish: they give back what they got.
        let all = self
            .inner
            .claims
            .acquire_many(super::claim::MAX_CLAIMS_IN_FLIGHT as u32);
        match tokio::time::timeout(grace, all).await {
            Ok(permits) => drop(permits),
            Err(_) => tracing::warn!("a claim in flight did not finish within the drain grace"),
        }
        let sessions = self.sessions();
        tracing::info!(sessions = sessions.len(), grace = ?grace, "draining sessions");
        for session in &sessions {
            session.push(Push::Drain { grace });
        }
        self.inner.changed.notify_one();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline && self.sessions().iter().any(|s| s.in_flight() > 0) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for session in self.sessions() {
            session.push(Push::Close);
        }
    }
}
