//! Bearer tokens with `--auth required`: every RPC and the session stream
//! against no token, a malformed one, an unknown one, an expired one, a
//! revoked one and each role, allowed or refused with the right code and
//! nothing written when refused; worker tokens limited to task types; a
//! revoked token's open session closed within 5 s; the first admin token
//! made on the database with no server; health open to all, reflection
//! switchable; and the refusal to serve a public address insecurely.

mod common;

use std::time::Duration;

use common::{register, Session, TestServer};
use leasehold::proto::{
    self, task_service_client::TaskServiceClient, token_service_client::TokenServiceClient,
    worker_service_client::WorkerServiceClient,
};
use tonic::transport::Channel;
use tonic::{Code, Request};

const BIN: &str = env!("CARGO_BIN_EXE_leasehold");

/// A request carrying `authorization: <header>` when given.
fn with<T>(message: T, header: Option<&str>) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(header) = header {
        request
            .metadata_mut()
            .insert("authorization", header.parse().unwrap());
    }
    request
}

async fn make_token(
    channel: &Channel,
    admin: &str,
    request: proto::CreateTokenRequest,
) -> (String, String) {
    let created = TokenServiceClient::new(channel.clone())
        .create_token(with(request, Some(&format!("Bearer {admin}"))))
        .await
        .unwrap()
        .into_inner();
    (created.token.unwrap().id, created.secret)
}

fn role(role: proto::TokenRole) -> proto::CreateTokenRequest {
    proto::CreateTokenRequest {
        role: role as i32,
        ..Default::default()
    }
}

/// Every RPC of the contract, and the session stream.
const CALLS: &[&str] = &[
    "CreateTask",
    "CreateTasks",
    "GetTask",
    "ListTasks",
    "CancelTask",
    "RetryTask",
    "PurgeTasks",
    "GetStats",
    "WatchTasks",
    "AcquireTasks",
    "Heartbeat",
    "CompleteTask",
    "FailTask",
    "ReleaseTask",
    "ListWorkers",
    "Connect",
    "CreateToken",
    "ListTokens",
    "RevokeToken",
];

