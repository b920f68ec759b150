//! Leases end to end: claim order, exclusivity, heartbeats, fencing,
//! idempotent outcomes, reclaim, backoff, release and long polls.

mod common;

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use common::{
    acquire, acquire_tasks, duration, fail_task, get_task, json, new_task, status_of, TestServer,
};
use leasehold::proto::worker_service_client::WorkerServiceClient;
use leasehold::proto::{self, TaskStatus};
use tonic::transport::Channel;
use tonic::Code;

/// Creates one task and leases it; returns the leased task.
async fn create_and_lease(
    server: &TestServer,
    req: proto::CreateTaskRequest,
    lease: Duration,
) -> proto::LeasedTask {
    let task_type = req.task_type.clone();
    server.tasks().await.create_task(req).await.unwrap();
    let mut claim = acquire("worker-1", &[&task_type], 1);
    claim.lease_duration = Some(duration(lease));
    let mut tasks = acquire_tasks(&mut server.workers().await, claim).await;
    assert_eq!(tasks.len(), 1, "one task leased");
    tasks.remove(0)
}

fn lease_of(leased: &proto::LeasedTask) -> (String, String) {
    let lease = leased.lease.as_ref().unwrap();
    (lease.task_id.clone(), lease.lease_token.clone())
}

/// The columns a stale write must not touch.
async fn row_snapshot(server: &TestServer, id: &str) -> String {
    let id = uuid::Uuid::parse_str(id).unwrap();
    server
        .sql()
        .await
        .query_one(
            "SELECT row(status, attempts, scheduled_for, locked_by, locked_until, lease_token, \
             last_error, result, completed_at)::text FROM task_all WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn claims_follow_priority_then_schedule_then_creation() {
    let server = TestServer::start().await;
    let mut tasks = server.tasks().await;
    let past = |secs| {
        Some(prost_types::Timestamp::from(
            SystemTime::now() - Duration::from_secs(secs),
        ))
    };
    let specs = [
        ("low-old", 1, past(100)),
        ("high-new", 10, past(1)),
        ("high-old", 10, past(50)),
        ("mid-a", 5, past(10)),
        ("mid-b", 5, past(10)),
    ];
    let mut ids = std::collections::HashMap::new();
    for (name, priority, scheduled_for) in specs {
        let created = tasks
            .create_task(proto::CreateTaskRequest {
                task_type: "analyze_book".into(),
                priority,
                scheduled_for,
                params: Some(json(serde_json::json!({ "name": name }))),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        ids.insert(created.task.unwrap().id, name);
    }
    let leased = acquire_tasks(
        &mut server.workers().await,
        acquire("w", &["analyze_book"], 10),
    )
    .await;
    let order: Vec<&str> = leased
        .iter()
        .map(|l| ids[&l.task.as_ref().unwrap().id])
        .collect();
    // Equal priority and schedule: creation order decides (mid-a first).
    assert_eq!(order, ["high-old", "high-new", "mid-a", "mid-b", "low-old"]);
    for l in &leased {
        let task = l.task.as_ref().unwrap();
        let lease = l.lease.as_ref().unwrap();
        assert_eq!(status_of(task), TaskStatus::Processing);
        assert_eq!(task.attempts, 1);
        assert_eq!(lease.attempt, 1);
        assert_eq!(lease.worker_id, "w");
        assert_eq!(task.locked_by.as_deref(), Some("w"));
        assert!(task.started_at.is_some());
        assert_eq!(task.locked_until, lease.locked_until);
    }
    server.stop().await;
}

/// Takers of some types merge their types' claim orders: priority, then
/// schedule, then creation across the types they run, never a task of
/// another type however far ahead it is, and a type named twice is walked
/// once.
#[tokio::test]
async fn a_claim_for_several_types_keeps_claim_order_across_them() {
    let server = TestServer::start().await;
    let mut tasks = server.tasks().await;
    // A backlog of another type, ahead of everything in claim order.
    let backlog = (0..300)
        .map(|_| proto::CreateTaskRequest {
            priority: 980,
            ..new_task("user_plugin_sync")
        })
        .collect();
    common::create_batch(&mut tasks, backlog).await;
    let specs = [
        ("thumb-1", "generate_thumbnail", 400),
        ("scan-1", "scan_library", 600),
        ("thumb-2", "generate_thumbnail", 400),
        ("analyze-1", "analyze_book", 500),
        ("scan-2", "scan_library", 600),
    ];
    let mut names = std::collections::HashMap::new();
    for (name, task_type, priority) in specs {
        let created = tasks
            .create_task(proto::CreateTaskRequest {
                priority,
                ..new_task(task_type)
            })
            .await
            .unwrap()
            .into_inner();
        names.insert(created.task.unwrap().id, name);
    }
    let mut workers = server.workers().await;
    let types = [
        "generate_thumbnail",
        "scan_library",
        "analyze_book",
        "scan_library",
    ];
    let first = acquire_tasks(&mut workers, acquire("w", &types, 4)).await;
    let order: Vec<&str> = first
        .iter()
        .map(|l| names[&l.task.as_ref().unwrap().id])
        .collect();
    assert_eq!(order, ["scan-1", "scan-2", "analyze-1", "thumb-1"]);
    let rest = acquire_tasks(&mut workers, acquire("w", &types, 10)).await;
    let order: Vec<&str> = rest
        .iter()
        .map(|l| names[&l.task.as_ref().unwrap().id])
        .collect();
    assert_eq!(order, ["thumb-2"], "each task once, none of another type");
    server.stop().await;
}

#[tokio::test]
async fn future_and_other_type_tasks_are_not_handed_out() {
    let server = TestServer::start().await;
    let mut tasks = server.tasks().await;
    tasks
        .create_task(proto::CreateTaskRequest {
            task_type: "scan_library".into(),
            scheduled_for: Some((SystemTime::now() + Duration::from_secs(3600)).into()),
            ..Default::default()
        })
        .await
        .unwrap();
    tasks.create_task(new_task("purge_deleted")).await.unwrap();
    let mut workers = server.workers().await;
    let got = acquire_tasks(&mut workers, acquire("w", &["scan_library"], 10)).await;
    assert!(got.is_empty(), "a future task must wait: {got:?}");
    // Empty task_types means any type: only the due one comes.
    let got = acquire_tasks(&mut workers, acquire("w", &[], 10)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].task.as_ref().unwrap().task_type, "purge_deleted");
    server.stop().await;
}

#[tokio::test]
async fn concurrent_acquirers_lease_every_task_exactly_once() {
    let server = TestServer::start().await;
    let mut tasks = server.tasks().await;
    for _ in 0..2 {
        let batch = (0..1000).map(|_| new_task("generate_thumbnail")).collect();
        tasks
            .create_tasks(proto::CreateTasksRequest { tasks: batch })
            .await
            .unwrap();
    }
    let mut handles = Vec::new();
    for w in 0..8 {
        let mut workers = server.workers().await;
        handles.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            loop {
                let got = acquire_tasks(
                    &mut workers,
                    acquire(&format!("w{w}"), &["generate_thumbnail"], 25),
                )
                .await;
                if got.is_empty() {
                    return seen;
                }
                for leased in got {
                    let (task_id, lease_token) = lease_of(&leased);
                    workers
                        .complete_task(proto::CompleteTaskRequest {
                            task_id: task_id.clone(),
                            lease_token,
                            result: None,
                        })
                        .await
                        .unwrap();
                    seen.push(task_id);
                }
            }
        }));
    }
    let mut all = Vec::new();
    for handle in handles {
        all.extend(handle.await.unwrap());
    }
    let distinct: HashSet<_> = all.iter().collect();
    assert_eq!(all.len(), 2000, "every task leased once in total");
    assert_eq!(distinct.len(), 2000, "no task leased twice");
    let row = server
        .sql()
        .await
        .query_one(
            "SELECT count(*) FILTER (WHERE status = 'completed' AND attempts = 1), count(*) FROM task_all",
            &[],
        )
        .await
        .unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (2000, 2000));
    server.stop().await;
}

