//! The domain: what each call means, over validated inputs. It decides what
//! a call does (which events it publishes, whom it wakes, whose lease it
//! revokes), and turns store outcomes (fencing results, missing rows,
//! conflicts) into domain errors. It never sees protobuf or SQL.
//!
//! The lease hand-outs and give-backs the dispatcher performs on its own
//! (a push, a task that never reached its worker) publish their `leased` and
//! `released` events there, in the one place every claim and release goes
//! through.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use uuid::Uuid;

use crate::dispatch::{Dispatcher, Push, Session};
use crate::error::Error;
use crate::events::{Hub, Subscription};
use crate::metrics::{Metrics, Outcome};
use crate::model::{
    CancelReason, Claim, Created, Event, EventKind, Failure, LeaseRef, LeaseState, ListFilter,
    NewTask, Page, Progress, Reclaimed, SessionEntry, SessionSpec, Stats, Status, Task,
};
use crate::store::{Announce, Fenced, Store};

/// The operations of a node, shared by the gRPC services. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Coordinator {
    store: Store,
    dispatcher: Dispatcher,
    events: Hub,
    metrics: Arc<Metrics>,
}

type Result<T> = std::result::Result<T, Error>;

fn not_found(id: Uuid) -> Error {
    Error::NotFound(format!("task {id} not found"))
}

/// Why a fenced write on `task` was refused.
fn stale(task_id: Uuid, status: Status, call: &str) -> Error {
    let why = match status {
        Status::Processing => "the lease token does not match the current lease",
        Status::Pending => "the lease was given back or expired and the task is pending again",
        Status::Completed => "the task is already completed",
        Status::Failed => "the task has already failed",
        Status::Cancelled => "the task was cancelled",
    };
    Error::LeaseLost {
        status,
        message: format!("cannot {call} task {task_id}: {why}"),
    }
}

/// How long the attempt `task` ended at `ended` ran, from its lease; unknown
/// for a task never leased, or across a clock that went back.
fn ran(task: &Task, ended: Option<SystemTime>) -> Option<Duration> {
    ended?.duration_since(task.started_at?).ok()
}

/// The task of an applied fenced write, or why it was refused.
fn fenced(outcome: Fenced, lease: LeaseRef, call: &str) -> Result<Task> {
    match outcome {
        Fenced::Applied(task) => Ok(*task),
        Fenced::Stale(status) => {
            tracing::info!(task_id = %lease.task_id, status = status.as_str(), call, "stale lease token refused");
            Err(stale(lease.task_id, status, call))
        }
        Fenced::NotFound => Err(not_found(lease.task_id)),
    }
}

