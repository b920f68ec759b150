//! The node's Prometheus metrics: every metric family, the one registry
//! they live in, and the HTTP endpoint that serves them (`GET /metrics`,
//! OpenMetrics text). docs/metrics.md lists every metric.
//!
//! Values are recorded where the thing happens (task outcomes in the
//! coordinator, claims in the dispatcher, calls in `api`) through the
//! methods here; gauges of state the node holds (sessions, the pool) are
//! read when a scrape arrives, through a refresh function the node
//! supplies; the queue gauges come from one SQL aggregate on a timer that
//! every scrape shares (see `server`). This module knows neither the
//! database nor the dispatcher.
//!
//! Labels are bounded: task type, status, outcome, gRPC method and code.
//! Never ids.

use crate::wire::convert::code_name;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use tokio::sync::watch;

/// The labels of a per-type metric.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct TypeLabel {
    /// The task type.
    pub(crate) task_type: String,
}

/// What became of an attempt.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The task is pending again, for another attempt.
    Retried,
    /// The task failed for good.
    Failed,
    /// The task completed (run durations only).
    Completed,
}

impl Outcome {
    /// The label value.
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Retried => "retried",
            Outcome::Failed => "failed",
            Outcome::Completed => "completed",
        }
    }
}

/// The labels of a per-type metric that distinguishes outcomes.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct OutcomeLabels {
    /// The task type.
    pub(crate) task_type: String,
    /// What became of the attempt: `completed`, `retried` or `failed`.
    pub(crate) outcome: &'static str,
}

/// The labels of the queue-depth gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct QueueLabels {
    /// The task type.
    pub(crate) task_type: String,
    /// `pending` or `processing`.
    pub(crate) status: String,
}

/// The labels of a gRPC call counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct CallLabels {
    /// The full method path (`/leasehold.v1.TaskService/CreateTask`), or
    /// `unknown` for a path no service answers.
    pub(crate) method: String,
    /// The gRPC status code name (`OK`, `NOT_FOUND`, ...).
    pub(crate) code: String,
}

/// The labels of the gRPC latency histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct MethodLabel {
    /// The full method path, as in [`CallLabels`].
    pub(crate) method: String,
}

/// The labels of the pool gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct PoolLabel {
    /// `in_use` or `idle`.
    pub(crate) state: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Seconds, from half a millisecond to about a minute.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 18))
}

/// Seconds, from 10 ms to about 11 hours.
fn run_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 2.0, 22))
}

/// Every metric of a node. One per node (tests run several in a process).
pub(crate) struct Metrics {
    registry: Registry,
    tasks_created: Family<TypeLabel, Counter>,
    tasks_leased: Family<TypeLabel, Counter>,
    tasks_completed: Family<TypeLabel, Counter>,
    tasks_failed: Family<OutcomeLabels, Counter>,
    tasks_cancelled: Family<TypeLabel, Counter>,
    tasks_reclaimed: Family<OutcomeLabels, Counter>,
    task_run: HistogramFamily<OutcomeLabels>,
    queue_tasks: Family<QueueLabels, Gauge>,
    queue_oldest_due: Family<TypeLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    grpc_requests: Family<CallLabels, Counter>,
    grpc_duration: HistogramFamily<MethodLabel>,
    sessions: Gauge,
    session_slots_free: Gauge,
    claim_tasks: Histogram,
    pool_connections: Family<PoolLabel, Gauge>,
    pool_waiting: Gauge,
    reclaim_lag: Histogram,
    /// Every method path the node serves: the only `method` labels.
    methods: std::collections::HashSet<String>,
}

