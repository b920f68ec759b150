//! Shared test harness: a real server on 127.0.0.1:0 over its own fresh
//! database, generated clients, and direct SQL access for asserting rows.
#![allow(dead_code)]

pub mod cluster;
pub mod pki;

use std::time::Duration;

use leasehold::config::Config;
use leasehold::proto;
use leasehold::proto::task_service_client::TaskServiceClient;
use leasehold::proto::worker_service_client::WorkerServiceClient;
use leasehold::server::Running;
use tonic::transport::Channel;

/// Logs go through the test harness's capture, shown only for failures.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// Where the tests find Postgres; the machine's default unless overridden.
pub fn admin_url() -> String {
    std::env::var("LEASEHOLD_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned())
}

/// A fresh database name; CI drops leftovers by this prefix.
pub fn fresh_database_url() -> (String, String) {
    let name = format!("leasehold_test_{}", uuid::Uuid::new_v4().simple());
    (format!("{}/{name}", admin_url()), name)
}

/// A server over its own database.
pub struct TestServer {
    pub running: Option<Running>,
    pub url: String,
    pub db_name: String,
    pub config: Config,
}

impl TestServer {
    /// Starts a server with the default configuration (smaller pool).
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Starts a server after `tweak` adjusts the configuration.
    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Self {
        init_logging();
        let (url, db_name) = fresh_database_url();
        let mut config = Config::with_database_url(&url);
        config.db_pool_size = 8;
        // Sessions still open when a test stops its server hold leases;
        // their drain need not wait long.
        config.drain_grace = Duration::from_secs(1);
        tweak(&mut config);
        Self::start_config(config, db_name).await
    }

    /// Starts a server with exactly `config` (its database named `db_name`).
    pub async fn start_config(config: Config, db_name: String) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let running = leasehold::server::start(config.clone(), listener)
            .await
            .expect("server starts");
        Self {
            running: Some(running),
            url: config.database_url.clone(),
            db_name,
            config,
        }
    }

    /// A second node on the same database.
    pub async fn another_node(&self) -> Running {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        leasehold::server::start(self.config.clone(), listener)
            .await
            .expect("second node starts")
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.running.as_ref().unwrap().addr())
    }

    pub async fn channel(&self) -> Channel {
        channel_to(&self.endpoint()).await
    }

    pub async fn tasks(&self) -> TaskServiceClient<Channel> {
        TaskServiceClient::new(self.channel().await)
    }

    pub async fn workers(&self) -> WorkerServiceClient<Channel> {
        WorkerServiceClient::new(self.channel().await)
    }

    /// A direct connection to the test database.
    pub async fn sql(&self) -> tokio_postgres::Client {
        connect_sql(&self.url).await
    }

    /// Number of rows in the task table.
    pub async fn task_count(&self) -> i64 {
        self.sql()
            .await
            .query_one("SELECT count(*) FROM task_all", &[])
            .await
            .unwrap()
            .get(0)
    }

    /// Creates `n` tasks of `task_type` in one call; returns their ids.
    pub async fn create_many(&self, task_type: &str, n: usize) -> Vec<String> {
        let batch = (0..n).map(|_| new_task(task_type)).collect();
        create_batch(&mut self.tasks().await, batch).await
    }

    /// Stops the server and drops its database.
    pub async fn stop(mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown().await.unwrap();
        }
        drop_database(&self.db_name).await;
    }
}

/// `leasehold token create --role ROLE --database-url URL`: a token made on
/// the database itself, with no server involved (how the first admin token
/// of an install is made); returns its secret.
pub fn token_on_database(database_url: &str, role: &str) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_leasehold"))
        .args([
            "token",
            "create",
            "--role",
            role,
            "--database-url",
            database_url,
        ])
        .args(["--description", "made by a test", "--json"])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(line["role"], role);
    line["secret"].as_str().unwrap().to_owned()
}

