//! The example workers in `examples/` as users run them: a real worker
//! process on a two-node cluster takes pushed tasks, completes and fails
//! them, stops a cancelled one, keeps a long task's lease while its node
//! drains, and carries on on the other node. On one node with one slot, a
//! failure whose error text is over the server's limit still ends the task
//! and frees the slot, and SIGTERM drains the worker: it gives back the task
//! still running and exits 0. Busy, through a tap that sees what the node
//! receives and sends, a worker gets tasks created together in one `tasks`
//! push and sends outcomes ready together in one `outcomes` message, those
//! re-sent after a reconnect too. Given `https://`, a CA file and a token,
//! they connect over TLS to a node that requires tokens. `.ci/tools.sh` installs what the workers
//! need; without it these tests fail, they never skip.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{get_task, list_sessions, status_of};
use futures_util::Stream;
use leasehold::client::from_struct as struct_to_json;
use leasehold::proto::task_service_client::TaskServiceClient;
use leasehold::proto::worker_service_client::WorkerServiceClient;
use leasehold::proto::worker_service_server::{WorkerService, WorkerServiceServer};
use leasehold::proto::{self, connect_request, connect_response, TaskStatus};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStderr, Command};
use tokio::sync::{mpsc, watch};
use tonic::transport::server::TcpIncoming;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

const TASK_TYPE: &str = "generate_thumbnail";

/// How long anything the tests wait for may take.
const LIMIT: Duration = Duration::from_secs(20);

/// Lease length the workers ask for: much shorter than the long task, so it
/// only survives if the worker heartbeats, across the drain too.
const LEASE_SECONDS: &str = "2";

/// How long the workers' own drain (on SIGTERM) lets running tasks finish.
const DRAIN_SECONDS: u64 = 1;

/// How long a worker may take to exit after its drain timeout: the answer to
/// its releases (the workers wait at most 5 s for them).
const EXIT_AFTER_DRAIN: Duration = Duration::from_secs(5);

#[tokio::test]
async fn python_worker_works_through_a_node_drain() {
    exercise("python", python_worker()).await;
}

#[tokio::test]
async fn node_worker_works_through_a_node_drain() {
    exercise("node", node_worker()).await;
}

#[tokio::test]
async fn python_worker_frees_its_slot_and_drains_on_sigterm() {
    one_slot_then_sigterm("python", python_worker).await;
}

#[tokio::test]
async fn node_worker_frees_its_slot_and_drains_on_sigterm() {
    one_slot_then_sigterm("node", node_worker).await;
}

#[tokio::test]
async fn python_worker_takes_and_sends_batches_when_busy() {
    batches("python", python_worker()).await;
}

#[tokio::test]
async fn node_worker_takes_and_sends_batches_when_busy() {
    batches("node", node_worker()).await;
}

#[tokio::test]
async fn python_worker_connects_over_tls() {
    over_tls("python", python_worker).await;
}

#[tokio::test]
async fn node_worker_connects_over_tls() {
    over_tls("node", node_worker).await;
}

