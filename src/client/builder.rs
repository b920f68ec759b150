//! The requests a [`Client`](super::Client) sends, as builders: [`NewTask`]
//! (a task to create), [`TaskFilter`] (which tasks to list) and
//! [`WatchFilter`] (which events to watch).

use std::time::{Duration, SystemTime};

use super::{to_struct, Result};
use crate::proto;

/// A task to create: its type and optional settings, as a builder.
///
/// ```
/// use std::time::Duration;
/// use leasehold::client::NewTask;
///
/// let task = NewTask::new("generate_thumbnail")
///     .params(serde_json::json!({"book": 7, "size": 512}))
///     .priority(10)
///     .max_attempts(5)
///     .scheduled_in(Duration::from_secs(60))
///     .dedup_key("thumb:7:512");
/// assert_eq!(task.task_type(), "generate_thumbnail");
/// ```
#[derive(Debug, Clone)]
pub struct NewTask {
    request: proto::CreateTaskRequest,
    params: Option<serde_json::Value>,
}

impl NewTask {
    /// A task of `task_type` (1 to 64 characters of letters, digits and
    /// `_ . : / -`), with empty params, priority 0, the server's default
    /// attempts (3), due now.
    pub fn new(task_type: impl Into<String>) -> Self {
        NewTask {
            request: proto::CreateTaskRequest {
                task_type: task_type.into(),
                ..Default::default()
            },
            params: None,
        }
    }

    /// The task type.
    pub fn task_type(&self) -> &str {
        &self.request.task_type
    }

    /// The task's input, which must be a JSON object (anything else fails
    /// the create with INVALID_ARGUMENT on `params`, before any call).
    pub fn params(mut self, params: serde_json::Value) -> Self {
        self.params = Some(params);
        self
    }

    /// Higher runs first; default 0.
    pub fn priority(mut self, priority: i32) -> Self {
        self.request.priority = priority;
        self
    }

    /// Executions allowed, 1 to 1000; 0 (the default) means the server's
    /// default, 3.
    pub fn max_attempts(mut self, max_attempts: i32) -> Self {
        self.request.max_attempts = max_attempts;
        self
    }

    /// Not handed out before `at`; default now.
    pub fn scheduled_for(mut self, at: SystemTime) -> Self {
        self.request.scheduled_for = Some(at.into());
        self
    }

    /// Not handed out before `delay` from now (this machine's clock).
    pub fn scheduled_in(mut self, delay: Duration) -> Self {
        match SystemTime::now().checked_add(delay) {
            Some(at) => self.scheduled_for(at),
            // Past the end of this machine's time: a timestamp the server
            // refuses with an error naming `scheduled_for`.
            None => {
                self.request.scheduled_for = Some(prost_types::Timestamp {
                    seconds: i64::MAX,
                    nanos: 0,
                });
                self
            }
        }
    }

    /// The library the task is about (a UUID).
    pub fn library_id(mut self, id: impl Into<String>) -> Self {
        self.request.library_id = Some(id.into());
        self
    }

    /// The series the task is about (a UUID).
    pub fn series_id(mut self, id: impl Into<String>) -> Self {
        self.request.series_id = Some(id.into());
        self
    }

    /// The book the task is about (a UUID).
    pub fn book_id(mut self, id: impl Into<String>) -> Self {
        self.request.book_id = Some(id.into());
        self
    }

    /// Deduplication key (1 to 255 characters): while a pending or
    /// processing task holds it, creating another returns that task.
    pub fn dedup_key(mut self, key: impl Into<String>) -> Self {
        self.request.dedup_key = Some(key.into());
        self
    }

    /// The wire request. `index` is the position within a CreateTasks call,
    /// so that a local rejection names the field as the server would.
    pub(crate) fn into_request(self, index: Option<usize>) -> Result<proto::CreateTaskRequest> {
        let mut request = self.request;
        match self.params {
            None => {}
            Some(params @ serde_json::Value::Object(_)) => {
                request.params = Some(to_struct(&params))
            }
            // Checked here because `to_struct` would turn it into `{}`
            // silently and the server would never see the mistake.
            Some(_) => {
                let field = match index {
                    Some(i) => format!("tasks[{i}].params"),
                    None => "params".to_owned(),
                };
                return Err(tonic::Status::invalid_argument(format!(
                    "{field}: must be a JSON object"
                ))
                .into());
            }
        }
        Ok(request)
    }
}

/// Which tasks [`Client::list`](super::Client::list) yields: filters combine with AND, and an
/// unset filter does not filter. A builder.
///
/// ```
/// use leasehold::client::TaskFilter;
/// use leasehold::proto::TaskStatus;
///
/// let filter = TaskFilter::new()
///     .statuses([TaskStatus::Failed, TaskStatus::Cancelled])
///     .task_type("scan_library")
///     .page_size(200);
/// ```
#[derive(Debug, Clone, Default)]
pub struct TaskFilter {
    pub(super) request: proto::ListTasksRequest,
}

