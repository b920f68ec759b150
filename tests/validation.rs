//! Every invalid field of every request gets INVALID_ARGUMENT naming the
//! field, and writes nothing.
//!
//! Each case is an otherwise valid request (one that would succeed and, for
//! the mutating calls, change a real row) with exactly one field broken.
//! After every case the whole task table must be exactly as before.

mod common;

use std::future::Future;
use std::time::Duration;

use common::{acquire, acquire_tasks, duration, json, new_task, TestServer};
use leasehold::proto;
use leasehold::proto::task_service_client::TaskServiceClient;
use leasehold::proto::worker_service_client::WorkerServiceClient;
use prost_types::value::Kind;
use prost_types::{ListValue, Struct, Value};
use tonic::transport::Channel;
use tonic::{Code, Response};

const MAX_PAYLOAD: usize = 1024;
const HOUR: Duration = Duration::from_secs(3600);

async fn start() -> TestServer {
    TestServer::start_with(|c| c.max_payload_bytes = MAX_PAYLOAD).await
}

/// The whole task table, every column of every row, in creation order.
async fn snapshot(sql: &tokio_postgres::Client) -> String {
    sql.query_one(
        "SELECT coalesce(json_agg(t ORDER BY t.seq), '[]')::text FROM task_all t",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// Sends every case and checks: INVALID_ARGUMENT, the message names the
/// expected field, and the task table is unchanged.
async fn reject_all<N, Req, Resp, Fut>(
    sql: &tokio_postgres::Client,
    rpc: &str,
    cases: Vec<(N, Req)>,
    call: impl Fn(Req) -> Fut,
) where
    N: AsRef<str>,
    Fut: Future<Output = Result<Response<Resp>, tonic::Status>>,
{
    assert!(!cases.is_empty());
    let before = snapshot(sql).await;
    for (i, (field, req)) in cases.into_iter().enumerate() {
        let field = field.as_ref();
        let case = format!("{rpc} case {i} (bad {field})");
        match call(req).await {
            Ok(_) => panic!("{case}: accepted"),
            Err(status) => {
                assert_eq!(
                    status.code(),
                    Code::InvalidArgument,
                    "{case}: {}",
                    status.message()
                );
                assert!(
                    names_field(status.message(), field),
                    "{case}: message {:?} does not name the field",
                    status.message()
                );
            }
        }
        assert_eq!(
            snapshot(sql).await,
            before,
            "{case}: the task table changed"
        );
    }
}

/// Whether `message` (`<field path>: <what is wrong>`) is about `field`: it
/// starts with it, as the whole path or a prefix of it. Merely containing
/// it is not enough (`id` is in "invalid").
fn names_field(message: &str, field: &str) -> bool {
    message
        .strip_prefix(field)
        .is_some_and(|rest| rest.starts_with([':', '.', '[']))
}

/// `reject_all`'s call: `method` on a clone of the client `client`.
macro_rules! rpc {
    ($client:ident, $method:ident) => {
        |r| {
            let mut c = $client.clone();
            async move { c.$method(r).await }
        }
    };
}

/// `base` with one change.
fn with<T: Clone>(base: &T, change: impl FnOnce(&mut T)) -> T {
    let mut req = base.clone();
    change(&mut req);
    req
}

/// Values that are not UUIDs (`real` is a valid one to mangle).
fn bad_uuids(real: &str) -> Vec<String> {
    vec![
        String::new(),
        "not-a-uuid".into(),
        real[..real.len() - 1].into(),
        format!("{real}0"),
        format!(" {real}"),
        "00000000-0000-0000-0000-00000000000g".into(),
    ]
}

/// Cases putting each bad UUID into one field.
fn uuid_cases<T: Clone>(
    field: &'static str,
    real: &str,
    base: &T,
    set: impl Fn(&mut T, String),
) -> Vec<(&'static str, T)> {
    bad_uuids(real)
        .into_iter()
        .map(|v| (field, with(base, |r| set(r, v))))
        .collect()
}

/// Bad worker ids: empty, 101 characters, control characters.
fn bad_worker_ids() -> Vec<String> {
    vec![
        String::new(),
        "w".repeat(101),
        "w\0".into(),
        "w\n1".into(),
        "w\u{7f}".into(),
    ]
}

/// Bad task types: empty, 65 characters, characters outside the set.
fn bad_task_types() -> Vec<String> {
    vec![
        String::new(),
        "a".repeat(65),
        "has space".into(),
        "bang!".into(),
        "naïve".into(),
        "tab\t".into(),
    ]
}

fn ts(seconds: i64, nanos: i32) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp { seconds, nanos })
}

