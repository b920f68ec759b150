//! The server keeps serving across a database restart: while Postgres is
//! down calls fail fast with UNAVAILABLE and health says NOT_SERVING; once
//! it is back, calls succeed again (leases granted before the outage still
//! count), long polls are woken again, and health says SERVING.
//!
//! The test runs its own Postgres cluster (initdb in a temporary folder, on a
//! free port) so that it can stop and start it without touching the shared
//! one.

mod common;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use leasehold::config::Config;
use leasehold::proto;
use leasehold::proto::task_service_client::TaskServiceClient;
use leasehold::proto::worker_service_client::WorkerServiceClient;
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// The server's database timeout in this test.
const DB_TIMEOUT: Duration = Duration::from_secs(2);
/// gRPC deadline sent with every call.
const CALL_DEADLINE: Duration = Duration::from_secs(5);
/// Hard limit on any single call, client side, in case the deadline is
/// ignored.
const CALL_LIMIT: Duration = Duration::from_secs(8);
/// Leases granted in this test: long enough to outlive the outage.
const LEASE: Duration = Duration::from_secs(600);
/// How long recovery (or noticing the outage) may take.
const RECOVERY_LIMIT: Duration = Duration::from_secs(30);

/// A private Postgres cluster, stopped and deleted on drop.
struct Cluster {
    bindir: PathBuf,
    dir: PathBuf,
    port: u16,
    as_postgres: bool,
}

