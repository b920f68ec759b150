//! Heartbeats and outcomes (complete, fail, release), fenced by their lease
//! tokens in the store. Heartbeats, completions and failures that arrive
//! together, from any sessions or unary calls, are written in one statement
//! each (group commit, see `batch`); each answer frees the slot of the
//! local session that held the lease.

use std::sync::Arc;
use std::time::Duration;

use super::batch::Batcher;
use super::{Dispatcher, Session};
use crate::model::{Backoff, EventKind, Failure, LeaseRef, LeaseState};
use crate::store::{self, Fenced, Store};

/// Most outcomes written by one statement.
const MAX_BATCH: usize = 1000;

/// The group-commit queues of the node's fenced writes.
#[derive(Debug)]
pub(super) struct Batchers {
    completes: Batcher<(LeaseRef, serde_json::Value), Fenced>,
    fails: Batcher<(LeaseRef, Failure), Fenced>,
    heartbeats: Batcher<(LeaseRef, Duration), LeaseState>,
}

impl Batchers {
    /// Starts the queues; failures are retried with `backoff`.
    pub(super) fn start(store: &Store, backoff: Backoff) -> Self {
        let completes = {
            let store = store.clone();
            Batcher::start(
                MAX_BATCH,
                4,
                move |items: Vec<(LeaseRef, serde_json::Value)>| {
                    let store = store.clone();
                    async move { store.task_complete_many(&items).await }
                },
            )
        };
        let fails = {
            let store = store.clone();
            Batcher::start(MAX_BATCH, 2, move |items: Vec<(LeaseRef, Failure)>| {
                let store = store.clone();
                async move { store.task_fail_many(&items, backoff).await }
            })
        };
        let heartbeats = {
            let store = store.clone();
            Batcher::start(
                10 * MAX_BATCH,
                2,
                move |items: Vec<(LeaseRef, Duration)>| {
                    let store = store.clone();
                    async move { store.lease_extend(&items).await }
                },
            )
        };
        Self {
            completes,
            fails,
            heartbeats,
        }
    }
}

impl Dispatcher {
    /// Renews leases, together with whatever else arrives at the same time.
    /// With a session, leases renewed are attached to it (a re-attach after
    /// a reconnect) and leases lost or cancelled are dropped from it.
    pub(crate) async fn heartbeat(
        &self,
        session: Option<&Arc<Session>>,
        leases: Vec<LeaseRef>,
        duration: Duration,
    ) -> store::Result<Vec<(LeaseRef, LeaseState)>> {
        // One submission for the whole heartbeat: one queue entry and one
        // answer, however many leases it names.
        let states = self
            .inner
            .outcomes
            .heartbeats
            .submit_many(leases.iter().map(|lease| (*lease, duration)).collect())
            .await?;
        let mut out = Vec::with_capacity(leases.len());
        for (lease, state) in leases.into_iter().zip(states) {
            if let Some(session) = session {
                match state {
                    LeaseState::Held(_) => {
                        self.attach(session, lease);
                    }
                    LeaseState::Lost | LeaseState::Cancelled => {
                        self.forget(lease);
                    }
                }
            }
            out.push((lease, state));
        }
        Ok(out)
    }

    /// Completes a leased task (batched with concurrent completions).
    pub(crate) async fn complete(
        &self,
        lease: LeaseRef,
        result: serde_json::Value,
    ) -> store::Result<Fenced> {
        let outcome = self
            .inner
            .outcomes
            .completes
            .submit((lease, result))
            .await?;
        self.forget(lease);
        Ok(outcome)
    }

    /// Records a failed attempt (batched with concurrent failures).
    pub(crate) async fn fail(&self, lease: LeaseRef, failure: Failure) -> store::Result<Fenced> {
        let outcome = self.inner.outcomes.fails.submit((lease, failure)).await?;
        self.forget(lease);
        Ok(outcome)
    }

    /// Gives a lease back: the task is pending again at once, watchers hear
    /// of it, and every local waiter may claim it.
    pub(crate) async fn release(&self, lease: LeaseRef) -> store::Result<Fenced> {
        let outcome = self.inner.store.task_release(lease).await?;
        self.forget(lease);
        if let Fenced::Applied(task) = &outcome {
            self.inner
                .events
                .publish_tasks(EventKind::Released, [task.as_ref()])
                .await;
            self.wake();
        }
        Ok(outcome)
    }

    /// Releases a lease whose task never reached the worker of `session`
    /// (pushed while draining, or to a stream that had ended). The session's
    /// slot is free at once; the release itself runs in the background, and
    /// a failure only leaves the lease to expire.
    pub(crate) fn give_back(&self, session: &Session, lease: LeaseRef) {
        self.detach(session, lease);
        let dispatcher = self.clone();
        tokio::spawn(async move {
            if let Err(err) = dispatcher.release(lease).await {
                tracing::warn!(task_id = %lease.task_id, error = %err, "cannot give back an undelivered task");
            }
        });
    }
}