fn dur(seconds: i64, nanos: i32) -> Option<prost_types::Duration> {
    Some(prost_types::Duration { seconds, nanos })
}

/// Timestamps outside 1970..=9999 or malformed.
fn bad_timestamps() -> Vec<Option<prost_types::Timestamp>> {
    const YEAR_10000: i64 = 253_402_300_800;
    vec![
        ts(-1, 0),
        ts(YEAR_10000, 0),
        ts(i64::MAX, 0),
        ts(1_700_000_000, -1),
        ts(1_700_000_000, 1_000_000_000),
    ]
}

/// Lease lengths outside 1 s to 1 h, or negative.
fn bad_lease_durations() -> Vec<Option<prost_types::Duration>> {
    vec![
        dur(0, 500_000_000),
        dur(0, 0),
        dur(7200, 0),
        dur(3600, 1),
        dur(-1, 0),
        dur(0, -1),
    ]
}

/// One-field struct.
fn object(key: &str, kind: Kind) -> Struct {
    Struct {
        fields: [(key.to_owned(), Value { kind: Some(kind) })].into(),
    }
}

/// Payloads over `MAX_PAYLOAD`, or holding what JSON cannot: NaN and
/// infinite numbers, NUL characters in strings or keys (also nested).
fn bad_payloads() -> Vec<Struct> {
    let number = |n| Value {
        kind: Some(Kind::NumberValue(n)),
    };
    vec![
        json(serde_json::json!({ "data": "x".repeat(MAX_PAYLOAD) })),
        object("x", Kind::NumberValue(f64::NAN)),
        object("x", Kind::NumberValue(f64::INFINITY)),
        object("x", Kind::NumberValue(f64::NEG_INFINITY)),
        object("x", Kind::StringValue("a\0b".into())),
        object("a\0b", Kind::BoolValue(true)),
        object(
            "list",
            Kind::ListValue(ListValue {
                values: vec![number(1.0), number(f64::NAN)],
            }),
        ),
        object(
            "nested",
            Kind::StructValue(object("y", Kind::StringValue("\0".into()))),
        ),
    ]
}

/// A valid request with every optional field set.
fn valid_create() -> proto::CreateTaskRequest {
    proto::CreateTaskRequest {
        task_type: "media/thumb:v2.x-y_z".into(),
        params: Some(json(serde_json::json!({ "mode": "deep", "count": 3 }))),
        priority: 5,
        max_attempts: 1000,
        scheduled_for: ts(1_700_000_000, 999_999_999),
        library_id: Some(uuid::Uuid::new_v4().to_string()),
        series_id: Some(uuid::Uuid::new_v4().to_string()),
        book_id: Some(uuid::Uuid::new_v4().to_string()),
        dedup_key: Some("k".repeat(255)),
    }
}

