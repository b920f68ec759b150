//! Worker sessions in one process: push, flow control, fairness, re-attach,
//! fencing on the stream, cancel pushes, protocol errors, watchers, drain.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::{get_task, list_sessions, new_task, register, status_of, Session, TestServer};
use leasehold::proto::{self, connect_request::Kind as Req, connect_response::Kind as Resp};
use tonic::Code;

fn task_id(leased: &proto::LeasedTask) -> String {
    leased.lease.as_ref().unwrap().task_id.clone()
}

/// A task created while a claim for an idle session is in flight (the claim
/// that registering set off, which may not see it) still reaches the
/// session at once, not at the next safety poll (a minute here).
#[tokio::test]
async fn a_task_created_while_a_claim_is_in_flight_is_pushed() {
    let server = TestServer::start_with(|c| c.poll_interval = Duration::from_secs(60)).await;
    let mut tasks = server.tasks().await;
    for round in 0..20 {
        let task_type = format!("racing_{round}");
        let mut worker =
            Session::connect(&server.endpoint(), register("w", &[task_type.as_str()], 1)).await;
        let created = tasks
            .create_task(new_task(&task_type))
            .await
            .unwrap()
            .into_inner()
            .task
            .unwrap();
        let leased = worker.next_task().await;
        assert_eq!(task_id(&leased), created.id, "round {round}");
    }
    server.stop().await;
}

#[tokio::test]
async fn a_created_task_is_pushed_to_an_idle_session() {
    let server = TestServer::start_with(|c| c.poll_interval = Duration::from_secs(60)).await;
    let mut worker =
        Session::connect(&server.endpoint(), register("w1", &["scan_library"], 2)).await;
    assert_eq!(
        worker.registered.heartbeat_interval,
        Some(prost_types::Duration {
            seconds: 10,
            nanos: 0
        })
    );
    let created = server
        .tasks()
        .await
        .create_task(new_task("scan_library"))
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    let leased = worker.next_task().await;
    assert_eq!(task_id(&leased), created.id);
    let lease = leased.lease.as_ref().unwrap();
    assert_eq!(lease.worker_id, "w1");
    assert_eq!(lease.attempt, 1);
    assert_eq!(
        status_of(leased.task.as_ref().unwrap()),
        proto::TaskStatus::Processing
    );

    worker
        .complete(&leased, serde_json::json!({"files_processed": 3}))
        .await;
    let ack = worker.next_ack().await;
    assert_eq!(ack.status, proto::AckStatus::Ok as i32);
    assert_eq!(ack.kind, proto::OutcomeKind::Complete as i32);
    assert_eq!(
        status_of(ack.task.as_ref().unwrap()),
        proto::TaskStatus::Completed
    );
    server.stop().await;
}

