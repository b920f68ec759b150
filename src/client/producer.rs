//! [`Client`]: what producers and operators call — create, inspect, cancel,
//! retry and purge tasks, read statistics, list workers, watch live events.
//!
//! A thin layer over the generated stubs: it builds requests from
//! [`NewTask`], [`TaskFilter`] and [`WatchFilter`], walks pages, and turns
//! statuses into [`Error`]. It never retries a call by itself: whether a
//! create may be repeated is the caller's decision (a `dedup_key` makes it
//! safe).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::{Stream, StreamExt, TryStreamExt};
use tonic::transport::Channel;

use super::{connect, to_struct, Error, Result};
use crate::proto::{
    self, task_service_client::TaskServiceClient, worker_service_client::WorkerServiceClient,
};

/// Most tasks one CreateTasks call accepts; [`Client::create_many`] splits
/// larger inputs into calls of this size.
pub const MAX_CREATE_BATCH: usize = crate::wire::limit::MAX_BATCH;

/// A client of the task and worker services of one server.
///
/// Cheap to clone: clones share one HTTP/2 connection, and calls on clones
/// run concurrently.
///
/// ```no_run
/// use futures_util::TryStreamExt;
/// use leasehold::client::{Client, NewTask, TaskFilter};
/// use leasehold::proto::TaskStatus;
///
/// # async fn demo() -> Result<(), leasehold::client::Error> {
/// let client = Client::connect("127.0.0.1:50051").await?;
///
/// // One task, at most one pending or processing per library.
/// let created = client
///     .create(
///         NewTask::new("scan_library")
///             .params(serde_json::json!({"mode": "deep"}))
///             .priority(600)
///             .library_id("3f2b8c1e-7a4d-4e6f-9b0a-5c1d2e3f4a5b")
///             .dedup_key("scan:3f2b8c1e"),
///     )
///     .await?;
/// println!("deduplicated: {}", created.deduplicated);
///
/// // Every failed task, all pages.
/// let mut failed = client.list(TaskFilter::new().status(TaskStatus::Failed));
/// while let Some(task) = failed.try_next().await? {
///     client.retry(&task.id).await?;
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Client {
    tasks: TaskServiceClient<Channel>,
    workers: WorkerServiceClient<Channel>,
    address: Option<Arc<str>>,
}

impl Client {
    /// Connects to `address` (`host:port` or an `http://` URI).
    ///
    /// Fails with [`Error::InvalidAddress`] or [`Error::Connect`]; once
    /// connected, the channel reconnects by itself when the connection
    /// drops.
    pub async fn connect(address: &str) -> Result<Client> {
        let mut client = Self::from_channel(connect(address).await?);
        client.address = Some(address.into());
        Ok(client)
    }

    /// Connects to the first of `addresses` that answers, trying them in
    /// order, one at a time — the same list of nodes a [`super::Worker`]
    /// (or `leasehold worker --server a:50051,b:50051`) takes.
    /// [`Client::address`] tells which one it is.
    ///
    /// Every address is parsed before any is tried, so a malformed one
    /// fails with [`Error::InvalidAddress`] even if an earlier one would
    /// answer; an empty list is [`Error::InvalidConfig`]. When none
    /// answers, the [`Error::Connect`] names every address tried (its
    /// `address` is the list joined with `, `) and carries the last one's
    /// cause; with a single address it is exactly what
    /// [`Client::connect`] returns.
    ///
    /// The choice is made once: like any client, this one reconnects to
    /// the same address when its connection drops, and does not move on to
    /// the next.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), leasehold::client::Error> {
    /// use leasehold::client::Client;
    ///
    /// let client = Client::connect_any(&["10.0.0.1:50051", "10.0.0.2:50051"]).await?;
    /// println!("connected to {}", client.address().unwrap_or_default());
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect_any<S: AsRef<str>>(addresses: &[S]) -> Result<Client> {
        let endpoints = addresses
            .iter()
            .map(|address| super::endpoint(address.as_ref()))
            .collect::<Result<Vec<_>>>()?;
        let mut last = None;
        for (address, endpoint) in addresses.iter().zip(endpoints) {
            match endpoint.connect().await {
                Ok(channel) => {
                    let mut client = Self::from_channel(channel);
                    client.address = Some(address.as_ref().into());
                    return Ok(client);
                }
                Err(source) => last = Some(source),
            }
        }
        match last {
            Some(source) => Err(Error::Connect {
                address: addresses
                    .iter()
                    .map(AsRef::as_ref)
                    .collect::<Vec<_>>()
                    .join(", "),
                source,
            }),
            None => Err(Error::InvalidConfig(
                "servers: give at least one server address".to_owned(),
            )),
        }
    }