/// Every way to break one field of a `CreateTaskRequest`.
fn create_cases(base: &proto::CreateTaskRequest) -> Vec<(&'static str, proto::CreateTaskRequest)> {
    let real = base.library_id.clone().unwrap();
    let mut cases: Vec<(&'static str, proto::CreateTaskRequest)> = Vec::new();
    for v in bad_task_types() {
        cases.push(("task_type", with(base, |r| r.task_type = v)));
    }
    for p in bad_payloads() {
        cases.push(("params", with(base, |r| r.params = Some(p))));
    }
    for n in [-1, 1001, i32::MIN, i32::MAX] {
        cases.push(("max_attempts", with(base, |r| r.max_attempts = n)));
    }
    for t in bad_timestamps() {
        cases.push(("scheduled_for", with(base, |r| r.scheduled_for = t)));
    }
    cases.extend(uuid_cases("library_id", &real, base, |r, v| {
        r.library_id = Some(v)
    }));
    cases.extend(uuid_cases("series_id", &real, base, |r, v| {
        r.series_id = Some(v)
    }));
    cases.extend(uuid_cases("book_id", &real, base, |r, v| {
        r.book_id = Some(v)
    }));
    for v in [
        String::new(),
        "k".repeat(256),
        "k\0".into(),
        "k\u{1b}".into(),
    ] {
        cases.push(("dedup_key", with(base, |r| r.dedup_key = Some(v))));
    }
    cases
}

/// A server holding one task, with SQL and TaskService clients: a row
/// already there, so "unchanged" is more than "still empty".
async fn start_with_a_task() -> (
    TestServer,
    tokio_postgres::Client,
    TaskServiceClient<Channel>,
) {
    let server = start().await;
    let sql = server.sql().await;
    let mut tasks = server.tasks().await;
    tasks.create_task(new_task("existing")).await.unwrap();
    (server, sql, tasks)
}

#[tokio::test]
async fn create_task_rejects_each_invalid_field() {
    let (server, sql, tasks) = start_with_a_task().await;

    let base = valid_create();
    reject_all(
        &sql,
        "CreateTask",
        create_cases(&base),
        rpc!(tasks, create_task),
    )
    .await;
    assert_eq!(server.task_count().await, 1);

    // The base request itself is valid.
    let created = tasks.clone().create_task(base).await.unwrap().into_inner();
    assert!(!created.deduplicated);
    assert_eq!(server.task_count().await, 2);
    server.stop().await;
}

#[tokio::test]
async fn create_tasks_rejects_the_whole_batch() {
    let (server, sql, tasks) = start_with_a_task().await;

    let base = valid_create();
    let filler = || new_task("filler");
    // Valid entries around one bad entry at index 3.
    let batch = |bad: proto::CreateTaskRequest| proto::CreateTasksRequest {
        tasks: (0..3)
            .map(|_| filler())
            .chain([bad])
            .chain((0..2).map(|_| filler()))
            .collect(),
    };
    let mut cases: Vec<(String, proto::CreateTasksRequest)> = vec![
        ("tasks".into(), proto::CreateTasksRequest { tasks: vec![] }),
        (
            "tasks".into(),
            proto::CreateTasksRequest {
                tasks: (0..10_001).map(|_| filler()).collect(),
            },
        ),
        (
            "tasks[9999].task_type".into(),
            proto::CreateTasksRequest {
                tasks: (0..9_999)
                    .map(|_| filler())
                    .chain([new_task("bad type")])
                    .collect(),
            },
        ),
    ];
    for (field, bad) in create_cases(&base) {
        cases.push((format!("tasks[3].{field}"), batch(bad)));
    }
    reject_all(&sql, "CreateTasks", cases, rpc!(tasks, create_tasks)).await;
    assert_eq!(server.task_count().await, 1);

    // The same batch with the base entry in the middle is valid.
    let created = tasks.clone().create_tasks(batch(base)).await.unwrap();
    assert_eq!(created.into_inner().results.len(), 6);
    assert_eq!(server.task_count().await, 7);
    server.stop().await;
}

/// Real rows for the admin and worker cases to (not) touch.
struct Fixture {
    /// A processing task leased for an hour by `w1`.
    leased: proto::Lease,
    /// A pending task of type `waiting`, due now.
    pending_id: String,
    /// A completed task.
    completed_id: String,
}

async fn lease_one(workers: &mut WorkerServiceClient<Channel>, task_type: &str) -> proto::Lease {
    let mut req = acquire("w1", &[task_type], 1);
    req.lease_duration = Some(duration(HOUR));
    let leased = acquire_tasks(workers, req).await;
    assert_eq!(leased.len(), 1);
    leased[0].lease.clone().unwrap()
}

async fn fixture(server: &TestServer) -> Fixture {
    let mut tasks = server.tasks().await;
    let mut workers = server.workers().await;
    let mut ids = Vec::new();
    for t in ["work", "done", "waiting"] {
        let task = tasks.create_task(new_task(t)).await.unwrap().into_inner();
        ids.push(task.task.unwrap().id);
    }
    let leased = lease_one(&mut workers, "work").await;
    let done = lease_one(&mut workers, "done").await;
    workers
        .complete_task(proto::CompleteTaskRequest {
            task_id: done.task_id.clone(),
            lease_token: done.lease_token,
            result: Some(json(serde_json::json!({ "ok": true }))),
        })
        .await
        .unwrap();
    Fixture {
        leased,
        pending_id: ids[2].clone(),
        completed_id: done.task_id,
    }
}

#[tokio::test]
async fn task_admin_calls_reject_each_invalid_field() {
    use proto::TaskStatus as S;
    let server = start().await;
    let sql = server.sql().await;
    let fx = fixture(&server).await;
    let tasks = server.tasks().await;
    let real = fx.leased.task_id.clone();

    // GetTask
    let get = proto::GetTaskRequest { id: real.clone() };
    let cases = uuid_cases("id", &real, &get, |r, v| r.id = v);
    reject_all(&sql, "GetTask", cases, rpc!(tasks, get_task)).await;

    // ListTasks
    let list = proto::ListTasksRequest {
        statuses: vec![S::Pending as i32, S::Processing as i32],
        task_types: vec!["work".into(), "waiting".into()],
        library_id: None,
        series_id: None,
        book_id: None,
        page_size: 1000,
        page_token: String::new(),
    };
    let mut cases = vec![
        ("statuses[0]", with(&list, |r| r.statuses = vec![0])),
        ("statuses[0]", with(&list, |r| r.statuses = vec![99])),
        ("statuses[0]", with(&list, |r| r.statuses = vec![-1])),
        ("statuses[2]", with(&list, |r| r.statuses.push(0))),
        ("page_size", with(&list, |r| r.page_size = -1)),
        ("page_size", with(&list, |r| r.page_size = 1001)),
    ];
    for v in bad_task_types() {
        cases.push(("task_types[1]", with(&list, |r| r.task_types[1] = v)));
    }
    for v in ["garbage", "v1.", "v1.zz", "v1.0", "v1.-5", "1234"] {
        cases.push(("page_token", with(&list, |r| r.page_token = v.into())));
    }
    cases.extend(uuid_cases("library_id", &real, &list, |r, v| {
        r.library_id = Some(v)
    }));
    cases.extend(uuid_cases("series_id", &real, &list, |r, v| {
        r.series_id = Some(v)
    }));
    cases.extend(uuid_cases("book_id", &real, &list, |r, v| {
        r.book_id = Some(v)
    }));
    reject_all(&sql, "ListTasks", cases, rpc!(tasks, list_tasks)).await;

    // CancelTask: on the leased task, so a missed check would cancel it.
    let cancel = proto::CancelTaskRequest {
        id: real.clone(),
        reason: "operator\nsays so".into(),
    };
    let mut cases = uuid_cases("id", &real, &cancel, |r, v| r.id = v);
    for v in ["r".repeat(1001), "r\0".into(), "r\u{1b}[0m".into()] {
        cases.push(("reason", with(&cancel, |r| r.reason = v)));
    }
    reject_all(&sql, "CancelTask", cases, rpc!(tasks, cancel_task)).await;

    // RetryTask
    let retry = proto::RetryTaskRequest { id: real.clone() };
    let cases = uuid_cases("id", &real, &retry, |r, v| r.id = v);
    reject_all(&sql, "RetryTask", cases, rpc!(tasks, retry_task)).await;

    // PurgeTasks: a missed check would delete the completed task (or the
    // pending and processing ones).
    let purge = proto::PurgeTasksRequest {
        completed_before: None,
        statuses: vec![S::Completed as i32],
    };
    let mut cases = vec![
        (
            "statuses[0]",
            with(&purge, |r| r.statuses = vec![S::Pending as i32]),
        ),
        (
            "statuses[0]",
            with(&purge, |r| r.statuses = vec![S::Processing as i32]),
        ),
        ("statuses[0]", with(&purge, |r| r.statuses = vec![0])),
        ("statuses[0]", with(&purge, |r| r.statuses = vec![99])),
        (
            "statuses[1]",
            with(&purge, |r| r.statuses.push(S::Pending as i32)),
        ),
        ("statuses[1]", with(&purge, |r| r.statuses.push(0))),
    ];
    for t in bad_timestamps() {
        cases.push(("completed_before", with(&purge, |r| r.completed_before = t)));
    }
    reject_all(&sql, "PurgeTasks", cases, rpc!(tasks, purge_tasks)).await;

    // Every base request is valid.
    let mut c = tasks.clone();
    let got = c.get_task(get).await.unwrap().into_inner().task.unwrap();
    assert_eq!(got.id, real);
    let page = c.list_tasks(list).await.unwrap().into_inner();
    assert_eq!(page.tasks.len(), 2);
    c.cancel_task(cancel).await.unwrap();
    c.retry_task(retry).await.unwrap();
    let purged = c.purge_tasks(purge).await.unwrap().into_inner();
    assert_eq!(purged.deleted_count, 1);
    let err = c
        .get_task(proto::GetTaskRequest {
            id: fx.completed_id,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    server.stop().await;
}

#[tokio::test]
async fn worker_calls_reject_each_invalid_field() {
    let server = start().await;
    let sql = server.sql().await;
    let fx = fixture(&server).await;
    let workers = server.workers().await;
    let id = fx.leased.task_id.clone();
    let token = fx.leased.lease_token.clone();

    // AcquireTasks: the pending task is due, so a missed check would lease it.
    let acq = proto::AcquireTasksRequest {
        worker_id: "w".repeat(100),
        task_types: vec!["work".into(), "waiting".into()],
        max_tasks: 1000,
        lease_duration: Some(duration(HOUR)),
        wait: Some(duration(Duration::from_secs(60))),
    };
    let mut cases = vec![
        ("max_tasks", with(&acq, |r| r.max_tasks = -1)),
        ("max_tasks", with(&acq, |r| r.max_tasks = 1001)),
        ("wait", with(&acq, |r| r.wait = dur(61, 0))),
        ("wait", with(&acq, |r| r.wait = dur(60, 1))),
        ("wait", with(&acq, |r| r.wait = dur(-1, 0))),
    ];
    for v in bad_worker_ids() {
        cases.push(("worker_id", with(&acq, |r| r.worker_id = v)));
    }
    for v in bad_task_types() {
        cases.push(("task_types[1]", with(&acq, |r| r.task_types[1] = v)));
    }
    for d in bad_lease_durations() {
        cases.push(("lease_duration", with(&acq, |r| r.lease_duration = d)));
    }
    reject_all(&sql, "AcquireTasks", cases, rpc!(workers, acquire_tasks)).await;

    // Heartbeat: a missed check would renew the real lease.
    let renewal = proto::LeaseRenewal {
        task_id: id.clone(),
        lease_token: token.clone(),
    };
    let hb = proto::HeartbeatRequest {
        worker_id: "w1".into(),
        leases: vec![renewal.clone(), renewal.clone(), renewal.clone()],
        lease_duration: Some(duration(HOUR)),
    };
    let mut cases = vec![(
        "leases".to_owned(),
        with(&hb, |r| r.leases = vec![renewal.clone(); 10_001]),
    )];
    for v in bad_worker_ids() {
        cases.push(("worker_id".into(), with(&hb, |r| r.worker_id = v)));
    }
    for d in bad_lease_durations() {
        cases.push(("lease_duration".into(), with(&hb, |r| r.lease_duration = d)));
    }
    for v in bad_uuids(&id) {
        let req = with(&hb, |r| r.leases[1].task_id = v);
        cases.push(("leases[1].task_id".into(), req));
    }
    for v in bad_uuids(&token) {
        let req = with(&hb, |r| r.leases[1].lease_token = v);
        cases.push(("leases[1].lease_token".into(), req));
    }
    reject_all(&sql, "Heartbeat", cases, rpc!(workers, heartbeat)).await;

    // CompleteTask
    let complete = proto::CompleteTaskRequest {
        task_id: id.clone(),
        lease_token: token.clone(),
        result: Some(json(serde_json::json!({ "pages": 12 }))),
    };
    let mut cases = uuid_cases("task_id", &id, &complete, |r, v| r.task_id = v);
    cases.extend(uuid_cases("lease_token", &token, &complete, |r, v| {
        r.lease_token = v
    }));
    for p in bad_payloads() {
        cases.push(("result", with(&complete, |r| r.result = Some(p))));
    }
    reject_all(&sql, "CompleteTask", cases, rpc!(workers, complete_task)).await;

    // FailTask
    let fail = proto::FailTaskRequest {
        task_id: id.clone(),
        lease_token: token.clone(),
        error: "boom\n\tat line 3".into(),
        permanent: false,
        retry_after: Some(duration(Duration::from_secs(30 * 24 * 3600))),
    };
    let mut cases = uuid_cases("task_id", &id, &fail, |r, v| r.task_id = v);
    cases.extend(uuid_cases("lease_token", &token, &fail, |r, v| {
        r.lease_token = v
    }));
    for v in ["e".repeat(65_537), "e\0".into(), "e\u{7}".into()] {
        cases.push(("error", with(&fail, |r| r.error = v)));
    }
    for d in [
        dur(-1, 0),
        dur(0, -1),
        dur(30 * 24 * 3600, 1),
        dur(30 * 24 * 3600 + 1, 0),
        dur(i64::MAX, 0),
    ] {
        cases.push(("retry_after", with(&fail, |r| r.retry_after = d)));
    }
    reject_all(&sql, "FailTask", cases, rpc!(workers, fail_task)).await;

    // ReleaseTask
    let release = proto::ReleaseTaskRequest {
        task_id: id.clone(),
        lease_token: token.clone(),
    };
    let mut cases = uuid_cases("task_id", &id, &release, |r, v| r.task_id = v);
    cases.extend(uuid_cases("lease_token", &token, &release, |r, v| {
        r.lease_token = v
    }));
    reject_all(&sql, "ReleaseTask", cases, rpc!(workers, release_task)).await;

    // Every base request is valid (fail and release share the lease fields
    // with complete, so the lease is used up by complete).
    let mut c = workers.clone();
    let beat = c.heartbeat(hb).await.unwrap().into_inner();
    assert!(beat
        .leases
        .iter()
        .all(|l| l.status == proto::LeaseStatus::Held as i32));
    let leased = c.acquire_tasks(acq).await.unwrap().into_inner();
    assert_eq!(leased.tasks.len(), 1);
    assert_eq!(leased.tasks[0].task.as_ref().unwrap().id, fx.pending_id);
    c.complete_task(complete).await.unwrap();
    server.stop().await;
}
