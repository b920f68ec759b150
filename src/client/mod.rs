//! Clients of a Leasehold server, for Rust programs.
//!
//! - [`Client`]: producers and operators create, inspect, cancel, retry and
//!   purge tasks, read statistics and watch live events.
//! - [`Worker`]: runs async handlers per task type over a worker session,
//!   with slots, automatic heartbeats, progress, cancellation, reconnects
//!   that keep held leases, and graceful drain.
//!
//! ```no_run
//! use leasehold::client::{Client, NewTask};
//!
//! # async fn demo() -> Result<(), leasehold::client::Error> {
//! let client = Client::connect("http://127.0.0.1:50051").await?;
//! let created = client
//!     .create(NewTask::new("generate_thumbnail").params(serde_json::json!({"book": 7})))
//!     .await?;
//! println!("created {}", created.task.map(|t| t.id).unwrap_or_default());
//! # Ok(())
//! # }
//! ```
//!
//! Files: `channel` (addresses and connections), `builder` (the builders
//! [`NewTask`], [`TaskFilter`], [`WatchFilter`]), `error`, and `worker`
//! (the [`Worker`] and its session loop). [`Client`] itself is here: a thin
//! layer over the generated stubs that builds requests, walks pages, and
//! turns statuses into [`Error`]. It never retries a call by itself:
//! whether a create may be repeated is the caller's decision (a
//! `dedup_key` makes it safe).

mod builder;
mod channel;
mod error;
mod worker;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::SystemTime;

use futures_util::{Stream, StreamExt, TryStreamExt};
use tonic::transport::Channel;

pub use builder::{NewTask, TaskFilter, WatchFilter};
pub use channel::{connect, endpoint, endpoint_with, AuthChannel, Bearer, Tls, DEFAULT_SERVER};
use error::missing;
pub use error::{CreateManyError, Error, Result};
pub use worker::{HandlerResult, Shutdown, TaskContext, TaskError, Worker, WorkerBuilder};

use crate::proto::{
    self, task_service_client::TaskServiceClient, token_service_client::TokenServiceClient,
    worker_service_client::WorkerServiceClient,
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
    channel: Channel,
    tasks: TaskServiceClient<AuthChannel>,
    workers: WorkerServiceClient<AuthChannel>,
    tokens: TokenServiceClient<AuthChannel>,
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

    /// Connects to `address` over TLS with these settings (a bare
    /// `host:port` means `https://`).
    pub async fn connect_with(address: &str, tls: &Tls) -> Result<Client> {
        Self::connect_any_with(&[address], Some(tls)).await
    }

    /// Connects to the first of `addresses` that answers, trying them in
    /// order, one at a time — the same list of nodes a [`Worker`]
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
        Self::connect_any_with(addresses, None).await
    }

    /// [`Client::connect_any`] with TLS settings for every address.
    pub async fn connect_any_with<S: AsRef<str>>(
        addresses: &[S],
        tls: Option<&Tls>,
    ) -> Result<Client> {
        let endpoints = addresses
            .iter()
            .map(|address| endpoint_with(address.as_ref(), tls))
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
    /// [`endpoint`] with TLS or other settings).
    pub fn from_channel(channel: Channel) -> Client {
        Self::authed(channel, Bearer::default(), None)
    }

    fn authed(channel: Channel, bearer: Bearer, address: Option<Arc<str>>) -> Client {
        Client {
            tasks: TaskServiceClient::with_interceptor(channel.clone(), bearer.clone()),
            workers: WorkerServiceClient::with_interceptor(channel.clone(), bearer.clone()),
            tokens: TokenServiceClient::with_interceptor(channel.clone(), bearer),
            channel,
            address,
        }
    }

    /// The same client, sending `token` (`authorization: Bearer <token>`)
    /// with every call, as a node with `--auth required` expects;
    /// [`Error::InvalidConfig`] if it is not printable ASCII.
    pub fn with_token(self, token: &str) -> Result<Client> {
        Ok(Self::authed(
            self.channel,
            Bearer::new(token)?,
            self.address,
        ))
    }

    /// Creates a bearer token (admin tokens only); the response holds its
    /// secret, shown this once.
    pub async fn create_token(
        &self,
        request: proto::CreateTokenRequest,
    ) -> Result<proto::CreateTokenResponse> {
        Ok(self
            .tokens
            .clone()
            .create_token(request)
            .await?
            .into_inner())
    }

    /// Every bearer token, newest first, without secrets (admin tokens only).
    pub async fn list_tokens(&self) -> Result<Vec<proto::Token>> {
        Ok(self
            .tokens
            .clone()
            .list_tokens(proto::ListTokensRequest {})
            .await?
            .into_inner()
            .tokens)
    }

    /// Revokes a bearer token (admin tokens only); every node refuses it
    /// within seconds.
    pub async fn revoke_token(&self, id: &str) -> Result<proto::Token> {
        let response = self
            .tokens
            .clone()
            .revoke_token(proto::RevokeTokenRequest { id: id.to_owned() })
            .await?
            .into_inner();
        response.token.ok_or_else(|| missing("token"))
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
            tasks: TaskServiceClient<AuthChannel>,
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

/// A JSON object as a protobuf `Struct` (anything but an object becomes an
/// empty one, as the server stores objects only).
pub fn to_struct(json: &serde_json::Value) -> prost_types::Struct {
    crate::wire::json::json_to_struct(json)
}

/// A protobuf `Struct` as a JSON object.
pub fn from_struct(value: &prost_types::Struct) -> Result<serde_json::Value> {
    crate::wire::json::struct_to_json(value).map_err(|e| Error::InvalidAnswer(e.0))
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
