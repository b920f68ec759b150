//! Task events: what happened to a task, as `WatchTasks` reports it, and
//! the filter a watcher sets.

use std::collections::HashSet;
use std::time::SystemTime;

use uuid::Uuid;

use super::task::{Progress, Status, Task};

/// Error texts in events are cut to this many characters.
const ERROR_CHARS: usize = 1000;

/// What happened to a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EventKind {
    Created,
    Leased,
    Progress,
    Completed,
    Failed,
    Retried,
    Cancelled,
    LeaseExpired,
    Released,
}

impl EventKind {
    /// Every kind, in the order of the contract's enum.
    pub(crate) const ALL: [EventKind; 9] = [
        EventKind::Created,
        EventKind::Leased,
        EventKind::Progress,
        EventKind::Completed,
        EventKind::Failed,
        EventKind::Retried,
        EventKind::Cancelled,
        EventKind::LeaseExpired,
        EventKind::Released,
    ];
}

/// One change of one task.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Event {
    pub(crate) kind: EventKind,
    pub(crate) task_id: Uuid,
    pub(crate) task_type: String,
    /// The task's status after the change.
    pub(crate) status: Status,
    pub(crate) attempts: i32,
    /// The worker holding (or, when it failed for good, last holding) the
    /// lease.
    pub(crate) worker_id: Option<String>,
    /// Set for progress events only.
    pub(crate) progress: Option<Progress>,
    pub(crate) library_id: Option<Uuid>,
    pub(crate) series_id: Option<Uuid>,
    pub(crate) book_id: Option<Uuid>,
    /// When the node that made the change saw it.
    pub(crate) at: SystemTime,
    /// The task's last error, for failures, cancellations and expiries.
    pub(crate) error: Option<String>,
}

impl Event {
    /// The event `kind` of `task` as it is after the change.
    pub(crate) fn of(kind: EventKind, task: &Task) -> Self {
        let error = match kind {
            EventKind::Failed | EventKind::Cancelled | EventKind::LeaseExpired => task
                .last_error
                .as_ref()
                .map(|e| e.chars().take(ERROR_CHARS).collect()),
            _ => None,
        };
        Self {
            kind,
            task_id: task.id,
            task_type: task.task_type.clone(),
            status: task.status,
            attempts: task.attempts,
            worker_id: task.locked_by.clone(),
            progress: if kind == EventKind::Progress {
                task.progress.clone()
            } else {
                None
            },
            library_id: task.library_id,
            series_id: task.series_id,
            book_id: task.book_id,
            at: SystemTime::now(),
            error,
        }
    }
}

/// Which events a watcher wants; empty parts match everything.
#[derive(Debug, Clone, Default)]
pub(crate) struct EventFilter {
    pub(crate) task_types: HashSet<String>,
    pub(crate) statuses: HashSet<Status>,
    pub(crate) task_ids: HashSet<Uuid>,
    pub(crate) library_id: Option<Uuid>,
    pub(crate) series_id: Option<Uuid>,
    pub(crate) book_id: Option<Uuid>,
}

impl EventFilter {
    /// Whether `event` passes every part of the filter.
    pub(crate) fn matches(&self, event: &Event) -> bool {
        (self.task_types.is_empty() || self.task_types.contains(&event.task_type))
            && (self.statuses.is_empty() || self.statuses.contains(&event.status))
            && (self.task_ids.is_empty() || self.task_ids.contains(&event.task_id))
            && (self.library_id.is_none() || self.library_id == event.library_id)
            && (self.series_id.is_none() || self.series_id == event.series_id)
            && (self.book_id.is_none() || self.book_id == event.book_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_combine_with_and() {
        let task_id = Uuid::now_v7();
        let event = Event {
            kind: EventKind::Created,
            task_id,
            task_type: "analyze_book".into(),
            status: Status::Pending,
            attempts: 0,
            worker_id: None,
            progress: None,
            library_id: None,
            series_id: None,
            book_id: None,
            at: SystemTime::now(),
            error: None,
        };
        let mut filter = EventFilter::default();
        assert!(filter.matches(&event));
        filter.task_types.insert("analyze_book".into());
        filter.statuses.insert(Status::Pending);
        assert!(filter.matches(&event));
        filter.task_ids.insert(Uuid::now_v7());
        assert!(!filter.matches(&event));
        filter.task_ids.insert(task_id);
        assert!(filter.matches(&event));
        filter.library_id = Some(Uuid::new_v4());
        assert!(!filter.matches(&event));
    }
}
