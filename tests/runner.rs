//! `leasehold worker -- COMMAND`: a shell script as the worker. It completes
//! tasks with the JSON it prints, fails them with its exit code and stderr,
//! is killed (with what it started) when its task is cancelled, and the
//! runner drains and exits 0 on SIGTERM.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;

use common::cluster::{BIN, PATIENCE};
use common::{eventually, TestServer};
use leasehold::client::{from_struct, Client, NewTask};
use leasehold::proto::TaskStatus;
use serde_json::json;
use tokio::process::{Child, Command};

/// The command under test. It reads the task from stdin and acts on
/// `params.mode`.
const SCRIPT: &str = r#"#!/bin/sh
input=$(cat)
case "$input" in
  *'"mode":"fail"'*)
    echo "opening archive for $LEASEHOLD_TASK_ID" >&2
    echo "disk full while writing the thumbnail" >&2
    exit 3 ;;
  *'"mode":"garbage"'*)
    echo "this is not json"
    exit 0 ;;
  *'"mode":"background"'*)
    sleep 300 &
    echo "$!" > "$RUNNER_TEST_DIR/$LEASEHOLD_TASK_ID.bg"
    echo '{"left":"a process behind"}'
    exit 0 ;;
  *'"mode":"hang"'*)
    sleep 300 &
    echo "$$ $!" > "$RUNNER_TEST_DIR/$LEASEHOLD_TASK_ID.pids"
    wait
    exit 0 ;;
esac
printf '{"id":"%s","type":"%s","attempt":%s,"stdin":%s}\n' \
  "$LEASEHOLD_TASK_ID" "$LEASEHOLD_TASK_TYPE" "$LEASEHOLD_ATTEMPT" "$input"
"#;

/// A runner process and the folder holding its script.
struct Runner {
    child: Child,
    dir: PathBuf,
}

impl Runner {
    fn start(endpoint: &str, task_type: &str) -> Self {
        Self::start_command(endpoint, task_type, &["sh"])
    }

    /// A runner of `program` (plus the test script as its last argument).
    fn start_command(endpoint: &str, task_type: &str, program: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(format!("leasehold-runner-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("thumbnail.sh");
        std::fs::write(&script, SCRIPT).unwrap();
        let child = Command::new(BIN)
            .args(["worker", "--server", endpoint, "--task-type", task_type])
            .args([
                "--slots",
                "3",
                "--kill-grace",
                "1s",
                "--drain-timeout",
                "5s",
            ])
            .arg("--")
            .args(program)
            .arg(&script)
            .env("RUNNER_TEST_DIR", &dir)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("runner.log")).unwrap())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        Runner { child, dir }
    }

    /// SIGTERM, then the exit status.
    async fn stop(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().unwrap() as i32;
        // SAFETY: signals our own child process.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let status = tokio::time::timeout(PATIENCE, self.child.wait())
            .await
            .expect("runner exits after SIGTERM")
            .unwrap();
        let _ = std::fs::remove_dir_all(&self.dir);
        status
    }
}

impl Drop for Runner {
    /// A failing test shows what the runner logged (the script's stderr
    /// included).
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.dir.join("runner.log")).unwrap_or_default();
            eprintln!("===== runner log =====\n{log}");
        }
    }
}

/// True while `pid` is a live (not zombie) process.
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => !matches!(
            stat.rsplit(')').next().map(str::trim_start),
            Some(rest) if rest.starts_with('Z') || rest.starts_with('X')
        ),
        Err(_) => false,
    }
}

fn status_of(task: &leasehold::proto::Task) -> TaskStatus {
    TaskStatus::try_from(task.status).unwrap_or(TaskStatus::Unspecified)
}

async fn reaches(client: &Client, id: &str, want: TaskStatus) -> leasehold::proto::Task {
    eventually(PATIENCE, || async {
        let task = client.get(id).await.unwrap();
        (status_of(&task) == want).then_some(task)
    })
    .await
}

async fn create(client: &Client, mode: &str, max_attempts: i32) -> String {
    let task = NewTask::new("generate_thumbnail")
        .params(json!({ "mode": mode, "book": "b-7" }))
        .book_id("0d6f1a52-8a4e-4c1b-9a7e-3b2c1d0e9f8a")
        .max_attempts(max_attempts);
    client.create(task).await.unwrap().task.unwrap().id
}

