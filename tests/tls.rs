//! TLS on the gRPC port, with certificates made in the test: the Rust
//! `Client` and `Worker`, the operator CLI and the command runner connect
//! over `https://` with a CA file (the Python and Node workers in
//! tests/examples.rs); plaintext and untrusted clients are refused; mutual
//! TLS refuses a client without a certificate; SIGHUP swaps certificates
//! without dropping an open session; bad files fail the start naming the
//! flag.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::pki::{Authority, Pki};
use common::{new_task, register, TestServer};
use leasehold::client::{Client, HandlerResult, TaskContext, Tls, Worker};
use leasehold::proto;
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_leasehold");

fn https(server: &TestServer) -> String {
    format!("https://{}", server.running.as_ref().unwrap().addr())
}

/// The Rust client, trusting the test's CA.
async fn client(server: &TestServer, pki: &Pki) -> Client {
    Client::connect_with(&https(server), &Tls::new().ca_pem(pki.ca.pem.clone()))
        .await
        .expect("a TLS client trusting the CA connects")
}

/// Whether a client from `connect` gets an answer (GetStats); `Err` when
/// it cannot connect or its call is refused.
async fn answers(
    connect: impl std::future::Future<Output = leasehold::client::Result<Client>>,
) -> leasehold::client::Result<()> {
    connect.await?.stats().await.map(drop)
}

/// The binary with a clean environment.
fn leasehold(args: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command
        .args(args)
        .env_remove("LEASEHOLD_SERVER")
        .env_remove("LEASEHOLD_TLS_CA")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

/// Waits for task `id` to complete; returns its result.
async fn wait_completed(client: &Client, id: &str) -> serde_json::Value {
    let task = common::eventually(Duration::from_secs(20), || async {
        let task = client.get(id).await.unwrap();
        (common::status_of(&task) == proto::TaskStatus::Completed).then_some(task)
    })
    .await;
    leasehold::client::from_struct(&task.result.unwrap()).unwrap()
}

/// Creates a task of `task_type`; returns its id.
async fn create(client: &Client, task_type: &str) -> String {
    client
        .create(leasehold::client::NewTask::new(task_type))
        .await
        .unwrap()
        .task
        .unwrap()
        .id
}

#[tokio::test]
async fn the_rust_clients_the_cli_and_the_runner_speak_tls() {
    let pki = Pki::new();
    let server = TestServer::start_with(|c| pki.serve_with(c, false)).await;
    let address = https(&server);
    let client = client(&server, &pki).await;

    // Plaintext to a TLS port, and TLS trusting only the system's CAs, are
    // both refused.
    let plaintext = format!("http://{}", server.running.as_ref().unwrap().addr());
    let refused = answers(Client::connect(&plaintext)).await;
    assert!(refused.is_err(), "a plaintext client was answered");
    let untrusted = answers(Client::connect(&address)).await;
    assert!(
        untrusted.is_err(),
        "a client not trusting the CA was answered"
    );
    // A CA for a plaintext address is a mistake, said before connecting.
    let mistake = Client::connect_with(&plaintext, &Tls::new().ca_pem(pki.ca.pem.clone()))
        .await
        .unwrap_err();
    assert!(mistake.to_string().contains("plaintext"), "{mistake}");

    // The Rust worker.
    let created = create(&client, "scan_library").await;
    let worker = Worker::builder("rust-over-tls")
        .server(address.clone())
        .tls(Tls::new().ca_pem(pki.ca.pem.clone()))
        .handler("scan_library", |_ctx: TaskContext| async move {
            let result: HandlerResult = Ok(serde_json::json!({"scanned": true}));
            result
        })
        .build()
        .unwrap();
    let stop = worker.shutdown_handle();
    let running = tokio::spawn(worker.run());
    let done = wait_completed(&client, &created).await;
    assert_eq!(done, serde_json::json!({"scanned": true}));
    stop.shutdown();
    running.await.unwrap().unwrap();

    // The CLI: the CA from --tls-ca, and from LEASEHOLD_TLS_CA with a bare
    // host:port.
    let ca = pki.path("ca.pem");
    let out = leasehold(&[
        "task",
        "create",
        "generate_thumbnail",
        "--server",
        &address,
        "--tls-ca",
        ca.to_str().unwrap(),
        "--json",
    ])
    .output()
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = line["task"]["id"].as_str().unwrap().to_owned();
    let bare = server.running.as_ref().unwrap().addr().to_string();
    let out = leasehold(&["task", "get", &id, "--server", &bare, "--json"])
        .env("LEASEHOLD_TLS_CA", &ca)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Without the CA the same call fails (exit 1, the server unreachable).
    let out = leasehold(&["task", "get", &id, "--server", &address])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));

    // The command runner runs the task.
    let mut runner = leasehold(&[
        "worker",
        "--server",
        &address,
        "--tls-ca",
        ca.to_str().unwrap(),
        "--task-type",
        "generate_thumbnail",
        "--",
        "echo",
        "{\"thumbnail\": \"done\"}",
    ])
    .spawn()
    .unwrap();
    let done = wait_completed(&client, &id).await;
    assert_eq!(done, serde_json::json!({"thumbnail": "done"}));
    runner.start_kill().unwrap();
    let _ = runner.wait().await;
    server.stop().await;
}