/// Makes `call` with `header`; the code it ended with (`Ok` for success).
/// `task` is a pending task the writes aim at.
async fn code_of(channel: &Channel, call: &str, header: Option<&str>, task: &str) -> Code {
    let mut tasks = TaskServiceClient::new(channel.clone());
    let mut workers = WorkerServiceClient::new(channel.clone());
    let mut tokens = TokenServiceClient::new(channel.clone());
    let new = || proto::CreateTaskRequest {
        task_type: "generate_thumbnail".into(),
        ..Default::default()
    };
    let lease = |id: &str| (id.to_owned(), uuid::Uuid::new_v4().to_string());
    let (task_id, token) = lease(task);
    let result: Result<(), tonic::Status> = match call {
        "CreateTask" => tasks.create_task(with(new(), header)).await.map(drop),
        "CreateTasks" => tasks
            .create_tasks(with(
                proto::CreateTasksRequest { tasks: vec![new()] },
                header,
            ))
            .await
            .map(drop),
        "GetTask" => tasks
            .get_task(with(proto::GetTaskRequest { id: task.into() }, header))
            .await
            .map(drop),
        "ListTasks" => tasks
            .list_tasks(with(proto::ListTasksRequest::default(), header))
            .await
            .map(drop),
        "CancelTask" => tasks
            .cancel_task(with(
                proto::CancelTaskRequest {
                    // Another task's id: an allowed cancel finds nothing, so
                    // the pending task stays for the next credential.
                    id: uuid::Uuid::now_v7().to_string(),
                    ..Default::default()
                },
                header,
            ))
            .await
            .map(drop),
        "RetryTask" => tasks
            .retry_task(with(proto::RetryTaskRequest { id: task.into() }, header))
            .await
            .map(drop),
        "PurgeTasks" => tasks
            .purge_tasks(with(
                proto::PurgeTasksRequest {
                    statuses: vec![proto::TaskStatus::Completed as i32],
                    ..Default::default()
                },
                header,
            ))
            .await
            .map(drop),
        "GetStats" => tasks
            .get_stats(with(proto::GetStatsRequest {}, header))
            .await
            .map(drop),
        "WatchTasks" => tasks
            .watch_tasks(with(proto::WatchTasksRequest::default(), header))
            .await
            .map(drop),
        "AcquireTasks" => workers
            .acquire_tasks(with(
                proto::AcquireTasksRequest {
                    worker_id: "w".into(),
                    task_types: vec!["nothing_of_this_type".into()],
                    max_tasks: 1,
                    ..Default::default()
                },
                header,
            ))
            .await
            .map(drop),
        "Heartbeat" => workers
            .heartbeat(with(
                proto::HeartbeatRequest {
                    leases: vec![proto::LeaseRenewal {
                        task_id: task_id.clone(),
                        lease_token: token.clone(),
                    }],
                    ..Default::default()
                },
                header,
            ))
            .await
            .map(drop),
        "CompleteTask" => workers
            .complete_task(with(
                proto::CompleteTaskRequest {
                    task_id: task_id.clone(),
                    lease_token: token.clone(),
                    result: None,
                },
                header,
            ))
            .await
            .map(drop),
        "FailTask" => workers
            .fail_task(with(
                proto::FailTaskRequest {
                    task_id: task_id.clone(),
                    lease_token: token.clone(),
                    error: "x".into(),
                    ..Default::default()
                },
                header,
            ))
            .await
            .map(drop),
        "ReleaseTask" => workers
            .release_task(with(
                proto::ReleaseTaskRequest {
                    task_id: task_id.clone(),
                    lease_token: token.clone(),
                },
                header,
            ))
            .await
            .map(drop),
        "ListWorkers" => workers
            .list_workers(with(proto::ListWorkersRequest {}, header))
            .await
            .map(drop),
        "Connect" => {
            let first = proto::ConnectRequest {
                kind: Some(proto::connect_request::Kind::Register(register(
                    "w",
                    &["nothing_of_this_type"],
                    1,
                ))),
            };
            let outbound = futures_util::stream::iter(vec![first]);
            match workers.connect(with(outbound, header)).await {
                Ok(response) => response.into_inner().message().await.map(drop),
                Err(status) => Err(status),
            }
        }
        "CreateToken" => tokens
            .create_token(with(role(proto::TokenRole::Producer), header))
            .await
            .map(drop),
        "ListTokens" => tokens
            .list_tokens(with(proto::ListTokensRequest {}, header))
            .await
            .map(drop),
        "RevokeToken" => tokens
            .revoke_token(with(
                proto::RevokeTokenRequest {
                    id: uuid::Uuid::now_v7().to_string(),
                },
                header,
            ))
            .await
            .map(drop),
        other => panic!("no such call {other}"),
    };
    match result {
        Ok(()) => Code::Ok,
        Err(status) => status.code(),
    }
}

/// Which calls a role may make.
fn allowed(role: &str, call: &str) -> bool {
    let worker = [
        "AcquireTasks",
        "Heartbeat",
        "CompleteTask",
        "FailTask",
        "ReleaseTask",
        "ListWorkers",
        "Connect",
    ];
    let producer = [
        "CreateTask",
        "CreateTasks",
        "GetTask",
        "ListTasks",
        "GetStats",
        "WatchTasks",
    ];
    match role {
        "admin" => true,
        "worker" => worker.contains(&call),
        "producer" => producer.contains(&call),
        _ => false,
    }
}