/// On a node serving TLS with `--auth required`, the worker given
/// `https://`, the CA file and a worker token (and, the second time, a bare
/// `host:port` with the CA and the token from LEASEHOLD_TLS_CA and
/// LEASEHOLD_TOKEN) completes a task.
async fn over_tls(language: &'static str, worker: fn() -> Command) {
    let pki = common::pki::Pki::new();
    let server = common::TestServer::start_with(|c| {
        pki.serve_with(c, false);
        c.auth = leasehold::config::Auth::Required;
    })
    .await;
    let addr = server.running.as_ref().unwrap().addr();
    let admin = common::token_on_database(&server.url, "admin");
    let worker_token = common::token_on_database(&server.url, "worker");
    let tls = leasehold::client::Tls::new().ca_pem(pki.ca.pem.clone());
    let client = leasehold::client::Client::connect_with(&format!("https://{addr}"), &tls)
        .await
        .unwrap()
        .with_token(&admin)
        .unwrap();
    let ca = pki.path("ca.pem");
    for (round, server_arg) in [format!("https://{addr}"), addr.to_string()]
        .into_iter()
        .enumerate()
    {
        let worker_id = format!("{language}-tls-{round}");
        let mut worker = worker();
        if round == 0 {
            worker.args(["--tls-ca", ca.to_str().unwrap(), "--token", &worker_token]);
        } else {
            worker
                .env("LEASEHOLD_TLS_CA", &ca)
                .env("LEASEHOLD_TOKEN", &worker_token);
        }
        worker
            .args(["--server", &server_arg, "--worker-id", &worker_id])
            .args(["--task-types", TASK_TYPE, "--slots", "1"]);
        let (mut child, _log) = spawn(language, &mut worker);
        let id = client
            .create(
                leasehold::client::NewTask::new(TASK_TYPE).params(json!({"image": "cover.png"})),
            )
            .await
            .unwrap()
            .task
            .unwrap()
            .id;
        let task = common::eventually(LIMIT, || async {
            let task = client.get(&id).await.unwrap();
            (status_of(&task) == TaskStatus::Completed).then_some(task)
        })
        .await;
        assert_eq!(task.locked_by.as_deref(), Some(worker_id.as_str()));
        child.start_kill().unwrap();
        let _ = child.wait().await;
    }
    server.stop().await;
}

/// `python worker.py` in its folder.
fn python_worker() -> Command {
    let dir = example_dir("python-worker");
    let python = dir.join(".venv/bin/python");
    require(python.is_file(), "examples/python-worker/.venv");
    require(
        dir.join("gen/leasehold/v1/worker_service_pb2_grpc.py")
            .is_file(),
        "the generated stubs in examples/python-worker/gen",
    );
    let mut worker = Command::new(python);
    worker.arg("worker.py").current_dir(&dir);
    worker
}

/// `node worker.js` in its folder.
fn node_worker() -> Command {
    let dir = example_dir("node-worker");
    require(
        dir.join("node_modules/@grpc/grpc-js/package.json")
            .is_file(),
        "examples/node-worker/node_modules",
    );
    // The machine's Node.js, as .ci/tools.sh finds it: on PATH.
    let node = std::process::Command::new("node").arg("--version").output();
    require(
        node.is_ok_and(|out| out.status.success()),
        "Node.js (`node` on PATH)",
    );
    let mut worker = Command::new("node");
    worker.arg("worker.js").current_dir(&dir);
    worker
}

fn example_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(name)
}

fn require(present: bool, what: &str) {
    assert!(present, "{what} is missing: run .ci/tools.sh first");
}

