//! Store tests against a real database of their own: every statement
//! prepares, and a database of the previous schema upgrades in place.

use std::time::Duration;

use super::*;
use crate::testing::FreshDatabase;

#[tokio::test]
async fn every_store_statement_prepares_against_the_migrated_schema() {
    let db = FreshDatabase::new();
    let store = Store::new(
        &db.url(),
        1,
        Duration::from_secs(5),
        Duration::from_secs(30),
    )
    .unwrap();
    store.database_create_if_missing().await.unwrap();
    store.migrate().await.unwrap();
    store.statements_prepare().await.unwrap();
    // Migrating again is a no-op.
    store.migrate().await.unwrap();
    // The wake-up trigger of the migrations notifies the channel the
    // node listens on.
    let client = store.client().await.unwrap();
    let source: String = client
        .query_one(
            "SELECT prosrc FROM pg_proc WHERE proname = 'task_wake'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        source.contains(&format!("'{}'", notify::WAKE_CHANNEL)),
        "{source}"
    );
    drop(client);
    drop(store);
    db.drop_it().await;
}

/// The tasks of a database at migration V5 (every task in one table), one
/// in each state a node of that version left them in: pending, due or not,
/// pending again after a failure (its token kept), processing under a lease,
/// and completed, failed and cancelled, one of them long ago, one holding a
/// dedup key a live task holds now too.
const V5_TASKS: &str = "
INSERT INTO task (id, task_type, status, priority, attempts, max_attempts, scheduled_for,
    created_at, started_at, completed_at, locked_by, locked_until, lease_token, last_error,
    params, result, library_id, series_id, book_id, dedup_key, progress_current,
    progress_total, progress_message, progress_updated_at) VALUES
('01900000-0000-7000-8000-000000000001', 'scan_library', 'pending', 600, 0, 3, now(),
    now(), NULL, NULL, NULL, NULL, NULL, NULL, '{\"mode\": \"deep\"}', NULL,
    '3f2b8c1e-7a4d-4e6f-9b0a-5c1d2e3f4a5b', NULL, NULL, 'scan:1', NULL, NULL, NULL, NULL),
('01900000-0000-7000-8000-000000000002', 'generate_thumbnail', 'pending', 400, 0, 3,
    now() + interval '1 hour', now(), NULL, NULL, NULL, NULL, NULL, NULL, '{\"force\": true}',
    NULL, NULL, NULL, 'b0000000-0000-4000-8000-000000000001', NULL, NULL, NULL, NULL, NULL),
('01900000-0000-7000-8000-000000000003', 'analyze_book', 'pending', 500, 1, 3,
    now() + interval '1 minute', now() - interval '1 minute', now() - interval '1 minute',
    NULL, NULL, NULL, 'f0000000-0000-4000-8000-000000000003', 'timeout', '{}', NULL, NULL,
    NULL, NULL, NULL, NULL, NULL, NULL, NULL),
('01900000-0000-7000-8000-000000000004', 'analyze_series', 'processing', 490, 1, 3, now(),
    now(), now(), NULL, 'worker-old', now() + interval '1 hour',
    'f0000000-0000-4000-8000-000000000004', NULL, '{}', NULL, NULL,
    'c0000000-0000-4000-8000-000000000001', NULL, NULL, 3, 10, 'reading', now()),
('01900000-0000-7000-8000-000000000005', 'scan_library', 'completed', 600, 1, 3,
    now() - interval '2 days', now() - interval '2 days', now() - interval '2 days',
    now() - interval '2 days', 'worker-1', NULL, 'f0000000-0000-4000-8000-000000000005', NULL,
    '{}', '{\"files_processed\": 812, \"errors\": []}', NULL, NULL, NULL, 'scan:1', 812, 812,
    'done', now() - interval '2 days'),
