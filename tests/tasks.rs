//! TaskService end to end: creation and dedup, batches, listing, purge,
//! stats, and the statements of the store against the migrated schema.

mod common;

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use common::{
    acquire, acquire_tasks, create_batch, get_task, json, new_task, status_of, TestServer,
};
use leasehold::proto::{self, TaskStatus};
use tonic::Code;

#[tokio::test]
async fn create_returns_the_full_task_and_get_reads_it_back() {
    let server = TestServer::start().await;
    let mut tasks = server.tasks().await;
    let library = uuid::Uuid::new_v4().to_string();
    let created = tasks
        .create_task(proto::CreateTaskRequest {
            task_type: "scan_library".into(),
            params: Some(json(serde_json::json!({"mode": "deep"}))),
            priority: 600,
            library_id: Some(library.clone()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!created.deduplicated);
    let task = created.task.unwrap();
    assert_eq!(status_of(&task), TaskStatus::Pending);
    assert_eq!(
        (task.priority, task.attempts, task.max_attempts),
        (600, 0, 3)
    );
    assert_eq!(task.library_id.as_deref(), Some(library.as_str()));
    assert!(task.scheduled_for.is_some() && task.created_at.is_some());
    assert!(task.started_at.is_none() && task.completed_at.is_none());
    assert!(task.locked_by.is_none() && task.locked_until.is_none() && task.result.is_none());

    let got = get_task(&mut tasks, &task.id).await;
    assert_eq!(got, task);
    let missing = tasks
        .get_task(proto::GetTaskRequest {
            id: uuid::Uuid::now_v7().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    server.stop().await;
}

#[tokio::test]
async fn concurrent_creates_with_one_dedup_key_make_one_row() {
    let server = TestServer::start().await;
    let library = uuid::Uuid::new_v4();
    let mut handles = Vec::new();
    for _ in 0..20 {
        let mut tasks = server.tasks().await;
        handles.push(tokio::spawn(async move {
            tasks
                .create_task(proto::CreateTaskRequest {
                    task_type: "scan_library".into(),
                    dedup_key: Some(format!("scan_library:{library}")),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
        }));
    }
    let mut ids = HashSet::new();
    let mut fresh = 0;
    for handle in handles {
        let response = handle.await.unwrap();
        ids.insert(response.task.unwrap().id);
        if !response.deduplicated {
            fresh += 1;
        }
    }
    assert_eq!(ids.len(), 1, "every caller sees the same task");
    assert_eq!(fresh, 1, "exactly one create added a row");
    assert_eq!(server.task_count().await, 1);

    // Once the holder is finished, the key is free again.
    let mut workers = server.workers().await;
    let leased = acquire_tasks(&mut workers, acquire("w", &["scan_library"], 1))
        .await
        .remove(0);
    let lease = leased.lease.unwrap();
    workers
        .complete_task(proto::CompleteTaskRequest {
            task_id: lease.task_id.clone(),
            lease_token: lease.lease_token,
            result: None,
        })
        .await
        .unwrap();
    let again = server
        .tasks()
        .await
        .create_task(proto::CreateTaskRequest {
            task_type: "scan_library".into(),
            dedup_key: Some(format!("scan_library:{library}")),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!again.deduplicated);
    assert_ne!(again.task.unwrap().id, lease.task_id);
    server.stop().await;
}

#[tokio::test]
async fn create_tasks_keeps_request_order_and_dedups_within_and_across_batches() {
    let server = TestServer::start().await;
    let mut tasks = server.tasks().await;
    let existing = tasks
        .create_task(proto::CreateTaskRequest {
            task_type: "analyze_series".into(),
            dedup_key: Some("series:1".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    let entry = |task_type: &str, key: Option<&str>, n: i64| proto::CreateTaskRequest {
        task_type: task_type.into(),
        dedup_key: key.map(str::to_owned),
        params: Some(json(serde_json::json!({ "n": n }))),
        ..Default::default()
    };
    let results = tasks
        .create_tasks(proto::CreateTasksRequest {
            tasks: vec![
                entry("analyze_book", None, 0),
                entry("analyze_series", Some("series:1"), 1),
                entry("analyze_book", Some("book:7"), 2),
                entry("analyze_book", Some("book:7"), 3),
                entry("generate_thumbnail", None, 4),
            ],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    let summary: Vec<(String, bool)> = results
        .iter()
        .map(|r| (r.task.as_ref().unwrap().task_type.clone(), r.deduplicated))
        .collect();
    assert_eq!(
        summary,
        [
            ("analyze_book".to_string(), false),
            ("analyze_series".to_string(), true),
            ("analyze_book".to_string(), false),
            ("analyze_book".to_string(), true),
            ("generate_thumbnail".to_string(), false),
        ]
    );
    assert_eq!(results[1].task.as_ref().unwrap().id, existing.id);
    assert_eq!(
        results[3].task.as_ref().unwrap().id,
        results[2].task.as_ref().unwrap().id
    );
    let params = |i: usize| {
        leasehold::client::from_struct(results[i].task.as_ref().unwrap().params.as_ref().unwrap())
            .unwrap()
    };
    assert_eq!(params(4), serde_json::json!({"n": 4}));
    assert_eq!(server.task_count().await, 4);

    // The largest batch goes through in one call.
    let big = (0..10_000)
        .map(|_| new_task("generate_thumbnail"))
        .collect();
    let results = tasks
        .create_tasks(proto::CreateTasksRequest { tasks: big })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(results.len(), 10_000);
    assert_eq!(server.task_count().await, 10_004);
    server.stop().await;
}

#[tokio::test]
async fn paging_returns_every_task_once_newest_first_while_the_table_changes() {
    let server = TestServer::start().await;
    let mut tasks = server.tasks().await;
    let batch = (0..1000).map(|_| new_task("analyze_book")).collect();
    let originals = create_batch(&mut tasks, batch).await;

    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = tasks
            .list_tasks(proto::ListTasksRequest {
                task_types: vec!["analyze_book".into()],
                page_size: 70,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        seen.extend(page.tasks.iter().map(|t| t.id.clone()));
        // The table changes between pages: new tasks arrive, some finish.
        tasks.create_task(new_task("analyze_book")).await.unwrap();
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(pages, 15);
    let distinct: HashSet<_> = seen.iter().collect();
    assert_eq!(distinct.len(), seen.len(), "no task twice");
    let expected: Vec<String> = originals.into_iter().rev().collect();
    assert_eq!(seen, expected, "all originals, newest first");
    server.stop().await;
}

#[tokio::test]
async fn list_filters_by_status_type_and_subject() {
    let server = TestServer::start().await;
    let mut tasks = server.tasks().await;
    let library = uuid::Uuid::new_v4().to_string();
    let book = uuid::Uuid::new_v4().to_string();
    tasks
        .create_task(proto::CreateTaskRequest {
            task_type: "scan_library".into(),
            library_id: Some(library.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    tasks
        .create_task(proto::CreateTaskRequest {
            task_type: "analyze_book".into(),
            library_id: Some(library.clone()),
            book_id: Some(book.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    tasks.create_task(new_task("purge_deleted")).await.unwrap();
    let leased = acquire_tasks(
        &mut server.workers().await,
        acquire("w", &["purge_deleted"], 1),
    )
    .await;
    assert_eq!(leased.len(), 1);

    let list = |req: proto::ListTasksRequest| {
        let mut tasks = tasks.clone();
        async move {
            let mut types: Vec<String> = tasks
                .list_tasks(req)
                .await
                .unwrap()
                .into_inner()
                .tasks
                .into_iter()
                .map(|t| t.task_type)
                .collect();
            types.sort();
            types
        }
    };
    assert_eq!(
        list(proto::ListTasksRequest {
            library_id: Some(library.clone()),
            ..Default::default()
        })
        .await,
        ["analyze_book", "scan_library"]
    );
    assert_eq!(
        list(proto::ListTasksRequest {
            book_id: Some(book),
            ..Default::default()
        })
        .await,
        ["analyze_book"]
    );
    assert_eq!(
        list(proto::ListTasksRequest {
            statuses: vec![TaskStatus::Processing as i32],
            ..Default::default()
        })
        .await,
        ["purge_deleted"]
    );
    assert_eq!(
        list(proto::ListTasksRequest {
            statuses: vec![TaskStatus::Pending as i32],
            task_types: vec!["scan_library".into(), "purge_deleted".into()],
            ..Default::default()
        })
        .await,
        ["scan_library"]
    );
    assert_eq!(list(proto::ListTasksRequest::default()).await.len(), 3);
    server.stop().await;
}

/// Creates `n` tasks of `task_type` and drives each to `status`.
async fn tasks_in(server: &TestServer, task_type: &str, n: usize, status: TaskStatus) {
    let mut tasks = server.tasks().await;
    let mut workers = server.workers().await;
    let batch = (0..n).map(|_| new_task(task_type)).collect();
    let created = create_batch(&mut tasks, batch).await;
    if status == TaskStatus::Pending {
        return;
    }
    if status == TaskStatus::Cancelled {
        for id in created {
            tasks
                .cancel_task(proto::CancelTaskRequest {
                    id,
                    reason: String::new(),
                })
                .await
                .unwrap();
        }
        return;
    }
    let mut leased = Vec::new();
    while leased.len() < n {
        let want = (n - leased.len()).min(1000) as i32;
        let got = acquire_tasks(&mut workers, acquire("w", &[task_type], want)).await;
        // Nothing leased would loop forever: fail instead.
        assert!(!got.is_empty(), "{} of {n} tasks leased", leased.len());
        leased.extend(got);
    }
    for l in leased {
        let lease = l.lease.unwrap();
        match status {
            TaskStatus::Completed => {
                workers
                    .complete_task(proto::CompleteTaskRequest {
                        task_id: lease.task_id,
                        lease_token: lease.lease_token,
                        result: None,
                    })
                    .await
                    .unwrap();
            }
            TaskStatus::Failed => {
                workers
                    .fail_task(proto::FailTaskRequest {
                        task_id: lease.task_id,
                        lease_token: lease.lease_token,
                        error: "broken".into(),
                        permanent: true,
                        retry_after: None,
                    })
                    .await
                    .unwrap();
            }
            _ => {}
        }
    }
}

#[tokio::test]
async fn stats_count_per_status_and_type_with_the_oldest_due_age() {
    let server = TestServer::start().await;
    tasks_in(&server, "scan_library", 3, TaskStatus::Pending).await;
    tasks_in(&server, "analyze_book", 2, TaskStatus::Processing).await;
    tasks_in(&server, "analyze_book", 4, TaskStatus::Completed).await;
    tasks_in(&server, "generate_thumbnail", 1, TaskStatus::Failed).await;
    tasks_in(&server, "generate_thumbnail", 2, TaskStatus::Cancelled).await;
    server
        .tasks()
        .await
        .create_task(proto::CreateTaskRequest {
            task_type: "scan_library".into(),
            scheduled_for: Some((SystemTime::now() - Duration::from_secs(120)).into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let stats = server
        .tasks()
        .await
        .get_stats(proto::GetStatsRequest {})
        .await
        .unwrap()
        .into_inner();
    let totals = stats.totals.unwrap();
    assert_eq!(
        (
            totals.pending,
            totals.processing,
            totals.completed,
            totals.failed,
            totals.cancelled,
            totals.total
        ),
        (4, 2, 4, 1, 2, 13)
    );
    let types: Vec<(&str, i64, i64)> = stats
        .task_types
        .iter()
        .map(|t| {
            let c = t.counts.as_ref().unwrap();
            (t.task_type.as_str(), c.pending, c.total)
        })
        .collect();
    assert_eq!(
        types,
        [
            ("analyze_book", 0, 6),
            ("generate_thumbnail", 0, 3),
            ("scan_library", 4, 4)
        ]
    );
    let scan_age = stats.task_types[2].oldest_due_pending_age.unwrap();
    assert!((119..200).contains(&scan_age.seconds), "{scan_age:?}");
    assert!(stats.task_types[0].oldest_due_pending_age.is_none());
    assert_eq!(stats.oldest_due_pending_age, Some(scan_age));
    server.stop().await;
}

#[tokio::test]
async fn purge_deletes_only_finished_tasks_of_the_chosen_statuses() {
    let server = TestServer::start().await;
    tasks_in(&server, "scan_library", 2, TaskStatus::Pending).await;
    tasks_in(&server, "analyze_book", 1, TaskStatus::Processing).await;
    tasks_in(&server, "analyze_book", 1500, TaskStatus::Completed).await;
    tasks_in(&server, "generate_thumbnail", 3, TaskStatus::Failed).await;
    tasks_in(&server, "generate_thumbnail", 2, TaskStatus::Cancelled).await;
    let mut tasks = server.tasks().await;

    // Nothing finished before an hour ago.
    let none = tasks
        .purge_tasks(proto::PurgeTasksRequest {
            completed_before: Some((SystemTime::now() - Duration::from_secs(3600)).into()),
            statuses: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(none.deleted_count, 0);

    let failed = tasks
        .purge_tasks(proto::PurgeTasksRequest {
            completed_before: None,
            statuses: vec![TaskStatus::Failed as i32],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(failed.deleted_count, 3);
    // More than one batch of completed tasks, plus the cancelled ones.
    let rest = tasks
        .purge_tasks(proto::PurgeTasksRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.deleted_count, 1502);
    let left: Vec<String> = server
        .sql()
        .await
        .query("SELECT status FROM task_all ORDER BY status", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(left, ["pending", "pending", "processing"]);
    server.stop().await;
}

/// Past `--vacuum-threshold` dead row versions, a node vacuums the task
/// table itself (this machine's Postgres, like many, runs without
/// autovacuum).
#[tokio::test]
async fn a_node_vacuums_the_task_table_past_its_dead_row_threshold() {
    let server = TestServer::start_with(|config| config.vacuum_threshold = 50).await;
    let mut tasks = server.tasks().await;
    let mut workers = server.workers().await;
    let batch = proto::CreateTasksRequest {
        tasks: (0..40).map(|_| new_task("vacuum_me")).collect(),
    };
    tasks.create_tasks(batch).await.unwrap();
    // Each lease and each completion leaves a dead row version behind.
    let leased = acquire_tasks(&mut workers, acquire("w", &["vacuum_me"], 40)).await;
    assert_eq!(leased.len(), 40);
    for task in &leased {
        let lease = task.lease.as_ref().unwrap();
        workers
            .complete_task(proto::CompleteTaskRequest {
                task_id: lease.task_id.clone(),
                lease_token: lease.lease_token.clone(),
                result: None,
            })
            .await
            .unwrap();
    }
    let sql = server.sql().await;
    common::eventually(Duration::from_secs(30), || async {
        let row = sql
            .query_one(
                "SELECT vacuum_count FROM pg_stat_user_tables WHERE relname = 'task'",
                &[],
            )
            .await
            .unwrap();
        (row.get::<_, i64>(0) > 0).then_some(())
    })
    .await;
    server.stop().await;
}