fn pids(dir: &Path, task_id: &str) -> Option<Vec<i32>> {
    let text = std::fs::read_to_string(dir.join(format!("{task_id}.pids"))).ok()?;
    let pids: Vec<i32> = text
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    (pids.len() == 2).then_some(pids)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_completes_tasks_with_its_stdout() {
    let server = TestServer::start().await;
    let client = Client::connect(&server.endpoint()).await.unwrap();
    let runner = Runner::start(&server.endpoint(), "generate_thumbnail");

    let id = create(&client, "ok", 3).await;
    let task = reaches(&client, &id, TaskStatus::Completed).await;
    let result = from_struct(task.result.as_ref().unwrap()).unwrap();
    assert_eq!(result["id"], json!(id));
    assert_eq!(result["type"], json!("generate_thumbnail"));
    assert_eq!(result["attempt"], json!(1));
    // The task as the command read it on stdin.
    let stdin = &result["stdin"];
    assert_eq!(stdin["id"], json!(id));
    assert_eq!(stdin["task_type"], json!("generate_thumbnail"));
    assert_eq!(stdin["params"], json!({ "mode": "ok", "book": "b-7" }));
    assert_eq!(stdin["attempt"], json!(1));
    assert_eq!(stdin["max_attempts"], json!(3));
    assert_eq!(
        stdin["book_id"],
        json!("0d6f1a52-8a4e-4c1b-9a7e-3b2c1d0e9f8a")
    );

    assert!(runner.stop().await.success(), "runner exits 0 on SIGTERM");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_command_fails_the_attempt_with_its_exit_code_and_stderr() {
    let server = TestServer::start().await;
    let client = Client::connect(&server.endpoint()).await.unwrap();
    let runner = Runner::start(&server.endpoint(), "generate_thumbnail");

    let failing = create(&client, "fail", 1).await;
    let task = reaches(&client, &failing, TaskStatus::Failed).await;
    assert_eq!(
        task.last_error.as_deref(),
        Some(
            format!(
                "command failed with exit code 3: opening archive for {failing}\n\
                 disk full while writing the thumbnail"
            )
            .as_str()
        )
    );

    // Output that is not JSON fails the attempt too; with attempts left the
    // task is retried (and fails again here).
    let garbage = create(&client, "garbage", 2).await;
    let task = reaches(&client, &garbage, TaskStatus::Failed).await;
    assert_eq!(task.attempts, 2);
    assert!(
        task.last_error
            .as_deref()
            .is_some_and(|e| e.starts_with("stdout is not JSON")),
        "{:?}",
        task.last_error
    );

    assert!(runner.stop().await.success());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_task_kills_its_command_and_what_it_started() {
    let server = TestServer::start().await;
    let client = Client::connect(&server.endpoint()).await.unwrap();
    let runner = Runner::start(&server.endpoint(), "generate_thumbnail");

    let hanging = create(&client, "hang", 3).await;
    let dir = runner.dir.clone();
    let pids = eventually(PATIENCE, || {
        let found = pids(&dir, &hanging);
        async move { found }
    })
    .await;
    assert!(pids.iter().all(|&pid| alive(pid)));
    reaches(&client, &hanging, TaskStatus::Processing).await;

    client.cancel(&hanging, "no longer needed").await.unwrap();
    eventually(PATIENCE, || {
        let gone = pids.iter().all(|&pid| !alive(pid));
        async move { gone.then_some(()) }
    })
    .await;
    let task = client.get(&hanging).await.unwrap();
    assert_eq!(status_of(&task), TaskStatus::Cancelled);

    // The runner goes on with the next task.
    let next = create(&client, "ok", 3).await;
    reaches(&client, &next, TaskStatus::Completed).await;

    assert!(runner.stop().await.success());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_command_leaves_running_is_stopped_when_it_exits() {
    let server = TestServer::start().await;
    let client = Client::connect(&server.endpoint()).await.unwrap();
    let runner = Runner::start(&server.endpoint(), "generate_thumbnail");

    // The background `sleep` keeps the command's stdout open; the task
    // still completes, and the `sleep` is gone.
    let id = create(&client, "background", 3).await;
    let task = reaches(&client, &id, TaskStatus::Completed).await;
    let result = from_struct(task.result.as_ref().unwrap()).unwrap();
    assert_eq!(result, json!({ "left": "a process behind" }));
    let pid: i32 = std::fs::read_to_string(runner.dir.join(format!("{id}.bg")))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    eventually(PATIENCE, || {
        let gone = !alive(pid);
        async move { gone.then_some(()) }
    })
    .await;

    assert!(runner.stop().await.success());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_that_cannot_be_found_stops_the_runner_before_it_takes_a_task() {
    let server = TestServer::start().await;
    let client = Client::connect(&server.endpoint()).await.unwrap();
    let id = create(&client, "ok", 3).await;
    let mut runner = Runner::start_command(
        &server.endpoint(),
        "generate_thumbnail",
        &["/no/such/program"],
    );
    let status = tokio::time::timeout(PATIENCE, runner.child.wait())
        .await
        .expect("the runner exits")
        .unwrap();
    assert_eq!(status.code(), Some(1));
    let log = std::fs::read_to_string(runner.dir.join("runner.log")).unwrap();
    assert!(log.contains("/no/such/program"), "{log}");
    let task = client.get(&id).await.unwrap();
    assert_eq!(status_of(&task), TaskStatus::Pending);
    assert_eq!(task.attempts, 0);
    server.stop().await;
}