#[tokio::test]
async fn slots_are_never_exceeded_and_each_outcome_frees_one() {
    let server = TestServer::start().await;
    let mut worker =
        Session::connect(&server.endpoint(), register("w1", &["analyze_book"], 3)).await;
    let ids: HashSet<String> = server
        .create_many("analyze_book", 20)
        .await
        .into_iter()
        .collect();
    let mut in_flight: HashMap<String, proto::LeasedTask> = HashMap::new();
    let mut done = HashSet::new();
    let mut acks_pending = 0;
    while done.len() < 20 {
        match worker.next().await.unwrap() {
            Some(Resp::Task(leased)) => {
                in_flight.insert(task_id(&leased), leased);
                assert!(
                    in_flight.len() + acks_pending <= 3,
                    "more tasks out than slots"
                );
                // Finish one whenever the session is full.
                if in_flight.len() + acks_pending == 3 {
                    let id = in_flight.keys().next().unwrap().clone();
                    let leased = in_flight.remove(&id).unwrap();
                    worker.complete(&leased, serde_json::json!({})).await;
                    acks_pending += 1;
                }
            }
            Some(Resp::Ack(ack)) => {
                assert_eq!(ack.status, proto::AckStatus::Ok as i32, "{ack:?}");
                acks_pending -= 1;
                done.insert(ack.task_id);
                // The tail: fewer tasks left than slots.
                if in_flight.len() + acks_pending + done.len() == 20 {
                    for (_, leased) in in_flight.drain() {
                        worker.complete(&leased, serde_json::json!({})).await;
                        acks_pending += 1;
                    }
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(done, ids);
    server.stop().await;
}

#[tokio::test]
async fn work_is_spread_across_free_sessions() {
    let server = TestServer::start().await;
    let endpoint = server.endpoint();
    let mut workers = Vec::new();
    for i in 0..4 {
        workers.push(
            Session::connect(
                &endpoint,
                register(&format!("w{i}"), &["generate_thumbnail"], 10),
            )
            .await,
        );
    }
    // Due a moment from now: a dispatch pass that began while the sessions
    // were still registering finds nothing, and the pass that wakes when
    // the tasks fall due sees all four sessions free.
    let due = std::time::SystemTime::now() + Duration::from_millis(500);
    let batch = (0..8)
        .map(|_| proto::CreateTaskRequest {
            scheduled_for: Some(due.into()),
            ..new_task("generate_thumbnail")
        })
        .collect();
    server
        .tasks()
        .await
        .create_tasks(proto::CreateTasksRequest { tasks: batch })
        .await
        .unwrap();
    let mut per_worker = vec![0; workers.len()];
    let mut total = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while total < 8 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {total} tasks arrived"
        );
        for (i, worker) in workers.iter_mut().enumerate() {
            match worker.next_within(Duration::from_millis(20)).await {
                Some(Resp::Task(_)) => {
                    per_worker[i] += 1;
                    total += 1;
                }
                Some(other) => panic!("unexpected {other:?}"),
                None => {}
            }
        }
    }
    assert_eq!(total, 8);
    assert_eq!(per_worker, [2, 2, 2, 2], "one claim dealt round-robin");
    server.stop().await;
}

#[tokio::test]
async fn a_lease_survives_a_broken_stream_and_is_reattached_by_heartbeat() {
    let server = TestServer::start().await;
    let endpoint = server.endpoint();
    let mut first = Session::connect(&endpoint, register("w1", &["scan_library"], 1)).await;
    server.create_many("scan_library", 1).await;
    let leased = first.next_task().await;
    let lease = leased.lease.clone().unwrap();
    first.close();

    // The stream is gone; the lease is not.
    let mut second = Session::connect(&endpoint, register("w1", &["scan_library"], 1)).await;
    let task = get_task(&mut server.tasks().await, &lease.task_id).await;
    assert_eq!(status_of(&task), proto::TaskStatus::Processing);

    second
        .send(Req::Heartbeat(proto::SessionHeartbeat {
            leases: vec![proto::LeaseRenewal {
                task_id: lease.task_id.clone(),
                lease_token: lease.lease_token.clone(),
            }],
        }))
        .await;
    match second.next().await.unwrap() {
        Some(Resp::HeartbeatAck(ack)) => {
            assert_eq!(ack.leases.len(), 1);
            assert_eq!(ack.leases[0].status, proto::LeaseStatus::Held as i32);
            assert!(ack.leases[0].locked_until.is_some());
        }
        other => panic!("expected a heartbeat ack, got {other:?}"),
    }
    // Re-attached: it fills the session's one slot, and an empty heartbeat
    // now covers it.
    server.create_many("scan_library", 1).await;
    second
        .send(Req::Heartbeat(proto::SessionHeartbeat { leases: vec![] }))
        .await;
    match second.next().await.unwrap() {
        Some(Resp::HeartbeatAck(ack)) => {
            assert_eq!(ack.leases.len(), 1);
            assert_eq!(ack.leases[0].task_id, lease.task_id);
        }
        other => panic!("expected a heartbeat ack, got {other:?}"),
    }
    second
        .complete(&leased, serde_json::json!({"ok": true}))
        .await;
    let ack = second.next_ack().await;
    assert_eq!(ack.status, proto::AckStatus::Ok as i32);
    // The freed slot takes the next task.
    let next = second.next_task().await;
    assert_ne!(task_id(&next), lease.task_id);
    server.stop().await;
}

#[tokio::test]
async fn cancel_is_pushed_and_a_stale_completion_on_the_stream_is_refused() {
    let server = TestServer::start().await;
    let mut worker =
        Session::connect(&server.endpoint(), register("w1", &["scan_library"], 2)).await;
    server.create_many("scan_library", 2).await;
    let a = worker.next_task().await;
    let b = worker.next_task().await;

    server
        .tasks()
        .await
        .cancel_task(proto::CancelTaskRequest {
            id: task_id(&a),
            reason: "library removed".into(),
        })
        .await
        .unwrap();
    match worker.next().await.unwrap() {
        Some(Resp::Cancel(cancel)) => {
            assert_eq!(cancel.task_id, task_id(&a));
            assert_eq!(cancel.lease_token, a.lease.as_ref().unwrap().lease_token);
            assert_eq!(cancel.reason, proto::CancelReason::Cancelled as i32);
        }
        other => panic!("expected cancel, got {other:?}"),
    }
    worker.complete(&a, serde_json::json!({})).await;
    let ack = worker.next_ack().await;
    assert_eq!(ack.status, proto::AckStatus::Cancelled as i32, "{ack:?}");

    // A made-up token is refused and changes nothing.
    let mut forged = b.clone();
    forged.lease.as_mut().unwrap().lease_token = uuid::Uuid::new_v4().to_string();
    worker.complete(&forged, serde_json::json!({})).await;
    let ack = worker.next_ack().await;
    assert_eq!(ack.status, proto::AckStatus::LeaseLost as i32);
    // Answers name the lease they are about, so a worker can tell them
    // from answers about another lease of the same task.
    assert_eq!(ack.lease_token, forged.lease.as_ref().unwrap().lease_token);
    let renewal = |leased: &proto::LeasedTask| proto::LeaseRenewal {
        task_id: task_id(leased),
        lease_token: leased.lease.as_ref().unwrap().lease_token.clone(),
    };
    worker
        .send(Req::Heartbeat(proto::SessionHeartbeat {
            leases: vec![renewal(&forged), renewal(&b)],
        }))
        .await;
    match worker.next().await.unwrap() {
        Some(Resp::HeartbeatAck(answer)) => {
            let states: Vec<(String, i32)> = answer
                .leases
                .iter()
                .map(|l| (l.lease_token.clone(), l.status))
                .collect();
            assert_eq!(
                states,
                vec![
                    (
                        renewal(&forged).lease_token,
                        proto::LeaseStatus::Lost as i32
                    ),
                    (renewal(&b).lease_token, proto::LeaseStatus::Held as i32),
                ]
            );
        }
        other => panic!("expected a heartbeat answer, got {other:?}"),
    }
    let stored = get_task(&mut server.tasks().await, &task_id(&b)).await;
    assert_eq!(status_of(&stored), proto::TaskStatus::Processing);

    // A malformed outcome is answered, and the session goes on.
    worker
        .send(Req::Complete(proto::CompleteTaskRequest {
            task_id: "nope".into(),
            lease_token: String::new(),
            result: None,
        }))
        .await;
    let ack = worker.next_ack().await;
    assert_eq!(ack.status, proto::AckStatus::Invalid as i32);
    assert!(ack.message.contains("task_id"), "{}", ack.message);
    worker.complete(&b, serde_json::json!({})).await;
    assert_eq!(worker.next_ack().await.status, proto::AckStatus::Ok as i32);
    server.stop().await;
}

#[tokio::test]
async fn a_reclaimed_lease_is_taken_back_from_its_silent_session() {
    let server = TestServer::start().await;
    let mut silent = Session::connect(
        &server.endpoint(),
        proto::RegisterWorker {
            lease_duration: Some(common::duration(Duration::from_secs(1))),
            ..register("silent", &["purge_deleted"], 1)
        },
    )
    .await;
    server.create_many("purge_deleted", 1).await;
    let leased = silent.next_task().await;
    // No heartbeat: the reclaimer takes it back and the session hears so.
    match silent.next().await.unwrap() {
        Some(Resp::Cancel(cancel)) => {
            assert_eq!(cancel.task_id, task_id(&leased));
            assert_eq!(cancel.reason, proto::CancelReason::LeaseReclaimed as i32);
        }
        other => panic!("expected cancel, got {other:?}"),
    }
    // Its slot is free again and the task comes back as attempt 2.
    let again = silent.next_task().await;
    assert_eq!(task_id(&again), task_id(&leased));
    assert_eq!(again.lease.unwrap().attempt, 2);
    server.stop().await;
}

#[tokio::test]
async fn protocol_violations_end_only_the_offending_stream() {
    let server = TestServer::start().await;
    let endpoint = server.endpoint();
    let mut good = Session::connect(&endpoint, register("good", &["scan_library"], 1)).await;

    let early = Session::open_with_first(
        &endpoint,
        Req::Heartbeat(proto::SessionHeartbeat { leases: vec![] }),
    )
    .await
    .err()
    .expect("a heartbeat before register is refused");
    assert_eq!(early.code(), Code::FailedPrecondition);
    assert!(early.message().contains("register"), "{}", early.message());

    let invalid = Session::open(&endpoint, register("", &["scan_library"], 1))
        .await
        .err()
        .expect("an invalid register is refused");
    assert_eq!(invalid.code(), Code::InvalidArgument);
    assert!(invalid.message().contains("register.worker_id"));
    let too_many = Session::open(&endpoint, register("w", &[], 10_001))
        .await
        .err()
        .unwrap();
    assert!(too_many.message().contains("register.slots"));

    let mut twice = Session::connect(&endpoint, register("twice", &["other"], 1)).await;
    twice
        .send(Req::Register(register("twice", &["other"], 1)))
        .await;
    let status = twice
        .next()
        .await
        .expect_err("a second register ends the stream");
    assert_eq!(status.code(), Code::FailedPrecondition);

    // The well-behaved session never noticed.
    server.create_many("scan_library", 1).await;
    good.next_task().await;
    server.stop().await;
}

#[tokio::test]
async fn tasks_and_cancels_cross_nodes() {
    let server = TestServer::start_with(|c| c.poll_interval = Duration::from_secs(60)).await;
    let node_b = server.another_node().await;
    let node_c = server.another_node().await;
    let mut on_b = Session::connect(
        &format!("http://{}", node_b.addr()),
        register("b", &["scan_library"], 5),
    )
    .await;
    let mut on_c = Session::connect(
        &format!("http://{}", node_c.addr()),
        register("c", &["analyze_book"], 5),
    )
    .await;
    // Created on node A, pushed by B and C.
    server.create_many("scan_library", 1).await;
    server.create_many("analyze_book", 1).await;
    let b_task = on_b.next_task().await;
    let c_task = on_c.next_task().await;
    assert_eq!(b_task.task.unwrap().task_type, "scan_library");

    // Cancelled on A, pushed to the worker on C.
    server
        .tasks()
        .await
        .cancel_task(proto::CancelTaskRequest {
            id: task_id(&c_task),
            reason: String::new(),
        })
        .await
        .unwrap();
    match on_c.next().await.unwrap() {
        Some(Resp::Cancel(cancel)) => assert_eq!(cancel.task_id, task_id(&c_task)),
        other => panic!("expected cancel, got {other:?}"),
    }

    // Every node lists every session.
    let listed = common::eventually(Duration::from_secs(10), || {
        let server = &server;
        async move {
            let sessions = list_sessions(&mut server.workers().await).await;
            (sessions.len() == 2).then_some(sessions)
        }
    })
    .await;
    let by_worker: HashMap<&str, &proto::WorkerSession> =
        listed.iter().map(|s| (s.worker_id.as_str(), s)).collect();
    assert_eq!(by_worker["b"].node_id, on_b.registered.node_id);
    assert_eq!(by_worker["c"].node_id, on_c.registered.node_id);
    assert_eq!(by_worker["b"].slots, 5);
    assert_eq!(by_worker["b"].task_types, ["scan_library"]);
    node_b.shutdown().await.unwrap();
    node_c.shutdown().await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn a_watcher_sees_the_whole_life_of_a_task() {
    let server = TestServer::start().await;
    let node_b = server.another_node().await;
    let mut watch = server
        .tasks()
        .await
        .watch_tasks(proto::WatchTasksRequest {
            task_types: vec!["analyze_series".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut worker = Session::connect(
        &format!("http://{}", node_b.addr()),
        register("w", &["analyze_series"], 1),
    )
    .await;
    let id = server.create_many("analyze_series", 1).await.remove(0);
    let leased = worker.next_task().await;
    worker.progress(&leased, 40, 100, "reading pages").await;
    // Progress is visible in GetTask once stored.
    let task = common::eventually(Duration::from_secs(10), || {
        let server = &server;
        let id = id.clone();
        async move {
            let task = get_task(&mut server.tasks().await, &id).await;
            task.progress.is_some().then_some(task)
        }
    })
    .await;
    let progress = task.progress.unwrap();
    assert_eq!((progress.current, progress.total), (40, 100));
    assert_eq!(progress.message, "reading pages");

    worker
        .complete(&leased, serde_json::json!({"pages": 100}))
        .await;
    assert_eq!(worker.next_ack().await.status, proto::AckStatus::Ok as i32);

    let mut kinds = Vec::new();
    while kinds.len() < 4 {
        let item = tokio::time::timeout(Duration::from_secs(10), watch.message())
            .await
            .expect("events arrive")
            .unwrap()
            .unwrap();
        match item.kind {
            Some(proto::watch_tasks_response::Kind::Event(event)) => {
                assert_eq!(event.task_id, id);
                if event.kind == proto::TaskEventKind::Progress as i32 {
                    assert_eq!(event.progress.as_ref().unwrap().current, 40);
                }
                kinds.push(proto::TaskEventKind::try_from(event.kind).unwrap());
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        kinds,
        [
            proto::TaskEventKind::Created,
            proto::TaskEventKind::Leased,
            proto::TaskEventKind::Progress,
            proto::TaskEventKind::Completed
        ]
    );
    node_b.shutdown().await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn a_stalled_watcher_does_not_slow_workers_and_learns_what_it_missed() {
    let server = TestServer::start().await;
    // Subscribed, then never read while the queue runs. A small HTTP/2
    // window, as over a slow link, so the transport does not absorb it all.
    let channel = tonic::transport::Endpoint::from_shared(server.endpoint())
        .unwrap()
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .connect()
        .await
        .unwrap();
    let mut stalled = proto::task_service_client::TaskServiceClient::new(channel)
        .watch_tasks(proto::WatchTasksRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut worker = Session::connect(
        &server.endpoint(),
        register("w", &["generate_thumbnail"], 100),
    )
    .await;
    let total = 6000;
    for _ in 0..(total / 1000) {
        server.create_many("generate_thumbnail", 1000).await;
    }
    let mut completed = 0;
    while completed < total {
        match worker.next().await.unwrap() {
            Some(Resp::Task(leased)) => worker.complete(&leased, serde_json::json!({})).await,
            Some(Resp::Ack(ack)) => {
                assert_eq!(ack.status, proto::AckStatus::Ok as i32);
                completed += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let count: i64 = server
        .sql()
        .await
        .query_one(
            "SELECT count(*) FROM task_all WHERE status = 'completed'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, total as i64);

    // 3 events per task went past a buffer of a few thousand: the watcher
    // is told how many it lost, then gets events again, and what it got and
    // what it was told it lost add up to every event.
    let expected = 3 * total as u64;
    let (mut missed, mut events_before, mut events_after) = (0, 0, 0);
    while events_before + missed + events_after < expected {
        let item = tokio::time::timeout(Duration::from_secs(10), stalled.message())
            .await
            .unwrap_or_else(|_| {
                panic!("watcher starved: {events_before} events, then missed {missed}, then {events_after}")
            })
            .unwrap()
            .unwrap();
        match item.kind {
            Some(proto::watch_tasks_response::Kind::Missed(m)) => missed += m.count,
            Some(proto::watch_tasks_response::Kind::Event(_)) if missed > 0 => events_after += 1,
            Some(proto::watch_tasks_response::Kind::Event(_)) => events_before += 1,
            None => panic!("empty item"),
        }
    }
    assert!(missed > 0, "the stalled watcher lost nothing");
    assert!(events_after > 0, "no events after the loss");
    assert_eq!(
        events_before + missed + events_after,
        expected,
        "{events_before} events, then missed {missed}, then {events_after}"
    );
    drop(stalled);
    server.stop().await;
}

#[tokio::test]
async fn shutdown_drains_sessions_and_accepts_their_outcomes() {
    let server = TestServer::start_with(|c| c.drain_grace = Duration::from_secs(10)).await;
    let mut worker =
        Session::connect(&server.endpoint(), register("w", &["scan_library"], 2)).await;
    server.create_many("scan_library", 1).await;
    let leased = worker.next_task().await;
    let mut tasks = server.tasks().await;
    let mut server = server;
    let running = server.running.take().unwrap();
    let stopping = tokio::spawn(running.shutdown());
    match worker.next().await.unwrap() {
        Some(Resp::Drain(drain)) => assert_eq!(drain.grace_period.unwrap().seconds, 10),
        other => panic!("expected drain, got {other:?}"),
    }
    // Nothing new is handed out while draining.
    tasks.create_task(new_task("scan_library")).await.unwrap();
    worker
        .complete(&leased, serde_json::json!({"done": true}))
        .await;
    assert_eq!(worker.next_ack().await.status, proto::AckStatus::Ok as i32);
    // Once it holds nothing, the stream ends cleanly and the node stops.
    assert!(
        worker.next().await.unwrap().is_none(),
        "clean end of stream"
    );
    stopping.await.unwrap().unwrap();
    let rows = server
        .sql()
        .await
        .query("SELECT status FROM task_all ORDER BY seq", &[])
        .await
        .unwrap();
    let statuses: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(statuses, ["completed", "pending"]);
    common::drop_database(&server.db_name).await;
}

#[tokio::test]
async fn a_stale_outcome_from_elsewhere_does_not_free_the_holders_slot() {
    let server = TestServer::start().await;
    let mut worker =
        Session::connect(&server.endpoint(), register("w", &["analyze_book"], 1)).await;
    server.create_many("analyze_book", 1).await;
    let held = worker.next_task().await;
    // A late worker (or anyone) sends an outcome with a token that is not
    // the current one: refused, and the session still holds its lease.
    let refused = server
        .workers()
        .await
        .complete_task(proto::CompleteTaskRequest {
            task_id: task_id(&held),
            lease_token: uuid::Uuid::new_v4().to_string(),
            result: None,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    server.create_many("analyze_book", 1).await;
    worker
        .send(Req::Heartbeat(proto::SessionHeartbeat { leases: vec![] }))
        .await;
    // The answer to the heartbeat comes before any second task could: the
    // one slot is still taken.
    match worker.next().await.unwrap() {
        Some(Resp::HeartbeatAck(ack)) => {
            assert_eq!(ack.leases.len(), 1);
            assert_eq!(ack.leases[0].task_id, task_id(&held));
            assert_eq!(ack.leases[0].status, proto::LeaseStatus::Held as i32);
        }
        other => panic!("expected the heartbeat ack, not {other:?}"),
    }
    assert!(
        worker
            .next_within(Duration::from_millis(300))
            .await
            .is_none(),
        "no second task on a one-slot session"
    );
    server.stop().await;
}