('01900000-0000-7000-8000-000000000006', 'purge_deleted', 'failed', 550, 3, 3,
    now() - interval '1 day', now() - interval '1 day', now() - interval '1 day',
    now() - interval '1 day', 'worker-2', NULL, 'f0000000-0000-4000-8000-000000000006',
    'gave up', '{}', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
('01900000-0000-7000-8000-000000000007', 'user_plugin_sync', 'cancelled', 980, 1, 3, now(),
    now(), now(), now(), 'worker-3', NULL, 'f0000000-0000-4000-8000-000000000007',
    'cancelled: library deleted', '{}', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
('01900000-0000-7000-8000-000000000008', 'cleanup_orphaned_files', 'completed', 100, 1, 3,
    now() - interval '400 days', now() - interval '400 days', now() - interval '400 days',
    now() - interval '400 days', 'worker-4', NULL, 'f0000000-0000-4000-8000-000000000008',
    NULL, '{}', '{}', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)";

/// Every column of every task, by id, as JSON.
async fn rows(client: &deadpool_postgres::Object, relation: &str) -> Vec<serde_json::Value> {
    client
        .query(
            &format!("SELECT to_jsonb(t) - 'seq' FROM {relation} t ORDER BY id"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// A database of the previous schema, full of tasks in every status, is
/// upgraded in place: every task keeps every field, the finished ones in the
/// history; a node then serves them all, a lease taken before the upgrade
/// still completes its task, and an outcome repeated with the token of a
/// task finished before the upgrade gets the same answer.
#[tokio::test]
async fn a_database_of_the_previous_schema_upgrades_keeping_every_task() {
    use crate::wire::proto::worker_service_client::WorkerServiceClient;
    use crate::wire::proto::{self, task_service_client::TaskServiceClient};

    let db = FreshDatabase::new();
    let store = Store::new(
        &db.url(),
        2,
        Duration::from_secs(5),
        Duration::from_secs(30),
    )
    .unwrap();
    store.database_create_if_missing().await.unwrap();
    store
        .migrate_to(refinery::Target::Version(5))
        .await
        .unwrap();
    let client = store.client().await.unwrap();
    client.batch_execute(V5_TASKS).await.unwrap();
    let before = rows(&client, "task").await;
    assert_eq!(before.len(), 8);
    drop(client);

    store.migrate().await.unwrap();
    let client = store.client().await.unwrap();
    assert_eq!(
        rows(&client, "task_all").await,
        before,
        "every task, every field"
    );
    let live: Vec<String> = client
        .query("SELECT status FROM task ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(live, ["pending", "pending", "pending", "processing"]);
    drop(client);

    // A node on the upgraded database (keeping finished tasks forever, so
    // that the 400-day-old one stays).
    let mut config = crate::config::Config::with_database_url(db.url());
    config.db_pool_size = 2;
    config.drain_grace = Duration::from_secs(1);
    config.retain_finished = Duration::ZERO;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let node = crate::server::start(config, listener).await.unwrap();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", node.addr()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut tasks = TaskServiceClient::new(channel.clone());
    let mut workers = WorkerServiceClient::new(channel);
    for row in &before {
        let id = row["id"].as_str().unwrap();
        let task = tasks
            .get_task(proto::GetTaskRequest { id: id.into() })
            .await
            .unwrap()
            .into_inner()
            .task
            .unwrap();
        assert_eq!(
            task.status().as_str_name(),
            format!(
                "TASK_STATUS_{}",
                row["status"].as_str().unwrap().to_uppercase()
            ),
            "{id}"
        );
        assert_eq!(task.attempts, row["attempts"].as_i64().unwrap() as i32);
        assert_eq!(task.last_error.as_deref(), row["last_error"].as_str());
        assert_eq!(task.dedup_key.as_deref(), row["dedup_key"].as_str());
    }
    let listed = tasks
        .list_tasks(proto::ListTasksRequest {
            page_size: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .tasks;
    assert_eq!(listed.len(), 8);

    // The lease taken before the upgrade completes its task.
    let done = workers
        .complete_task(proto::CompleteTaskRequest {
            task_id: "01900000-0000-7000-8000-000000000004".into(),
            lease_token: "f0000000-0000-4000-8000-000000000004".into(),
            result: None,
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(done.status(), proto::TaskStatus::Completed);
    // A completion repeated with the token of a task completed before the
    // upgrade is recognised as applied: the same task comes back.
    let again = workers
        .complete_task(proto::CompleteTaskRequest {
            task_id: "01900000-0000-7000-8000-000000000005".into(),
            lease_token: "f0000000-0000-4000-8000-000000000005".into(),
            result: None,
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(again.status(), proto::TaskStatus::Completed);
    assert_eq!(
        crate::wire::json::struct_to_json(again.result.as_ref().unwrap()).unwrap(),
        serde_json::json!({"files_processed": 812, "errors": []})
    );
    node.shutdown().await.unwrap();
    drop(store);
    db.drop_it().await;
}
