//! A real cluster: three `leasehold serve` processes on one database, with
//! worker sessions on each, over loopback. Tasks created on one node reach
//! workers on the others, a cancel reaches the worker holding the task on
//! whichever node it is connected to, ListWorkers sees every node's sessions,
//! SIGTERM drains a node's sessions (they finish their work and move on), and
//! SIGKILL loses nothing: every task is completed exactly once.
//!
//! Each node's log goes to a file under the temp directory; it is printed
//! when a test fails and removed when it passes.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::ExitStatusExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::cluster::{Cluster, PATIENCE};
use common::{eventually, get_task, list_sessions, new_task, register, Session};
use futures_util::FutureExt;
use leasehold::proto::task_service_client::TaskServiceClient;
use leasehold::proto::worker_service_client::WorkerServiceClient;
use leasehold::proto::{self, connect_request, connect_response};
use serde_json::json;
use tonic::transport::Channel;

const A: usize = 0;
const B: usize = 1;
const C: usize = 2;

/// Every task of the cluster, in creation order, with the worker named in
/// its result.
async fn task_rows(cluster: &Cluster) -> Vec<TaskRow> {
    cluster
        .sql()
        .await
        .query(
            "SELECT id::text, task_type, status, attempts, locked_by, result->>'worker' \
             FROM task_all ORDER BY seq",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| TaskRow {
            id: row.get(0),
            task_type: row.get(1),
            status: row.get(2),
            attempts: row.get(3),
            locked_by: row.get(4),
            completed_by: row.get(5),
        })
        .collect()
}

#[derive(Debug, Clone)]
struct TaskRow {
    id: String,
    task_type: String,
    status: String,
    attempts: i32,
    locked_by: Option<String>,
    completed_by: Option<String>,
}

// ---------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------

async fn tasks(endpoint: &str) -> TaskServiceClient<Channel> {
    TaskServiceClient::new(common::channel_to(endpoint).await)
}

async fn workers(endpoint: &str) -> WorkerServiceClient<Channel> {
    WorkerServiceClient::new(common::channel_to(endpoint).await)
}

/// Creates `n` tasks of `task_type` in one CreateTasks call on `endpoint`;
/// returns their ids.
async fn create(endpoint: &str, task_type: &str, n: usize) -> Vec<String> {
    let batch = (0..n)
        .map(|i| proto::CreateTaskRequest {
            params: Some(common::json(json!({ "i": i }))),
            ..new_task(task_type)
        })
        .collect();
    common::create_batch(&mut tasks(endpoint).await, batch).await
}

fn task_id(leased: &proto::LeasedTask) -> String {
    leased.lease.as_ref().unwrap().task_id.clone()
}

/// Asserts an OK acknowledgement of a `complete` of `task_id`.
fn assert_completed(ack: &proto::OutcomeAck, task_id: &str) {
    assert_eq!(ack.task_id, task_id, "{ack:?}");
    assert_eq!(ack.kind(), proto::OutcomeKind::Complete, "{ack:?}");
    assert_eq!(ack.status(), proto::AckStatus::Ok, "{ack:?}");
    let task = ack.task.as_ref().expect("an OK ack carries the task");
    assert_eq!(common::status_of(task), proto::TaskStatus::Completed);
}

// ---------------------------------------------------------------------------
// Worker loop
// ---------------------------------------------------------------------------

/// What the worker loops saw, shared by all of them.
#[derive(Debug, Default)]
struct Log {
    /// `(worker, node id)` of every session opened, in order.
    sessions: Vec<(String, String)>,
    /// Tasks pushed: `(worker, node id, task id, attempt)`.
    received: Vec<(String, String, String, i32)>,
    /// Acknowledgements: `(worker, node id, ack)`.
    acks: Vec<(String, String, proto::OutcomeAck)>,
    /// `(worker, node id)` of every drain notice.
    drains: Vec<(String, String)>,
    /// How each session ended: `(worker, node id, Ok(()) for a clean end or
    /// the status)`.
    ends: Vec<(String, String, Result<(), String>)>,
    /// Panics or errors of the loops themselves.
    failures: Vec<String>,
}

type Ledger = Arc<Mutex<Log>>;

impl Log {
    /// Task ids with an OK `complete` acknowledgement, and how many each got.
    fn completed(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for (_, _, ack) in &self.acks {
            if ack.kind() == proto::OutcomeKind::Complete && ack.status() == proto::AckStatus::Ok {
                *counts.entry(ack.task_id.clone()).or_insert(0) += 1;
            }
        }
        counts
    }
}

