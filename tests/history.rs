//! Live tasks and their history: every read spans both while tasks move
//! between them, a retry moves a finished task back with no old lease, and
//! retention drops whole days past it and nothing younger.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::{acquire, acquire_tasks, fail_task, get_task, TestServer};
use leasehold::proto::{self, TaskStatus};
use tonic::Code;

/// Completes a lease (unary), which must succeed.
async fn complete(
    workers: &mut proto::worker_service_client::WorkerServiceClient<tonic::transport::Channel>,
    lease: &proto::Lease,
) -> proto::Task {
    workers
        .complete_task(proto::CompleteTaskRequest {
            task_id: lease.task_id.clone(),
            lease_token: lease.lease_token.clone(),
            result: Some(common::json(serde_json::json!({"done": lease.task_id}))),
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap()
}

/// A permanent failure of `lease`.
fn permanent(lease: &proto::Lease, error: &str) -> proto::FailTaskRequest {
    proto::FailTaskRequest {
        task_id: lease.task_id.clone(),
        lease_token: lease.lease_token.clone(),
        error: error.into(),
        permanent: true,
        retry_after: None,
    }
}

/// Paging, single reads and statistics see every task exactly once, in its
/// current status, while tasks finish (leave the live table) between pages.
#[tokio::test]
async fn reads_paging_and_stats_span_live_and_finished_tasks_while_they_move() {
    let server = TestServer::start().await;
    let mut tasks = server.tasks().await;
    let mut workers = server.workers().await;
    let ids = server.create_many("move_me", 60).await;
    let leased = acquire_tasks(&mut workers, acquire("w", &["move_me"], 40)).await;
    assert_eq!(leased.len(), 40);
    let leases: HashMap<String, proto::Lease> = leased
        .into_iter()
        .map(|t| {
            let lease = t.lease.unwrap();
            (lease.task_id.clone(), lease)
        })
        .collect();
    // Before paging: some finished three ways, the rest processing or
    // pending.
    let mut expected: HashMap<String, TaskStatus> = ids
        .iter()
        .map(|id| {
            let status = if leases.contains_key(id) {
                TaskStatus::Processing
            } else {
                TaskStatus::Pending
            };
            (id.clone(), status)
        })
        .collect();
    let mut live: Vec<&proto::Lease> = leases.values().collect();
    live.sort_by(|a, b| a.task_id.cmp(&b.task_id));
    for lease in live.drain(..10) {
        complete(&mut workers, lease).await;
        expected.insert(lease.task_id.clone(), TaskStatus::Completed);
    }
    for lease in live.drain(..5) {
        fail_task(&mut workers, permanent(lease, "broken")).await;
        expected.insert(lease.task_id.clone(), TaskStatus::Failed);
    }
    for id in ids.iter().filter(|id| !leases.contains_key(*id)).take(5) {
        tasks
            .cancel_task(proto::CancelTaskRequest {
                id: id.clone(),
                reason: "not needed".into(),
            })
            .await
            .unwrap();
        expected.insert(id.clone(), TaskStatus::Cancelled);
    }

    // Page by 7; between pages, tasks on pages already read and on pages to
    // come move to the history.
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = tasks
            .list_tasks(proto::ListTasksRequest {
                task_types: vec!["move_me".into()],
                page_size: 7,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        seen.extend(page.tasks.iter().map(|t| t.id.clone()));
        for lease in live.drain(..live.len().min(3)) {
            complete(&mut workers, lease).await;
            expected.insert(lease.task_id.clone(), TaskStatus::Completed);
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let newest_first: Vec<String> = ids.iter().rev().cloned().collect();
    assert_eq!(seen, newest_first, "every task once, newest first");

    // Each task reads back in the status it ended in, live or finished.
    for (id, status) in &expected {
        let task = get_task(&mut tasks, id).await;
        assert_eq!(task.status(), *status, "task {id}");
        if *status == TaskStatus::Completed {
            assert!(task.completed_at.is_some() && task.result.is_some());
            assert!(task.locked_until.is_none());
        }
    }
    // A status filter finds exactly the tasks in that status, in either
    // table.
    for status in [
        TaskStatus::Pending,
        TaskStatus::Processing,
        TaskStatus::Completed,
        TaskStatus::Failed,
        TaskStatus::Cancelled,
    ] {
        let listed: HashSet<String> = tasks
            .list_tasks(proto::ListTasksRequest {
                task_types: vec!["move_me".into()],
                statuses: vec![status as i32],
                page_size: 100,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .tasks
            .into_iter()
            .map(|t| t.id)
            .collect();
        let want: HashSet<String> = expected
            .iter()
            .filter(|(_, s)| **s == status)
            .map(|(id, _)| id.clone())
            .collect();
        assert_eq!(listed, want, "{status:?}");
    }
    // Statistics count both tables.
    let stats = tasks
        .get_stats(proto::GetStatsRequest {})
        .await
        .unwrap()
        .into_inner();
    let counts = stats
        .task_types
        .iter()
        .find(|t| t.task_type == "move_me")
        .and_then(|t| t.counts)
        .unwrap();
    let count = |status| expected.values().filter(|s| **s == status).count() as i64;
    assert_eq!(counts.pending, count(TaskStatus::Pending));
    assert_eq!(counts.processing, count(TaskStatus::Processing));
    assert_eq!(counts.completed, count(TaskStatus::Completed));
    assert_eq!(counts.failed, count(TaskStatus::Failed));
    assert_eq!(counts.cancelled, count(TaskStatus::Cancelled));
    assert_eq!(counts.total, 60);
    server.stop().await;
}

/// A task that failed for good moves back to the live table on retry: same
/// id, pending, attempts reset, and no lease, so the old token can never act
/// on it; a live task holding its dedup key refuses the retry and the task
/// stays failed, unchanged.
#[tokio::test]
async fn retry_moves_a_finished_task_back_without_its_lease_and_respects_live_dedup() {
    let server = TestServer::start().await;
    let mut tasks = server.tasks().await;
    let mut workers = server.workers().await;
    let keyed = |key: &str| proto::CreateTaskRequest {
        task_type: "retry_me".into(),
        dedup_key: Some(key.into()),
        ..Default::default()
    };
    tasks.create_task(keyed("album:1")).await.unwrap();
    let leased = acquire_tasks(&mut workers, acquire("w", &["retry_me"], 1)).await;
    let old = leased[0].lease.clone().unwrap();
    let failed = fail_task(&mut workers, permanent(&old, "disk full")).await;
    assert_eq!(failed.status(), TaskStatus::Failed);

    // While finished, its key is free: a new live task takes it...
    let holder = tasks
        .create_task(keyed("album:1"))
        .await
        .unwrap()
        .into_inner();
    assert!(!holder.deduplicated);
    // ...and then the finished one cannot come back.
    let refused = tasks
        .retry_task(proto::RetryTaskRequest {
            id: old.task_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert_eq!(
        get_task(&mut tasks, &old.task_id).await,
        failed,
        "a refused retry changes nothing"
    );

    // Without the holder it comes back, without a lease.
    tasks
        .cancel_task(proto::CancelTaskRequest {
            id: holder.task.unwrap().id,
            reason: String::new(),
        })
        .await
        .unwrap();
    let retried = tasks
        .retry_task(proto::RetryTaskRequest {
            id: old.task_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(retried.status(), TaskStatus::Pending);
    assert_eq!(retried.attempts, 0);
    assert_eq!(retried.last_error.as_deref(), Some("disk full"));
    assert!(retried.completed_at.is_none() && retried.locked_by.is_none());
    let stale = workers
        .complete_task(proto::CompleteTaskRequest {
            task_id: old.task_id.clone(),
            lease_token: old.lease_token.clone(),
            result: None,
        })
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition);
    // It is leased anew, and its key is held again while it lives.
    let again = acquire_tasks(&mut workers, acquire("w", &["retry_me"], 1)).await;
    let lease = again[0].lease.clone().unwrap();
    assert_eq!(lease.task_id, old.task_id);
    assert_ne!(lease.lease_token, old.lease_token);
    assert!(
        tasks
            .create_task(keyed("album:1"))
            .await
            .unwrap()
            .into_inner()
            .deduplicated
    );
    complete(&mut workers, &lease).await;
    server.stop().await;
}

/// Each finished task is in one partition of its status and completion day;
/// what the test puts there directly.
struct Day {
    status: &'static str,
    /// Days before today (UTC, by the database clock).
    age: i32,
    id: uuid::Uuid,
}

/// The history's partitions, by name.
async fn history_tables(sql: &tokio_postgres::Client) -> HashSet<String> {
    sql.query(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
         WHERE i.inhparent::regclass::text LIKE 'task_history_%'",
        &[],
    )
    .await
    .unwrap()
    .into_iter()
    .map(|row| row.get(0))
    .collect()
}

/// Past its retention a whole day is dropped (its table gone, its tasks with
/// it); a younger day of the same status, and any day of a status kept
/// forever, stay with every row.
#[tokio::test]
async fn retention_drops_whole_days_past_it_and_nothing_younger() {
    common::init_logging();
    let (url, db_name) = common::fresh_database_url();
    let mut config = leasehold::config::Config::with_database_url(&url);
    config.db_pool_size = 4;
    config.drain_grace = Duration::from_secs(1);
    config.retain_completed = Some(Duration::from_secs(2 * 24 * 3600));
    config.retain_failed = Some(Duration::ZERO);
    // Cancelled tasks keep --retain-finished's 14 days.
    leasehold::server::migrate(&config).await.unwrap();

    let days = [
        ("completed", 10, true),
        ("completed", 1, false),
        ("failed", 30, false),
        ("cancelled", 20, true),
        ("cancelled", 5, false),
    ];
    let sql = common::connect_sql(&url).await;
    let mut placed = Vec::new();
    for (status, age, _) in days {
        let id = uuid::Uuid::now_v7();
        // The migration made yesterday to a week ahead; older days are made
        // here as a node would have made them then.
        sql.batch_execute(&format!(
            "DO $$ DECLARE d date := (now() AT TIME ZONE 'UTC')::date - {age}; BEGIN \
               EXECUTE format('CREATE TABLE IF NOT EXISTS %I PARTITION OF %I \
                 FOR VALUES FROM (%L) TO (%L)', \
                 'task_history_{status}_' || to_char(d, 'YYYYMMDD'), 'task_history_{status}', \
                 d::timestamp AT TIME ZONE 'UTC', (d + 1)::timestamp AT TIME ZONE 'UTC'); \
             END $$; \
             INSERT INTO task_history (id, seq, task_type, status, priority, attempts, \
               max_attempts, scheduled_for, created_at, completed_at, params) \
             VALUES ('{id}', 1, 'old', '{status}', 0, 1, 3, now(), now(), \
               date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' \
                 - interval '{age} days' + interval '12 hours', '{{}}')"
        ))
        .await
        .unwrap();
        placed.push(Day { status, age, id });
    }

    // The partitions' names, as the node names them.
    let mut names = Vec::new();
    for day in &placed {
        names.push(
            sql.query_one(
                &format!(
                    "SELECT 'task_history_{}_' || \
                     to_char((now() AT TIME ZONE 'UTC')::date - {}, 'YYYYMMDD')",
                    day.status, day.age
                ),
                &[],
            )
            .await
            .unwrap()
            .get::<_, String>(0),
        );
    }

    // A day past retention that a node detached and then could not drop
    // (it stopped, or the drop failed) is a loose table, not a partition.
    let loose: String = sql
        .query_one(
            "SELECT 'task_history_completed_' || \
             to_char((now() AT TIME ZONE 'UTC')::date - 11, 'YYYYMMDD')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    sql.batch_execute(&format!(
        "DO $$ DECLARE d date := (now() AT TIME ZONE 'UTC')::date - 11; BEGIN \
           EXECUTE format('CREATE TABLE %I PARTITION OF task_history_completed \
             FOR VALUES FROM (%L) TO (%L)', '{loose}', \
             d::timestamp AT TIME ZONE 'UTC', (d + 1)::timestamp AT TIME ZONE 'UTC'); \
         END $$; \
         ALTER TABLE task_history_completed DETACH PARTITION {loose}"
    ))
    .await
    .unwrap();
    let exists = |table: String| {
        let sql = &sql;
        async move {
            sql.query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
                .await
                .unwrap()
                .get::<_, bool>(0)
        }
    };
    assert!(exists(loose.clone()).await);

    let server = TestServer::start_config(config, db_name).await;
    // The node's history job runs as it starts.
    common::eventually(Duration::from_secs(20), || async {
        let present = history_tables(&sql).await;
        let done = names
            .iter()
            .zip(days)
            .all(|(name, (_, _, dropped))| present.contains(name) != dropped);
        (done && !exists(loose.clone()).await).then_some(())
    })
    .await;
    let mut tasks = server.tasks().await;
    for (day, (_, _, dropped)) in placed.iter().zip(days) {
        let got = tasks
            .get_task(proto::GetTaskRequest {
                id: day.id.to_string(),
            })
            .await;
        match got {
            Ok(task) if !dropped => {
                assert_eq!(
                    task.into_inner().task.unwrap().status().as_str_name(),
                    format!("TASK_STATUS_{}", day.status.to_uppercase())
                );
            }
            Err(status) if dropped => assert_eq!(status.code(), Code::NotFound),
            other => panic!("{} day {} ago: {other:?}", day.status, day.age),
        }
    }
    // Today and the week ahead exist for every status.
    let present = history_tables(&sql).await;
    for status in ["completed", "failed", "cancelled"] {
        for ahead in 0..=7 {
            let table: String = sql
                .query_one(
                    &format!(
                        "SELECT 'task_history_{status}_' || \
                         to_char((now() AT TIME ZONE 'UTC')::date + {ahead}, 'YYYYMMDD')"
                    ),
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            assert!(present.contains(&table), "{table} missing");
        }
    }
    server.stop().await;
}

/// A task that ends on a day the history has no partition for (a node
/// whose history job could not run for a week, a clock that jumped) is not
/// refused: the write makes the day and lands.
#[tokio::test]
async fn an_outcome_on_a_day_without_its_partition_makes_the_day() {
    let server = TestServer::start().await;
    let mut tasks = server.tasks().await;
    let mut workers = server.workers().await;
    let ids = server.create_many("dayless", 3).await;
    let leased = acquire_tasks(&mut workers, acquire("w", &["dayless"], 2)).await;
    assert_eq!(leased.len(), 2);
    let sql = server.sql().await;
    let today = |status: &str| {
        format!(
            "SELECT 'task_history_{status}_' || to_char((now() AT TIME ZONE 'UTC')::date, 'YYYYMMDD')"
        )
    };
    for status in ["completed", "failed", "cancelled"] {
        let table: String = sql.query_one(&today(status), &[]).await.unwrap().get(0);
        sql.batch_execute(&format!(
            "ALTER TABLE task_history_{status} DETACH PARTITION {table}; DROP TABLE {table}"
        ))
        .await
        .unwrap();
    }

    let lease = |i: usize| leased[i].lease.clone().unwrap();
    let completed = complete(&mut workers, &lease(0)).await;
    assert_eq!(completed.status(), TaskStatus::Completed);
    let failed = fail_task(&mut workers, permanent(&lease(1), "broken")).await;
    assert_eq!(failed.status(), TaskStatus::Failed);
    let pending = ids
        .iter()
        .find(|id| leased.iter().all(|t| &t.task.as_ref().unwrap().id != *id))
        .unwrap();
    let cancelled = tasks
        .cancel_task(proto::CancelTaskRequest {
            id: pending.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(cancelled.status(), TaskStatus::Cancelled);

    let present = history_tables(&sql).await;
    for status in ["completed", "failed", "cancelled"] {
        let table: String = sql.query_one(&today(status), &[]).await.unwrap().get(0);
        assert!(present.contains(&table), "{table} not made again");
    }
    for (id, status) in [
        (&lease(0).task_id, TaskStatus::Completed),
        (&lease(1).task_id, TaskStatus::Failed),
        (pending, TaskStatus::Cancelled),
    ] {
        assert_eq!(get_task(&mut tasks, id).await.status(), status);
    }
    server.stop().await;
}

/// A heartbeat moves no indexed column, so Postgres writes it in place
/// (a heap-only update, no index entry); a heartbeat that shortens the
/// lease still has it reclaimed when the shorter lease runs out.
#[tokio::test]
async fn heartbeats_are_updates_in_place_and_a_shortened_lease_still_expires() {
    let server = TestServer::start().await;
    let mut workers = server.workers().await;
    server
        .tasks()
        .await
        .create_task(proto::CreateTaskRequest {
            task_type: "beat".into(),
            max_attempts: 5,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut request = acquire("w", &["beat"], 1);
    request.lease_duration = Some(common::duration(Duration::from_secs(60)));
    let lease = acquire_tasks(&mut workers, request).await[0]
        .lease
        .clone()
        .unwrap();
    let beat = |seconds: u64| proto::HeartbeatRequest {
        worker_id: "w".into(),
        leases: vec![proto::LeaseRenewal {
            task_id: lease.task_id.clone(),
            lease_token: lease.lease_token.clone(),
        }],
        lease_duration: Some(common::duration(Duration::from_secs(seconds))),
    };
    for _ in 0..5 {
        workers.heartbeat(beat(60)).await.unwrap();
    }
    // Postgres publishes its table statistics within about a second.
    let sql = server.sql().await;
    let (updates, hot) = common::eventually(Duration::from_secs(10), || async {
        let row = sql
            .query_one(
                "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables \
                 WHERE relname = 'task'",
                &[],
            )
            .await
            .unwrap();
        let (updates, hot): (i64, i64) = (row.get(0), row.get(1));
        (updates >= 6).then_some((updates, hot))
    })
    .await;
    // The claim changed the status the pending indexes depend on; each of
    // the five renewals was in place.
    assert_eq!((updates, hot), (6, 5));

    // Shortened to a second: reclaimed once that second has passed, not
    // when the 60 s the reclaimer last knew of would have.
    workers.heartbeat(beat(1)).await.unwrap();
    let task = common::eventually(Duration::from_secs(10), || async {
        let task = get_task(&mut server.tasks().await, &lease.task_id).await;
        (task.status() == TaskStatus::Pending).then_some(task)
    })
    .await;
    assert!(task.last_error.unwrap().starts_with("lease expired"));
    server.stop().await;
}