    /// A client over an existing channel (e.g. one built from
    /// [`super::endpoint`] with TLS or other settings).
    pub fn from_channel(channel: Channel) -> Client {
        Client {
            tasks: TaskServiceClient::new(channel.clone()),
            workers: WorkerServiceClient::new(channel),
            address: None,
        }
    }

    /// The address this client connected to, as given to
    /// [`Client::connect`] or [`Client::connect_any`]; `None` for a client
    /// made [from a channel](Client::from_channel).
    pub fn address(&self) -> Option<&str> {
        self.address.as_deref()
    }

    /// Creates one task (CreateTask). With a `dedup_key` that a pending or
    /// processing task already holds, that task comes back with
    /// `deduplicated = true` and nothing is added.
    pub async fn create(&self, task: NewTask) -> Result<proto::CreateTaskResponse> {
        let request = task.into_request(None)?;
        Ok(self.tasks.clone().create_task(request).await?.into_inner())
    }

    /// Creates many tasks (CreateTasks), results in input order.
    ///
    /// Each call holds at most [`MAX_CREATE_BATCH`] tasks and is one
    /// transaction: an invalid entry rejects its whole call with
    /// INVALID_ARGUMENT naming its index within that call (`params` that
    /// are not an object are rejected before any call, naming their index
    /// in the input). Larger inputs take several calls, one after the
    /// other. An empty input makes no call.
    ///
    /// When a call fails, the calls before it stay committed and the rest
    /// of the input is not sent: the [`CreateManyError`] holds the results
    /// of the committed calls ([`CreateManyError::created`], the first
    /// entries of the input, in order) besides the [`Error`], and
    /// [`CreateManyError::invalid_entry`] turns an index the server names
    /// into an index in the input. So nothing created is lost track of:
    /// resubmit the input from `created.len()` on (after fixing the entry)
    /// to finish. With `?` into an [`Error`] only the error is kept — fine
    /// for inputs of at most [`MAX_CREATE_BATCH`] tasks, where `created` is
    /// always empty.
    pub async fn create_many(
        &self,
        tasks: impl IntoIterator<Item = NewTask>,
    ) -> Result<Vec<proto::CreateTaskResponse>, CreateManyError> {
        let requests = tasks
            .into_iter()
            .enumerate()
            .map(|(i, task)| task.into_request(Some(i)))
            .collect::<Result<Vec<_>>>()
            .map_err(|error| CreateManyError {
                created: Vec::new(),
                error,
            })?;
        let mut results = Vec::with_capacity(requests.len());
        let mut requests = requests.into_iter().peekable();
        while requests.peek().is_some() {
            let batch: Vec<_> = requests.by_ref().take(MAX_CREATE_BATCH).collect();
            let response = self
                .tasks
                .clone()
                .create_tasks(proto::CreateTasksRequest { tasks: batch })
                .await;
            match response {
                Ok(response) => results.extend(response.into_inner().results),
                Err(status) => {
                    return Err(CreateManyError {
                        created: results,
                        error: status.into(),
                    })
                }
            }
        }
        Ok(results)
    }

    /// One task (GetTask); NOT_FOUND if it does not exist.
    pub async fn get(&self, id: &str) -> Result<proto::Task> {
        let response = self
            .tasks
            .clone()
            .get_task(proto::GetTaskRequest { id: id.to_owned() })
            .await?
            .into_inner();
        response.task.ok_or_else(|| missing("task"))
    }

