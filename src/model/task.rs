//! Tasks and leases: states, the row, and the inputs of the writes.

use std::time::{Duration, SystemTime};

use uuid::Uuid;

/// Lifecycle state of a task, as stored in the `status` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Status {
    /// Waiting to be leased once due.
    Pending,
    /// Leased to a worker.
    Processing,
    /// Finished with a result.
    Completed,
    /// Failed for good.
    Failed,
    /// Cancelled by an operator.
    Cancelled,
}

impl Status {
    /// Every status, in lifecycle order.
    pub(crate) const ALL: [Status; 5] = [
        Status::Pending,
        Status::Processing,
        Status::Completed,
        Status::Failed,
        Status::Cancelled,
    ];

    /// The statuses no worker can change any more.
    pub(crate) const TERMINAL: [Status; 3] = [Status::Completed, Status::Failed, Status::Cancelled];

    /// The word stored in the database.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Processing => "processing",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
        }
    }

    /// Parses the word stored in the database.
    pub(crate) fn parse(s: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|status| status.as_str() == s)
    }

    /// Whether the status is final until an operator retries the task.
    pub(crate) fn is_terminal(self) -> bool {
        Status::TERMINAL.contains(&self)
    }
}

/// A task row.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Task {
    pub(crate) id: Uuid,
    /// Creation order, unique and increasing.
    pub(crate) seq: i64,
    pub(crate) task_type: String,
    pub(crate) status: Status,
    pub(crate) priority: i32,
    pub(crate) attempts: i32,
    pub(crate) max_attempts: i32,
    pub(crate) scheduled_for: SystemTime,
    pub(crate) created_at: SystemTime,
    pub(crate) started_at: Option<SystemTime>,
    pub(crate) completed_at: Option<SystemTime>,
    pub(crate) locked_by: Option<String>,
    pub(crate) locked_until: Option<SystemTime>,
    pub(crate) lease_token: Option<Uuid>,
    pub(crate) last_error: Option<String>,
    pub(crate) params: serde_json::Value,
    pub(crate) result: Option<serde_json::Value>,
    pub(crate) library_id: Option<Uuid>,
    pub(crate) series_id: Option<Uuid>,
    pub(crate) book_id: Option<Uuid>,
    pub(crate) dedup_key: Option<String>,
    pub(crate) progress: Option<Progress>,
}

/// Progress of a running attempt, as its worker reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Progress {
    pub(crate) current: i64,
    /// 0 when unknown.
    pub(crate) total: i64,
    pub(crate) message: String,
    /// `None` in a report not yet stored.
    pub(crate) updated_at: Option<SystemTime>,
}

/// A validated request to create a task.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct NewTask {
    pub(crate) id: Uuid,
    pub(crate) task_type: String,
    pub(crate) params: serde_json::Value,
    pub(crate) priority: i32,
    pub(crate) max_attempts: i32,
    /// `None` means now, by the database clock.
    pub(crate) scheduled_for: Option<SystemTime>,
    pub(crate) library_id: Option<Uuid>,
    pub(crate) series_id: Option<Uuid>,
    pub(crate) book_id: Option<Uuid>,
    pub(crate) dedup_key: Option<String>,
}

/// The outcome of a create: the task, and whether an existing live task with
/// the same dedup key was returned instead of a new row.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Created {
    pub(crate) task: Task,
    pub(crate) deduplicated: bool,
}

/// A lease the reclaimer took back.
#[derive(Debug, Clone)]
pub(crate) struct Reclaimed {
    /// The task as it is now: pending again, or failed (no attempts left).
    pub(crate) task: Task,
    /// The lease that expired.
    pub(crate) lease: LeaseRef,
    /// How long after its expiry the lease was taken back.
    pub(crate) lag: Duration,
}

/// One claim statement's worth of takers: tasks of `task_types` for each
/// slot, the n-th task in claim order going to the n-th slot.
#[derive(Debug, Clone)]
pub(crate) struct Claim {
    /// Empty means any type.
    pub(crate) task_types: Vec<String>,
    /// The worker id of each slot; as many tasks are claimed at most.
    pub(crate) slots: Vec<String>,
    pub(crate) lease_duration: Duration,
}

