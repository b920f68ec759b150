//! The Rust `Worker` (`leasehold::client::Worker`) against real servers:
//! completing tasks, cancellation tokens, panicking handlers, drain on
//! shutdown, and reconnecting to another node after a SIGKILL without
//! running any task twice.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::cluster::{Cluster, PATIENCE};
use common::{eventually, TestServer};
use leasehold::client::{Client, NewTask, Shutdown, TaskError, Worker};
use leasehold::proto::TaskStatus;
use serde_json::json;
use tokio::sync::{mpsc, watch};

/// Longest wait for a message from a handler.
const WAIT: Duration = Duration::from_secs(15);

fn status(task: &leasehold::proto::Task) -> TaskStatus {
    TaskStatus::try_from(task.status).unwrap_or(TaskStatus::Unspecified)
}

/// Waits until the task `id` reaches `want`, and returns it.
async fn reaches(client: &Client, id: &str, want: TaskStatus) -> leasehold::proto::Task {
    eventually(PATIENCE, || async {
        let task = client.get(id).await.unwrap();
        (status(&task) == want).then_some(task)
    })
    .await
}

async fn create(client: &Client, task: NewTask) -> String {
    client.create(task).await.unwrap().task.unwrap().id
}

/// A worker running in the background.
struct Running {
    shutdown: Shutdown,
    handle: tokio::task::JoinHandle<Result<(), leasehold::client::Error>>,
}

impl Running {
    fn spawn(worker: Worker) -> Self {
        Running {
            shutdown: worker.shutdown_handle(),
            handle: tokio::spawn(worker.run()),
        }
    }

    /// Waits until the worker has stopped by itself (after a shutdown).
    async fn stopped(self) {
        tokio::time::timeout(WAIT, self.handle)
            .await
            .expect("the worker stops")
            .expect("the worker does not panic")
            .expect("the worker stops without an error");
    }

    /// Shuts the worker down and waits until it has drained.
    async fn stop(self) {
        self.shutdown.shutdown();
        self.stopped().await;
    }
}