impl Cluster {
    /// Creates and starts a cluster on a free port.
    fn create() -> Self {
        let bindir = postgres_bindir();
        // initdb and pg_ctl refuse to run as root: run them as `postgres`.
        let as_postgres = is_root();
        // Under /tmp, which the `postgres` user can reach (TMPDIR may not be).
        let dir = Path::new("/tmp").join(format!(
            "leasehold-restart-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir(&dir).expect("creating the cluster folder");
        let cluster = Self {
            bindir,
            dir,
            port: free_port(),
            as_postgres,
        };
        if as_postgres {
            run(Command::new("chown")
                .arg("postgres:postgres")
                .arg(&cluster.dir));
        }
        run(cluster
            .tool("initdb")
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"])
            .arg("-D")
            .arg(cluster.data()));
        cluster.start();
        cluster
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// A command running `program` of the Postgres bindir, as `postgres`
    /// when we are root.
    fn tool(&self, program: &str) -> Command {
        let program = self.bindir.join(program);
        let mut command = if self.as_postgres {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(program);
            command
        } else {
            Command::new(program)
        };
        // A folder the `postgres` user can enter (it may not enter ours).
        command.current_dir(&self.dir);
        command
    }

    fn pg_ctl(&self, args: &[&str]) -> Command {
        let mut command = self.tool("pg_ctl");
        command.arg("-D").arg(self.data()).args(args);
        command
    }

    /// Starts the cluster and waits until it accepts connections.
    fn start(&self) {
        let options = format!(
            "-k {} -p {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.dir.display(),
            self.port
        );
        run(self
            .pg_ctl(&["-w", "-t", "60", "-o", &options, "-l"])
            .arg(self.dir.join("postgres.log"))
            .arg("start"));
    }

    /// Stops the cluster (fast: connections are terminated at once).
    fn stop(&self) {
        run(&mut self.pg_ctl(&["-w", "-t", "60", "-m", "fast", "stop"]));
    }

    fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.data().join("postmaster.pid").exists() {
            let _ = self
                .pg_ctl(&["-w", "-t", "30", "-m", "immediate", "stop"])
                .output();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn postgres_bindir() -> PathBuf {
    let from_pg_config = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
    let candidates = from_pg_config
        .into_iter()
        .chain([PathBuf::from("/usr/lib/postgresql/15/bin")]);
    for dir in candidates {
        if dir.join("initdb").is_file() && dir.join("pg_ctl").is_file() {
            return dir;
        }
    }
    panic!(
        "initdb and pg_ctl not found via `pg_config --bindir` nor in /usr/lib/postgresql/15/bin"
    );
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    // /proc/self belongs to the effective user of this process.
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs `command`, failing the test with its output if it fails.
fn run(command: &mut Command) {
    let out = command
        .output()
        .unwrap_or_else(|err| panic!("cannot run {command:?}: {err}"));
    assert!(
        out.status.success(),
        "{command:?} failed ({})\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs a blocking cluster operation off the async workers.
async fn blocking(f: impl FnOnce() + Send + 'static) {
    tokio::task::spawn_blocking(f).await.unwrap();
}

/// `message` as a request with a gRPC deadline.
fn request<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(CALL_DEADLINE);
    request
}

/// Awaits a call, failing the test if it takes longer than `CALL_LIMIT`.
async fn bounded<T>(
    what: &str,
    call: impl Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    match tokio::time::timeout(CALL_LIMIT, call).await {
        Ok(result) => result,
        Err(_) => panic!("{what} hung: no answer within {CALL_LIMIT:?}"),
    }
}

/// Asserts that a call made while the database is down fails with
/// UNAVAILABLE, well before its deadline.
async fn assert_unavailable<T: std::fmt::Debug>(
    what: &str,
    call: impl Future<Output = Result<T, Status>>,
) {
    let started = Instant::now();
    let result = bounded(what, call).await;
    let elapsed = started.elapsed();
    match result {
        Err(status) if status.code() == Code::Unavailable => {}
        other => panic!("{what} with the database down: expected UNAVAILABLE, got {other:?}"),
    }
    assert!(
        elapsed < DB_TIMEOUT + Duration::from_secs(1),
        "{what} took {elapsed:?} to fail; the database timeout is {DB_TIMEOUT:?}"
    );
}

/// Retries `call` while it fails with UNAVAILABLE, until `RECOVERY_LIMIT`.
/// Any other error fails the test.
async fn until_available<T, F, Fut>(what: &str, mut call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    let deadline = Instant::now() + RECOVERY_LIMIT;
    loop {
        match bounded(what, call()).await {
            Ok(value) => return value,
            Err(status) if status.code() == Code::Unavailable => {
                assert!(
                    Instant::now() < deadline,
                    "{what} still UNAVAILABLE {RECOVERY_LIMIT:?} after the database came back: {status:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(status) => panic!("{what} after the database came back: {status:?}"),
        }
    }
}

/// Polls the health service (for `service`) until it reports `want`.
async fn wait_for_health(
    health: &mut HealthClient<tonic::transport::Channel>,
    service: &str,
    want: ServingStatus,
) {
    let deadline = Instant::now() + RECOVERY_LIMIT;
    loop {
        let answer = bounded(
            "Health/Check",
            health.check(request(HealthCheckRequest {
                service: service.to_owned(),
            })),
        )
        .await
        .expect("the health service answers whatever the database does")
        .into_inner();
        let got = ServingStatus::try_from(answer.status).unwrap();
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "health of {service:?} still {got:?} after {RECOVERY_LIMIT:?}, expected {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// CreateTask of a `task_type` task, which must succeed in time.
async fn create(tasks: &mut TaskServiceClient<Channel>, task_type: &str) -> proto::Task {
    bounded(
        "CreateTask",
        tasks.create_task(request(new_task(task_type))),
    )
    .await
    .unwrap_or_else(|status| panic!("CreateTask of {task_type}: {status:?}"))
    .into_inner()
    .task
    .unwrap()
}

/// AcquireTasks for w1 of `task_type` with a `LEASE` lease, which must
/// succeed in time and hand out exactly one task.
async fn lease_one(
    workers: &mut WorkerServiceClient<Channel>,
    task_type: &str,
) -> proto::LeasedTask {
    let mut leased = bounded(
        "AcquireTasks",
        workers.acquire_tasks(request(proto::AcquireTasksRequest {
            lease_duration: Some(duration(LEASE)),
            ..acquire("w1", &[task_type], 1)
        })),
    )
    .await
    .unwrap_or_else(|status| panic!("AcquireTasks of {task_type}: {status:?}"))
    .into_inner()
    .tasks;
    assert_eq!(leased.len(), 1, "one {task_type} task handed out");
    leased.remove(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn server_keeps_serving_across_a_database_restart() {
    let cluster = std::sync::Arc::new(tokio::task::spawn_blocking(Cluster::create).await.unwrap());

    common::init_logging();
    let mut config = Config::with_database_url(cluster.url("leasehold"));
    config.db_timeout = DB_TIMEOUT;
    config.db_pool_size = 4;
    // Long, so that a long poll returning early proves a wake-up, not the
    // safety poll.
    config.poll_interval = Duration::from_secs(60);
    let mut server = TestServer::start_config(config, "leasehold".into()).await;
    let channel = server.channel().await;
    let mut tasks = TaskServiceClient::new(channel.clone());
    let mut workers = WorkerServiceClient::new(channel.clone());
    let mut health = HealthClient::new(channel);

    // Before: a task leased to w1 (for long enough to outlive the outage).
    let before = create(&mut tasks, "before_restart").await;
    let leased = lease_one(&mut workers, "before_restart").await;
    let lease = leased.lease.unwrap();
    assert_eq!(lease.task_id, before.id);
    wait_for_health(&mut health, "", ServingStatus::Serving).await;

    // Outage.
    let c = cluster.clone();
    blocking(move || c.stop()).await;

    assert_unavailable(
        "GetTask",
        tasks.get_task(request(proto::GetTaskRequest {
            id: before.id.clone(),
        })),
    )
    .await;
    assert_unavailable(
        "CreateTask",
        tasks.create_task(request(new_task("during_outage"))),
    )
    .await;
    assert_unavailable(
        "AcquireTasks (long poll)",
        workers.acquire_tasks(request(proto::AcquireTasksRequest {
            wait: Some(duration(Duration::from_secs(3))),
            ..acquire("w2", &[], 1)
        })),
    )
    .await;
    assert_unavailable(
        "Heartbeat",
        workers.heartbeat(request(proto::HeartbeatRequest {
            worker_id: "w1".into(),
            leases: vec![proto::LeaseRenewal {
                task_id: lease.task_id.clone(),
                lease_token: lease.lease_token.clone(),
            }],
            lease_duration: Some(duration(LEASE)),
        })),
    )
    .await;
    assert_unavailable(
        "CompleteTask",
        workers.complete_task(request(proto::CompleteTaskRequest {
            task_id: lease.task_id.clone(),
            lease_token: lease.lease_token.clone(),
            result: None,
        })),
    )
    .await;
    wait_for_health(&mut health, "", ServingStatus::NotServing).await;
    wait_for_health(
        &mut health,
        "leasehold.v1.WorkerService",
        ServingStatus::NotServing,
    )
    .await;
    // Still failing fast after a while (no connection attempts piling up).
    assert_unavailable(
        "GetTask, later",
        tasks.get_task(request(proto::GetTaskRequest {
            id: before.id.clone(),
        })),
    )
    .await;

    // Recovery.
    let c = cluster.clone();
    blocking(move || c.start()).await;

    // The lease granted before the outage still completes with its token.
    let completed = until_available("CompleteTask", || {
        let mut workers = workers.clone();
        let complete = proto::CompleteTaskRequest {
            task_id: lease.task_id.clone(),
            lease_token: lease.lease_token.clone(),
            result: Some(json(serde_json::json!({"ok": true}))),
        };
        async move { workers.complete_task(request(complete)).await }
    })
    .await
    .into_inner()
    .task
    .unwrap();
    assert_eq!(completed.id, before.id);
    assert_eq!(status_of(&completed), proto::TaskStatus::Completed);
    assert_eq!(
        completed.result,
        Some(json(serde_json::json!({"ok": true})))
    );

    // New work flows again: the task created after recovery is handed out.
    let after = create(&mut tasks, "after_restart").await;
    let leased = lease_one(&mut workers, "after_restart").await;
    assert_eq!(leased.task.as_ref().unwrap().id, after.id);

    wait_for_health(&mut health, "", ServingStatus::Serving).await;
    wait_for_health(
        &mut health,
        "leasehold.v1.TaskService",
        ServingStatus::Serving,
    )
    .await;

    // Long polls are woken again by tasks that appear in the database (here
    // inserted behind the server's back, so only the LISTEN connection, which
    // had to reconnect, can tell it), well before the 60 s safety poll.
    let wait = Duration::from_secs(20);
    let mut poller = workers.clone();
    let long_poll = tokio::spawn(async move {
        let started = Instant::now();
        let answer = poller
            .acquire_tasks(proto::AcquireTasksRequest {
                wait: Some(duration(wait)),
                ..acquire("w3", &["notified"], 1)
            })
            .await;
        (answer, started.elapsed())
    });
    // Give the poll a moment to be waiting (not needed for correctness: an
    // insert that comes first is simply claimed at once).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sql = common::connect_sql(&cluster.url("leasehold")).await;
    sql.execute(
        "INSERT INTO task (id, task_type) VALUES (gen_random_uuid(), 'notified')",
        &[],
    )
    .await
    .unwrap();
    let (answer, elapsed) = tokio::time::timeout(wait + CALL_LIMIT, long_poll)
        .await
        .expect("the long poll returns")
        .unwrap();
    let got = answer.expect("AcquireTasks long poll").into_inner().tasks;
    assert_eq!(got.len(), 1, "the long poll gets the inserted task");
    assert!(
        elapsed < Duration::from_secs(10),
        "the long poll was woken only after {elapsed:?}: notifications did not resume"
    );

    server.running.take().unwrap().shutdown().await.unwrap();
    drop(sql);
    // The cluster (and its folder) goes with the last reference.
    drop(cluster);
}