    /// Every task matching `filter`, newest first, fetching page after page
    /// (ListTasks) as the stream is read.
    ///
    /// Nothing is requested until the stream is polled. The first error ends
    /// the stream. Paging while tasks change never yields a task twice.
    pub fn list(
        &self,
        filter: TaskFilter,
    ) -> impl Stream<Item = Result<proto::Task>> + Send + Unpin + 'static {
        struct Pages {
            tasks: TaskServiceClient<Channel>,
            request: proto::ListTasksRequest,
            buffered: VecDeque<proto::Task>,
            last_page: bool,
        }
        let pages = Pages {
            tasks: self.tasks.clone(),
            request: filter.request,
            buffered: VecDeque::new(),
            last_page: false,
        };
        let stream = futures_util::stream::try_unfold(pages, |mut pages| async move {
            loop {
                if let Some(task) = pages.buffered.pop_front() {
                    return Ok(Some((task, pages)));
                }
                if pages.last_page {
                    return Ok(None);
                }
                let page = pages
                    .tasks
                    .list_tasks(pages.request.clone())
                    .await?
                    .into_inner();
                pages.last_page = page.next_page_token.is_empty();
                pages.request.page_token = page.next_page_token;
                pages.buffered.extend(page.tasks);
            }
        });
        // Boxed so that callers can use `try_next` without pinning.
        Box::pin(stream)
    }

    /// Cancels a pending or processing task (CancelTask) and returns it.
    /// `reason` is kept as its `last_error`; empty means none.
    /// FAILED_PRECONDITION if it already finished, NOT_FOUND if it does not
    /// exist.
    pub async fn cancel(&self, id: &str, reason: impl Into<String>) -> Result<proto::Task> {
        let response = self
            .tasks
            .clone()
            .cancel_task(proto::CancelTaskRequest {
                id: id.to_owned(),
                reason: reason.into(),
            })
            .await?
            .into_inner();
        response.task.ok_or_else(|| missing("task"))
    }

    /// Puts a failed or cancelled task back to pending, due now, with its
    /// attempts reset (RetryTask), and returns it. FAILED_PRECONDITION in
    /// any other state.
    pub async fn retry(&self, id: &str) -> Result<proto::Task> {
        let response = self
            .tasks
            .clone()
            .retry_task(proto::RetryTaskRequest { id: id.to_owned() })
            .await?
            .into_inner();
        response.task.ok_or_else(|| missing("task"))
    }

    /// Deletes finished tasks (PurgeTasks) and returns how many.
    ///
    /// Only tasks that finished before `completed_before` (`None`: now) in
    /// one of `statuses` (COMPLETED, FAILED or CANCELLED; empty means all
    /// three) are deleted.
    pub async fn purge(
        &self,
        completed_before: Option<SystemTime>,
        statuses: &[proto::TaskStatus],
    ) -> Result<i64> {
        let response = self
            .tasks
            .clone()
            .purge_tasks(proto::PurgeTasksRequest {
                completed_before: completed_before.map(Into::into),
                statuses: statuses.iter().map(|s| *s as i32).collect(),
            })
            .await?
            .into_inner();
        Ok(response.deleted_count)
    }

    /// Task counts per status, overall and per task type, and the age of
    /// the oldest due pending task (GetStats).
    pub async fn stats(&self) -> Result<proto::GetStatsResponse> {
        Ok(self
            .tasks
            .clone()
            .get_stats(proto::GetStatsRequest {})
            .await?
            .into_inner())
    }

    /// Every connected worker session across all nodes (ListWorkers), by
    /// worker id then connection time.
    pub async fn workers(&self) -> Result<Vec<proto::WorkerSession>> {
        Ok(self
            .workers
            .clone()
            .list_workers(proto::ListWorkersRequest {})
            .await?
            .into_inner()
            .sessions)
    }

    /// Live task events matching `filter` (WatchTasks).
    ///
    /// Returns once the server has subscribed, so every change made after
    /// this returns is seen. The stream never ends by itself while the
    /// server runs; a watcher that reads too slowly gets a `missed` item
    /// with the number of events it lost.
    pub async fn watch(
        &self,
        filter: WatchFilter,
    ) -> Result<impl Stream<Item = Result<proto::WatchTasksResponse>> + Send + Unpin + 'static>
    {
        let stream = self
            .tasks
            .clone()
            .watch_tasks(filter.request)
            .await?
            .into_inner();
        Ok(stream.map_err(Error::from).boxed())
    }
}

/// Why [`Client::create_many`] stopped, with what it had created by then.
///
/// Displays as its [`error`](CreateManyError::error), followed by how many
/// tasks were created before the failed call when there were any.
#[derive(Debug)]
pub struct CreateManyError {
    /// The results of the calls that succeeded, in input order: those of
    /// the first `created.len()` entries of the input. Empty when the
    /// first call failed or the input was refused before any call.
    pub created: Vec<proto::CreateTaskResponse>,
    /// Why the next call failed (or, with `created` empty, why the input
    /// was refused before any call). Entries after that call's were not
    /// sent.
    pub error: Error,
}