/// A worker process, simulated: a tokio task that opens a session on the
/// first endpoint, completes every task it is given, heartbeats every second,
/// and records everything in the ledger. When its stream ends (cleanly after
/// a drain, or broken) it reconnects to the next endpoint (staying on the
/// last one). On `drain` it stops heartbeating and waits for the server to
/// end the stream, so the acks of its last completions still arrive.
struct Worker {
    handle: tokio::task::JoinHandle<()>,
}

impl Worker {
    fn spawn(
        worker_id: &str,
        task_types: &[&str],
        slots: i32,
        endpoints: Vec<String>,
        ledger: Ledger,
    ) -> Self {
        let worker_id = worker_id.to_owned();
        let register = register(&worker_id, task_types, slots);
        let failures = ledger.clone();
        let name = worker_id.clone();
        let run = std::panic::AssertUnwindSafe(work(register, endpoints, ledger));
        let handle = tokio::spawn(async move {
            if let Err(panic) = run.catch_unwind().await {
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                failures
                    .lock()
                    .unwrap()
                    .failures
                    .push(format!("{name} panicked: {message}"));
            }
        });
        Worker { handle }
    }

    /// Stops the worker (it is a simulated process: it just vanishes).
    fn stop(self) {
        self.handle.abort();
    }
}

async fn work(register: proto::RegisterWorker, endpoints: Vec<String>, ledger: Ledger) {
    let worker_id = register.worker_id.clone();
    let mut next = 0;
    loop {
        let endpoint = &endpoints[next.min(endpoints.len() - 1)];
        next += 1;
        let mut session = match Session::open(endpoint, register.clone()).await {
            Ok(session) => session,
            Err(status) if next < endpoints.len() => {
                ledger.lock().unwrap().ends.push((
                    worker_id.clone(),
                    String::new(),
                    Err(format!("refused by {endpoint}: {status:?}")),
                ));
                continue;
            }
            Err(status) => panic!("{worker_id} cannot register on {endpoint}: {status:?}"),
        };
        let node = session.registered.node_id.clone();
        ledger
            .lock()
            .unwrap()
            .sessions
            .push((worker_id.clone(), node.clone()));
        let mut beat = tokio::time::interval(Duration::from_secs(1));
        let mut draining = false;
        let end = loop {
            tokio::select! {
                biased;
                message = session.next() => match message {
                    Ok(Some(connect_response::Kind::Task(leased))) => {
                        let lease = leased.lease.clone().unwrap();
                        ledger.lock().unwrap().received.push((
                            worker_id.clone(),
                            node.clone(),
                            lease.task_id,
                            lease.attempt,
                        ));
                        session.complete(&leased, json!({ "worker": worker_id })).await;
                    }
                    Ok(Some(connect_response::Kind::Ack(ack))) => {
                        ledger.lock().unwrap().acks.push((worker_id.clone(), node.clone(), ack));
                    }
                    Ok(Some(connect_response::Kind::Drain(_))) => {
                        draining = true;
                        ledger.lock().unwrap().drains.push((worker_id.clone(), node.clone()));
                    }
                    // Heartbeat answers; cancels cannot happen here (every
                    // task is completed at once).
                    Ok(Some(_)) => {}
                    Ok(None) => break Ok(()),
                    Err(status) => break Err(format!("{status:?}")),
                },
                _ = beat.tick(), if !draining => {
                    session
                        .send(connect_request::Kind::Heartbeat(proto::SessionHeartbeat::default()))
                        .await;
                }
            }
        };
        ledger
            .lock()
            .unwrap()
            .ends
            .push((worker_id.clone(), node.clone(), end));
    }
}

