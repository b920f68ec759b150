//! [`WorkerBuilder`]: a worker's settings and handlers, checked when it is
//! built against the server's own registration rules.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::context::{Handler, HandlerResult, TaskContext};
use super::Worker;
use crate::client::{endpoint_with, Bearer, Error, Result, Tls};
use crate::proto;
use crate::wire::{convert, limit, request};

/// Configures a [`Worker`]; see [`Worker::builder`].
pub struct WorkerBuilder {
    pub(super) worker_id: String,
    pub(super) servers: Vec<String>,
    pub(super) slots: u32,
    pub(super) lease_duration: Option<Duration>,
    pub(super) labels: HashMap<String, String>,
    pub(super) handlers: HashMap<String, Handler>,
    pub(super) drain_timeout: Duration,
    pub(super) backoff_initial: Duration,
    pub(super) backoff_max: Duration,
    pub(super) tls: Option<Tls>,
    pub(super) token: Option<String>,
}

impl WorkerBuilder {
    /// Adds a server address (`host:port` or `http://host:port`). With
    /// several, a broken session reconnects to the next one in turn.
    pub fn server(mut self, address: impl Into<String>) -> Self {
        self.servers.push(address.into());
        self
    }

    /// Adds several server addresses.
    pub fn servers<I, S>(mut self, addresses: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.servers.extend(addresses.into_iter().map(Into::into));
        self
    }

    /// Connects over TLS with these settings (a bare `host:port` then
    /// means `https://`). An `https://` address without this trusts the
    /// system's certificate authorities.
    pub fn tls(mut self, tls: Tls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Sends this bearer token with the session (`authorization: Bearer
    /// <token>`), as a node with `--auth required` expects: a worker token,
    /// limited to this worker's task types if it is limited at all.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// How many tasks may run at once (default 1; the server allows 1 to
    /// 10,000).
    pub fn slots(mut self, slots: u32) -> Self {
        self.slots = slots;
        self
    }

    /// Lease length of this worker's tasks (default: the server's). The
    /// worker heartbeats at the interval the server recommends for it.
    pub fn lease_duration(mut self, lease: Duration) -> Self {
        self.lease_duration = Some(lease);
        self
    }

    /// A label shown by `ListWorkers` (e.g. host, version).
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// Runs `handler` for tasks of `task_type`. The worker asks only for the
    /// types it has handlers for.
    pub fn handler<F, Fut>(mut self, task_type: impl Into<String>, handler: F) -> Self
    where
        F: Fn(TaskContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
    {
        let handler: Handler = Arc::new(move |ctx| Box::pin(handler(ctx)));
        self.handlers.insert(task_type.into(), handler);
        self
    }

    /// On shutdown, how long in-flight tasks may still run before they are
    /// cancelled and released (default 30 s).
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = timeout;
        self
    }

    /// Reconnect delays: the first, doubled per failed attempt up to `max`,
    /// each scaled by a random factor in [0.5, 1) so a fleet does not
    /// reconnect in lockstep (default 100 ms to 10 s).
    pub fn reconnect_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.backoff_initial = initial;
        self.backoff_max = max.max(initial);
        self
    }

    /// Checks the configuration and builds the worker. Connections are made
    /// when it runs.
    pub fn build(self) -> Result<Worker> {
        let invalid = |message: &str| Error::InvalidConfig(message.to_owned());
        if self.servers.is_empty() {
            return Err(invalid("servers: give at least one server address"));
        }
        if self.handlers.is_empty() {
            return Err(invalid("handlers: register at least one task type"));
        }
        if self.slots == 0 {
            return Err(invalid("slots: must be at least 1"));
        }
        let channels = self
            .servers
            .iter()
            .map(|address| {
                let endpoint = endpoint_with(address, self.tls.as_ref())?;
                Ok((address.clone(), endpoint.connect_lazy()))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut task_types: Vec<String> = self.handlers.keys().cloned().collect();
        task_types.sort();
        let register = proto::RegisterWorker {
            worker_id: self.worker_id,
            task_types,
            slots: i32::try_from(self.slots).unwrap_or(i32::MAX),
            lease_duration: self.lease_duration.map(convert::duration),
            labels: self.labels,
            batched_pushes: true,
        };
        // The server's own checks of a registration, so that a worker id,
        // slot count, lease or label it would refuse fails here and not at
        // the first connection. (The default lease is only a placeholder:
        // the server picks its own when none is given.)
        request::register(&register, limit::MIN_LEASE)
            .map_err(|err| Error::InvalidConfig(err.to_string()))?;
        let bearer = match &self.token {
            Some(token) => Bearer::new(token)?,
            None => Bearer::default(),
        };
        Ok(Worker {
            register,
            channels,
            bearer,
            handlers: self.handlers,
            drain_timeout: self.drain_timeout,
            backoff_initial: self.backoff_initial,
            backoff_max: self.backoff_max,
            shutdown: CancellationToken::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn builder(worker_id: &str) -> WorkerBuilder {
        Worker::builder(worker_id)
            .server("http://127.0.0.1:1")
            .handler("scan_library", |_| async { Ok(serde_json::json!({})) })
    }

    fn refused(builder: WorkerBuilder) -> String {
        match builder.build() {
            Err(Error::InvalidConfig(message)) => message,
            Err(other) => panic!("expected InvalidConfig, got {other:?}"),
            Ok(_) => panic!("built a worker the server would refuse"),
        }
    }

    /// What the server would refuse at registration is refused when the
    /// worker is built, naming the field.
    #[tokio::test]
    async fn build_runs_the_servers_registration_checks() {
        assert!(builder("thumbnailer-1").build().is_ok());
        assert!(refused(builder("")).starts_with("register.worker_id:"));
        assert!(refused(builder("w").slots(20_000)).starts_with("register.slots:"));
        let lease = refused(builder("w").lease_duration(Duration::from_millis(1)));
        assert!(lease.starts_with("register.lease_duration:"), "{lease}");
    }
}
