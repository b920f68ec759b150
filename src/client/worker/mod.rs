//! [`Worker`]: async handlers per task type, run over a worker session.
//!
//! - `builder`: [`WorkerBuilder`], the settings and handlers, checked at
//!   build time against the server's own registration rules;
//! - `context`: what a handler gets ([`TaskContext`]) and returns
//!   ([`TaskError`]);
//! - `session`: the session loop, the worker's one background task, which
//!   owns the stream and reconnects;
//! - `leases`: what the loop holds and owes across streams (a `Leases` it
//!   owns and talks to through its methods), and the rules that make each
//!   task complete exactly once;
//! - `message`: the outcome messages, built as the server accepts them.
//!
//! Handlers run as their own tokio tasks and talk to the loop through
//! channels, so every piece of state has one owner.

mod builder;
mod context;
mod leases;
mod message;
mod session;

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

pub use builder::WorkerBuilder;
use context::Handler;
pub use context::{HandlerResult, TaskContext, TaskError};
use session::SessionLoop;

use super::Result;
use crate::proto;

/// Stops a running [`Worker`] gracefully: no new tasks, in-flight ones may
/// finish until the drain timeout, the rest are released.
#[derive(Debug, Clone)]
pub struct Shutdown(CancellationToken);

impl Shutdown {
    /// Starts the drain. Idempotent.
    pub fn shutdown(&self) {
        self.0.cancel();
    }

    /// True once shutdown was asked for.
    pub fn is_shutdown(&self) -> bool {
        self.0.is_cancelled()
    }
}

/// Runs handlers for tasks pushed over a worker session.
///
/// ```no_run
/// use leasehold::client::{TaskError, Worker};
///
/// # async fn demo() -> Result<(), leasehold::client::Error> {
/// let worker = Worker::builder("thumbnailer-1")
///     .server("http://127.0.0.1:50051")
///     .slots(4)
///     .handler("generate_thumbnail", |task| async move {
///         let book = task.params()["book_id"].as_str().unwrap_or_default().to_owned();
///         if book.is_empty() {
///             return Err(TaskError::permanent("params.book_id: required"));
///         }
///         task.progress(1, 2, "rendering");
///         tokio::select! {
///             _ = task.cancelled() => Err(TaskError::retry("cancelled")),
///             _ = tokio::time::sleep(std::time::Duration::from_millis(50)) => {
///                 Ok(serde_json::json!({ "thumbnail": format!("{book}.webp") }))
///             }
///         }
///     })
///     .build()?;
/// // Runs until Ctrl-C or SIGTERM, then drains.
/// worker.run_until_signal().await
/// # }
/// ```
///
/// Heartbeats go out automatically at the interval the server recommends;
/// a broken stream reconnects with jittered exponential backoff (to the next
/// server when several are given) and re-attaches the leases still held; a
/// handler that panics fails its attempt with the panic message and the
/// worker goes on.
pub struct Worker {
    register: proto::RegisterWorker,
    channels: Vec<(String, Channel)>,
    bearer: crate::client::Bearer,
    handlers: HashMap<String, Handler>,
    drain_timeout: Duration,
    backoff_initial: Duration,
    backoff_max: Duration,
    shutdown: CancellationToken,
}

impl Worker {
    /// A worker identified as `worker_id` (1 to 100 characters; stored as
    /// `locked_by` of its tasks).
    pub fn builder(worker_id: impl Into<String>) -> WorkerBuilder {
        WorkerBuilder {
            worker_id: worker_id.into(),
            servers: Vec::new(),
            slots: 1,
            lease_duration: None,
            labels: HashMap::new(),
            handlers: HashMap::new(),
            drain_timeout: Duration::from_secs(30),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            tls: None,
            token: None,
        }
    }

    /// A handle that stops this worker gracefully.
    pub fn shutdown_handle(&self) -> Shutdown {
        Shutdown(self.shutdown.clone())
    }

    /// Runs until shut down through [`Self::shutdown_handle`], then drains.
    /// Returns an error only when the server refuses the registration
    /// itself (e.g. too many slots): retrying could not help. Every other
    /// failure (a broken stream, a node going away) reconnects.
    pub async fn run(self) -> Result<()> {
        SessionLoop::new(self).run().await
    }

    /// Runs until `signal` completes, then drains.
    pub async fn run_until(self, signal: impl Future<Output = ()>) -> Result<()> {
        let shutdown = self.shutdown_handle();
        let run = self.run();
        tokio::pin!(run);
        tokio::select! {
            result = &mut run => return result,
            () = signal => shutdown.shutdown(),
        }
        run.await
    }

    /// Runs until Ctrl-C or SIGTERM, then drains.
    pub async fn run_until_signal(self) -> Result<()> {
        self.run_until(crate::signal::shutdown()).await
    }
}