/// The paths of every gRPC method the node serves (`/package.Service/Method`),
/// read from the descriptors it serves by reflection.
fn served_methods() -> std::collections::HashSet<String> {
    let mut methods: std::collections::HashSet<String> = [
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    for encoded in [
        crate::wire::proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
    ] {
        let Ok(set) = <prost_types::FileDescriptorSet as prost::Message>::decode(encoded) else {
            continue;
        };
        for file in &set.file {
            for service in &file.service {
                for method in &service.method {
                    methods.insert(format!(
                        "/{}.{}/{}",
                        file.package(),
                        service.name(),
                        method.name()
                    ));
                }
            }
        }
    }
    methods
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Every family, registered under its name (the `_total` of counters and
    /// the unit suffixes are added by the encoder).
    pub(crate) fn new() -> Self {
        let mut registry = Registry::with_prefix("leasehold");
        let tasks_created = Family::default();
        registry.register(
            "tasks_created",
            "Tasks created on this node (a create answered by an existing task's dedup key is not counted)",
            tasks_created.clone(),
        );
        let tasks_leased = Family::default();
        registry.register(
            "tasks_leased",
            "Leases handed out by this node (pushed to sessions or answered to AcquireTasks)",
            tasks_leased.clone(),
        );
        let tasks_completed = Family::default();
        registry.register(
            "tasks_completed",
            "Tasks completed through this node",
            tasks_completed.clone(),
        );
        let tasks_failed = Family::default();
        registry.register(
            "tasks_failed",
            "Failed attempts reported through this node, by outcome: retried (pending again) or failed (for good)",
            tasks_failed.clone(),
        );
        let tasks_cancelled = Family::default();
        registry.register(
            "tasks_cancelled",
            "Tasks cancelled through this node",
            tasks_cancelled.clone(),
        );
        let tasks_reclaimed = Family::default();
        registry.register(
            "tasks_reclaimed",
            "Expired leases taken back by this node's reclaimer, by outcome: retried or failed (no attempts left)",
            tasks_reclaimed.clone(),
        );
        let task_run: HistogramFamily<OutcomeLabels> =
            Family::new_with_constructor(run_histogram as fn() -> Histogram);
        registry.register_with_unit(
            "task_run_duration",
            "From an attempt's lease to its outcome, by outcome (completed, retried, failed)",
            Unit::Seconds,
            task_run.clone(),
        );
        let queue_tasks = Family::default();
        registry.register(
            "queue_tasks",
            "Live tasks by type and status (pending, processing), from the latest queue sample (all nodes)",
            queue_tasks.clone(),
        );
        let queue_oldest_due = Family::default();
        registry.register_with_unit(
            "queue_oldest_due_age",
            "How long the oldest due pending task of a type has been due, from the latest queue sample",
            Unit::Seconds,
            queue_oldest_due.clone(),
        );
        let grpc_requests = Family::default();
        registry.register(
            "grpc_requests",
            "gRPC calls this node answered, by method and status code",
            grpc_requests.clone(),
        );
        let grpc_duration: HistogramFamily<MethodLabel> =
            Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        registry.register_with_unit(
            "grpc_request_duration",
            "gRPC calls from request to final status, by method (a stream counts its whole life)",
            Unit::Seconds,
            grpc_duration.clone(),
        );
        let sessions = Gauge::default();
        registry.register(
            "sessions_connected",
            "Worker sessions connected to this node",
            sessions.clone(),
        );
        let session_slots_free = Gauge::default();
        registry.register(
            "sessions_slots_free",
            "Free slots across the worker sessions of this node",
            session_slots_free.clone(),
        );
        let claim_tasks = Histogram::new(exponential_buckets(1.0, 2.0, 12));
        registry.register(
            "dispatch_claim_tasks",
            "Tasks leased per claim statement of this node",
            claim_tasks.clone(),
        );
        let pool_connections = Family::default();
        registry.register(
            "db_pool_connections",
            "This node's pooled database connections, by state (in_use, idle)",
            pool_connections.clone(),
        );
        let pool_waiting = Gauge::default();
        registry.register(
            "db_pool_waiting",
            "Requests of this node waiting for a pooled database connection",
            pool_waiting.clone(),
        );
        let reclaim_lag = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register_with_unit(
            "reclaim_lag",
            "From a lease's expiry to its reclaim by this node",
            Unit::Seconds,
            reclaim_lag.clone(),
        );
        Self {
            registry,
            tasks_created,
            tasks_leased,
            tasks_completed,
            tasks_failed,
            tasks_cancelled,
            tasks_reclaimed,
            task_run,
            queue_tasks,
            queue_oldest_due,
            grpc_requests,
            grpc_duration,
            sessions,
            session_slots_free,
            claim_tasks,
            pool_connections,
            pool_waiting,
            reclaim_lag,
            methods: served_methods(),
        }
    }

    fn of_type(task_type: &str) -> TypeLabel {
        TypeLabel {
            task_type: task_type.to_owned(),
        }
    }

    /// A task was created.
    pub(crate) fn task_created(&self, task_type: &str) {
        self.tasks_created
            .get_or_create(&Self::of_type(task_type))
            .inc();
    }

    /// One claim statement leased these tasks (by type).
    pub(crate) fn tasks_leased<'a>(&self, task_types: impl IntoIterator<Item = &'a str>) {
        // A claim is mostly of one or a few types: one label lookup per type
        // and claim, not per task.
        let mut counts: Vec<(&str, u64)> = Vec::new();
        for task_type in task_types {
            match counts.iter_mut().find(|(t, _)| *t == task_type) {
                Some((_, n)) => *n += 1,
                None => counts.push((task_type, 1)),
            }
        }
        let total: u64 = counts.iter().map(|(_, n)| n).sum();
        for (task_type, n) in counts {
            self.tasks_leased
                .get_or_create(&Self::of_type(task_type))
                .inc_by(n);
        }
        if total > 0 {
            self.claim_tasks.observe(total as f64);
        }
    }

    /// A task completed after running for `ran` (if known).
    pub(crate) fn task_completed(&self, task_type: &str, ran: Option<Duration>) {
        self.tasks_completed
            .get_or_create(&Self::of_type(task_type))
            .inc();
        self.observe_run(task_type, Outcome::Completed, ran);
    }

    /// An attempt failed: `outcome` says whether it will be retried.
    pub(crate) fn task_failed(&self, task_type: &str, outcome: Outcome, ran: Option<Duration>) {
        self.tasks_failed
            .get_or_create(&OutcomeLabels {
                task_type: task_type.to_owned(),
                outcome: outcome.as_str(),
            })
            .inc();
        self.observe_run(task_type, outcome, ran);
    }

    fn observe_run(&self, task_type: &str, outcome: Outcome, ran: Option<Duration>) {
        if let Some(ran) = ran {
            self.task_run
                .get_or_create(&OutcomeLabels {
                    task_type: task_type.to_owned(),
                    outcome: outcome.as_str(),
                })
                .observe(ran.as_secs_f64());
        }
    }

    /// A task was cancelled.
    pub(crate) fn task_cancelled(&self, task_type: &str) {
        self.tasks_cancelled
            .get_or_create(&Self::of_type(task_type))
            .inc();
    }

    /// An expired lease was taken back `lag` after it expired.
    pub(crate) fn task_reclaimed(&self, task_type: &str, outcome: Outcome, lag: Duration) {
        self.tasks_reclaimed
            .get_or_create(&OutcomeLabels {
                task_type: task_type.to_owned(),
                outcome: outcome.as_str(),
            })
            .inc();
        self.reclaim_lag.observe(lag.as_secs_f64());
    }

    /// A gRPC call ended with `code` after `took`.
    pub(crate) fn grpc_call(&self, method: &str, code: tonic::Code, took: Duration) {
        // A path no service answers is anyone's invention (and is refused
        // before routing when tokens are required): one label for all of
        // them keeps the label set bounded.
        let method = if self.methods.contains(method) {
            method
        } else {
            "unknown"
        };
        self.grpc_requests
            .get_or_create(&CallLabels {
                method: method.to_owned(),
                code: code_name(code).to_owned(),
            })
            .inc();
        self.grpc_duration
            .get_or_create(&MethodLabel {
                method: method.to_owned(),
            })
            .observe(took.as_secs_f64());
    }

    /// Replaces the queue sample: `(task_type, status, count)` rows and the
    /// age of the oldest due task per type. Types no longer present drop out.
    pub(crate) fn queue_sampled(
        &self,
        depths: &[(String, String, i64)],
        oldest_due: &[(String, f64)],
    ) {
        self.queue_tasks.clear();
        for (task_type, status, count) in depths {
            self.queue_tasks
                .get_or_create(&QueueLabels {
                    task_type: task_type.clone(),
                    status: status.clone(),
                })
                .set(*count);
        }
        self.queue_oldest_due.clear();
        for (task_type, age) in oldest_due {
            self.queue_oldest_due
                .get_or_create(&Self::of_type(task_type))
                .set(*age);
        }
    }

    /// The node's sessions and their free slots, now.
    pub(crate) fn sessions_now(&self, sessions: usize, free_slots: usize) {
        self.sessions.set(sessions as i64);
        self.session_slots_free.set(free_slots as i64);
    }

    /// The pool's connections and waiters, now.
    pub(crate) fn pool_now(&self, in_use: usize, idle: usize, waiting: usize) {
        self.pool_connections
            .get_or_create(&PoolLabel { state: "in_use" })
            .set(in_use as i64);
        self.pool_connections
            .get_or_create(&PoolLabel { state: "idle" })
            .set(idle as i64);
        self.pool_waiting.set(waiting as i64);
    }

    /// Every metric in the OpenMetrics text format.
    pub(crate) fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Reads the node's own state into the gauges just before a scrape.
pub(crate) type Refresh = Arc<dyn Fn(&Metrics) + Send + Sync>;

/// The content type of the OpenMetrics text format, which Prometheus
/// scrapes natively.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves `GET /metrics` on `listener` until `shutdown` turns true.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    refresh: Refresh,
    mut shutdown: watch::Receiver<bool>,
) {
    use hyper::service::service_fn;
    use hyper::{Method, Response, StatusCode};

    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(err) => {
                // Out of file descriptors, most likely: try again shortly.
                tracing::warn!(error = %err, "metrics listener cannot accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (metrics, refresh) = (metrics.clone(), refresh.clone());
        let service = service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
            let (metrics, refresh) = (metrics.clone(), refresh.clone());
            async move {
                let response = if request.uri().path() != "/metrics" {
                    Response::builder()
                        .status(StatusCode::NOT_FOUND)
                        .body(String::from("not found: metrics are at /metrics\n"))
                } else if request.method() != Method::GET && request.method() != Method::HEAD {
                    Response::builder()
                        .status(StatusCode::METHOD_NOT_ALLOWED)
                        .header(hyper::header::ALLOW, "GET, HEAD")
                        .body(String::new())
                } else {
                    refresh(&metrics);
                    Response::builder()
                        .header(hyper::header::CONTENT_TYPE, CONTENT_TYPE)
                        .body(metrics.render())
                };
                Ok::<_, std::convert::Infallible>(
                    response.expect("a response of valid static parts"),
                )
            }
        });
        tokio::spawn(async move {
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(err) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await
            {
                tracing::debug!(error = %err, "metrics connection ended");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_conventions_and_samples_show() {
        let metrics = Metrics::new();
        metrics.task_created("scan_library");
        metrics.task_failed(
            "scan_library",
            Outcome::Retried,
            Some(Duration::from_millis(20)),
        );
        metrics.grpc_call(
            "/leasehold.v1.TaskService/GetTask",
            tonic::Code::NotFound,
            Duration::from_millis(2),
        );
        metrics.grpc_call("/nope/Nope", tonic::Code::Unimplemented, Duration::ZERO);
        metrics.grpc_call(
            "/leasehold.v1.TaskService/Invented",
            tonic::Code::Unauthenticated,
            Duration::ZERO,
        );
        metrics.queue_sampled(
            &[("scan_library".into(), "pending".into(), 3)],
            &[("scan_library".into(), 1.5)],
        );
        let text = metrics.render();
        for line in [
            "leasehold_tasks_created_total{task_type=\"scan_library\"} 1",
            "leasehold_tasks_failed_total{task_type=\"scan_library\",outcome=\"retried\"} 1",
            "leasehold_grpc_requests_total{method=\"/leasehold.v1.TaskService/GetTask\",code=\"NOT_FOUND\"} 1",
            "leasehold_grpc_requests_total{method=\"unknown\",code=\"UNIMPLEMENTED\"} 1",
            "leasehold_grpc_requests_total{method=\"unknown\",code=\"UNAUTHENTICATED\"} 1",
            "leasehold_queue_tasks{task_type=\"scan_library\",status=\"pending\"} 3",
            "leasehold_queue_oldest_due_age_seconds{task_type=\"scan_library\"} 1.5",
            "# TYPE leasehold_task_run_duration_seconds histogram",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        // A type gone from the queue drops out of the next sample.
        metrics.queue_sampled(&[], &[]);
        assert!(!metrics.render().contains("leasehold_queue_tasks{"));
    }
}