/// The whole scenario for one example worker.
async fn exercise(language: &'static str, mut worker: Command) {
    let mut server = common::TestServer::start().await;
    let node_a = server.running.as_ref().unwrap();
    let node_b = server.another_node().await;
    let (node_a_id, node_b_id) = (node_a.node_id(), node_b.node_id());
    // Producers and checks go through node B, which stays up.
    let channel = common::channel_to(&format!("http://{}", node_b.addr())).await;
    let mut tasks = TaskServiceClient::new(channel.clone());
    let workers = WorkerServiceClient::new(channel);

    let worker_id = format!("{language}-{}", uuid::Uuid::new_v4().simple());
    let servers = format!("{},{}", node_a.addr(), node_b.addr());
    worker
        .args(["--server", &servers, "--worker-id", &worker_id])
        .args(["--task-types", TASK_TYPE, "--slots", "4"])
        .args(["--lease-seconds", LEASE_SECONDS]);
    let (mut child, mut log) = spawn(language, &mut worker);
    log.wait_for(&format!("node={node_a_id}")).await;

    // Pushed tasks complete with the handler's result, and a failure travels
    // with its message.
    let mut thumbnails = Vec::new();
    for i in 0..3 {
        let image = format!("cat-{i}.png");
        let id = create(&mut tasks, json!({"image": image, "sleep_ms": 50})).await;
        thumbnails.push((id, image));
    }
    let broken = create(
        &mut tasks,
        json!({"fail": "unsupported image format", "permanent": true}),
    )
    .await;
    for (id, image) in &thumbnails {
        let task = wait_status(&tasks, id, TaskStatus::Completed).await;
        assert_eq!(
            result_of(&task),
            json!({"thumbnail": format!("thumbs/{image}"), "worker": worker_id})
        );
        assert_eq!(task.locked_by.as_deref(), Some(worker_id.as_str()));
    }
    let task = wait_status(&tasks, &broken, TaskStatus::Failed).await;
    assert_eq!(task.last_error.as_deref(), Some("unsupported image format"));
    assert_eq!(task.attempts, 1, "a permanent failure is not retried");

    // Cancelled while running: the worker stops it and sends nothing for it.
    let doomed = create(&mut tasks, json!({"sleep_ms": 60_000})).await;
    wait_status(&tasks, &doomed, TaskStatus::Processing).await;
    tasks
        .cancel_task(proto::CancelTaskRequest {
            id: doomed.clone(),
            reason: "no longer needed".to_owned(),
        })
        .await
        .unwrap();
    log.wait_for(&format!("task {doomed} stopped")).await;

    // A long task is running when node A drains: it outlives the drain
    // grace, so the worker moves to node B still holding it, re-attaches
    // its lease there and sends the outcome on the new stream.
    let long = create(
        &mut tasks,
        json!({"image": "panorama.png", "sleep_ms": 5_000}),
    )
    .await;
    wait_status(&tasks, &long, TaskStatus::Processing).await;
    server.running.take().unwrap().shutdown().await.unwrap();
    assert_eq!(
        status_of(&get_task(&mut tasks, &long).await),
        TaskStatus::Processing,
        "the long task is still running once node A has stopped"
    );
    log.wait_for("node draining").await;
    log.wait_for(&format!("node={node_b_id}")).await;
    log.wait_for("re-attaching 1 running task").await;

    // Work goes on through node B.
    let after = create(&mut tasks, json!({"image": "dog.png", "sleep_ms": 50})).await;
    let task = wait_status(&tasks, &after, TaskStatus::Completed).await;
    assert_eq!(
        result_of(&task),
        json!({"thumbnail": "thumbs/dog.png", "worker": worker_id})
    );
    let task = wait_status(&tasks, &long, TaskStatus::Completed).await;
    assert_eq!(
        result_of(&task),
        json!({"thumbnail": "thumbs/panorama.png", "worker": worker_id})
    );
    assert_eq!(
        task.attempts, 1,
        "heartbeats kept the lease alive, across the reconnect too"
    );
    let sessions = common::eventually(LIMIT, || {
        let mut workers = workers.clone();
        let worker_id = worker_id.clone();
        async move {
            let sessions: Vec<_> = list_sessions(&mut workers)
                .await
                .into_iter()
                .filter(|s| s.worker_id == worker_id)
                .collect();
            // Node A's rows go when it stops; wait for that.
            (sessions.len() == 1).then_some(sessions)
        }
    })
    .await;
    assert_eq!(sessions[0].node_id, node_b_id.to_string());
    assert_eq!(
        sessions[0].labels.get("language").map(String::as_str),
        Some(language)
    );

    // Nothing was sent for the cancelled task, and it stays cancelled.
    let task = get_task(&mut tasks, &doomed).await;
    assert_eq!(status_of(&task), TaskStatus::Cancelled);
    assert!(
        !log.contains(&format!("task {doomed}: outcome"))
            && !log.contains(&format!("task {doomed} completed")),
        "the worker sent an outcome for the cancelled task"
    );

    child.kill().await.unwrap();
    node_b.shutdown().await.unwrap();
    server.stop().await;
}