/// The filters `ListTasks` and `WatchTasks` share (statuses, task types,
/// library, series, book), as builder methods of a type holding them in
/// `self.request`. In the docs, `$what` names what is filtered and
/// `$in_status` how a status selects it.
macro_rules! shared_filters {
    ($what:literal, $in_status:literal) => {
        #[doc = concat!("Also ", $in_status, " `status`.")]
        pub fn status(mut self, status: proto::TaskStatus) -> Self {
            self.request.statuses.push(status as i32);
            self
        }

        #[doc = concat!("Also ", $in_status, " any of `statuses`.")]
        pub fn statuses(mut self, statuses: impl IntoIterator<Item = proto::TaskStatus>) -> Self {
            self.request
                .statuses
                .extend(statuses.into_iter().map(|s| s as i32));
            self
        }

        #[doc = concat!("Also ", $what, " of `task_type`.")]
        pub fn task_type(mut self, task_type: impl Into<String>) -> Self {
            self.request.task_types.push(task_type.into());
            self
        }

        #[doc = concat!("Also ", $what, " of any of `task_types`.")]
        pub fn task_types<S: Into<String>>(
            mut self,
            task_types: impl IntoIterator<Item = S>,
        ) -> Self {
            self.request
                .task_types
                .extend(task_types.into_iter().map(Into::into));
            self
        }

        #[doc = concat!("Only ", $what, " about this library (UUID).")]
        pub fn library_id(mut self, id: impl Into<String>) -> Self {
            self.request.library_id = Some(id.into());
            self
        }

        #[doc = concat!("Only ", $what, " about this series (UUID).")]
        pub fn series_id(mut self, id: impl Into<String>) -> Self {
            self.request.series_id = Some(id.into());
            self
        }

        #[doc = concat!("Only ", $what, " about this book (UUID).")]
        pub fn book_id(mut self, id: impl Into<String>) -> Self {
            self.request.book_id = Some(id.into());
            self
        }
    };
}

impl TaskFilter {
    /// Every task.
    pub fn new() -> Self {
        Self::default()
    }

    shared_filters!("tasks", "tasks in");

    /// Tasks fetched per call, 1 to 1000; 0 (the default) means 50.
    pub fn page_size(mut self, page_size: i32) -> Self {
        self.request.page_size = page_size;
        self
    }
}

/// Which events [`Client::watch`](super::Client::watch) yields: filters combine with AND, and an
/// unset filter does not filter. A builder.
///
/// ```
/// use leasehold::client::WatchFilter;
/// use leasehold::proto::TaskStatus;
///
/// // Every task of this type that ends up failed.
/// let filter = WatchFilter::new()
///     .task_type("scan_library")
///     .status(TaskStatus::Failed);
/// ```
#[derive(Debug, Clone, Default)]
pub struct WatchFilter {
    pub(super) request: proto::WatchTasksRequest,
}

impl WatchFilter {
    /// Every event.
    pub fn new() -> Self {
        Self::default()
    }

    shared_filters!("events of tasks", "events after which the task is in");

    /// Also events of the task `id` (UUID).
    pub fn task_id(mut self, id: impl Into<String>) -> Self {
        self.request.task_ids.push(id.into());
        self
    }

    /// Also events of any of the tasks `ids` (UUIDs, at most 1,000 in all).
    pub fn task_ids<S: Into<String>>(mut self, ids: impl IntoIterator<Item = S>) -> Self {
        self.request
            .task_ids
            .extend(ids.into_iter().map(Into::into));
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_must_be_an_object_and_name_their_index() {
        let ok = NewTask::new("t")
            .params(serde_json::json!({"a": 1}))
            .into_request(None)
            .unwrap();
        assert_eq!(ok.params.unwrap().fields.len(), 1);

        let err = NewTask::new("t")
            .params(serde_json::json!([1]))
            .into_request(Some(3))
            .unwrap_err();
        let status = err.status().unwrap();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(status.message(), "tasks[3].params: must be a JSON object");
    }

    #[test]
    fn a_delay_past_the_end_of_time_is_refused_by_the_server_not_a_panic() {
        let request = NewTask::new("t")
            .scheduled_in(Duration::MAX)
            .into_request(None)
            .unwrap();
        let err = crate::wire::field::timestamp("scheduled_for", request.scheduled_for.as_ref())
            .unwrap_err();
        assert!(err.to_string().starts_with("scheduled_for:"), "{err}");
    }

    #[test]
    fn filters_accumulate() {
        let filter = TaskFilter::new()
            .status(proto::TaskStatus::Failed)
            .statuses([proto::TaskStatus::Cancelled])
            .task_types(["a", "b"])
            .page_size(7);
        assert_eq!(
            filter.request.statuses,
            [
                proto::TaskStatus::Failed as i32,
                proto::TaskStatus::Cancelled as i32
            ]
        );
        assert_eq!(filter.request.task_types, ["a", "b"]);
        assert_eq!(filter.request.page_size, 7);
    }
}
