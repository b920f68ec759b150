//! The `leasehold` binary as operators run it: `migrate`, `serve`, and a
//! graceful stop on SIGTERM that lets in-flight calls finish.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{acquire, acquire_tasks, duration, fresh_database_url, new_task};
use leasehold::proto::task_service_client::TaskServiceClient;
use leasehold::proto::worker_service_client::WorkerServiceClient;

const BIN: &str = env!("CARGO_BIN_EXE_leasehold");

/// Starts `leasehold serve` on a free port; returns the child and address.
fn spawn_server(database_url: &str) -> (std::process::Child, String) {
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("DATABASE_URL", database_url)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Logs go to standard error.
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("server printed its address before exiting")
            .unwrap();
        if let Some(rest) = line.split("addr=").nth(1) {
            break rest.split_whitespace().next().unwrap().to_owned();
        }
    };
    // Keep draining the log so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (child, addr)
}

#[tokio::test]
async fn migrate_then_serve_and_stop_gracefully_on_sigterm() {
    let (url, db_name) = fresh_database_url();
    let status = Command::new(BIN)
        .arg("migrate")
        .env("DATABASE_URL", &url)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(
        status.success(),
        "migrate creates and migrates the database"
    );

    let (mut child, addr) = spawn_server(&url);
    let endpoint = format!("http://{addr}");
    let channel = common::channel_to(&endpoint).await;
    let mut tasks = TaskServiceClient::new(channel.clone());
    let mut workers = WorkerServiceClient::new(channel);
    tasks.create_task(new_task("scan_library")).await.unwrap();
    let got = acquire_tasks(&mut workers, acquire("w", &["scan_library"], 1)).await;
    assert_eq!(got.len(), 1);

    // A long poll is in flight when the signal arrives: it must get its
    // (empty) answer, not a broken connection. The pause lets the request
    // reach the server first; a request sent after the signal would be
    // refused, which is the other half of a graceful stop.
    let mut request = acquire("w", &["scan_library"], 1);
    request.wait = Some(duration(Duration::from_secs(60)));
    let mut poller = workers.clone();
    let poll = tokio::spawn(async move { poller.acquire_tasks(request).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let answer = tokio::time::timeout(Duration::from_secs(20), poll)
        .await
        .expect("the long poll ends at shutdown")
        .unwrap()
        .expect("in-flight call finishes normally");
    assert!(answer.into_inner().tasks.is_empty());
    let exit = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(exit.code(), Some(0), "exit 0 after a graceful stop");
    common::drop_database(&db_name).await;
}