#[tokio::test]
async fn mutual_tls_refuses_a_client_without_a_certificate() {
    let pki = Pki::new();
    let server = TestServer::start_with(|c| pki.serve_with(c, true)).await;
    let address = https(&server);

    let anonymous = Tls::new().ca_pem(pki.ca.pem.clone());
    let refused = answers(Client::connect_with(&address, &anonymous)).await;
    assert!(
        refused.is_err(),
        "a client without a certificate was answered"
    );

    // A certificate from another CA is refused too.
    let stranger = Authority::new("someone else");
    let (cert, key) = stranger.sign(&["worker-2"]);
    let refused = answers(Client::connect_with(
        &address,
        &anonymous.clone().identity_pem(cert, key),
    ))
    .await;
    assert!(
        refused.is_err(),
        "a certificate of an unknown CA was answered"
    );

    let known = anonymous.identity_pem(pki.client_cert.clone(), pki.client_key.clone());
    let client = Client::connect_with(&address, &known).await.unwrap();
    client.stats().await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn sighup_swaps_the_certificate_and_keeps_open_sessions() {
    let pki = Pki::new();
    let server = TestServer::start_with(|c| pki.serve_with(c, false)).await;
    let address = https(&server);
    let old_ca = Tls::new().ca_pem(pki.ca.pem.clone());

    // A session over TLS, holding a lease.
    let channel = leasehold::client::endpoint_with(&address, Some(&old_ca))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut session = common::Session::over(
        channel.clone(),
        proto::connect_request::Kind::Register(register("w", &["scan_library"], 2)),
    )
    .await
    .unwrap();
    let mut tasks = proto::task_service_client::TaskServiceClient::new(channel);
    tasks.create_task(new_task("scan_library")).await.unwrap();
    let first = session.next_task().await;

    // New certificate, from a new CA, and SIGHUP to this process (the
    // node's).
    let new_ca = Authority::new("leasehold test ca 2");
    pki.server_signed_by(&new_ca);
    // SAFETY: sending a signal to our own process; the node has installed
    // its SIGHUP handler at start.
    assert_eq!(unsafe { libc::kill(libc::getpid(), libc::SIGHUP) }, 0);
    let trusting_new = Tls::new().ca_pem(new_ca.pem.clone());
    let fresh = common::eventually(Duration::from_secs(10), || async {
        let client = Client::connect_with(&address, &trusting_new).await.ok()?;
        client.stats().await.ok().map(|_| client)
    })
    .await;
    // New connections no longer trust the old certificate...
    let refused = answers(Client::connect_with(&address, &old_ca)).await;
    assert!(refused.is_err(), "the old certificate is still served");
    // ...while the session opened before goes on: it completes its task and
    // gets the next one.
    session.complete(&first, serde_json::json!({})).await;
    assert!(matches!(
        session.next().await,
        Ok(Some(proto::connect_response::Kind::Ack(_)))
    ));
    create(&fresh, "scan_library").await;
    session.next_task().await;
    server.stop().await;
}

#[tokio::test]
async fn bad_tls_files_fail_the_start_naming_the_flag() {
    let pki = Pki::new();
    let (url, db) = common::fresh_database_url();
    let mut config = leasehold::config::Config::with_database_url(&url);
    pki.serve_with(&mut config, false);
    config.tls_key = Some(pki.path("missing.key"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = leasehold::server::start(config.clone(), listener)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("--tls-key"), "{err}");
    // A key that is not the certificate's.
    let (_, other_key) = pki.ca.sign(&["localhost"]);
    std::fs::write(pki.path("other.key"), other_key).unwrap();
    config.tls_key = Some(pki.path("other.key"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = leasehold::server::start(config, listener)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("--tls-cert") && err.contains("--tls-key"),
        "{err}"
    );
    common::drop_database(&db).await;
}