impl Claim {
    /// A claim of up to `max_tasks` tasks for one worker.
    pub(crate) fn for_worker(
        worker_id: &str,
        task_types: Vec<String>,
        max_tasks: usize,
        lease_duration: Duration,
    ) -> Self {
        Self {
            task_types,
            slots: vec![worker_id.to_owned(); max_tasks],
            lease_duration,
        }
    }
}

/// A reference to one lease: the task and the token of its hand-out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LeaseRef {
    pub(crate) task_id: Uuid,
    pub(crate) lease_token: Uuid,
}

impl LeaseRef {
    /// The lease a leased task carries; `None` for a task without one.
    pub(crate) fn of(task: &Task) -> Option<LeaseRef> {
        task.lease_token.map(|lease_token| LeaseRef {
            task_id: task.id,
            lease_token,
        })
    }
}

/// State of a lease after a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LeaseState {
    /// Renewed until the given time.
    Held(SystemTime),
    /// Expired, reclaimed, finished, handed to someone else or unknown.
    Lost,
    /// The task was cancelled while leased.
    Cancelled,
}

/// How a failed attempt should be retried.
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    pub(crate) error: String,
    pub(crate) permanent: bool,
    /// Overrides the backoff when set.
    pub(crate) retry_after: Option<Duration>,
}

/// Retry backoff settings: `base * 2^(attempt-1)`, capped, with jitter.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Backoff {
    pub(crate) base: Duration,
    pub(crate) max: Duration,
}

/// Filters and page position of a task listing.
#[derive(Debug, Clone, Default)]
pub(crate) struct ListFilter {
    pub(crate) statuses: Vec<Status>,
    pub(crate) task_types: Vec<String>,
    pub(crate) library_id: Option<Uuid>,
    pub(crate) series_id: Option<Uuid>,
    pub(crate) book_id: Option<Uuid>,
    /// Only tasks created before this one (exclusive; task ids are
    /// time-ordered); `None` is the first page.
    pub(crate) before_id: Option<Uuid>,
    pub(crate) limit: i64,
}

/// One page of a listing.
#[derive(Debug, Clone)]
pub(crate) struct Page {
    pub(crate) tasks: Vec<Task>,
    /// The last task of the page, to continue from when more rows may
    /// follow.
    pub(crate) next_id: Option<Uuid>,
}

/// Counts of one task type (or of all tasks) per status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    pub(crate) pending: i64,
    pub(crate) processing: i64,
    pub(crate) completed: i64,
    pub(crate) failed: i64,
    pub(crate) cancelled: i64,
}

impl Counts {
    /// Adds `n` tasks of `status`.
    pub(crate) fn add(&mut self, status: Status, n: i64) {
        match status {
            Status::Pending => self.pending += n,
            Status::Processing => self.processing += n,
            Status::Completed => self.completed += n,
            Status::Failed => self.failed += n,
            Status::Cancelled => self.cancelled += n,
        }
    }

    /// Tasks in every status.
    pub(crate) fn total(&self) -> i64 {
        self.pending + self.processing + self.completed + self.failed + self.cancelled
    }
}

/// Statistics of one task type.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TypeStats {
    pub(crate) task_type: String,
    pub(crate) counts: Counts,
    /// How long the oldest due pending task has been due.
    pub(crate) oldest_due_pending_age: Option<Duration>,
}

/// Statistics over the whole table.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Stats {
    pub(crate) totals: Counts,
    pub(crate) task_types: Vec<TypeStats>,
    pub(crate) oldest_due_pending_age: Option<Duration>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_words_round_trip() {
        for status in Status::ALL {
            assert_eq!(Status::parse(status.as_str()), Some(status));
        }
        assert_eq!(Status::parse("running"), None);
    }

    #[test]
    fn counts_total_every_status() {
        let mut counts = Counts::default();
        for (i, status) in Status::ALL.into_iter().enumerate() {
            counts.add(status, i as i64 + 1);
        }
        assert_eq!(counts.total(), 15);
    }
}