impl CreateManyError {
    /// The entry an INVALID_ARGUMENT names (`tasks[3].params: ...`), as
    /// its index in the whole input, with the rest of the message
    /// (`params: ...`). `None` for other errors.
    pub fn invalid_entry(&self) -> Option<(usize, &str)> {
        let status = self.error.status()?;
        if status.code() != tonic::Code::InvalidArgument {
            return None;
        }
        let rest = status.message().strip_prefix("tasks[")?;
        let (index, rest) = rest.split_once(']')?;
        let index: usize = index.parse().ok()?;
        let rest = rest.strip_prefix('.').unwrap_or(rest);
        // Indexes are within the failed call, which starts right after the
        // created entries (a refusal before any call names input indexes
        // and has nothing created).
        Some((self.created.len().checked_add(index)?, rest))
    }
}

impl std::fmt::Display for CreateManyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.error)?;
        match self.created.len() {
            0 => Ok(()),
            1 => write!(f, " (after 1 task was created)"),
            n => write!(f, " (after {n} tasks were created)"),
        }
    }
}

impl std::error::Error for CreateManyError {
    // The message already holds `error`'s, so its causes come next.
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&self.error)
    }
}

/// Keeps the error and drops the results of the calls that succeeded.
impl From<CreateManyError> for Error {
    fn from(err: CreateManyError) -> Self {
        err.error
    }
}

/// A response field the contract says is always set was missing.
fn missing(field: &str) -> Error {
    Error::InvalidAnswer(format!("the response has no {field}"))
}

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

/// Which tasks [`Client::list`] yields: filters combine with AND, and an
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
    request: proto::ListTasksRequest,
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

/// Which events [`Client::watch`] yields: filters combine with AND, and an
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
    request: proto::WatchTasksRequest,
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
    fn create_many_errors_name_the_input_entry_and_keep_what_was_created() {
        let created = |n: usize| vec![proto::CreateTaskResponse::default(); n];
        let invalid = |message: &str| Error::from(tonic::Status::invalid_argument(message));

        // A call after 10,000 created names its entries from 0.
        let err = CreateManyError {
            created: created(10_000),
            error: invalid("tasks[1].task_type: ' ' is not allowed"),
        };
        assert_eq!(
            err.invalid_entry(),
            Some((10_001, "task_type: ' ' is not allowed"))
        );
        assert_eq!(
            err.to_string(),
            format!("{} (after 10000 tasks were created)", err.error)
        );
        // `?` into an `Error` keeps the error.
        let plain: Error = err.into();
        assert!(plain.status().is_some());

        // Refused before any call: input indexes, nothing created.
        let err = CreateManyError {
            created: Vec::new(),
            error: NewTask::new("t")
                .params(serde_json::json!(1))
                .into_request(Some(4))
                .unwrap_err(),
        };
        assert_eq!(
            err.invalid_entry(),
            Some((4, "params: must be a JSON object"))
        );
        assert!(!err.to_string().contains("created"));

        // Other errors name no entry.
        for error in [
            Error::from(tonic::Status::unavailable("tasks[1] database down")),
            invalid("tasks: must hold at least one task"),
        ] {
            let err = CreateManyError {
                created: created(1),
                error,
            };
            assert_eq!(err.invalid_entry(), None);
            assert!(err.to_string().ends_with(" (after 1 task was created)"));
        }
    }

    #[tokio::test]
    async fn connect_any_checks_every_address_first_and_names_all_it_tried() {
        let err = Client::connect_any::<&str>(&[]).await.unwrap_err();
        assert!(matches!(err, Error::InvalidConfig(_)), "{err:?}");
        let err = Client::connect_any(&["127.0.0.1:1", "http://[::1"])
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::InvalidAddress { address, .. } if address == "http://[::1"),
            "{err:?}"
        );

        // Ports that were just free: nothing listens there.
        let mut closed = Vec::new();
        for _ in 0..2 {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            closed.push(listener.local_addr().unwrap().to_string());
        }
        let err = Client::connect_any(&closed).await.unwrap_err();
        assert!(
            matches!(&err, Error::Connect { address, .. } if *address == closed.join(", ")),
            "{err:?}"
        );
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
