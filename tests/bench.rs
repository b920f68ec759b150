//! `leasehold bench` as operators run it, with the node spawned as a child
//! process (`leasehold serve`) so that its CPU time and memory are its own.
//! Tiny sizes; counts and the shape of the JSON line only, no figure.

mod common;

use std::process::{Command, Stdio};

use common::{drop_database, fresh_database_url};

const BIN: &str = env!("CARGO_BIN_EXE_leasehold");

/// Runs `leasehold bench <args>` on a fresh database; returns the JSON of
/// the last line of its standard output.
async fn bench(args: &[&str]) -> serde_json::Value {
    let (url, db_name) = fresh_database_url();
    let output = tokio::task::spawn_blocking({
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let url = url.clone();
        move || {
            Command::new(BIN)
                .arg("bench")
                .args(&args)
                .args(["--database-url", &url])
                .env("RUST_LOG", "warn")
                .env("NO_COLOR", "1")
                .stdin(Stdio::null())
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    drop_database(&db_name).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "bench {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let last = stdout.lines().last().expect("a JSON line");
    serde_json::from_str(last).unwrap_or_else(|err| panic!("{err}: {last}"))
}

#[tokio::test]
async fn drain_on_a_spawned_node_reports_its_cpu() {
    let json = bench(&[
        "drain",
        "--tasks",
        "40",
        "--sessions",
        "2",
        "--slots",
        "5",
        "--preexisting-finished",
        "3",
    ])
    .await;
    assert_eq!(json["scenario"], "drain");
    assert_eq!(json["tasks"], 40);
    assert_eq!(json["sessions"], 2);
    assert_eq!(json["slots"], 5);
    assert_eq!(json["preexisting_finished_rows"], 3);
    assert!(json["tasks_per_s"].is_f64());
    assert!(
        json["server_cpu_s_per_1k"].is_f64(),
        "the spawned node is measured"
    );
}

/// With `--tls-cert` and `--auth`, the spawned node serves TLS and requires
/// tokens, and the bench's clients drain every task through both.
#[tokio::test]
async fn drain_over_tls_with_tokens_drains_every_task() {
    let pki = common::pki::Pki::new();
    let (cert, key, ca) = (
        pki.path("server.pem"),
        pki.path("server.key"),
        pki.path("ca.pem"),
    );
    let json = bench(&[
        "drain",
        "--tasks",
        "40",
        "--sessions",
        "2",
        "--slots",
        "5",
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
        "--tls-ca",
        ca.to_str().unwrap(),
        "--auth",
    ])
    .await;
    assert_eq!(json["scenario"], "drain");
    assert_eq!(json["tasks"], 40);
}

/// The sessions spread over three nodes on one database drain every task;
/// the nodes' CPU is summed.
#[tokio::test]
async fn drain_over_several_nodes_drains_every_task() {
    let json = bench(&[
        "drain",
        "--tasks",
        "60",
        "--sessions",
        "3",
        "--slots",
        "4",
        "--nodes",
        "3",
    ])
    .await;
    assert_eq!(json["nodes"], 3);
    assert_eq!(json["tasks"], 60);
    assert_eq!(json["batched"], true);
    assert!(json["server_cpu_s_per_1k"].is_f64());
}

#[tokio::test]
async fn sessions_on_a_spawned_node_reports_its_memory() {
    let json = bench(&[
        "sessions",
        "--sessions",
        "3",
        "--leases",
        "1",
        "--lease",
        "3s",
        "--duration",
        "1s",
    ])
    .await;
    assert_eq!(json["scenario"], "sessions");
    assert_eq!(json["sessions"], 3);
    assert_eq!(json["leases_per_session"], 1);
    assert!(json["rss_mb"].as_f64().unwrap() > 0.0);
    assert!(json["cpu_percent"].is_f64());
}
