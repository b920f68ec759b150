//! The Prometheus endpoint: scraped over plain HTTP, its counters and gauges
//! move as tasks are created, leased, completed, failed, cancelled and
//! reclaimed, and as gRPC calls are answered.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{new_task, register, Session, TestServer};
use leasehold::proto::{self, connect_request::Kind as Req};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One HTTP/1.1 request to the metrics endpoint: the status line and body.
async fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response
        .split_once("\r\n\r\n")
        .expect("a response with headers");
    (head.to_owned(), body.to_owned())
}

/// The value of one series (`name{labels}`) in a scrape, if present.
fn value(scrape: &str, series: &str) -> Option<f64> {
    scrape.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?.strip_prefix(' ')?;
        rest.split(' ').next()?.parse().ok()
    })
}

/// Scrapes until `series` reads `want` (`None`: until it is absent); fails
/// naming both after 10 s.
async fn until_value(addr: SocketAddr, series: &str, want: impl Into<Option<f64>>) {
    let want = want.into();
    let mut last = String::new();
    let found = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let (_, body) = http_get(addr, "/metrics").await;
            if value(&body, series) == want {
                return;
            }
            last = body;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        found.is_ok(),
        "{series} never read {want:?}; last scrape:\n{last}"
    );
}

fn failure(leased: &proto::LeasedTask, permanent: bool) -> Req {
    let lease = leased.lease.as_ref().unwrap();
    Req::Fail(proto::FailTaskRequest {
        task_id: lease.task_id.clone(),
        lease_token: lease.lease_token.clone(),
        error: "no cover image".into(),
        permanent,
        // Not again during this test.
        retry_after: Some(common::duration(Duration::from_secs(3600))),
    })
}

#[tokio::test]
async fn counters_and_gauges_move_with_the_tasks() {
    let server = TestServer::start_with(|c| {
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
        c.metrics_queue_interval = Duration::from_millis(100);
    })
    .await;
    let addr = server.running.as_ref().unwrap().metrics_addr().unwrap();

    let (head, body) = http_get(addr, "/metrics").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{head}"
    );
    assert!(
        body.contains("# TYPE leasehold_sessions_connected gauge"),
        "{body}"
    );
    let (head, _) = http_get(addr, "/nothing").await;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");

    // Three tasks to run, one with a single attempt to let expire, one due
    // in an hour to cancel.
    let mut tasks = server.tasks().await;
    let mut batch: Vec<proto::CreateTaskRequest> =
        (0..3).map(|_| new_task("generate_thumbnail")).collect();
    batch.push(proto::CreateTaskRequest {
        max_attempts: 1,
        ..new_task("generate_thumbnail")
    });
    common::create_batch(&mut tasks, batch).await;
    let later = tasks
        .create_task(proto::CreateTaskRequest {
            scheduled_for: Some((std::time::SystemTime::now() + Duration::from_secs(3600)).into()),
            ..new_task("generate_thumbnail")
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    let created = "leasehold_tasks_created_total{task_type=\"generate_thumbnail\"}";
    until_value(addr, created, 5.0).await;
    let pending = "leasehold_queue_tasks{task_type=\"generate_thumbnail\",status=\"pending\"}";
    until_value(addr, pending, 5.0).await;
    until_value(
        addr,
        "leasehold_grpc_requests_total{method=\"/leasehold.v1.TaskService/CreateTasks\",code=\"OK\"}",
        1.0,
    )
    .await;

    // A session with a short lease takes the four due ones.
    let mut session = Session::connect(
        &server.endpoint(),
        proto::RegisterWorker {
            lease_duration: Some(common::duration(Duration::from_secs(1))),
            ..register("thumbnailer", &["generate_thumbnail"], 4)
        },
    )
    .await;
    let mut leased = Vec::new();
    while leased.len() < 4 {
        leased.push(session.next_task().await);
    }
    until_value(
        addr,
        "leasehold_tasks_leased_total{task_type=\"generate_thumbnail\"}",
        4.0,
    )
    .await;
    until_value(addr, "leasehold_sessions_connected", 1.0).await;
    until_value(
        addr,
        "leasehold_queue_tasks{task_type=\"generate_thumbnail\",status=\"processing\"}",
        4.0,
    )
    .await;

    // Complete one, fail one for good and one with attempts left; the one
    // with a single attempt is left to expire.
    let (single, others): (Vec<_>, Vec<_>) = leased
        .into_iter()
        .partition(|t| t.task.as_ref().unwrap().max_attempts == 1);
    session
        .complete(&others[0], serde_json::json!({"ok": true}))
        .await;
    session.send(failure(&others[1], true)).await;
    session.send(failure(&others[2], false)).await;
    assert_eq!(single.len(), 1);

    until_value(
        addr,
        "leasehold_tasks_completed_total{task_type=\"generate_thumbnail\"}",
        1.0,
    )
    .await;
    until_value(
        addr,
        "leasehold_tasks_failed_total{task_type=\"generate_thumbnail\",outcome=\"failed\"}",
        1.0,
    )
    .await;
    until_value(
        addr,
        "leasehold_tasks_failed_total{task_type=\"generate_thumbnail\",outcome=\"retried\"}",
        1.0,
    )
    .await;
    until_value(
        addr,
        "leasehold_task_run_duration_seconds_count{task_type=\"generate_thumbnail\",outcome=\"completed\"}",
        1.0,
    )
    .await;
    until_value(
        addr,
        "leasehold_tasks_reclaimed_total{task_type=\"generate_thumbnail\",outcome=\"failed\"}",
        1.0,
    )
    .await;
    until_value(addr, "leasehold_reclaim_lag_seconds_count", 1.0).await;

    tasks
        .cancel_task(proto::CancelTaskRequest {
            id: later.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    until_value(
        addr,
        "leasehold_tasks_cancelled_total{task_type=\"generate_thumbnail\"}",
        1.0,
    )
    .await;
    // Left live: only the retried one, pending an hour from now; no type
    // has a processing task, so the series is gone from the sample.
    until_value(addr, pending, 1.0).await;
    until_value(
        addr,
        "leasehold_queue_tasks{task_type=\"generate_thumbnail\",status=\"processing\"}",
        None,
    )
    .await;

    // A refused call counts under its code.
    let missing = tasks
        .get_task(proto::GetTaskRequest {
            id: uuid::Uuid::now_v7().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    until_value(
        addr,
        "leasehold_grpc_requests_total{method=\"/leasehold.v1.TaskService/GetTask\",code=\"NOT_FOUND\"}",
        1.0,
    )
    .await;

    let (_, body) = http_get(addr, "/metrics").await;
    for series in [
        "leasehold_dispatch_claim_tasks_count",
        "leasehold_db_pool_connections{state=\"idle\"}",
        "leasehold_db_pool_waiting",
        "leasehold_sessions_slots_free",
    ] {
        assert!(value(&body, series).is_some(), "{series} missing:\n{body}");
    }
    session.close();
    server.stop().await;
}