/// A connected channel to `endpoint` (`http://host:port`).
pub async fn channel_to(endpoint: &str) -> Channel {
    Channel::from_shared(endpoint.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// A direct connection to the database at `url`, its connection task
/// spawned.
pub async fn connect_sql(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
}

/// Drops a test database, disconnecting whatever is still attached.
pub async fn drop_database(name: &str) {
    connect_sql(&format!("{}/postgres", admin_url()))
        .await
        .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .await
        .unwrap();
}

/// A `CreateTaskRequest` of `task_type` with everything else default.
pub fn new_task(task_type: &str) -> proto::CreateTaskRequest {
    proto::CreateTaskRequest {
        task_type: task_type.to_owned(),
        ..Default::default()
    }
}

/// Creates `batch` in one CreateTasks call; returns the ids in request order.
pub async fn create_batch(
    tasks: &mut TaskServiceClient<Channel>,
    batch: Vec<proto::CreateTaskRequest>,
) -> Vec<String> {
    tasks
        .create_tasks(proto::CreateTasksRequest { tasks: batch })
        .await
        .unwrap()
        .into_inner()
        .results
        .into_iter()
        .map(|r| r.task.unwrap().id)
        .collect()
}

/// GetTask: the task `id`, which must exist.
pub async fn get_task(tasks: &mut TaskServiceClient<Channel>, id: &str) -> proto::Task {
    tasks
        .get_task(proto::GetTaskRequest { id: id.to_owned() })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap()
}

/// FailTask, which must succeed: the task after it.
pub async fn fail_task(
    workers: &mut WorkerServiceClient<Channel>,
    request: proto::FailTaskRequest,
) -> proto::Task {
    workers
        .fail_task(request)
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap()
}

/// AcquireTasks, which must succeed: the tasks it leased.
pub async fn acquire_tasks(
    workers: &mut WorkerServiceClient<Channel>,
    request: proto::AcquireTasksRequest,
) -> Vec<proto::LeasedTask> {
    workers
        .acquire_tasks(request)
        .await
        .unwrap()
        .into_inner()
        .tasks
}

/// ListWorkers, which must succeed: the sessions listed.
pub async fn list_sessions(
    workers: &mut WorkerServiceClient<Channel>,
) -> Vec<proto::WorkerSession> {
    workers
        .list_workers(proto::ListWorkersRequest {})
        .await
        .unwrap()
        .into_inner()
        .sessions
}

/// An `AcquireTasksRequest` for `worker_id`.
pub fn acquire(worker_id: &str, task_types: &[&str], max_tasks: i32) -> proto::AcquireTasksRequest {
    proto::AcquireTasksRequest {
        worker_id: worker_id.to_owned(),
        task_types: task_types.iter().map(|s| s.to_string()).collect(),
        max_tasks,
        ..Default::default()
    }
}

/// A protobuf duration.
pub fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// A JSON object as a `Struct`.
pub fn json(value: serde_json::Value) -> prost_types::Struct {
    leasehold::client::to_struct(&value)
}

/// Polls `check` until it yields `Some`, failing the test after `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Shortcut: a task's status as the enum.
pub fn status_of(task: &proto::Task) -> proto::TaskStatus {
    proto::TaskStatus::try_from(task.status).unwrap()
}

/// A worker session over a real `Connect` stream, driven by the test.
pub struct Session {
    tx: tokio::sync::mpsc::Sender<proto::ConnectRequest>,
    rx: tonic::Streaming<proto::ConnectResponse>,
    pub registered: proto::SessionRegistered,
}

/// A `RegisterWorker` for `worker_id` with `slots`, taking `task_types`.
pub fn register(worker_id: &str, task_types: &[&str], slots: i32) -> proto::RegisterWorker {
    proto::RegisterWorker {
        worker_id: worker_id.to_owned(),
        task_types: task_types.iter().map(|s| s.to_string()).collect(),
        slots,
        ..Default::default()
    }
}

impl Session {
    /// Opens a session on `endpoint` and registers; fails with the server's
    /// status if it refuses.
    pub async fn open(
        endpoint: &str,
        register: proto::RegisterWorker,
    ) -> Result<Session, tonic::Status> {
        Self::open_with_first(endpoint, proto::connect_request::Kind::Register(register)).await
    }

    /// Opens a session the server must accept; fails the test naming the
    /// worker, the endpoint and the status otherwise.
    pub async fn connect(endpoint: &str, register: proto::RegisterWorker) -> Session {
        let worker = register.worker_id.clone();
        Self::open(endpoint, register)
            .await
            .unwrap_or_else(|status| panic!("{worker} cannot register on {endpoint}: {status:?}"))
    }

    /// Opens a stream whose first message is `first` (for protocol tests).
    pub async fn open_with_first(
        endpoint: &str,
        first: proto::connect_request::Kind,
    ) -> Result<Session, tonic::Status> {
        Self::over(channel_to(endpoint).await, first).await
    }

    /// Opens a stream over `channel` whose first message is `first`, with
    /// `bearer`'s token.
    pub async fn over_intercepted(
        channel: Channel,
        bearer: leasehold::client::Bearer,
        first: proto::connect_request::Kind,
    ) -> Result<Session, tonic::Status> {
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        tx.send(proto::ConnectRequest { kind: Some(first) })
            .await
            .unwrap();
        let outbound = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        let mut client = WorkerServiceClient::with_interceptor(channel, bearer);
        let mut rx = client.connect(outbound).await?.into_inner();
        let registered = match rx.message().await?.and_then(|m| m.kind) {
            Some(proto::connect_response::Kind::Registered(r)) => r,
            other => panic!("expected registered, got {other:?}"),
        };
        Ok(Session { tx, rx, registered })
    }

    /// Opens a stream over `channel` (TLS, say) whose first message is
    /// `first`.
    pub async fn over(
        channel: Channel,
        first: proto::connect_request::Kind,
    ) -> Result<Session, tonic::Status> {
        Self::over_intercepted(channel, leasehold::client::Bearer::default(), first).await
    }

    /// Sends one message.
    pub async fn send(&self, kind: proto::connect_request::Kind) {
        self.tx
            .send(proto::ConnectRequest { kind: Some(kind) })
            .await
            .expect("session stream open");
    }

    /// The next message from the server; fails the test after 10 s.
    /// `Err` is the status that ended the stream; `Ok(None)` a clean end.
    pub async fn next(&mut self) -> Result<Option<proto::connect_response::Kind>, tonic::Status> {
        match tokio::time::timeout(Duration::from_secs(10), self.rx.message()).await {
            Ok(Ok(Some(message))) => Ok(message.kind),
            Ok(Ok(None)) => Ok(None),
            Ok(Err(status)) => Err(status),
            Err(_) => panic!("no message from the server within 10 s"),
        }
    }

    /// The next message, or `None` if none arrives within `wait`.
    pub async fn next_within(&mut self, wait: Duration) -> Option<proto::connect_response::Kind> {
        match tokio::time::timeout(wait, self.rx.message()).await {
            Ok(Ok(Some(message))) => message.kind,
            Ok(_) => panic!("stream ended"),
            Err(_) => None,
        }
    }

    /// The next message, which must be a pushed task.
    pub async fn next_task(&mut self) -> proto::LeasedTask {
        match self.next().await {
            Ok(Some(proto::connect_response::Kind::Task(task))) => task,
            other => panic!("expected a task, got {other:?}"),
        }
    }

    /// The next message, which must be an outcome acknowledgement.
    pub async fn next_ack(&mut self) -> proto::OutcomeAck {
        match self.next().await {
            Ok(Some(proto::connect_response::Kind::Ack(ack))) => ack,
            other => panic!("expected an ack, got {other:?}"),
        }
    }

    /// Sends `complete` for a leased task.
    pub async fn complete(&self, leased: &proto::LeasedTask, result: serde_json::Value) {
        let lease = leased.lease.as_ref().unwrap();
        self.send(proto::connect_request::Kind::Complete(
            proto::CompleteTaskRequest {
                task_id: lease.task_id.clone(),
                lease_token: lease.lease_token.clone(),
                result: Some(json(result)),
            },
        ))
        .await;
    }

    /// Reports progress on a leased task.
    pub async fn progress(
        &self,
        leased: &proto::LeasedTask,
        current: i64,
        total: i64,
        message: &str,
    ) {
        let lease = leased.lease.as_ref().unwrap();
        self.send(proto::connect_request::Kind::Progress(
            proto::ReportProgress {
                task_id: lease.task_id.clone(),
                lease_token: lease.lease_token.clone(),
                current,
                total,
                message: message.to_owned(),
            },
        ))
        .await;
    }

    /// Closes the worker's side of the stream and drops it.
    pub fn close(self) {}
}