async fn recv<T>(rx: &mut mpsc::UnboundedReceiver<T>, what: &str) -> T {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .unwrap_or_else(|| panic!("channel closed waiting for {what}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_completes_tasks_with_their_results_and_progress() {
    let server = TestServer::start().await;
    let client = Client::connect(&server.endpoint()).await.unwrap();
    // Book 0 reports progress and waits until the test has seen it.
    let (gate_tx, gate) = watch::channel(false);
    let worker = Worker::builder("thumbnailer")
        .server(server.endpoint())
        .slots(4)
        .handler("generate_thumbnail", move |task| {
            let mut gate = gate.clone();
            async move {
                let book = task.params()["book"].as_i64().unwrap_or(-1);
                if book == 0 {
                    task.progress(1, 2, "rendering");
                    gate.wait_for(|open| *open).await?;
                }
                Ok(json!({ "thumbnail": format!("{book}.webp"), "attempt": task.attempt() }))
            }
        })
        // A plain value is stored under "value".
        .handler("count_pages", |_task| async { Ok(json!(42)) })
        .build()
        .unwrap();
    let running = Running::spawn(worker);

    let mut ids = Vec::new();
    for book in 0..12 {
        let task = NewTask::new("generate_thumbnail").params(json!({ "book": book }));
        ids.push((book, create(&client, task).await));
    }
    let pages = create(&client, NewTask::new("count_pages")).await;

    let progress = eventually(PATIENCE, || async {
        client.get(&ids[0].1).await.unwrap().progress
    })
    .await;
    assert_eq!((progress.current, progress.total), (1, 2));
    assert_eq!(progress.message, "rendering");
    gate_tx.send(true).unwrap();

    for (book, id) in &ids {
        let task = reaches(&client, id, TaskStatus::Completed).await;
        let result = leasehold::client::from_struct(task.result.as_ref().unwrap()).unwrap();
        assert_eq!(
            result,
            json!({ "thumbnail": format!("{book}.webp"), "attempt": 1 })
        );
        assert_eq!(task.locked_by.as_deref(), Some("thumbnailer"));
        assert_eq!(task.attempts, 1);
    }
    let task = reaches(&client, &pages, TaskStatus::Completed).await;
    let result = leasehold::client::from_struct(task.result.as_ref().unwrap()).unwrap();
    assert_eq!(result, json!({ "value": 42 }));

    running.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_task_fires_its_handlers_token() {
    let server = TestServer::start().await;
    let client = Client::connect(&server.endpoint()).await.unwrap();
    let (events, mut rx) = mpsc::unbounded_channel::<(String, &'static str)>();
    let worker = Worker::builder("cancellable")
        .server(server.endpoint())
        // The last task waits for its token: the drain cancels it.
        .drain_timeout(Duration::from_millis(500))
        .handler("scan_library", move |task| {
            let events = events.clone();
            async move {
                let _ = events.send((task.id().to_owned(), "started"));
                task.cancelled().await;
                let _ = events.send((task.id().to_owned(), "cancelled"));
                // Whatever a cancelled handler returns is dropped.
                Ok(json!({ "should": "never be stored" }))
            }
        })
        .build()
        .unwrap();
    let running = Running::spawn(worker);

    let id = create(&client, NewTask::new("scan_library")).await;
    assert_eq!(
        recv(&mut rx, "the handler to start").await,
        (id.clone(), "started")
    );
    client
        .cancel(&id, "operator changed their mind")
        .await
        .unwrap();
    assert_eq!(
        recv(&mut rx, "the token to fire").await,
        (id.clone(), "cancelled")
    );

    // The slot is free again: the next task runs on the same one-slot worker.
    let next = create(&client, NewTask::new("scan_library")).await;
    assert_eq!(
        recv(&mut rx, "the next task").await,
        (next.clone(), "started")
    );
    let task = client.get(&id).await.unwrap();
    assert_eq!(status(&task), TaskStatus::Cancelled);
    assert!(
        task.result.is_none(),
        "a cancelled handler's result is not sent"
    );

    running.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_fails_the_attempt_and_the_worker_goes_on() {
    let server = TestServer::start().await;
    let client = Client::connect(&server.endpoint()).await.unwrap();
    let worker = Worker::builder("fragile")
        .server(server.endpoint())
        .handler("parse_archive", |task| async move {
            match task.params()["mode"].as_str() {
                Some("panic") => panic!("corrupt archive {}", task.id()),
                Some("refuse") => Err(TaskError::permanent("params.path: not a cbz file")),
                Some("later") => Err(TaskError::retry_after(
                    "archive locked",
                    Duration::from_secs(3600),
                )),
                _ => Ok(json!({ "pages": 24 })),
            }
        })
        .build()
        .unwrap();
    let running = Running::spawn(worker);

    let panics = create(
        &client,
        NewTask::new("parse_archive")
            .params(json!({ "mode": "panic" }))
            .max_attempts(1),
    )
    .await;
    let failed = reaches(&client, &panics, TaskStatus::Failed).await;
    assert_eq!(
        failed.last_error.as_deref(),
        Some(format!("handler panicked: corrupt archive {panics}").as_str())
    );

    let refused = create(
        &client,
        NewTask::new("parse_archive").params(json!({ "mode": "refuse" })),
    )
    .await;
    let task = reaches(&client, &refused, TaskStatus::Failed).await;
    assert_eq!(task.attempts, 1, "permanent: no retry");
    assert_eq!(
        task.last_error.as_deref(),
        Some("params.path: not a cbz file")
    );

    let later = create(
        &client,
        NewTask::new("parse_archive").params(json!({ "mode": "later" })),
    )
    .await;
    let task = eventually(PATIENCE, || async {
        let task = client.get(&later).await.unwrap();
        (status(&task) == TaskStatus::Pending && task.attempts == 1).then_some(task)
    })
    .await;
    let scheduled = task.scheduled_for.unwrap();
    let created = task.created_at.unwrap();
    assert!(
        scheduled.seconds - created.seconds >= 3500,
        "retry_after pushed the retry an hour out: {scheduled:?} vs {created:?}"
    );

    // The worker is still alive after the panic.
    let fine = create(&client, NewTask::new("parse_archive")).await;
    reaches(&client, &fine, TaskStatus::Completed).await;

    running.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_finishes_in_flight_tasks_and_releases_the_rest() {
    let server = TestServer::start().await;
    let client = Client::connect(&server.endpoint()).await.unwrap();
    let (events, mut rx) = mpsc::unbounded_channel::<(String, &'static str)>();
    let worker = Worker::builder("drainer")
        .server(server.endpoint())
        .slots(2)
        .drain_timeout(Duration::from_millis(1500))
        .handler("export_series", move |task| {
            let events = events.clone();
            async move {
                let _ = events.send((task.id().to_owned(), "started"));
                if task.params()["stuck"] == json!(true) {
                    task.cancelled().await;
                    let _ = events.send((task.id().to_owned(), "cancelled"));
                    return Err(TaskError::retry("stopped"));
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                Ok(json!({ "exported": true }))
            }
        })
        .build()
        .unwrap();
    let running = Running::spawn(worker);

    let quick = create(&client, NewTask::new("export_series")).await;
    let stuck = create(
        &client,
        NewTask::new("export_series").params(json!({ "stuck": true })),
    )
    .await;
    let mut started = vec![
        recv(&mut rx, "a start").await.0,
        recv(&mut rx, "a start").await.0,
    ];
    started.sort();
    let mut both = vec![quick.clone(), stuck.clone()];
    both.sort();
    assert_eq!(started, both);

    running.shutdown.shutdown();
    // A task created during the drain is not taken (never started, below).
    let late = create(&client, NewTask::new("export_series")).await;
    assert_eq!(
        recv(&mut rx, "the stuck handler's token").await,
        (stuck.clone(), "cancelled")
    );
    // It stops after its drain timeout.
    running.stopped().await;
    while let Ok((id, _)) = rx.try_recv() {
        assert_ne!(id, late, "a task created during the drain was started");
    }

    let task = client.get(&quick).await.unwrap();
    assert_eq!(
        status(&task),
        TaskStatus::Completed,
        "in-flight work finished"
    );
    let task = client.get(&stuck).await.unwrap();
    assert_eq!(status(&task), TaskStatus::Pending, "released, not failed");
    assert_eq!(task.attempts, 0, "a release does not use an attempt");
    let task = client.get(&late).await.unwrap();
    assert_eq!(status(&task), TaskStatus::Pending);
    assert_eq!(task.attempts, 0);
    server.stop().await;
}

/// The worker holds three leases on node A when A is SIGKILLed. It
/// reconnects to B, re-attaches the leases by heartbeat and completes each
/// task exactly once, in its first attempt, although the leases are short
/// enough to expire during the test if they were not renewed on B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_node_is_killed_reconnects_and_completes_held_tasks_once() {
    let mut cluster = Cluster::start(&[("a", &[]), ("b", &[])]);
    let (a, b) = (cluster.endpoint(0), cluster.endpoint(1));
    let client_b = Client::connect(&b).await.unwrap();

    let runs: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let (started_tx, mut started) = mpsc::unbounded_channel::<String>();
    let (gate_tx, gate) = watch::channel(false);
    let worker = Worker::builder("survivor")
        .servers([a.clone(), b.clone()])
        .slots(3)
        .lease_duration(Duration::from_secs(3))
        .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(500))
        .handler("index_book", {
            let runs = runs.clone();
            move |task| {
                let runs = runs.clone();
                let started = started_tx.clone();
                let mut gate = gate.clone();
                async move {
                    *runs
                        .lock()
                        .unwrap()
                        .entry(task.id().to_owned())
                        .or_default() += 1;
                    let _ = started.send(task.id().to_owned());
                    gate.wait_for(|open| *open)
                        .await
                        .map_err(|e| TaskError::retry(e.to_string()))?;
                    Ok(json!({ "indexed": task.id() }))
                }
            }
        })
        .build()
        .unwrap();
    let running = Running::spawn(worker);

    // The worker registers on A (first in its list) before any task exists.
    let client_a = Client::connect(&a).await.unwrap();
    let first_node = eventually(PATIENCE, || async {
        let sessions = client_a.workers().await.unwrap();
        sessions
            .into_iter()
            .find(|s| s.worker_id == "survivor")
            .map(|s| s.node_id)
    })
    .await;
    let mut ids = Vec::new();
    for n in 0..3 {
        let task = NewTask::new("index_book").params(json!({ "n": n }));
        ids.push(create(&client_a, task).await);
    }
    for _ in 0..3 {
        recv(&mut started, "a task to start").await;
    }

    cluster.signal(0, "KILL");
    cluster.exited(0).await;

    // The worker is back, on B: a session on another node than the first
    // (A's own session stays listed until A's row is seen as dead).
    eventually(PATIENCE, || async {
        let sessions = client_b.workers().await.unwrap_or_default();
        sessions
            .iter()
            .any(|s| s.worker_id == "survivor" && s.node_id != first_node)
            .then_some(())
    })
    .await;
    // Longer than the 3 s lease: only heartbeats on B keep the tasks ours.
    tokio::time::sleep(Duration::from_secs(4)).await;
    gate_tx.send(true).unwrap();

    for id in &ids {
        let task = reaches(&client_b, id, TaskStatus::Completed).await;
        assert_eq!(task.attempts, 1, "task {id} ran in its first attempt only");
        let result = leasehold::client::from_struct(task.result.as_ref().unwrap()).unwrap();
        assert_eq!(result, json!({ "indexed": id }));
    }
    let runs = runs.lock().unwrap().clone();
    assert_eq!(runs.len(), 3);
    assert!(
        runs.values().all(|&n| n == 1),
        "each handler ran once: {runs:?}"
    );

    running.stop().await;
}

/// A handler may cancel its own token (a drop guard stopping its helpers):
/// that is not a cancel of the task, and its result still counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_cancelling_its_own_token_still_completes_its_task() {
    let server = TestServer::start().await;
    let client = Client::connect(&server.endpoint()).await.unwrap();
    let worker = Worker::builder("self-cancelling")
        .server(server.endpoint())
        .handler("scan_library", |task| async move {
            let _guard = task.cancellation().clone().drop_guard();
            task.cancellation().cancel();
            Ok(json!({ "scanned": true }))
        })
        .build()
        .unwrap();
    let running = Running::spawn(worker);

    for _ in 0..2 {
        let id = create(&client, NewTask::new("scan_library")).await;
        reaches(&client, &id, TaskStatus::Completed).await;
    }

    running.stop().await;
    server.stop().await;
}

/// A result over the server's payload limit is refused; the worker fails
/// the task for good with the server's reason instead of letting its lease
/// run out and the task run again to the same end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_the_server_refuses_fails_the_task_with_the_reason() {
    let server = TestServer::start_with(|config| config.max_payload_bytes = 1024).await;
    let client = Client::connect(&server.endpoint()).await.unwrap();
    let worker = Worker::builder("verbose")
        .server(server.endpoint())
        .handler("scan_library", |_task| async move {
            Ok(json!({ "log": "x".repeat(4096) }))
        })
        .build()
        .unwrap();
    let running = Running::spawn(worker);

    let id = create(&client, NewTask::new("scan_library")).await;
    let task = reaches(&client, &id, TaskStatus::Failed).await;
    assert_eq!(task.attempts, 1);
    let error = task.last_error.unwrap_or_default();
    assert!(
        error.starts_with("the server refused the result: result"),
        "{error}"
    );

    running.stop().await;
    server.stop().await;
}

/// A handler that panics before it even returns its future, and one whose
/// error carries terminal colour codes (control characters the server
/// refuses): both attempts are recorded as failed, and the one-slot worker
/// goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_panics_and_control_characters_still_fail_the_attempt() {
    let server = TestServer::start().await;
    let client = Client::connect(&server.endpoint()).await.unwrap();
    let worker = Worker::builder("careless")
        .server(server.endpoint())
        .handler("parse_archive", |task| {
            // Outside the async block: runs when the handler is called.
            let mode = task.params()["mode"]
                .as_str()
                .expect("params.mode")
                .to_owned();
            async move {
                if mode == "colour" {
                    return Err(TaskError::permanent("\u{1b}[31mcorrupt page 3\u{1b}[0m"));
                }
                Ok(json!({ "mode": mode }))
            }
        })
        .build()
        .unwrap();
    let running = Running::spawn(worker);

    let early = create(&client, NewTask::new("parse_archive").max_attempts(1)).await;
    let task = reaches(&client, &early, TaskStatus::Failed).await;
    assert_eq!(task.attempts, 1);
    assert_eq!(
        task.last_error.as_deref(),
        Some("handler panicked: params.mode")
    );

    let coloured = create(
        &client,
        NewTask::new("parse_archive").params(json!({ "mode": "colour" })),
    )
    .await;
    let task = reaches(&client, &coloured, TaskStatus::Failed).await;
    assert_eq!(task.attempts, 1, "permanent, recorded at the first attempt");
    assert_eq!(
        task.last_error.as_deref(),
        Some("\u{fffd}[31mcorrupt page 3\u{fffd}[0m")
    );

    let fine = create(
        &client,
        NewTask::new("parse_archive").params(json!({ "mode": "plain" })),
    )
    .await;
    reaches(&client, &fine, TaskStatus::Completed).await;

    running.stop().await;
    server.stop().await;
}

/// With one slot, a task pushed while a cancelled handler is still winding
/// down waits for it: never two handlers at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_waits_for_a_cancelled_handler_that_still_runs() {
    let server = TestServer::start().await;
    let client = Client::connect(&server.endpoint()).await.unwrap();
    let (events, mut rx) = mpsc::unbounded_channel::<(String, &'static str)>();
    let worker = Worker::builder("one-at-a-time")
        .server(server.endpoint())
        .handler("scan_library", move |task| {
            let events = events.clone();
            async move {
                let _ = events.send((task.id().to_owned(), "started"));
                task.cancelled().await;
                // Winding down takes a while after the cancel.
                tokio::time::sleep(Duration::from_millis(800)).await;
                let _ = events.send((task.id().to_owned(), "returned"));
                Ok(json!({}))
            }
        })
        .drain_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let running = Running::spawn(worker);

    let first = create(&client, NewTask::new("scan_library")).await;
    assert_eq!(
        recv(&mut rx, "the first start").await,
        (first.clone(), "started")
    );
    client.cancel(&first, "changed my mind").await.unwrap();
    let second = create(&client, NewTask::new("scan_library")).await;
    // The server may push the second task at once; the worker starts it
    // only after the first handler has returned.
    assert_eq!(recv(&mut rx, "the first return").await, (first, "returned"));
    assert_eq!(
        recv(&mut rx, "the second start").await,
        (second.clone(), "started")
    );
    let task = client.get(&second).await.unwrap();
    assert_eq!(status(&task), TaskStatus::Processing);
    assert_eq!(task.attempts, 1);

    running.stop().await;
    server.stop().await;
}