/// A bad flag, a task that would wedge a worker's only slot, and SIGTERM
/// while a task runs, on one node.
async fn one_slot_then_sigterm(language: &'static str, worker: fn() -> Command) {
    // A flag the server would refuse is refused at start-up, naming it,
    // rather than retried forever.
    let refused = tokio::time::timeout(
        LIMIT,
        worker()
            .args(["--slots", "0"])
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .expect("the worker exits at once on a bad flag")
    .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--slots"), "{stderr}");

    let server = common::TestServer::start().await;
    let mut tasks = server.tasks().await;
    let worker_id = format!("{language}-{}", uuid::Uuid::new_v4().simple());
    let mut worker = worker();
    worker
        .args([
            "--server",
            server.running.as_ref().unwrap().addr().to_string().as_str(),
        ])
        .args(["--worker-id", &worker_id, "--task-types", TASK_TYPE])
        .args(["--slots", "1", "--lease-seconds", LEASE_SECONDS])
        .args(["--drain-seconds", &DRAIN_SECONDS.to_string()]);
    let (mut child, mut log) = spawn(language, &mut worker);
    log.wait_for("registered on").await;

    // An error text over the server's 65,536 characters: the worker cuts it
    // short, so the failure is recorded and frees the only slot. Were it
    // refused, the lease would be renewed forever and nothing else would run.
    let overlong = create_task(&mut tasks, json!({"fail": "x".repeat(70_000)}), |request| {
        request.max_attempts = 1
    })
    .await
    .id;
    let next = create(&mut tasks, json!({"image": "next.png", "sleep_ms": 50})).await;
    let task = wait_status(&tasks, &overlong, TaskStatus::Failed).await;
    let error = task.last_error.unwrap_or_default();
    assert!(
        error.starts_with("xxxxxxxxxx") && error.chars().count() <= 65_536,
        "the worker's error, cut short, is the last error; got {} characters: {:.100}",
        error.chars().count(),
        error
    );
    assert_eq!(task.attempts, 1);
    let task = wait_status(&tasks, &next, TaskStatus::Completed).await;
    assert_eq!(
        result_of(&task),
        json!({"thumbnail": "thumbs/next.png", "worker": worker_id})
    );

    // SIGTERM while a long task runs: the worker stops taking tasks, gives
    // the task a drain timeout to finish, then gives it back (a release
    // does not use an attempt) and exits 0 once that is acknowledged.
    let created = create_task(&mut tasks, json!({"sleep_ms": 60_000}), |_| {}).await;
    let long = created.id;
    wait_status(&tasks, &long, TaskStatus::Processing).await;
    log.wait_for(&format!("task {long} (")).await;
    let pid = child.id().expect("the worker is running") as libc::pid_t;
    let signalled = Instant::now();
    // SAFETY: `kill` only sends a signal to our own child process.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let drain = Duration::from_secs(DRAIN_SECONDS);
    let status = tokio::time::timeout(drain + EXIT_AFTER_DRAIN, child.wait())
        .await
        .expect("the worker exits after its drain timeout")
        .unwrap();
    assert_eq!(status.code(), Some(0), "the worker exits 0 after draining");
    assert!(
        signalled.elapsed() >= drain,
        "the running task had the drain timeout to finish"
    );
    log.wait_for(&format!("task {long} released")).await;
    let task = get_task(&mut tasks, &long).await;
    assert_eq!(status_of(&task), TaskStatus::Pending, "given back");
    assert_eq!(task.attempts, created.attempts, "a release uses no attempt");
    assert_eq!(task.locked_by, None);

    server.stop().await;
}

/// A busy worker, as the node sees it through a [`Tap`]: tasks created
/// together arrive in one `tasks` push, their outcomes ready together leave
/// in one `outcomes` message answered by one `acks`, and so do outcomes
/// re-sent after a reconnect. Nothing here depends on timing: tasks created
/// in one transaction are claimed by one statement for the free slots (one
/// push), a task that fails at once has its outcome ready before the
/// worker's sending loop runs again, and the outcomes re-sent on a new
/// session are all queued at its registration.
async fn batches(language: &'static str, mut worker: Command) {
    const SLOTS: usize = 5;
    let server = common::TestServer::start().await;
    let mut tasks = server.tasks().await;
    let tap = Tap::start(&server.endpoint()).await;
    let worker_id = format!("{language}-{}", uuid::Uuid::new_v4().simple());
    // The server's default lease (30 s): the withheld outcomes below are
    // still accepted after the reconnect.
    worker
        .args(["--server", &tap.addr.to_string(), "--worker-id", &worker_id])
        .args(["--task-types", TASK_TYPE, "--slots", &SLOTS.to_string()]);
    let (mut child, mut log) = spawn(language, &mut worker);
    log.wait_for("registered on").await;

    // Tasks that fail as soon as they start: one push, one message of
    // fails, one answer.
    let failing = create_together(
        &mut tasks,
        SLOTS,
        |i| json!({"fail": format!("corrupt image {i}"), "permanent": true}),
    )
    .await;
    for (i, id) in failing.iter().enumerate() {
        let task = wait_status(&tasks, id, TaskStatus::Failed).await;
        let error = format!("corrupt image {i}");
        assert_eq!(task.last_error.as_deref(), Some(error.as_str()));
        assert_eq!(task.attempts, 1);
        // Its answer has passed the tap.
        log.wait_for(&format!("task {id} failed")).await;
    }
    let seen = tap.take();
    assert_eq!(seen.pushes(), [("tasks", SLOTS)], "{seen:#?}");
    assert_eq!(seen.outcomes(), [("outcomes", SLOTS)], "{seen:#?}");
    assert_eq!(seen.acks(), [("acks", SLOTS)], "{seen:#?}");

    // The tap withholds the outcomes of the next tasks, however they are
    // sent, then breaks the stream, as a cut just after they left the
    // worker would. The worker reconnects, through the tap again, and sends
    // them all again in one message.
    tap.withhold(SLOTS);
    let sleeping = create_together(
        &mut tasks,
        SLOTS,
        |i| json!({"image": format!("cat-{i}.png"), "sleep_ms": 50}),
    )
    .await;
    for (i, id) in sleeping.iter().enumerate() {
        let task = wait_status(&tasks, id, TaskStatus::Completed).await;
        assert_eq!(
            result_of(&task),
            json!({"thumbnail": format!("thumbs/cat-{i}.png"), "worker": worker_id})
        );
        assert_eq!(task.attempts, 1, "the lease outlived the cut");
        log.wait_for(&format!("task {id} completed")).await;
    }
    let seen = tap.take();
    assert_eq!(seen.pushes(), [("tasks", SLOTS)], "{seen:#?}");
    let registers = seen
        .from_worker
        .iter()
        .filter(|(kind, _)| *kind == "register");
    assert_eq!(registers.count(), 1, "one reconnect: {seen:#?}");
    let resent = seen.since_register();
    assert_eq!(resent.outcomes(), [("outcomes", SLOTS)], "{seen:#?}");
    assert_eq!(resent.acks(), [("acks", SLOTS)], "{seen:#?}");

    child.kill().await.unwrap();
    server.stop().await;
}

/// Creates `n` tasks in one CreateTasks call (one transaction), the params
/// of the i-th from `params(i)`; returns their ids in that order.
async fn create_together(
    tasks: &mut TaskServiceClient<Channel>,
    n: usize,
    params: impl Fn(usize) -> serde_json::Value,
) -> Vec<String> {
    let batch = (0..n)
        .map(|i| proto::CreateTaskRequest {
            params: Some(common::json(params(i))),
            ..common::new_task(TASK_TYPE)
        })
        .collect();
    common::create_batch(tasks, batch).await
}

/// The session messages that went through a [`Tap`], each as its kind (the
/// proto field) and how many tasks, outcomes or acks it carries (1 for the
/// single forms).
#[derive(Debug, Default)]
struct Seen {
    from_worker: Vec<(&'static str, usize)>,
    from_node: Vec<(&'static str, usize)>,
}

impl Seen {
    /// The pushes of tasks, single and batched.
    fn pushes(&self) -> Vec<(&'static str, usize)> {
        only(&self.from_node, &["task", "tasks"])
    }

    /// The worker's outcome messages, single and batched.
    fn outcomes(&self) -> Vec<(&'static str, usize)> {
        only(
            &self.from_worker,
            &["complete", "fail", "release", "outcomes"],
        )
    }

    /// The answers to outcomes, single and batched.
    fn acks(&self) -> Vec<(&'static str, usize)> {
        only(&self.from_node, &["ack", "acks"])
    }

    /// What went through on the latest session: from its `register` and
    /// its `registered` on.
    fn since_register(&self) -> Seen {
        let from = |messages: &[(&'static str, usize)], first: &str| {
            let start = messages.iter().rposition(|(kind, _)| *kind == first);
            messages[start.unwrap_or(0)..].to_vec()
        };
        Seen {
            from_worker: from(&self.from_worker, "register"),
            from_node: from(&self.from_node, "registered"),
        }
    }
}

/// The messages of `kinds`, in order.
fn only(messages: &[(&'static str, usize)], kinds: &[&str]) -> Vec<(&'static str, usize)> {
    messages
        .iter()
        .filter(|(kind, _)| kinds.contains(kind))
        .copied()
        .collect()
}

/// Stands between a worker and a node on `Connect` and notes each session
/// message as the node receives or sends it: the node logs nothing per
/// message, so this is where a test sees which forms a worker uses. Asked
/// to, it withholds a number of outcomes and then breaks the worker's
/// stream.
struct Tap {
    addr: SocketAddr,
    state: Arc<Mutex<TapState>>,
}

#[derive(Default)]
struct TapState {
    seen: Seen,
    /// Outcomes still to withhold before breaking the stream; 0 forwards
    /// everything.
    withhold: usize,
}

/// What the tap does with a message from the worker.
enum Pass {
    Forward,
    Withhold,
    /// Withhold it and break the stream.
    Cut,
}

impl TapState {
    /// Notes a message from the worker; says what to do with it.
    fn note_from_worker(&mut self, message: &proto::ConnectRequest) -> Pass {
        let (kind, outcomes) = worker_kind(message);
        self.seen.from_worker.push((kind, outcomes));
        let outcome = matches!(kind, "complete" | "fail" | "release" | "outcomes");
        if !outcome || self.withhold == 0 {
            return Pass::Forward;
        }
        self.withhold = self.withhold.saturating_sub(outcomes);
        if self.withhold == 0 {
            Pass::Cut
        } else {
            Pass::Withhold
        }
    }
}

impl Tap {
    /// Listens on 127.0.0.1:0 and forwards sessions to `endpoint`.
    async fn start(endpoint: &str) -> Tap {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(TapState::default()));
        let service = TapService {
            node: WorkerServiceClient::new(common::channel_to(endpoint).await),
            state: state.clone(),
        };
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(WorkerServiceServer::new(service))
                .serve_with_incoming(TcpIncoming::from(listener)),
        );
        Tap { addr, state }
    }

    /// What went through since the last call.
    fn take(&self) -> Seen {
        std::mem::take(&mut self.state.lock().unwrap().seen)
    }

    /// Withholds the next `outcomes` outcomes, then breaks the stream.
    fn withhold(&self, outcomes: usize) {
        self.state.lock().unwrap().withhold = outcomes;
    }
}

#[derive(Clone)]
struct TapService {
    node: WorkerServiceClient<Channel>,
    state: Arc<Mutex<TapState>>,
}

type ConnectStream = Pin<Box<dyn Stream<Item = Result<proto::ConnectResponse, Status>> + Send>>;

#[tonic::async_trait]
impl WorkerService for TapService {
    type ConnectStream = ConnectStream;

    async fn connect(
        &self,
        request: Request<Streaming<proto::ConnectRequest>>,
    ) -> Result<Response<ConnectStream>, Status> {
        let mut from_worker = request.into_inner();
        let (to_node, node_rx) = mpsc::channel(1024);
        // The node answers the call only once it has read `register`.
        let Some(register) = from_worker.message().await? else {
            return Err(Status::cancelled("the worker sent nothing"));
        };
        self.state.lock().unwrap().note_from_worker(&register);
        to_node.send(register).await.unwrap();
        let mut from_node = self
            .node
            .clone()
            .connect(channel_stream(node_rx))
            .await?
            .into_inner();
        let (to_worker, worker_rx) = mpsc::channel(1024);
        let state = self.state.clone();
        // One task per session carries both ways; when it ends, both
        // streams end (the worker's with the node's status).
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    message = from_worker.message() => {
                        let Ok(Some(message)) = message else { return };
                        let pass = state.lock().unwrap().note_from_worker(&message);
                        match pass {
                            Pass::Forward => {
                                if to_node.send(message).await.is_err() {
                                    return;
                                }
                            }
                            Pass::Withhold => {}
                            Pass::Cut => {
                                let cut = Status::unavailable("cut by the tap");
                                let _ = to_worker.send(Err(cut)).await;
                                return;
                            }
                        }
                    }
                    message = from_node.message() => {
                        let message = match message {
                            Ok(Some(message)) => message,
                            Ok(None) => return,
                            Err(status) => {
                                let _ = to_worker.send(Err(status)).await;
                                return;
                            }
                        };
                        state.lock().unwrap().seen.from_node.push(node_kind(&message));
                        if to_worker.send(Ok(message)).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(channel_stream(worker_rx))))
    }

    // The workers use only `Connect`.

    async fn acquire_tasks(
        &self,
        _request: Request<proto::AcquireTasksRequest>,
    ) -> Result<Response<proto::AcquireTasksResponse>, Status> {
        Err(Status::unimplemented("the tap forwards only Connect"))
    }

    async fn heartbeat(
        &self,
        _request: Request<proto::HeartbeatRequest>,
    ) -> Result<Response<proto::HeartbeatResponse>, Status> {
        Err(Status::unimplemented("the tap forwards only Connect"))
    }

    async fn complete_task(
        &self,
        _request: Request<proto::CompleteTaskRequest>,
    ) -> Result<Response<proto::CompleteTaskResponse>, Status> {
        Err(Status::unimplemented("the tap forwards only Connect"))
    }

    async fn fail_task(
        &self,
        _request: Request<proto::FailTaskRequest>,
    ) -> Result<Response<proto::FailTaskResponse>, Status> {
        Err(Status::unimplemented("the tap forwards only Connect"))
    }

    async fn release_task(
        &self,
        _request: Request<proto::ReleaseTaskRequest>,
    ) -> Result<Response<proto::ReleaseTaskResponse>, Status> {
        Err(Status::unimplemented("the tap forwards only Connect"))
    }

    async fn list_workers(
        &self,
        _request: Request<proto::ListWorkersRequest>,
    ) -> Result<Response<proto::ListWorkersResponse>, Status> {
        Err(Status::unimplemented("the tap forwards only Connect"))
    }
}

/// What a channel receives, as a stream.
fn channel_stream<T: Send + 'static>(rx: mpsc::Receiver<T>) -> impl Stream<Item = T> + Send {
    futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
}

/// A worker's message as its kind and how many outcomes it carries.
fn worker_kind(message: &proto::ConnectRequest) -> (&'static str, usize) {
    use connect_request::Kind;
    match &message.kind {
        Some(Kind::Register(_)) => ("register", 1),
        Some(Kind::Heartbeat(_)) => ("heartbeat", 1),
        Some(Kind::Complete(_)) => ("complete", 1),
        Some(Kind::Fail(_)) => ("fail", 1),
        Some(Kind::Release(_)) => ("release", 1),
        Some(Kind::Progress(_)) => ("progress", 1),
        Some(Kind::Drain(_)) => ("drain", 1),
        Some(Kind::Outcomes(batch)) => ("outcomes", batch.outcomes.len()),
        None => ("none", 0),
    }
}

/// A node's message as its kind and how many tasks or acks it carries.
fn node_kind(message: &proto::ConnectResponse) -> (&'static str, usize) {
    use connect_response::Kind;
    match &message.kind {
        Some(Kind::Registered(_)) => ("registered", 1),
        Some(Kind::Task(_)) => ("task", 1),
        Some(Kind::Tasks(batch)) => ("tasks", batch.tasks.len()),
        Some(Kind::HeartbeatAck(_)) => ("heartbeat_ack", 1),
        Some(Kind::Ack(_)) => ("ack", 1),
        Some(Kind::Acks(batch)) => ("acks", batch.acks.len()),
        Some(Kind::Cancel(_)) => ("cancel", 1),
        Some(Kind::Drain(_)) => ("drain", 1),
        None => ("none", 0),
    }
}

/// Starts the worker, killed when dropped, its log captured.
fn spawn(language: &'static str, worker: &mut Command) -> (Child, WorkerLog) {
    let mut child = worker
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|err| {
            panic!("cannot start the {language} worker ({err}): run .ci/tools.sh first")
        });
    let log = WorkerLog::capture(child.stderr.take().unwrap(), language);
    (child, log)
}

async fn create(tasks: &mut TaskServiceClient<Channel>, params: serde_json::Value) -> String {
    create_task(tasks, params, |_| {}).await.id
}

/// Creates a task with `params`, after `tweak` adjusts the request; returns
/// it as created (before any worker leases it).
async fn create_task(
    tasks: &mut TaskServiceClient<Channel>,
    params: serde_json::Value,
    tweak: impl FnOnce(&mut proto::CreateTaskRequest),
) -> proto::Task {
    let mut request = common::new_task(TASK_TYPE);
    request.params = Some(common::json(params));
    tweak(&mut request);
    tasks
        .create_task(request)
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap()
}

/// Polls the task until it is in `status`.
async fn wait_status(
    tasks: &TaskServiceClient<Channel>,
    id: &str,
    status: TaskStatus,
) -> proto::Task {
    common::eventually(LIMIT, || {
        let mut tasks = tasks.clone();
        async move {
            let task = get_task(&mut tasks, id).await;
            (status_of(&task) == status).then_some(task)
        }
    })
    .await
}

fn result_of(task: &proto::Task) -> serde_json::Value {
    struct_to_json(task.result.as_ref().expect("a completed task has a result")).unwrap()
}

/// The worker's log lines (it logs to stderr), echoed into the test output
/// so that a failure shows them.
struct WorkerLog(watch::Receiver<Vec<String>>);

impl WorkerLog {
    fn capture(stderr: ChildStderr, language: &'static str) -> Self {
        let (tx, rx) = watch::channel(Vec::new());
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("[{language} worker] {line}");
                tx.send_modify(|all| all.push(line));
            }
        });
        Self(rx)
    }

    fn contains(&self, needle: &str) -> bool {
        self.0.borrow().iter().any(|line| line.contains(needle))
    }

    /// Waits until a line contains `needle`; fails if the worker exits first.
    async fn wait_for(&mut self, needle: &str) {
        let found = self
            .0
            .wait_for(|lines| lines.iter().any(|line| line.contains(needle)));
        match tokio::time::timeout(LIMIT, found).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => panic!("the worker exited before logging `{needle}`"),
            Err(_) => panic!("the worker did not log `{needle}` within {LIMIT:?}"),
        }
    }
}