#[tokio::test]
async fn heartbeat_extends_held_leases_and_reports_lost_and_cancelled_ones() {
    let server = TestServer::start().await;
    let held = create_and_lease(&server, new_task("scan_library"), Duration::from_secs(5)).await;
    let cancelled =
        create_and_lease(&server, new_task("scan_library"), Duration::from_secs(5)).await;
    let (held_id, held_token) = lease_of(&held);
    let (cancelled_id, cancelled_token) = lease_of(&cancelled);
    server
        .tasks()
        .await
        .cancel_task(proto::CancelTaskRequest {
            id: cancelled_id.clone(),
            reason: "operator".into(),
        })
        .await
        .unwrap();
    let unknown = uuid::Uuid::now_v7().to_string();
    let renewal = |task_id: &str, lease_token: &str| proto::LeaseRenewal {
        task_id: task_id.into(),
        lease_token: lease_token.into(),
    };
    let states = server
        .workers()
        .await
        .heartbeat(proto::HeartbeatRequest {
            worker_id: "worker-1".into(),
            leases: vec![
                renewal(&held_id, &held_token),
                renewal(&held_id, &uuid::Uuid::new_v4().to_string()),
                renewal(&cancelled_id, &cancelled_token),
                renewal(&unknown, &uuid::Uuid::new_v4().to_string()),
            ],
            lease_duration: Some(duration(Duration::from_secs(600))),
        })
        .await
        .unwrap()
        .into_inner()
        .leases;
    let statuses: Vec<_> = states
        .iter()
        .map(|s| {
            (
                s.task_id.as_str(),
                proto::LeaseStatus::try_from(s.status).unwrap(),
            )
        })
        .collect();
    assert_eq!(
        statuses,
        [
            (held_id.as_str(), proto::LeaseStatus::Held),
            (held_id.as_str(), proto::LeaseStatus::Lost),
            (cancelled_id.as_str(), proto::LeaseStatus::Cancelled),
            (unknown.as_str(), proto::LeaseStatus::Lost),
        ]
    );
    let old_until = SystemTime::try_from(held.lease.unwrap().locked_until.unwrap()).unwrap();
    let new_until = SystemTime::try_from(states[0].locked_until.unwrap()).unwrap();
    assert!(new_until > old_until + Duration::from_secs(500));
    assert!(states[1].locked_until.is_none());
    // The row agrees with the answer.
    let stored = get_task(&mut server.tasks().await, &held_id).await;
    assert_eq!(stored.locked_until, states[0].locked_until);
    server.stop().await;
}

