//! What a handler sees and returns: [`TaskContext`] (the task, its
//! parameters, a cancellation token, progress reports) and [`TaskError`]
//! (why an attempt failed, and whether and when to retry).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::proto;

/// What a handler returns: the task's result (a JSON object; anything else
/// is stored as `{"value": ...}`), or why the attempt failed.
pub type HandlerResult = std::result::Result<serde_json::Value, TaskError>;

pub(super) type BoxFuture = Pin<Box<dyn Future<Output = HandlerResult> + Send>>;

pub(super) type Handler = Arc<dyn Fn(TaskContext) -> BoxFuture + Send + Sync>;

/// Why an attempt failed, and whether and when to try again.
///
/// Any error converts into a retryable `TaskError` with `?`, so handlers can
/// use their own error types; use [`TaskError::permanent`] for input that
/// will never work, and [`TaskError::retry_after`] when the cause says when
/// to come back (a rate limit, a locked file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskError {
    pub(super) message: String,
    pub(super) permanent: bool,
    pub(super) retry_after: Option<Duration>,
}

impl TaskError {
    /// A failed attempt, retried with the server's backoff while attempts
    /// are left.
    pub fn retry(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            permanent: false,
            retry_after: None,
        }
    }

    /// A failed attempt, retried no sooner than `after` while attempts are
    /// left.
    pub fn retry_after(message: impl Into<String>, after: Duration) -> Self {
        Self {
            retry_after: Some(after),
            ..Self::retry(message)
        }
    }

    /// Fails the task for good, whatever attempts are left.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            permanent: true,
            ..Self::retry(message)
        }
    }

    /// The message, stored as the task's `last_error`.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// True if the task fails for good.
    pub fn is_permanent(&self) -> bool {
        self.permanent
    }

    /// The earliest retry, when set.
    pub fn retry_delay(&self) -> Option<Duration> {
        self.retry_after
    }
}

impl std::fmt::Display for TaskError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Lets `?` turn any error into a retryable failure. (`TaskError` itself is
/// not a `std::error::Error`, or this blanket conversion would overlap with
/// the reflexive `From`.)
impl<E: std::error::Error> From<E> for TaskError {
    fn from(error: E) -> Self {
        TaskError::retry(error.to_string())
    }
}

/// Progress of one task, from a handler to the session loop.
pub(super) struct ProgressReport {
    pub(super) task_id: String,
    pub(super) lease_token: String,
    pub(super) current: i64,
    pub(super) total: i64,
    pub(super) message: String,
}

/// What a handler gets: the task, its parameters, a cancellation token and
/// a way to report progress.
pub struct TaskContext {
    pub(super) task: proto::Task,
    pub(super) lease: proto::Lease,
    pub(super) params: serde_json::Value,
    pub(super) cancel: CancellationToken,
    pub(super) progress: mpsc::Sender<ProgressReport>,
}

impl TaskContext {
    /// The task id (UUID).
    pub fn id(&self) -> &str {
        &self.task.id
    }

    /// The task type.
    pub fn task_type(&self) -> &str {
        &self.task.task_type
    }

    /// Which attempt this is (1 for the first).
    pub fn attempt(&self) -> i32 {
        self.lease.attempt
    }

    /// The task's parameters, a JSON object.
    pub fn params(&self) -> &serde_json::Value {
        &self.params
    }

    /// The whole task as the server handed it out.
    pub fn task(&self) -> &proto::Task {
        &self.task
    }

    /// The lease: token, worker id, expiry at hand-out.
    pub fn lease(&self) -> &proto::Lease {
        &self.lease
    }

    /// Fires when the work should stop: the task was cancelled, its lease
    /// was lost, or the worker's drain deadline passed. Whatever the handler
    /// returns afterwards is dropped.
    pub fn cancellation(&self) -> &CancellationToken {
        &self.cancel
    }

    /// Completes when the work should stop (see [`Self::cancellation`]).
    pub async fn cancelled(&self) {
        self.cancel.cancelled().await
    }

    /// True once the work should stop.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Reports progress, shown by `GetTask`, `WatchTasks` and `leasehold
    /// watch`. Never blocks: progress is advisory, so a report that finds
    /// the session's queue full is dropped (the next one carries the news).
    pub fn progress(&self, current: i64, total: i64, message: impl Into<String>) {
        let _ = self.progress.try_send(ProgressReport {
            task_id: self.task.id.clone(),
            lease_token: self.lease.lease_token.clone(),
            current,
            total,
            message: message.into(),
        });
    }
}