impl Coordinator {
    /// Builds the domain over a store, the node's dispatcher, its event
    /// hub and its metrics.
    pub(crate) fn new(
        store: Store,
        dispatcher: Dispatcher,
        events: Hub,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            store,
            dispatcher,
            events,
            metrics,
        }
    }

    /// This node's id.
    pub(crate) fn node_id(&self) -> Uuid {
        self.dispatcher.node_id()
    }

    /// Opens a worker session; the receiver yields what to push down its
    /// stream. Refused while the node drains.
    pub(crate) fn session_open(
        &self,
        spec: SessionSpec,
    ) -> Result<(Arc<Session>, mpsc::UnboundedReceiver<Push>)> {
        self.dispatcher.register(spec)
    }

    /// A session's stream ended. Its leases stay in the database until they
    /// expire or another session re-attaches them; a task pushed that never
    /// reached the worker is given back.
    pub(crate) fn session_close(&self, session: &Session, undelivered: Vec<LeaseRef>) {
        for lease in undelivered {
            self.dispatcher.give_back(session, lease);
        }
        self.dispatcher.unregister(session);
    }

    /// The worker asked for nothing new on its session.
    pub(crate) fn session_drain(&self, session: &Session) {
        self.dispatcher.session_drain(session);
    }

    /// Creates one task (or returns the live one holding its dedup key).
    pub(crate) async fn create(&self, new: NewTask) -> Result<Created> {
        let announce = self.events.announcer(EventKind::Created);
        let created = self
            .store
            .task_insert(&new, announce.as_ref().map(|a| a as Announce))
            .await?;
        if !created.deduplicated {
            self.metrics.task_created(&created.task.task_type);
            // Local waiters need not wait for the notification round trip.
            self.dispatcher.wake();
        }
        Ok(created)
    }

    /// Creates many tasks in one transaction.
    pub(crate) async fn create_many(&self, news: Vec<NewTask>) -> Result<Vec<Created>> {
        let announce = self.events.announcer(EventKind::Created);
        let created = self
            .store
            .task_insert_many(&news, announce.as_ref().map(|a| a as Announce))
            .await?;
        for created in created.iter().filter(|c| !c.deduplicated) {
            self.metrics.task_created(&created.task.task_type);
        }
        self.dispatcher.wake();
        Ok(created)
    }

    /// Reads one task.
    pub(crate) async fn get(&self, id: Uuid) -> Result<Task> {
        self.store.task_get(id).await?.ok_or_else(|| not_found(id))
    }

    /// Lists tasks newest first.
    pub(crate) async fn list(&self, filter: ListFilter) -> Result<Page> {
        Ok(self.store.task_list(&filter).await?)
    }

    /// Cancels a pending or processing task.
    pub(crate) async fn cancel(&self, id: Uuid, reason: Option<String>) -> Result<Task> {
        let reason = reason.map(|r| format!("cancelled: {r}"));
        match self.store.task_cancel(id, reason.as_deref()).await? {
            Some(Ok(task)) => {
                tracing::info!(task_id = %id, "task cancelled");
                self.metrics.task_cancelled(&task.task_type);
                self.events
                    .publish_tasks(EventKind::Cancelled, [&task])
                    .await;
                // Whichever node's session holds the lease must stop it.
                if let Some(lease_token) = task.lease_token {
                    let lease = LeaseRef {
                        task_id: id,
                        lease_token,
                    };
                    self.dispatcher
                        .revoke(&[lease], CancelReason::Cancelled)
                        .await;
                }
                Ok(task)
            }
            Some(Err(task)) => Err(Error::FailedPrecondition(format!(
                "cannot cancel task {id}: it is already {}",
                task.status.as_str()
            ))),
            None => Err(not_found(id)),
        }
    }

    /// Puts a failed or cancelled task back to pending.
    pub(crate) async fn retry(&self, id: Uuid) -> Result<Task> {
        match self.store.task_retry(id).await {
            Ok(Some(Ok(task))) => {
                self.events.publish_tasks(EventKind::Retried, [&task]).await;
                self.dispatcher.wake();
                Ok(task)
            }
            Ok(Some(Err(task))) => Err(Error::FailedPrecondition(format!(
                "cannot retry task {id}: it is {}, only failed or cancelled tasks can be retried",
                task.status.as_str()
            ))),
            Ok(None) => Err(not_found(id)),
            Err(crate::store::Error::Conflict(_)) => Err(Error::FailedPrecondition(format!(
                "cannot retry task {id}: another pending or processing task holds its dedup_key"
            ))),
            Err(err) => Err(err.into()),
        }
    }

    /// Deletes finished tasks.
    pub(crate) async fn purge(
        &self,
        statuses: Vec<Status>,
        before: Option<SystemTime>,
    ) -> Result<i64> {
        let deleted = self.store.task_purge(&statuses, before).await?;
        tracing::info!(deleted, "purged tasks");
        Ok(deleted)
    }

    /// Counts tasks.
    pub(crate) async fn stats(&self) -> Result<Stats> {
        Ok(self.store.task_stats().await?)
    }

    /// Live events, for a watcher.
    pub(crate) async fn watch(&self) -> Subscription {
        self.events.subscribe().await
    }

    /// Leases due tasks, waiting up to `wait` for some to arrive.
    pub(crate) async fn acquire(&self, claim: Claim, wait: Duration) -> Result<Vec<Task>> {
        if self.dispatcher.is_draining() {
            return Err(Error::draining());
        }
        Ok(self.dispatcher.acquire(&claim, wait).await?)
    }

    /// Renews leases.
    pub(crate) async fn heartbeat(
        &self,
        leases: Vec<LeaseRef>,
        duration: Duration,
    ) -> Result<Vec<(LeaseRef, LeaseState)>> {
        Ok(self.dispatcher.heartbeat(None, leases, duration).await?)
    }

    /// Renews leases on a session: the listed ones (re-attaching them to it),
    /// or every lease it holds when the list is empty.
    pub(crate) async fn session_heartbeat(
        &self,
        session: &Arc<Session>,
        leases: Vec<LeaseRef>,
    ) -> Result<Vec<(LeaseRef, LeaseState)>> {
        let leases = if leases.is_empty() {
            session.leases()
        } else {
            leases
        };
        Ok(self
            .dispatcher
            .heartbeat(Some(session), leases, session.spec.lease_duration)
            .await?)
    }

    /// Completes a leased task.
    pub(crate) async fn complete(
        &self,
        lease: LeaseRef,
        result: serde_json::Value,
    ) -> Result<Task> {
        let task = fenced(
            self.dispatcher.complete(lease, result).await?,
            lease,
            "complete",
        )?;
        self.metrics
            .task_completed(&task.task_type, ran(&task, task.completed_at));
        self.events
            .publish_tasks(EventKind::Completed, [&task])
            .await;
        Ok(task)
    }

    /// Records a failed attempt.
    pub(crate) async fn fail(&self, lease: LeaseRef, failure: Failure) -> Result<Task> {
        let task = fenced(self.dispatcher.fail(lease, failure).await?, lease, "fail")?;
        if task.status == Status::Failed {
            let took = ran(&task, task.completed_at);
            self.metrics
                .task_failed(&task.task_type, Outcome::Failed, took);
        } else {
            let took = ran(&task, Some(SystemTime::now()));
            self.metrics
                .task_failed(&task.task_type, Outcome::Retried, took);
        }
        self.events.publish_tasks(EventKind::Failed, [&task]).await;
        Ok(task)
    }

    /// Gives a lease back without using up the attempt.
    pub(crate) async fn release(&self, lease: LeaseRef) -> Result<Task> {
        fenced(self.dispatcher.release(lease).await?, lease, "release")
    }

    /// Stores the progress of a leased task.
    pub(crate) async fn progress(&self, lease: LeaseRef, progress: Progress) -> Result<Task> {
        let task = fenced(
            self.store.task_progress(lease, &progress).await?,
            lease,
            "report progress of",
        )?;
        self.events
            .publish_tasks(EventKind::Progress, [&task])
            .await;
        Ok(task)
    }

    /// Every connected worker session across all nodes.
    pub(crate) async fn workers(&self) -> Result<Vec<SessionEntry>> {
        Ok(self.store.worker_list().await?)
    }

    /// What to do with leases the reclaimer took back: tell watchers, and
    /// tell the sessions that held them to stop.
    pub(crate) async fn on_reclaimed(&self, reclaimed: &[Reclaimed]) {
        for Reclaimed { task, lag, .. } in reclaimed {
            let outcome = if task.status == Status::Failed {
                Outcome::Failed
            } else {
                Outcome::Retried
            };
            self.metrics.task_reclaimed(&task.task_type, outcome, *lag);
        }
        self.events
            .publish(
                reclaimed
                    .iter()
                    .map(|r| Event::of(EventKind::LeaseExpired, &r.task))
                    .collect(),
            )
            .await;
        let leases: Vec<LeaseRef> = reclaimed.iter().map(|r| r.lease).collect();
        self.dispatcher
            .revoke(&leases, CancelReason::LeaseReclaimed)
            .await;
    }
}