/// Waits until `check` holds over the ledger, failing at once if a worker
/// loop failed.
async fn until(ledger: &Ledger, what: &str, check: impl Fn(&Log) -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        {
            let log = ledger.lock().unwrap();
            assert!(log.failures.is_empty(), "worker failed: {:?}", log.failures);
            if check(&log) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: not within {PATIENCE:?}; ledger: {log:#?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// Sessions on each of three nodes; ListWorkers on every node lists all
/// three; tasks created on one node are pushed to workers on the others; a
/// cancel on node A reaches the worker holding the task on node C.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tasks_cancels_and_sessions_span_the_nodes() {
    let cluster = Cluster::start(&[("a", &[]), ("b", &[]), ("c", &[])]);
    let (a, b, c) = (
        cluster.endpoint(A),
        cluster.endpoint(B),
        cluster.endpoint(C),
    );

    let mut wa = Session::connect(&a, register("worker-a", &["local"], 1)).await;
    let mut wb = Session::connect(&b, register("worker-b", &["spread"], 1)).await;
    let mut wc = Session::connect(&c, register("worker-c", &["spread", "pinned"], 1)).await;
    let expected: BTreeMap<String, (String, String)> = [
        ("worker-a", &wa.registered),
        ("worker-b", &wb.registered),
        ("worker-c", &wc.registered),
    ]
    .into_iter()
    .map(|(w, r)| (w.to_owned(), (r.node_id.clone(), r.session_id.clone())))
    .collect();
    let nodes: BTreeSet<&String> = expected.values().map(|(node, _)| node).collect();
    assert_eq!(nodes.len(), 3, "three nodes, three node ids: {expected:?}");

    // ListWorkers on any node lists the sessions of all three.
    for endpoint in [&a, &b, &c] {
        let client = workers(endpoint).await;
        let listed = eventually(PATIENCE, || {
            let mut client = client.clone();
            async move {
                let sessions = list_sessions(&mut client).await;
                (sessions.len() == 3).then_some(sessions)
            }
        })
        .await;
        let got: BTreeMap<String, (String, String)> = listed
            .iter()
            .map(|s| {
                (
                    s.worker_id.clone(),
                    (s.node_id.clone(), s.session_id.clone()),
                )
            })
            .collect();
        assert_eq!(got, expected, "ListWorkers on {endpoint}");
        let c_row = listed.iter().find(|s| s.worker_id == "worker-c").unwrap();
        assert_eq!(c_row.task_types, ["pinned", "spread"]);
        assert_eq!(c_row.slots, 1);
        assert!(listed.iter().all(|s| !s.draining));
    }

    // Two tasks created on A; only B's and C's sessions take them, one slot
    // each, so each gets one.
    let spread = create(&a, "spread", 2).await;
    let tb = wb.next_task().await;
    let tc = wc.next_task().await;
    assert_eq!(
        BTreeSet::from([task_id(&tb), task_id(&tc)]),
        spread.iter().cloned().collect::<BTreeSet<_>>()
    );
    assert_eq!(tb.lease.as_ref().unwrap().worker_id, "worker-b");
    assert_eq!(tc.lease.as_ref().unwrap().worker_id, "worker-c");
    wb.complete(&tb, json!({ "worker": "worker-b" })).await;
    wc.complete(&tc, json!({ "worker": "worker-c" })).await;
    assert_completed(&wb.next_ack().await, &task_id(&tb));
    assert_completed(&wc.next_ack().await, &task_id(&tc));

    // And the other way round: created on C, pushed to the worker on A.
    let local = create(&c, "local", 1).await;
    let ta = wa.next_task().await;
    assert_eq!(task_id(&ta), local[0]);
    wa.complete(&ta, json!({ "worker": "worker-a" })).await;
    assert_completed(&wa.next_ack().await, &local[0]);

    // A task held by the worker on C, cancelled on A: C's session is told.
    let pinned = create(&a, "pinned", 1).await;
    let held = wc.next_task().await;
    assert_eq!(task_id(&held), pinned[0]);
    let cancelled = tasks(&a)
        .await
        .cancel_task(proto::CancelTaskRequest {
            id: pinned[0].clone(),
            reason: "operator says stop".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(common::status_of(&cancelled), proto::TaskStatus::Cancelled);
    match wc.next().await {
        Ok(Some(connect_response::Kind::Cancel(cancel))) => {
            assert_eq!(cancel.task_id, pinned[0]);
            assert_eq!(cancel.reason(), proto::CancelReason::Cancelled);
        }
        other => panic!("expected cancel of {}, got {other:?}", pinned[0]),
    }
    // A late completion is refused as cancelled.
    wc.complete(&held, json!({ "worker": "worker-c" })).await;
    let ack = wc.next_ack().await;
    assert_eq!(ack.task_id, pinned[0]);
    assert_eq!(ack.status(), proto::AckStatus::Cancelled, "{ack:?}");

    // The database agrees, whichever node is asked.
    let rows = task_rows(&cluster).await;
    assert_eq!(rows.len(), 4);
    for row in &rows {
        if row.id == pinned[0] {
            assert_eq!(row.status, "cancelled", "{row:?}");
            continue;
        }
        assert_eq!(row.status, "completed", "{row:?}");
        assert_eq!(row.attempts, 1, "{row:?}");
        assert_eq!(row.locked_by, row.completed_by, "{row:?}");
    }
    let by: BTreeMap<&str, &str> = rows
        .iter()
        .map(|r| (r.id.as_str(), r.locked_by.as_deref().unwrap()))
        .collect();
    assert_eq!(by[task_id(&tb).as_str()], "worker-b");
    assert_eq!(by[task_id(&tc).as_str()], "worker-c");
    assert_eq!(by[local[0].as_str()], "worker-a");
    for endpoint in [&a, &b, &c] {
        let task = get_task(&mut tasks(endpoint).await, &pinned[0]).await;
        assert_eq!(common::status_of(&task), proto::TaskStatus::Cancelled);
    }
    drop((wa, wb, wc));
}

/// SIGTERM on node B: its sessions get `drain`, the worker still completes
/// the task it holds, its stream ends with OK, the process exits 0, and the
/// worker finishes the remaining tasks on node C.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_sessions_and_workers_finish_elsewhere() {
    let mut cluster = Cluster::start(&[("a", &[]), ("b", &[]), ("c", &[])]);
    let (a, b, c) = (
        cluster.endpoint(A),
        cluster.endpoint(B),
        cluster.endpoint(C),
    );
    let ledger = Ledger::default();

    // A driven worker on B holding one task, and a looping worker on B
    // (falling back to C) completing a stream of others.
    let mut wb = Session::connect(&b, register("worker-b", &["drain"], 1)).await;
    let node_b = wb.registered.node_id.clone();
    let drain_tasks = create(&a, "drain", 4).await;
    let held = wb.next_task().await;
    assert!(drain_tasks.contains(&task_id(&held)));

    let bulk_worker = Worker::spawn(
        "worker-bulk",
        &["bulk"],
        2,
        vec![b.clone(), c.clone()],
        ledger.clone(),
    );
    until(&ledger, "worker-bulk registered on B", |log| {
        log.sessions.len() == 1
    })
    .await;
    let bulk = create(&a, "bulk", 30).await;

    cluster.signal(B, "TERM");
    match wb.next().await {
        Ok(Some(connect_response::Kind::Drain(notice))) => {
            assert_eq!(
                notice.grace_period,
                Some(common::duration(Duration::from_secs(5)))
            );
        }
        other => panic!("expected drain, got {other:?}"),
    }
    // While it drains (worker-b still holds its task), B refuses new sessions.
    match Session::open(&b, register("worker-late", &[], 1)).await {
        Err(status) => assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}"),
        Ok(_) => panic!("a draining node accepted a new session"),
    }
    // The held task can still be completed on the draining node.
    wb.complete(&held, json!({ "worker": "worker-b" })).await;
    assert_completed(&wb.next_ack().await, &task_id(&held));
    // Nothing else is pushed; the stream ends cleanly.
    match wb.next().await {
        Ok(None) => {}
        other => panic!("expected a clean end of the drained stream, got {other:?}"),
    }
    let exit = cluster.exited(B).await;
    assert_eq!(exit.code(), Some(0), "B exits 0 after draining: {exit:?}");

    // The worker reconnects to C, where the remaining tasks come.
    let mut wb = Session::connect(&c, register("worker-b", &["drain"], 1)).await;
    let node_c = wb.registered.node_id.clone();
    let mut rest = BTreeSet::new();
    for _ in 0..3 {
        let leased = wb.next_task().await;
        wb.complete(&leased, json!({ "worker": "worker-b" })).await;
        assert_completed(&wb.next_ack().await, &task_id(&leased));
        rest.insert(task_id(&leased));
    }
    let mut expected_rest: BTreeSet<String> = drain_tasks.iter().cloned().collect();
    expected_rest.remove(&task_id(&held));
    assert_eq!(rest, expected_rest);

    // The looping worker was drained too: clean end on B, then on to C,
    // where whatever bulk work was left got done.
    until(&ledger, "every bulk task completed", |log| {
        bulk.iter().all(|id| log.completed().contains_key(id))
    })
    .await;
    bulk_worker.stop();
    let log = std::mem::take(&mut *ledger.lock().unwrap());
    assert_eq!(
        log.sessions,
        [
            ("worker-bulk".to_owned(), node_b.clone()),
            ("worker-bulk".to_owned(), node_c.clone())
        ],
        "{log:#?}"
    );
    assert_eq!(log.drains, [("worker-bulk".to_owned(), node_b.clone())]);
    assert_eq!(log.ends, [("worker-bulk".to_owned(), node_b, Ok(()))]);
    assert!(log.completed().values().all(|n| *n == 1), "{log:#?}");

    let rows = task_rows(&cluster).await;
    assert_eq!(rows.len(), 34);
    for row in &rows {
        assert_eq!(row.status, "completed", "{row:?}");
        assert_eq!(row.attempts, 1, "{row:?}");
        let worker = if row.task_type == "drain" {
            "worker-b"
        } else {
            "worker-bulk"
        };
        assert_eq!(row.locked_by.as_deref(), Some(worker), "{row:?}");
        assert_eq!(row.completed_by.as_deref(), Some(worker), "{row:?}");
    }
}

/// SIGKILL on node C while its worker holds leases: nothing is lost. The
/// leases expire, are reclaimed by the surviving nodes and the tasks go to
/// workers there; in the end every task is completed exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_loses_nothing_and_every_task_completes_exactly_once() {
    let mut cluster = Cluster::start(&[("a", &[]), ("b", &[]), ("c", &["--lease-duration", "2s"])]);
    let (a, b, c) = (
        cluster.endpoint(A),
        cluster.endpoint(B),
        cluster.endpoint(C),
    );
    let ledger = Ledger::default();

    // The worker on C is the only one at first: it gets the first three
    // tasks (2 s leases, the node's default) and sits on them.
    let mut wc = Session::connect(&c, register("worker-c", &[], 3)).await;
    let node_c = wc.registered.node_id.clone();
    assert_eq!(
        wc.registered.lease_duration,
        Some(common::duration(Duration::from_secs(2)))
    );
    let doomed = create(&a, "work", 3).await;
    let mut held = BTreeSet::new();
    for _ in 0..3 {
        let leased = wc.next_task().await;
        assert_eq!(leased.lease.as_ref().unwrap().attempt, 1);
        held.insert(task_id(&leased));
    }
    assert_eq!(held, doomed.iter().cloned().collect::<BTreeSet<_>>());

    // Workers on A and B, and more work while C still holds its leases.
    let wa = Worker::spawn(
        "worker-a",
        &[],
        4,
        vec![a.clone(), b.clone()],
        ledger.clone(),
    );
    let wb = Worker::spawn(
        "worker-b",
        &[],
        4,
        vec![b.clone(), a.clone()],
        ledger.clone(),
    );
    let more = create(&a, "work", 20).await;

    cluster.signal(C, "KILL");
    let exit = cluster.exited(C).await;
    assert_eq!(exit.signal(), Some(9), "{exit:?}");
    match wc.next().await {
        Err(status) => eprintln!("worker-c's stream broke: {status:?}"),
        other => panic!("expected the stream on the killed node to break, got {other:?}"),
    }
    drop(wc);
    // worker-c comes back on A.
    let wc = Worker::spawn("worker-c", &[], 4, vec![a.clone()], ledger.clone());

    let all: BTreeSet<String> = doomed.iter().chain(&more).cloned().collect();
    until(&ledger, "every task acked as completed", |log| {
        let done = log.completed();
        all.iter().all(|id| done.contains_key(id))
    })
    .await;
    let rows = eventually(PATIENCE, || async {
        let rows = task_rows(&cluster).await;
        rows.iter().all(|r| r.status == "completed").then_some(rows)
    })
    .await;
    for worker in [wa, wb, wc] {
        worker.stop();
    }

    // Exactly once: one OK completion per task, across all workers.
    let log = std::mem::take(&mut *ledger.lock().unwrap());
    let done = log.completed();
    assert_eq!(done.keys().cloned().collect::<BTreeSet<_>>(), all);
    assert!(
        done.values().all(|n| *n == 1),
        "a task was completed twice: {done:?}"
    );
    assert!(log.failures.is_empty(), "{:?}", log.failures);
    // The reclaimed tasks were handed out again, on the surviving nodes,
    // as their second attempt.
    for id in &doomed {
        let again: Vec<_> = log.received.iter().filter(|r| &r.2 == id).collect();
        assert_eq!(again.len(), 1, "{id}: {again:?}");
        assert_ne!(again[0].1, node_c);
        assert_eq!(again[0].3, 2, "{again:?}");
    }

    assert_eq!(rows.len(), all.len());
    assert_eq!(
        rows.iter().map(|r| r.id.clone()).collect::<BTreeSet<_>>(),
        all
    );
    for row in &rows {
        let attempts = if doomed.contains(&row.id) { 2 } else { 1 };
        assert_eq!(row.attempts, attempts, "{row:?}");
        assert_eq!(row.locked_by, row.completed_by, "{row:?}");
    }
    let completed: i64 = cluster
        .sql()
        .await
        .query_one(
            "SELECT count(*) FROM task_all WHERE status = 'completed'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(completed, all.len() as i64);
}