async fn counts(sql: &tokio_postgres::Client) -> (i64, i64) {
    let row = sql
        .query_one(
            "SELECT (SELECT count(*) FROM task_all), (SELECT count(*) FROM api_token)",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

#[tokio::test]
async fn every_call_against_every_credential() {
    let (url, db_name) = common::fresh_database_url();
    let admin = common::token_on_database(&url, "admin");
    let mut config = leasehold::config::Config::with_database_url(&url);
    config.auth = leasehold::config::Auth::Required;
    config.db_pool_size = 8;
    config.drain_grace = Duration::from_secs(1);
    let server = TestServer::start_config(config, db_name).await;
    let channel = server.channel().await;
    let sql = server.sql().await;

    let (_, worker) = make_token(&channel, &admin, role(proto::TokenRole::Worker)).await;
    let (_, producer) = make_token(&channel, &admin, role(proto::TokenRole::Producer)).await;
    let (expired_id, expired) = make_token(&channel, &admin, role(proto::TokenRole::Admin)).await;
    sql.execute(
        "UPDATE api_token SET expires_at = now() - interval '1 second' WHERE id = $1::text::uuid",
        &[&expired_id],
    )
    .await
    .unwrap();
    let (revoked_id, revoked) = make_token(&channel, &admin, role(proto::TokenRole::Admin)).await;
    TokenServiceClient::new(channel.clone())
        .revoke_token(with(
            proto::RevokeTokenRequest { id: revoked_id },
            Some(&format!("Bearer {admin}")),
        ))
        .await
        .unwrap();
    let task = TaskServiceClient::new(channel.clone())
        .create_task(with(
            proto::CreateTaskRequest {
                task_type: "generate_thumbnail".into(),
                ..Default::default()
            },
            Some(&format!("Bearer {producer}")),
        ))
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();

    // The refused first: nothing may change.
    let before = counts(&sql).await;
    let refused: Vec<(&str, Option<String>)> = vec![
        ("none", None),
        ("malformed", Some("Basic dXNlcjpwYXNz".to_owned())),
        ("empty", Some("Bearer ".to_owned())),
        ("not ours", Some("Bearer lh_0000".to_owned())),
        ("unknown", Some(format!("Bearer lh_{}", "0".repeat(64)))),
        ("expired", Some(format!("Bearer {expired}"))),
        ("revoked", Some(format!("Bearer {revoked}"))),
    ];
    for (what, header) in &refused {
        for call in CALLS {
            let code = code_of(&channel, call, header.as_deref(), &task.id).await;
            assert_eq!(code, Code::Unauthenticated, "{call} with a {what} token");
        }
    }
    for (name, secret) in [("worker", &worker), ("producer", &producer)] {
        let header = format!("Bearer {secret}");
        for call in CALLS.iter().filter(|call| !allowed(name, call)) {
            let code = code_of(&channel, call, Some(&header), &task.id).await;
            assert_eq!(code, Code::PermissionDenied, "{call} with a {name} token");
        }
    }
    assert_eq!(counts(&sql).await, before, "a refused call wrote something");
    let status: String = sql
        .query_one(
            "SELECT status FROM task_all WHERE id = $1::text::uuid",
            &[&task.id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "pending");

    // The allowed get past authentication (the dummy requests may still be
    // refused for what they ask: NOT_FOUND, FAILED_PRECONDITION...).
    for (name, secret) in [
        ("worker", &worker),
        ("producer", &producer),
        ("admin", &admin),
    ] {
        let header = format!("Bearer {secret}");
        for call in CALLS.iter().filter(|call| allowed(name, call)) {
            let code = code_of(&channel, call, Some(&header), &task.id).await;
            assert!(
                code != Code::Unauthenticated && code != Code::PermissionDenied,
                "{call} with a {name} token: {code:?}"
            );
        }
    }

    // Health needs no token.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let answer = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        answer.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    server.stop().await;
}

#[tokio::test]
async fn a_worker_token_takes_only_its_task_types_and_its_revocation_closes_the_session() {
    let (url, db_name) = common::fresh_database_url();
    let admin = common::token_on_database(&url, "admin");
    let mut config = leasehold::config::Config::with_database_url(&url);
    config.auth = leasehold::config::Auth::Required;
    config.drain_grace = Duration::from_secs(1);
    let server = TestServer::start_config(config, db_name).await;
    let channel = server.channel().await;
    let (token_id, limited) = make_token(
        &channel,
        &admin,
        proto::CreateTokenRequest {
            task_types: vec!["generate_thumbnail".into()],
            ..role(proto::TokenRole::Worker)
        },
    )
    .await;

    // Outside its types, or asking for any type: refused.
    for types in [
        &["scan_library"][..],
        &[],
        &["generate_thumbnail", "scan_library"],
    ] {
        let mut workers = WorkerServiceClient::new(channel.clone());
        let refused = workers
            .acquire_tasks(with(
                proto::AcquireTasksRequest {
                    worker_id: "w".into(),
                    task_types: types.iter().map(|t| t.to_string()).collect(),
                    max_tasks: 1,
                    ..Default::default()
                },
                Some(&format!("Bearer {limited}")),
            ))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied, "{types:?}");
        assert!(refused.message().contains("task_types"), "{refused:?}");
    }

    // The Rust worker library and client send the token themselves.
    let client = leasehold::client::Client::from_channel(channel.clone())
        .with_token(&admin)
        .unwrap();
    let id = client
        .create(leasehold::client::NewTask::new("generate_thumbnail"))
        .await
        .unwrap()
        .task
        .unwrap()
        .id;

    // A session in its type is served...
    let first = proto::connect_request::Kind::Register(register("w", &["generate_thumbnail"], 1));
    let mut session = session_with_token(&channel, first, &limited).await.unwrap();
    let leased = session.next_task().await;
    assert_eq!(leased.lease.unwrap().task_id, id);
    // ...until its token is revoked: drained and closed within 5 s.
    client.revoke_token(&token_id).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match session.next().await {
                Ok(Some(proto::connect_response::Kind::Drain(_))) => continue,
                Ok(other) => panic!("expected the stream to end, got {other:?}"),
                Err(status) => return status,
            }
        }
    })
    .await
    .expect("the session of a revoked token still open after 5 s");
    assert_eq!(closed.code(), Code::Unauthenticated);
    // A watch stream ends the same way when its token goes.
    let (watcher_id, watcher) =
        make_token(&channel, &admin, role(proto::TokenRole::Producer)).await;
    let mut watch = TaskServiceClient::new(channel.clone())
        .watch_tasks(with(
            proto::WatchTasksRequest::default(),
            Some(&format!("Bearer {watcher}")),
        ))
        .await
        .unwrap()
        .into_inner();
    client.revoke_token(&watcher_id).await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match watch.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the watch ended without a status"),
                Err(status) => return status,
            }
        }
    })
    .await
    .expect("the watch of a revoked token still open after 5 s");
    assert_eq!(ended.code(), Code::Unauthenticated);
    // And a new session with it is refused.
    let first = proto::connect_request::Kind::Register(register("w", &["generate_thumbnail"], 1));
    let Err(refused) = session_with_token(&channel, first, &limited).await else {
        panic!("a session with a revoked token was opened");
    };
    assert_eq!(refused.code(), Code::Unauthenticated);
    server.stop().await;
}

/// A session opened with `token`.
async fn session_with_token(
    channel: &Channel,
    first: proto::connect_request::Kind,
    token: &str,
) -> Result<Session, tonic::Status> {
    let bearer = leasehold::client::Bearer::new(token).unwrap();
    Session::over_intercepted(channel.clone(), bearer, first).await
}

#[tokio::test]
async fn reflection_can_be_turned_off() {
    let server = TestServer::start_with(|c| c.reflection = false).await;
    let mut reflection =
        tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(
            server.channel().await,
        );
    let request = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            ),
        ),
    };
    let refused = reflection
        .server_reflection_info(futures_util::stream::iter(vec![request]))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unimplemented);
    server.stop().await;
}

#[tokio::test]
async fn a_public_address_is_not_served_insecurely_without_insecure() {
    let (url, _) = common::fresh_database_url();
    let out = tokio::process::Command::new(BIN)
        .args(["serve", "--listen", "0.0.0.0:0", "--database-url", &url])
        .env("RUST_LOG", "warn")
        .env_remove("LEASEHOLD_INSECURE")
        .env_remove("LEASEHOLD_AUTH")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--insecure") && stderr.contains("--auth required"),
        "{stderr}"
    );
}
