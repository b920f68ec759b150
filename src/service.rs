//! The domain: what each call means, over validated inputs. It turns store
//! outcomes (fencing results, missing rows, conflicts) into domain errors and
//! never sees protobuf or SQL.

use std::time::{Duration, SystemTime};

use uuid::Uuid;

use crate::dispatch::Dispatcher;
use crate::error::Error;
use crate::store::{Fenced, Store};
use crate::task::{
    Backoff, Claim, Created, Failure, LeaseRef, LeaseState, ListFilter, NewTask, Page, Stats,
    Status, Task,
};

/// Domain operations shared by the gRPC services.
#[derive(Debug, Clone)]
pub struct Service {
    store: Store,
    dispatcher: Dispatcher,
    backoff: Backoff,
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
    Error::FailedPrecondition(format!("cannot {call} task {task_id}: {why}"))
}

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

impl Service {
    /// Builds the domain over a store and the node's dispatcher.
    pub fn new(store: Store, dispatcher: Dispatcher, backoff: Backoff) -> Self {
        Self {
            store,
            dispatcher,
            backoff,
        }
    }

    /// Creates one task (or returns the live one holding its dedup key).
    pub async fn create(&self, new: NewTask) -> Result<Created> {
        let created = self.store.task_insert(&new).await?;
        if !created.deduplicated {
            // Local waiters need not wait for the notification round trip.
            self.dispatcher.wake();
        }
        Ok(created)
    }

    /// Creates many tasks in one transaction.
    pub async fn create_many(&self, news: Vec<NewTask>) -> Result<Vec<Created>> {
        let created = self.store.task_insert_many(&news).await?;
        self.dispatcher.wake();
        Ok(created)
    }

    /// Reads one task.
    pub async fn get(&self, id: Uuid) -> Result<Task> {
        self.store.task_get(id).await?.ok_or_else(|| not_found(id))
    }

    /// Lists tasks newest first.
    pub async fn list(&self, filter: ListFilter) -> Result<Page> {
        Ok(self.store.task_list(&filter).await?)
    }

    /// Cancels a pending or processing task.
    pub async fn cancel(&self, id: Uuid, reason: Option<String>) -> Result<Task> {
        let reason = reason.map(|r| format!("cancelled: {r}"));
        match self.store.task_cancel(id, reason.as_deref()).await? {
            Some(Ok(task)) => {
                tracing::info!(task_id = %id, "task cancelled");
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
    pub async fn retry(&self, id: Uuid) -> Result<Task> {
        match self.store.task_retry(id).await {
            Ok(Some(Ok(task))) => Ok(task),
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
    pub async fn purge(&self, statuses: Vec<Status>, before: Option<SystemTime>) -> Result<i64> {
        let deleted = self.store.task_purge(&statuses, before).await?;
        tracing::info!(deleted, "purged tasks");
        Ok(deleted)
    }

    /// Counts tasks.
    pub async fn stats(&self) -> Result<Stats> {
        Ok(self.store.task_stats().await?)
    }

    /// Leases due tasks, waiting up to `wait` for some to arrive.
    pub async fn acquire(&self, claim: Claim, wait: Duration) -> Result<Vec<Task>> {
        Ok(self.dispatcher.acquire(&claim, wait).await?)
    }

    /// Renews leases.
    pub async fn heartbeat(
        &self,
        leases: Vec<LeaseRef>,
        duration: Duration,
    ) -> Result<Vec<(Uuid, LeaseState)>> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        Ok(self.store.lease_extend(&leases, duration).await?)
    }

    /// Completes a leased task.
    pub async fn complete(&self, lease: LeaseRef, result: serde_json::Value) -> Result<Task> {
        fenced(
            self.store.task_complete(lease, &result).await?,
            lease,
            "complete",
        )
    }

    /// Records a failed attempt.
    pub async fn fail(&self, lease: LeaseRef, failure: Failure) -> Result<Task> {
        fenced(
            self.store.task_fail(lease, &failure, self.backoff).await?,
            lease,
            "fail",
        )
    }

    /// Gives a lease back without using up the attempt.
    pub async fn release(&self, lease: LeaseRef) -> Result<Task> {
        fenced(self.store.task_release(lease).await?, lease, "release")
    }
}
