//! The node's database connections: a statement stuck behind a lock fails
//! after the statement timeout (answered UNAVAILABLE, nothing written); a
//! revoke the LISTEN connection missed while it was away is made up for as
//! soon as it listens again; and no connection of a node's start is left
//! to end in an unexpected EOF.

mod common;

use std::time::Duration;

use common::{get_task, new_task, register, status_of, Session, TestServer};
use leasehold::proto::{self, connect_response::Kind as Resp};
use tonic::Code;

/// A cancel that waits on a row an operator's open transaction has locked
/// fails with UNAVAILABLE once the statement timeout passes, well before the
/// call's own deadline, and changes nothing; once the lock is gone the same
/// call succeeds.
#[tokio::test]
async fn a_statement_stuck_behind_a_lock_fails_after_the_statement_timeout() {
    let server = TestServer::start_with(|c| c.db_statement_timeout = Duration::from_secs(1)).await;
    let mut tasks = server.tasks().await;
    let created = tasks
        .create_task(new_task("scan_library"))
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();

    let mut sql = server.sql().await;
    let lock = sql.transaction().await.unwrap();
    lock.execute(
        "SELECT 1 FROM task WHERE id = $1::text::uuid FOR UPDATE",
        &[&created.id],
    )
    .await
    .unwrap();

    let mut request = tonic::Request::new(proto::CancelTaskRequest {
        id: created.id.clone(),
        ..Default::default()
    });
    request.set_timeout(Duration::from_secs(20));
    let refused = tasks.cancel_task(request).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(
        !refused.message().to_lowercase().contains("select"),
        "SQL reached the client: {refused:?}"
    );
    assert_eq!(
        status_of(&get_task(&mut tasks, &created.id).await),
        proto::TaskStatus::Pending
    );

    lock.rollback().await.unwrap();
    let cancelled = tasks
        .cancel_task(proto::CancelTaskRequest {
            id: created.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(status_of(&cancelled), proto::TaskStatus::Cancelled);
    server.stop().await;
}

/// Ends the node's LISTEN connection from the database side, as a network
/// break or a restart of Postgres would; returns how many it ended.
async fn break_listen_connection(sql: &tokio_postgres::Client) -> i64 {
    sql.query_one(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE datname = current_database() AND query LIKE 'LISTEN %'",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// A lease voided behind the node's back (with the revoke it would send
/// suppressed, as if sent while the node's LISTEN connection was away)
/// reaches its session as a cancel the moment that connection listens
/// again, not at the worker's next heartbeat (none comes here). That the
/// dispatcher claims again on listening is shown across a database restart
/// (tests/database_restart.rs).
#[tokio::test]
async fn a_revoke_missed_while_not_listening_is_made_up_when_it_listens_again() {
    let server = TestServer::start().await;
    let mut tasks = server.tasks().await;
    let mut session =
        Session::connect(&server.endpoint(), register("w", &["scan_library"], 1)).await;
    let created = tasks
        .create_task(new_task("scan_library"))
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    let leased = session.next_task().await;
    let lease = leased.lease.clone().unwrap();
    assert_eq!(lease.task_id, created.id);

    // With triggers off (session_replication_role), this write notifies no
    // one: the lease is taken back as a reclaim on another node would, the
    // task due again only in an hour.
    let sql = server.sql().await;
    sql.batch_execute("SET session_replication_role = replica")
        .await
        .unwrap();
    let voided = sql
        .execute(
            "UPDATE task SET status = 'pending', lease_token = NULL, locked_by = NULL, \
               locked_until = NULL, reclaim_at = NULL, \
               scheduled_for = now() + interval '1 hour' \
             WHERE id = $1::text::uuid AND lease_token = $2::text::uuid",
            &[&lease.task_id, &lease.lease_token],
        )
        .await
        .unwrap();
    assert_eq!(voided, 1);
    assert!(
        session
            .next_within(Duration::from_millis(500))
            .await
            .is_none(),
        "the node heard of a write that notified no one"
    );

    assert_eq!(break_listen_connection(&sql).await, 1);
    match session.next().await.unwrap() {
        Some(Resp::Cancel(cancel)) => {
            assert_eq!(cancel.task_id, created.id);
            assert_eq!(cancel.lease_token, lease.lease_token);
            assert_eq!(cancel.reason, proto::CancelReason::LeaseReclaimed as i32);
        }
        other => panic!("expected a cancel, got {other:?}"),
    }
    server.stop().await;
}

/// Sessions of this test's database that ended without saying goodbye
/// (the server logs "unexpected EOF on client connection" for each).
async fn abandoned_sessions(sql: &tokio_postgres::Client) -> i64 {
    sql.query_one(
        "SELECT sessions_abandoned FROM pg_stat_database WHERE datname = current_database()",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// A node's start (the probe for its database, the migrations, the history
/// upkeep) leaves no connection dropped without a goodbye. (A stopping node
/// is another matter: the pool ends its connections by aborting them.)
#[tokio::test]
async fn a_node_start_closes_every_connection_it_is_done_with() {
    let server = TestServer::start().await;
    let sql = server.sql().await;
    // The first node's probe found no database; a second node's finds it
    // and does the rest again on it.
    let second = server.another_node().await;
    // Postgres counts a session when its backend exits, a moment after the
    // client went: poll for a while for a count that must stay zero.
    let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
    while tokio::time::Instant::now() < deadline {
        assert_eq!(abandoned_sessions(&sql).await, 0);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    second.shutdown().await.unwrap();
    server.stop().await;
}