#[tokio::test]
async fn stale_tokens_change_nothing_and_get_failed_precondition() {
    let server = TestServer::start().await;
    let leased =
        create_and_lease(&server, new_task("analyze_series"), Duration::from_secs(60)).await;
    let (task_id, _token) = lease_of(&leased);
    let stale = uuid::Uuid::new_v4().to_string();
    let before = row_snapshot(&server, &task_id).await;
    let mut workers = server.workers().await;

    let complete = workers
        .complete_task(proto::CompleteTaskRequest {
            task_id: task_id.clone(),
            lease_token: stale.clone(),
            result: Some(json(serde_json::json!({"overwritten": true}))),
        })
        .await
        .unwrap_err();
    let fail = workers
        .fail_task(proto::FailTaskRequest {
            task_id: task_id.clone(),
            lease_token: stale.clone(),
            error: "boom".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    let release = workers
        .release_task(proto::ReleaseTaskRequest {
            task_id: task_id.clone(),
            lease_token: stale.clone(),
        })
        .await
        .unwrap_err();
    for status in [complete, fail, release] {
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    }
    assert_eq!(row_snapshot(&server, &task_id).await, before);

    let missing = workers
        .complete_task(proto::CompleteTaskRequest {
            task_id: uuid::Uuid::now_v7().to_string(),
            lease_token: stale,
            result: None,
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    server.stop().await;
}

#[tokio::test]
async fn a_retried_complete_or_fail_with_the_same_token_succeeds_again() {
    let server = TestServer::start().await;
    let mut workers = server.workers().await;

    let leased = create_and_lease(&server, new_task("scan_library"), Duration::from_secs(60)).await;
    let (task_id, lease_token) = lease_of(&leased);
    let request = proto::CompleteTaskRequest {
        task_id: task_id.clone(),
        lease_token,
        result: Some(json(
            serde_json::json!({"files_processed": 812, "books_created": 40, "errors": []}),
        )),
    };
    let first = workers
        .complete_task(request.clone())
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    let second = workers
        .complete_task(request)
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(first, second);
    assert_eq!(status_of(&first), TaskStatus::Completed);
    assert_eq!(
        leasehold::client::from_struct(first.result.as_ref().unwrap()).unwrap(),
        serde_json::json!({"files_processed": 812, "books_created": 40, "errors": []})
    );
    assert!(first.completed_at.is_some());
    assert!(first.locked_until.is_none());

    let leased = create_and_lease(&server, new_task("scan_library"), Duration::from_secs(60)).await;
    let (task_id, lease_token) = lease_of(&leased);
    let request = proto::FailTaskRequest {
        task_id,
        lease_token,
        error: "disk full".into(),
        retry_after: Some(duration(Duration::from_secs(3600))),
        ..Default::default()
    };
    let first = fail_task(&mut workers, request.clone()).await;
    let second = fail_task(&mut workers, request).await;
    assert_eq!(first, second);
    assert_eq!(status_of(&first), TaskStatus::Pending);
    server.stop().await;
}

/// Waits until the reclaimer has taken the lease of `id` back, then checks
/// by the database's own timestamps that it did so within 500 ms of the
/// expiry: a reclaimed task is due again (or finished) at the moment of the
/// reclaim. Returns status, attempts, last_error and whether the token is
/// gone.
async fn reclaimed(sql: &tokio_postgres::Client, id: uuid::Uuid) -> tokio_postgres::Row {
    let expiry: SystemTime = sql
        .query_one("SELECT locked_until FROM task WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0);
    let row = common::eventually(Duration::from_secs(10), || async move {
        let row = sql
            .query_one(
                "SELECT status, attempts, COALESCE(last_error, ''), lease_token IS NULL, \
                 CASE WHEN status = 'failed' THEN completed_at ELSE scheduled_for END \
                 FROM task_all WHERE id = $1",
                &[&id],
            )
            .await
            .unwrap();
        (row.get::<_, &str>(0) != "processing").then_some(row)
    })
    .await;
    let at: SystemTime = row.get(4);
    let late = at.duration_since(expiry).unwrap();
    assert!(
        late <= Duration::from_millis(500),
        "reclaimed {late:?} after the expiry"
    );
    row
}

#[tokio::test]
async fn expired_leases_are_reclaimed_within_500ms_and_fail_at_max_attempts() {
    let server = TestServer::start().await;
    let sql = server.sql().await;

    // Attempts left: pending again, with the worker named in last_error.
    let leased = create_and_lease(&server, new_task("scan_library"), Duration::from_secs(1)).await;
    let (task_id, _) = lease_of(&leased);
    let id = uuid::Uuid::parse_str(&task_id).unwrap();
    let row = reclaimed(&sql, id).await;
    assert_eq!(row.get::<_, &str>(0), "pending");
    assert_eq!(row.get::<_, i32>(1), 1);
    assert!(
        row.get::<_, &str>(2).contains("worker-1"),
        "{}",
        row.get::<_, &str>(2)
    );
    assert!(row.get::<_, bool>(3));

    // The task goes to the next worker as attempt 2.
    let again = acquire_tasks(
        &mut server.workers().await,
        acquire("worker-2", &["scan_library"], 1),
    )
    .await;
    assert_eq!(again[0].lease.as_ref().unwrap().attempt, 2);

    // No attempts left: failed.
    let leased = create_and_lease(
        &server,
        proto::CreateTaskRequest {
            task_type: "purge_deleted".into(),
            max_attempts: 1,
            ..Default::default()
        },
        Duration::from_secs(1),
    )
    .await;
    let (task_id, token) = lease_of(&leased);
    let id = uuid::Uuid::parse_str(&task_id).unwrap();
    let row = reclaimed(&sql, id).await;
    assert_eq!(row.get::<_, &str>(0), "failed");
    // The late worker's completion is refused.
    let late = server
        .workers()
        .await
        .complete_task(proto::CompleteTaskRequest {
            task_id,
            lease_token: token,
            result: None,
        })
        .await
        .unwrap_err();
    assert_eq!(late.code(), Code::FailedPrecondition);
    server.stop().await;
}

/// The database's clock just before and just after a call: the `now()` of
/// the call's statement lies between the two.
struct Between {
    before: SystemTime,
    after: SystemTime,
}

impl Between {
    /// Asserts that `scheduled_for` is `now() + delay` for some delay in
    /// `min..=max`, without a tolerance for how long the call took: the
    /// reading before bounds the delay from above, the one after from below.
    fn assert_delay(&self, scheduled_for: SystemTime, min: Duration, max: Duration) {
        let at_most = scheduled_for.duration_since(self.before).unwrap();
        let at_least = scheduled_for.duration_since(self.after).unwrap();
        assert!(
            at_most >= min && at_least <= max,
            "delay between {at_least:?} and {at_most:?}, expected {min:?} to {max:?}"
        );
    }
}

/// FailTask with `request`, timed by the database's clock.
async fn fail_timed(
    sql: &tokio_postgres::Client,
    workers: &mut WorkerServiceClient<Channel>,
    request: proto::FailTaskRequest,
) -> (proto::Task, Between) {
    let clock = || async {
        sql.query_one("SELECT clock_timestamp()", &[])
            .await
            .unwrap()
            .get::<_, SystemTime>(0)
    };
    let before = clock().await;
    let task = fail_task(workers, request).await;
    let after = clock().await;
    (task, Between { before, after })
}

#[tokio::test]
async fn failures_back_off_or_fail_for_good() {
    let server = TestServer::start_with(|c| {
        c.retry_backoff_base = Duration::from_secs(10);
        c.retry_backoff_max = Duration::from_secs(15);
    })
    .await;
    let sql = server.sql().await;
    let mut workers = server.workers().await;
    let row_of = |id: String| {
        let sql = &sql;
        async move {
            let id = uuid::Uuid::parse_str(&id).unwrap();
            let row = sql
                .query_one(
                    "SELECT status, scheduled_for, last_error FROM task_all WHERE id = $1",
                    &[&id],
                )
                .await
                .unwrap();
            (
                row.get::<_, String>(0),
                row.get::<_, SystemTime>(1),
                row.get::<_, Option<String>>(2),
            )
        }
    };
    let fail = |task_id: String,
                lease_token: String,
                permanent: bool,
                retry_after: Option<Duration>| proto::FailTaskRequest {
        task_id,
        lease_token,
        error: "decoder crashed".into(),
        permanent,
        retry_after: retry_after.map(duration),
    };

    // Backoff: base 10 s for attempt 1, with jitter in [0.5, 1).
    let leased = create_and_lease(&server, new_task("analyze_book"), Duration::from_secs(60)).await;
    let (id, token) = lease_of(&leased);
    let (task, failed) = fail_timed(&sql, &mut workers, fail(id.clone(), token, false, None)).await;
    assert_eq!(status_of(&task), TaskStatus::Pending);
    assert_eq!(task.last_error.as_deref(), Some("decoder crashed"));
    assert!(task.locked_by.is_none() && task.locked_until.is_none());
    let (status, scheduled_for, error) = row_of(id).await;
    assert_eq!(status, "pending");
    failed.assert_delay(
        scheduled_for,
        Duration::from_secs(5),
        Duration::from_secs(10),
    );
    assert_eq!(error.as_deref(), Some("decoder crashed"));

    // retry_after overrides the backoff (and the cap).
    let leased = create_and_lease(&server, new_task("analyze_book"), Duration::from_secs(60)).await;
    let (id, token) = lease_of(&leased);
    let retry_after = Duration::from_secs(100);
    let (_, failed) = fail_timed(
        &sql,
        &mut workers,
        fail(id.clone(), token, false, Some(retry_after)),
    )
    .await;
    let (_, scheduled_for, _) = row_of(id).await;
    failed.assert_delay(scheduled_for, retry_after, retry_after);

    // Permanent: failed at once, whatever attempts are left.
    let leased = create_and_lease(&server, new_task("analyze_book"), Duration::from_secs(60)).await;
    let (id, token) = lease_of(&leased);
    let task = fail_task(&mut workers, fail(id, token, true, None)).await;
    assert_eq!(status_of(&task), TaskStatus::Failed);
    assert!(task.completed_at.is_some());
    assert_eq!(task.attempts, 1);

    // Last attempt: failed.
    let leased = create_and_lease(
        &server,
        proto::CreateTaskRequest {
            task_type: "analyze_series".into(),
            max_attempts: 1,
            ..Default::default()
        },
        Duration::from_secs(60),
    )
    .await;
    let (id, token) = lease_of(&leased);
    let task = fail_task(&mut workers, fail(id, token, false, None)).await;
    assert_eq!(status_of(&task), TaskStatus::Failed);
    server.stop().await;
}

#[tokio::test]
async fn release_returns_the_task_without_using_an_attempt() {
    let server = TestServer::start().await;
    let leased = create_and_lease(&server, new_task("scan_library"), Duration::from_secs(60)).await;
    let (task_id, lease_token) = lease_of(&leased);
    let mut workers = server.workers().await;
    let request = proto::ReleaseTaskRequest {
        task_id,
        lease_token,
    };
    let task = workers
        .release_task(request.clone())
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(status_of(&task), TaskStatus::Pending);
    assert_eq!(task.attempts, 0);
    assert!(task.locked_by.is_none());
    // The old token is void now.
    let again = workers.release_task(request).await.unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition);
    // And the task is due at once.
    let got = acquire_tasks(&mut workers, acquire("w2", &["scan_library"], 1)).await;
    assert_eq!(got[0].lease.as_ref().unwrap().attempt, 1);
    server.stop().await;
}

#[tokio::test]
async fn a_long_poll_is_woken_by_a_create_well_before_its_wait() {
    let server = TestServer::start_with(|c| c.poll_interval = Duration::from_secs(60)).await;
    let mut workers = server.workers().await;
    let started = tokio::time::Instant::now();
    let poll = tokio::spawn(async move {
        let mut request = acquire("sleepy", &["user_plugin_sync"], 1);
        request.wait = Some(duration(Duration::from_secs(30)));
        acquire_tasks(&mut workers, request).await
    });
    // Created through a second node: the wake-up crosses Postgres NOTIFY.
    // Starting that node takes longer than the poll needs to park, so the
    // create lands while the poll waits (were it earlier, the poll would
    // still get the task, just without being woken).
    let other = server.another_node().await;
    let mut other_tasks = leasehold::proto::task_service_client::TaskServiceClient::new(
        common::channel_to(&format!("http://{}", other.addr())).await,
    );
    let created = other_tasks
        .create_task(new_task("user_plugin_sync"))
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    let got = poll.await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].task.as_ref().unwrap().id, created.id);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "woken, not timed out"
    );
    other.shutdown().await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn a_long_poll_wakes_when_a_scheduled_task_becomes_due_and_times_out_empty() {
    let server = TestServer::start_with(|c| c.poll_interval = Duration::from_secs(60)).await;
    let mut tasks = server.tasks().await;
    tasks
        .create_task(proto::CreateTaskRequest {
            task_type: "refresh_library_metadata".into(),
            scheduled_for: Some((SystemTime::now() + Duration::from_millis(300)).into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut workers = server.workers().await;
    let mut request = acquire("w", &["refresh_library_metadata"], 1);
    request.wait = Some(duration(Duration::from_secs(30)));
    let started = tokio::time::Instant::now();
    let got = acquire_tasks(&mut workers, request.clone()).await;
    assert_eq!(got.len(), 1);
    assert!(started.elapsed() < Duration::from_secs(10));

    // Nothing left: the poll waits out its 200 ms, then answers empty (one
    // that answered at once would not be a long poll).
    let wait = Duration::from_millis(200);
    request.wait = Some(duration(wait));
    let started = tokio::time::Instant::now();
    let got = acquire_tasks(&mut workers, request).await;
    assert!(got.is_empty());
    assert!(
        started.elapsed() >= wait,
        "answered after {:?}, before its wait",
        started.elapsed()
    );
    server.stop().await;
}

#[tokio::test]
async fn cancel_voids_the_lease_and_retry_starts_over() {
    let server = TestServer::start().await;
    let mut tasks = server.tasks().await;
    let mut workers = server.workers().await;

    // Cancel a pending task.
    let pending = tasks
        .create_task(new_task("cleanup_orphaned_files"))
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    let cancelled = tasks
        .cancel_task(proto::CancelTaskRequest {
            id: pending.id.clone(),
            reason: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(status_of(&cancelled), TaskStatus::Cancelled);
    assert!(cancelled.completed_at.is_some());

    // Cancel a processing task: the late completion is refused.
    let leased = create_and_lease(&server, new_task("scan_library"), Duration::from_secs(60)).await;
    let (task_id, lease_token) = lease_of(&leased);
    let cancelled = tasks
        .cancel_task(proto::CancelTaskRequest {
            id: task_id.clone(),
            reason: "library deleted".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(status_of(&cancelled), TaskStatus::Cancelled);
    assert!(cancelled.last_error.unwrap().contains("library deleted"));
    let late = workers
        .complete_task(proto::CompleteTaskRequest {
            task_id: task_id.clone(),
            lease_token,
            result: None,
        })
        .await
        .unwrap_err();
    assert_eq!(late.code(), Code::FailedPrecondition);
    let row = row_snapshot(&server, &task_id).await;
    assert!(row.starts_with("(cancelled,"), "{row}");

    // Cancelling a finished task is refused; a missing one is not found.
    let again = tasks
        .cancel_task(proto::CancelTaskRequest {
            id: task_id.clone(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition);
    let missing = tasks
        .cancel_task(proto::CancelTaskRequest {
            id: uuid::Uuid::now_v7().to_string(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    // Retry: back to pending, due now, attempts reset, and leasable.
    let retried = tasks
        .retry_task(proto::RetryTaskRequest {
            id: task_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(status_of(&retried), TaskStatus::Pending);
    assert_eq!(retried.attempts, 0);
    assert!(retried.completed_at.is_none());
    let got = acquire_tasks(&mut workers, acquire("w", &["scan_library"], 1)).await;
    assert_eq!(got[0].task.as_ref().unwrap().id, task_id);
    assert_eq!(got[0].lease.as_ref().unwrap().attempt, 1);

    // Retrying a processing task is refused.
    let refused = tasks
        .retry_task(proto::RetryTaskRequest { id: task_id })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    server.stop().await;
}

#[tokio::test]
async fn heartbeated_leases_outlive_their_first_expiry() {
    // A renewed lease is never reclaimed, however often it passes its
    // original expiry.
    let server = TestServer::start().await;
    let leased = create_and_lease(&server, new_task("analyze_book"), Duration::from_secs(1)).await;
    let (task_id, lease_token) = lease_of(&leased);
    let mut workers = server.workers().await;
    let first_expiry = SystemTime::try_from(leased.lease.unwrap().locked_until.unwrap()).unwrap();
    let mut last = first_expiry;
    while last < first_expiry + Duration::from_secs(2) {
        let states = workers
            .heartbeat(proto::HeartbeatRequest {
                worker_id: "worker-1".into(),
                leases: vec![proto::LeaseRenewal {
                    task_id: task_id.clone(),
                    lease_token: lease_token.clone(),
                }],
                lease_duration: Some(duration(Duration::from_secs(1))),
            })
            .await
            .unwrap()
            .into_inner()
            .leases;
        assert_eq!(
            states[0].status,
            proto::LeaseStatus::Held as i32,
            "lease kept while renewed"
        );
        last = SystemTime::try_from(states[0].locked_until.unwrap()).unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let done = workers
        .complete_task(proto::CompleteTaskRequest {
            task_id: task_id.clone(),
            lease_token: lease_token.clone(),
            result: None,
        })
        .await
        .unwrap();
    assert_eq!(
        status_of(&done.into_inner().task.unwrap()),
        TaskStatus::Completed
    );
    server.stop().await;
}
