//! The operator CLI as a person or a script runs it: the real `leasehold`
//! binary against a live server, checking output (tables and JSON lines)
//! and exit codes — 0 success, 1 the server said no or is unreachable,
//! 2 usage.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{register, Session, TestServer};
use leasehold::proto;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStderr, ChildStdout, Command};

const LIBRARY: &str = "3f2b8c1e-7a4d-4e6f-9b0a-5c1d2e3f4a5b";

/// What one run of the binary printed, and its exit code.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|err| panic!("stdout is not one JSON value ({err}): {self:?}"))
    }

    fn json_lines(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .map(|line| {
                serde_json::from_str(line)
                    .unwrap_or_else(|err| panic!("not a JSON line ({err}): {line:?}"))
            })
            .collect()
    }

    /// Exit 0.
    fn ok(self) -> Self {
        assert_eq!(self.code, 0, "{self:?}");
        self
    }

    /// Exit `code` and a message on stderr, nothing on stdout.
    fn failed(self, code: i32) -> Self {
        assert_eq!(self.code, code, "{self:?}");
        assert!(self.stdout.is_empty(), "{self:?}");
        assert!(self.stderr.starts_with("error: "), "{self:?}");
        self
    }
}

/// The binary, pointed at `server` through the environment (every other
/// setting of the caller's environment left out).
fn command(server: &str, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_leasehold"));
    command
        .args(args)
        .env_remove("LEASEHOLD_SERVER")
        .env_remove("LEASEHOLD_LOG_JSON")
        .env("LEASEHOLD_SERVER", server)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

/// Runs the binary to its end.
async fn run(server: &str, args: &[&str]) -> Run {
    finish(command(server, args)).await
}

/// Runs the binary with `input` on its standard input.
async fn run_with_input(server: &str, args: &[&str], input: &str) -> Run {
    let mut command = command(server, args);
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.as_bytes()).await.unwrap();
    drop(stdin);
    collect(child.wait_with_output()).await
}

async fn finish(mut command: Command) -> Run {
    collect(command.output()).await
}

async fn collect(
    output: impl std::future::Future<Output = std::io::Result<std::process::Output>>,
) -> Run {
    let output = tokio::time::timeout(Duration::from_secs(30), output)
        .await
        .expect("the command finishes within 30 s")
        .unwrap();
    Run {
        code: output.status.code().expect("exited, not killed"),
        stdout: String::from_utf8(output.stdout).unwrap(),
        stderr: String::from_utf8(output.stderr).unwrap(),
    }
}

/// Runs the binary, which must exit 0 and print one JSON value.
async fn run_json(server: &str, args: &[&str]) -> Value {
    run(server, args).await.ok().json()
}

/// The id in `created <id> <type>`.
fn created_id(run: &Run) -> String {
    let line = run.stdout.trim();
    let mut words = line.split(' ');
    assert_eq!(words.next(), Some("created"), "{run:?}");
    words.next().unwrap().to_owned()
}

#[tokio::test]
async fn create_get_and_list_print_tables_and_json() {
    let server = TestServer::start().await;
    let addr = server.endpoint();

    let created = run(
        &addr,
        &[
            "task",
            "create",
            "scan_library",
            "--params",
            r#"{"mode": "deep", "depth": 2}"#,
            "--priority",
            "600",
            "--max-attempts",
            "5",
            "--library-id",
            LIBRARY,
            "--dedup-key",
            "scan:lib",
        ],
    )
    .await
    .ok();
    let id = created_id(&created);
    assert!(created.stdout.trim().ends_with(" scan_library"));

    // The same key again: the existing task, marked deduplicated.
    let again = run(
        &addr,
        &["task", "create", "scan_library", "--dedup-key", "scan:lib"],
    )
    .await
    .ok();
    assert_eq!(
        again.stdout.trim(),
        format!("deduplicated {id} scan_library")
    );
    let again = run_json(
        &addr,
        &[
            "task",
            "create",
            "scan_library",
            "--dedup-key",
            "scan:lib",
            "--json",
        ],
    )
    .await;
    assert_eq!(again["deduplicated"], true);
    assert_eq!(again["task"]["id"], id.as_str());

    let later = run_json(
        &addr,
        &[
            "task",
            "create",
            "generate_thumbnail",
            "--scheduled-in",
            "1h",
            "--json",
        ],
    )
    .await;
    assert_eq!(later["deduplicated"], false);
    let later_id = later["task"]["id"].as_str().unwrap().to_owned();

    // get, for people: one field per line.
    let shown = run(&addr, &["task", "get", &id]).await.ok();
    for expected in [
        format!("id             {id}"),
        "type           scan_library".to_owned(),
        "status         pending".to_owned(),
        "priority       600".to_owned(),
        "attempts       0 of 5".to_owned(),
        format!("library        {LIBRARY}"),
        "dedup key      scan:lib".to_owned(),
        r#"params         {"depth":2,"mode":"deep"}"#.to_owned(),
    ] {
        assert!(
            shown.stdout.lines().any(|line| line == expected),
            "no line {expected:?} in\n{}",
            shown.stdout
        );
    }

    // get, for scripts: the proto fields by name.
    let task = run_json(&addr, &["task", "get", &id, "--json"]).await;
    assert_eq!(task["id"], id.as_str());
    assert_eq!(task["task_type"], "scan_library");
    assert_eq!(task["status"], "TASK_STATUS_PENDING");
    assert_eq!(task["priority"], 600);
    assert_eq!(task["max_attempts"], 5);
    assert_eq!(task["params"], json!({"mode": "deep", "depth": 2}));
    assert_eq!(task["library_id"], LIBRARY);
    assert!(task["created_at"].as_str().unwrap().ends_with('Z'));
    assert!(task.get("result").is_none());

    // list, for people: a header and one aligned row per task, newest
    // first.
    let listed = run(&addr, &["task", "list"]).await.ok();
    let lines: Vec<&str> = listed.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{}", listed.stdout);
    assert!(lines[0].starts_with("ID "));
    assert!(lines[0].contains("STATUS"));
    assert!(lines[1].starts_with(&later_id));
    assert!(lines[2].starts_with(&id));
    assert!(lines[2].contains(" scan_library "));
    // Columns line up: STATUS starts at the same place on every line.
    let column = lines[0].find("STATUS").unwrap();
    assert_eq!(&lines[1][column..column + 7], "pending");
    assert_eq!(&lines[2][column..column + 7], "pending");

    // list, for scripts, filtered.
    let tasks = run(&addr, &["task", "list", "--type", "scan_library", "--json"])
        .await
        .ok()
        .json_lines();
    assert_eq!(tasks.len(), 1);
    assert_eq!(tasks[0]["id"], id.as_str());
    let tasks = run(&addr, &["task", "list", "--library-id", LIBRARY, "--json"])
        .await
        .ok()
        .json_lines();
    assert_eq!(tasks.len(), 1);
    assert_eq!(tasks[0]["id"], id.as_str());
    let tasks = run(
        &addr,
        &["task", "list", "--status", "completed,failed", "--json"],
    )
    .await
    .ok();
    assert!(tasks.stdout.is_empty());
    let none = run(&addr, &["task", "list", "--status", "cancelled"])
        .await
        .ok();
    assert_eq!(none.stdout.trim(), "no tasks");

    // A limit, and a note on stderr when more tasks match.
    let first = run(&addr, &["task", "list", "--limit", "1", "--json"])
        .await
        .ok();
    assert_eq!(first.json_lines().len(), 1);
    assert!(
        first.stderr.contains("showing the first 1 tasks"),
        "{first:?}"
    );
    let all = run(&addr, &["task", "list", "--all", "--json"]).await.ok();
    assert_eq!(all.json_lines().len(), 2);
    assert!(all.stderr.is_empty(), "{all:?}");
    server.stop().await;
}

#[tokio::test]
async fn create_from_standard_input_makes_one_call_and_rejects_bad_lines() {
    let server = TestServer::start().await;
    let addr = server.endpoint();
    let input = format!(
        "{}\n\n{}\n{}\n",
        json!({"task_type": "generate_thumbnail", "params": {"book": 1}, "priority": 3}),
        json!({"task_type": "generate_thumbnail", "dedup_key": "same"}),
        json!({"task_type": "analyze_series", "dedup_key": "same", "scheduled_for": "2030-01-01T00:00:00Z"}),
    );
    let results = run_with_input(
        &addr,
        &["task", "create", "--from-file", "-", "--json"],
        &input,
    )
    .await
    .ok()
    .json_lines();
    assert_eq!(results.len(), 3);
    assert_eq!(results[0]["task"]["params"], json!({"book": 1}));
    assert_eq!(results[0]["task"]["priority"], 3);
    // Two entries with one key: one task, the second deduplicated.
    assert_eq!(results[1]["deduplicated"], false);
    assert_eq!(results[2]["deduplicated"], true);
    assert_eq!(results[2]["task"]["id"], results[1]["task"]["id"]);
    assert_eq!(server.task_count().await, 2);

    let human = run_with_input(
        &addr,
        &["task", "create", "--from-file", "-"],
        r#"{"task_type": "scan_library"}"#,
    )
    .await
    .ok();
    created_id(&human);

    // One bad line: nothing is created, and the line is named.
    let bad = format!(
        "{}\n{}\n",
        json!({"task_type": "scan_library"}),
        json!({"task_type": "scan_library", "prio": 1}),
    );
    let refused = run_with_input(&addr, &["task", "create", "--from-file", "-"], &bad)
        .await
        .failed(2);
    assert_eq!(
        refused.stderr.trim(),
        r#"error: standard input line 2: unknown field "prio""#
    );
    // The server's field checks too, before any call.
    let refused = run_with_input(
        &addr,
        &["task", "create", "--from-file", "-"],
        &format!(
            "{}\n{}\n",
            json!({"task_type": "scan_library"}),
            json!({"task_type": "scan library"}),
        ),
    )
    .await
    .failed(2);
    assert!(
        refused
            .stderr
            .starts_with("error: standard input line 2: task_type: ' ' is not allowed"),
        "{refused:?}"
    );
    assert_eq!(server.task_count().await, 3);
    server.stop().await;
}

/// `count` lines of `--from-file` input, one task each: line `n` is
/// `line(n)` (numbered from 1), or blank when that is `None`.
fn task_lines(count: usize, line: impl Fn(usize) -> Option<Value>) -> String {
    (1..=count)
        .map(|n| line(n).map(|v| v.to_string()).unwrap_or_default() + "\n")
        .collect()
}

#[tokio::test]
async fn create_from_a_file_of_several_calls_checks_every_line_first() {
    let server = TestServer::start().await;
    let addr = server.endpoint();
    // 10,010 tasks, two calls; line 10,005 would be refused by the server
    // in the second call, after the first had created 10,000 tasks.
    let input = task_lines(10_010, |n| {
        Some(match n {
            10_005 => json!({"task_type": "scan library"}),
            n => json!({"task_type": "generate_thumbnail", "params": {"book": n}}),
        })
    });
    let refused = run_with_input(&addr, &["task", "create", "--from-file", "-"], &input)
        .await
        .failed(2);
    assert!(
        refused
            .stderr
            .starts_with("error: standard input line 10005: task_type: ' ' is not allowed"),
        "{refused:?}"
    );
    assert_eq!(server.task_count().await, 0);
    server.stop().await;
}

#[tokio::test]
async fn create_from_a_file_prints_what_earlier_calls_created_when_a_later_one_fails() {
    // The payload limit is the server's setting: the CLI cannot check it.
    let server = TestServer::start_with(|config| config.max_payload_bytes = 256).await;
    let addr = server.endpoint();
    // Line 2 is blank, so lines 1 to 10,001 are the 10,000 tasks of the
    // first call; the second holds lines 10,002 to 10,004, and the server
    // refuses line 10,003.
    let input = task_lines(10_004, |n| match n {
        2 => None,
        10_003 => {
            Some(json!({"task_type": "generate_thumbnail", "params": {"pad": "x".repeat(300)}}))
        }
        n => Some(json!({"task_type": "generate_thumbnail", "params": {"book": n}})),
    });
    let expect_stderr = |run: &Run| {
        let mut lines = run.stderr.lines();
        let error = lines.next().unwrap_or_default();
        assert!(
            error.starts_with("error: INVALID_ARGUMENT: standard input line 10003: params: is ")
                && error.ends_with("bytes encoded, more than the limit of 256"),
            "{error}"
        );
        assert_eq!(
            lines.next(),
            Some(
                "created the 10000 tasks printed above (lines 1 to 10001); \
                 the call for lines 10002 to 10004 failed"
            ),
            "{}",
            run.stderr
        );
    };
    let stored_ids = || async {
        let rows = server
            .sql()
            .await
            .query("SELECT id::text FROM task_all", &[])
            .await
            .unwrap();
        rows.iter()
            .map(|row| row.get::<_, String>(0))
            .collect::<std::collections::HashSet<_>>()
    };

    // For scripts: every task created is a JSON line, and only those.
    let partial = run_with_input(
        &addr,
        &["task", "create", "--from-file", "-", "--json"],
        &input,
    )
    .await;
    assert_eq!(partial.code, 1, "{}", partial.stderr);
    expect_stderr(&partial);
    let printed: std::collections::HashSet<String> = partial
        .json_lines()
        .iter()
        .enumerate()
        .map(|(i, result)| {
            assert_eq!(result["deduplicated"], false);
            // In input order: the i-th task is on line i + 1, or i + 2
            // after the blank line.
            let line = if i == 0 { 1 } else { i + 2 };
            assert_eq!(result["task"]["params"], json!({"book": line}));
            result["task"]["id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(printed.len(), 10_000);
    assert_eq!(printed, stored_ids().await);

    // For people: a `created` line per task.
    let partial = run_with_input(&addr, &["task", "create", "--from-file", "-"], &input).await;
    assert_eq!(partial.code, 1, "{}", partial.stderr);
    expect_stderr(&partial);
    let mut printed_too = std::collections::HashSet::new();
    for line in partial.stdout.lines() {
        let words: Vec<&str> = line.split(' ').collect();
        assert_eq!((words[0], words[2]), ("created", "generate_thumbnail"));
        assert!(!printed.contains(words[1]), "{line}");
        printed_too.insert(words[1].to_owned());
    }
    assert_eq!(printed_too.len(), 10_000);
    assert_eq!(server.task_count().await, 20_000);

    // In a single call, the refused line is named the same way and nothing
    // is created.
    let refused = run_with_input(
        &addr,
        &["task", "create", "--from-file", "-"],
        &input.lines().skip(10_000).collect::<Vec<_>>().join("\n"),
    )
    .await
    .failed(1);
    assert!(
        refused
            .stderr
            .starts_with("error: INVALID_ARGUMENT: standard input line 3: params: is "),
        "{refused:?}"
    );
    assert_eq!(refused.stderr.lines().count(), 1, "{refused:?}");
    assert_eq!(server.task_count().await, 20_000);
    server.stop().await;
}

#[tokio::test]
async fn cancel_retry_and_purge_change_the_task_and_refuse_what_the_state_forbids() {
    let server = TestServer::start().await;
    let addr = server.endpoint();
    let id = created_id(&run(&addr, &["task", "create", "scan_library"]).await.ok());

    let cancelled = run(
        &addr,
        &["task", "cancel", &id, "--reason", "library deleted"],
    )
    .await
    .ok();
    assert_eq!(cancelled.stdout.trim(), format!("cancelled {id}"));
    let task = run_json(&addr, &["task", "get", &id, "--json"]).await;
    assert_eq!(task["status"], "TASK_STATUS_CANCELLED");
    assert!(task["last_error"]
        .as_str()
        .unwrap()
        .contains("library deleted"));

    let again = run(&addr, &["task", "cancel", &id]).await.failed(1);
    assert!(
        again.stderr.starts_with("error: FAILED_PRECONDITION: "),
        "{again:?}"
    );

    let retried = run_json(&addr, &["task", "retry", &id, "--json"]).await;
    assert_eq!(retried["status"], "TASK_STATUS_PENDING");
    assert_eq!(retried["attempts"], 0);
    let again = run(&addr, &["task", "retry", &id]).await.failed(1);
    assert!(
        again.stderr.starts_with("error: FAILED_PRECONDITION: "),
        "{again:?}"
    );
    assert_eq!(
        run_json(&addr, &["task", "cancel", &id, "--json"]).await["status"],
        "TASK_STATUS_CANCELLED"
    );

    // Finished a moment ago: not older than a day, so kept.
    let kept = run_json(&addr, &["task", "purge", "--older-than", "1d", "--json"]).await;
    assert_eq!(kept, json!({"deleted_count": 0}));
    let kept = run(&addr, &["task", "purge", "--status", "completed,failed"])
        .await
        .ok();
    assert_eq!(kept.stdout.trim(), "purged 0 tasks");
    let purged = run(&addr, &["task", "purge", "--status", "cancelled"])
        .await
        .ok();
    assert_eq!(purged.stdout.trim(), "purged 1 task");
    assert_eq!(server.task_count().await, 0);
    run(&addr, &["task", "get", &id]).await.failed(1);
    server.stop().await;
}

#[tokio::test]
async fn stats_and_workers_show_the_queue_and_the_sessions() {
    let server = TestServer::start().await;
    let addr = server.endpoint();
    for task_type in ["analyze_series", "analyze_series", "scan_library"] {
        run(&addr, &["task", "create", task_type]).await.ok();
    }

    let stats = run(&addr, &["stats"]).await.ok();
    let lines: Vec<&str> = stats.stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{}", stats.stdout);
    assert!(lines[0].starts_with("TYPE "));
    let words = |line: &str| {
        line.split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    // type, pending, processing, completed, failed, cancelled, total, age
    assert_eq!(
        words(lines[1])[..7],
        ["analyze_series", "2", "0", "0", "0", "0", "2"]
    );
    assert_eq!(
        words(lines[2])[..7],
        ["scan_library", "1", "0", "0", "0", "0", "1"]
    );
    assert_eq!(words(lines[3])[..7], ["*", "3", "0", "0", "0", "0", "3"]);

    let stats = run_json(&addr, &["stats", "--json"]).await;
    assert_eq!(stats["totals"]["pending"], 3);
    assert_eq!(stats["task_types"][0]["task_type"], "analyze_series");
    assert_eq!(stats["task_types"][0]["counts"]["total"], 2);
    assert!(stats["oldest_due_pending_age"]
        .as_str()
        .unwrap()
        .ends_with('s'));

    let none = run(&addr, &["workers"]).await.ok();
    assert_eq!(none.stdout.trim(), "no workers connected");
    assert!(run(&addr, &["workers", "--json"])
        .await
        .ok()
        .stdout
        .is_empty());

    let mut registration = register("thumbnailer-1", &["generate_thumbnail"], 4);
    registration.labels.insert("host".into(), "box-7".into());
    let session = Session::open(&addr, registration).await.unwrap();
    let listed = common::eventually(Duration::from_secs(10), || {
        let addr = addr.clone();
        async move {
            let lines = run(&addr, &["workers", "--json"]).await.ok().json_lines();
            (!lines.is_empty()).then_some(lines)
        }
    })
    .await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["worker_id"], "thumbnailer-1");
    assert_eq!(
        listed[0]["session_id"],
        session.registered.session_id.as_str()
    );
    assert_eq!(listed[0]["task_types"], json!(["generate_thumbnail"]));
    assert_eq!(listed[0]["slots"], 4);
    assert_eq!(listed[0]["labels"], json!({"host": "box-7"}));
    assert_eq!(listed[0]["draining"], false);

    let table = run(&addr, &["workers"]).await.ok();
    let lines: Vec<&str> = table.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{}", table.stdout);
    assert!(lines[0].starts_with("WORKER "));
    let row = words(lines[1]);
    assert_eq!(row[0], "thumbnailer-1");
    assert_eq!(row[1], session.registered.session_id);
    assert_eq!(row[3..6], ["generate_thumbnail", "4", "0"]);
    assert_eq!(row[8..], ["active", "host=box-7"]);
    session.close();
    server.stop().await;
}

/// A running `leasehold watch`, read line by line.
struct Watch {
    child: Child,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl Watch {
    /// Starts a watch and waits until it says the server has subscribed.
    async fn start(addr: &str, args: &[&str]) -> Watch {
        let mut command = command(addr, args);
        command.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = command.spawn().unwrap();
        let mut stderr: Lines<BufReader<ChildStderr>> =
            BufReader::new(child.stderr.take().unwrap()).lines();
        let line = tokio::time::timeout(Duration::from_secs(10), stderr.next_line())
            .await
            .expect("the watch starts within 10 s")
            .unwrap()
            .expect("a line on stderr");
        assert!(line.starts_with("watching task events on "), "{line}");
        // Drained in the background so the child never blocks on a full
        // pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = stderr.next_line().await {} });
        let stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        Watch { child, stdout }
    }

    /// The next line, a JSON event of task `id`.
    async fn event(&mut self, id: &str) -> Value {
        let line: Value = serde_json::from_str(&self.line().await).unwrap();
        let event = line["event"].clone();
        assert_eq!(event["task_id"], id, "{line}");
        assert_eq!(event["task_type"], "analyze_series");
        event
    }

    /// Sends SIGTERM and returns the exit code.
    async fn stop(mut self) -> i32 {
        let pid = self.child.id().expect("still running") as libc::pid_t;
        // SAFETY: `kill` only sends a signal to our own child process.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let status = tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .expect("the watch stops within 10 s")
            .unwrap();
        status.code().expect("exited, not killed")
    }

    /// The next line on stdout, within 10 s.
    async fn line(&mut self) -> String {
        tokio::time::timeout(Duration::from_secs(10), self.stdout.next_line())
            .await
            .expect("an event within 10 s")
            .unwrap()
            .expect("the watch is still running")
    }
}

#[tokio::test]
async fn watch_prints_the_life_of_a_task_as_json_and_as_lines() {
    let server = TestServer::start().await;
    let addr = server.endpoint();
    let mut as_json = Watch::start(&addr, &["watch", "--type", "analyze_series", "--json"]).await;
    let mut as_lines = Watch::start(&addr, &["watch", "--type", "analyze_series"]).await;
    let mut worker = Session::open(&addr, register("w", &["analyze_series"], 1))
        .await
        .unwrap();

    // Filtered out by type: never shows.
    run(&addr, &["task", "create", "scan_library"]).await.ok();
    let id = created_id(&run(&addr, &["task", "create", "analyze_series"]).await.ok());
    let leased = worker.next_task().await;
    worker.progress(&leased, 40, 100, "reading pages").await;
    // Progress is stored on its own schedule, and refused once the task
    // completed: the completion waits until the progress has shown.
    let mut kinds = Vec::new();
    for _ in 0..3 {
        let event = as_json.event(&id).await;
        if event["kind"] == "TASK_EVENT_KIND_PROGRESS" {
            let progress = &event["progress"];
            assert_eq!(
                (
                    &progress["current"],
                    &progress["total"],
                    &progress["message"]
                ),
                (&json!(40), &json!(100), &json!("reading pages"))
            );
        }
        kinds.push(event["kind"].as_str().unwrap().to_owned());
    }
    let shown = run(&addr, &["task", "get", &id]).await.ok();
    assert!(
        shown
            .stdout
            .lines()
            .any(|line| line == "progress       40/100 reading pages"),
        "{}",
        shown.stdout
    );
    worker.complete(&leased, json!({"pages": 100})).await;
    assert_eq!(worker.next_ack().await.status, proto::AckStatus::Ok as i32);
    kinds.push(
        as_json.event(&id).await["kind"]
            .as_str()
            .unwrap()
            .to_owned(),
    );
    assert_eq!(
        kinds,
        [
            "TASK_EVENT_KIND_CREATED",
            "TASK_EVENT_KIND_LEASED",
            "TASK_EVENT_KIND_PROGRESS",
            "TASK_EVENT_KIND_COMPLETED"
        ]
    );

    // Not a terminal: every event is a line, progress included.
    let mut lines = Vec::new();
    for _ in 0..4 {
        lines.push(as_lines.line().await);
    }
    let fields = |line: &str| {
        line.split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    for (line, (kind, status)) in lines.iter().zip([
        ("created", "pending"),
        ("leased", "processing"),
        ("progress", "processing"),
        ("completed", "completed"),
    ]) {
        let fields = fields(line);
        assert!(fields[0].ends_with('Z'), "{line}");
        assert_eq!(
            fields[1..5],
            [kind, &id, "analyze_series", status],
            "{line}"
        );
    }
    assert!(lines[1].contains(" worker=w"), "{}", lines[1]);
    assert!(
        lines[2].ends_with(r#" progress=40/100 message="reading pages""#),
        "{}",
        lines[2]
    );

    // SIGTERM (like Ctrl-C) ends a watch cleanly.
    assert_eq!(as_json.stop().await, 0);
    assert_eq!(as_lines.stop().await, 0);
    server.stop().await;
}

#[tokio::test]
async fn server_refusals_exit_1_with_the_code_and_the_servers_message() {
    let server = TestServer::start().await;
    let addr = server.endpoint();
    let refused = run(&addr, &["task", "get", "not-a-uuid"]).await.failed(1);
    assert_eq!(
        refused.stderr.trim(),
        r#"error: INVALID_ARGUMENT: id: "not-a-uuid" is not a UUID"#
    );
    let missing = "01a22327-955a-73f3-adcb-d34f7506329a";
    for args in [
        vec!["task", "get", missing],
        vec!["task", "cancel", missing],
        vec!["task", "retry", missing, "--json"],
    ] {
        let refused = run(&addr, &args).await.failed(1);
        assert!(
            refused.stderr.starts_with("error: NOT_FOUND: ") && refused.stderr.contains(missing),
            "{args:?}: {refused:?}"
        );
    }
    let refused = run(
        &addr,
        &["task", "create", "scan_library", "--library-id", "nope"],
    )
    .await
    .failed(1);
    assert_eq!(
        refused.stderr.trim(),
        r#"error: INVALID_ARGUMENT: library_id: "nope" is not a UUID"#
    );
    let refused = run(&addr, &["task", "create", "no spaces"]).await.failed(1);
    assert!(
        refused
            .stderr
            .starts_with("error: INVALID_ARGUMENT: task_type: "),
        "{refused:?}"
    );
    let refused = run(&addr, &["watch", "--task-id", "nope"]).await.failed(1);
    assert_eq!(
        refused.stderr.trim(),
        r#"error: INVALID_ARGUMENT: task_ids[0]: "nope" is not a UUID"#
    );
    assert_eq!(server.task_count().await, 0);
    server.stop().await;
}

#[tokio::test]
async fn usage_errors_exit_2_before_any_call() {
    let server = TestServer::start().await;
    let addr = server.endpoint();
    let cases: &[(&[&str], &str)] = &[
        (
            &["task", "create", "x", "--params", "{nope"],
            "not valid JSON",
        ),
        (
            &["task", "create", "x", "--params", "[1, 2]"],
            "must be a JSON object",
        ),
        (&["task", "create", "x", "--priority", "high"], "--priority"),
        (
            &["task", "create", "x", "--scheduled-in", "10"],
            "time unit",
        ),
        (
            &["task", "create", "x", "--scheduled-for", "tomorrow"],
            "--scheduled-for",
        ),
        (
            &[
                "task",
                "create",
                "x",
                "--scheduled-in",
                "1s",
                "--scheduled-for",
                "2030-01-01T00:00:00Z",
            ],
            "cannot be used with",
        ),
        (
            &["task", "create", "x", "--scheduled-in", "300000000000y"],
            "--scheduled-in 300000000000years is too far ahead",
        ),
        (
            &[
                "task",
                "create",
                "--from-file",
                "-",
                "--library-id",
                LIBRARY,
            ],
            "cannot be used with",
        ),
        (&["task", "create"], "<TYPE>"),
        (&["task", "get"], "<ID>"),
        (&["task", "list", "--status", "done"], "possible values"),
        (&["task", "list", "--limit", "many"], "--limit"),
        (&["task", "list", "--limit", "0"], "--limit"),
        (&["task", "purge", "--status", "pending"], "possible values"),
        (&["task", "purge", "--older-than", "soon"], "--older-than"),
        (&["task", "frobnicate"], "unrecognized subcommand"),
        (&["watch", "--status", "nope"], "possible values"),
        (
            &["stats", "--server", "http://[::1"],
            "invalid server address",
        ),
    ];
    for (args, expected) in cases {
        let refused = run(&addr, args).await.failed(2);
        assert!(refused.stderr.contains(expected), "{args:?}: {refused:?}");
    }
    assert_eq!(server.task_count().await, 0);
    server.stop().await;
}

#[tokio::test]
async fn an_unreachable_server_exits_1_naming_its_address() {
    // A port that was just free: nothing listens there.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    drop(listener);
    for args in [
        vec!["stats"],
        vec!["workers", "--json"],
        vec!["task", "list"],
        vec!["watch"],
    ] {
        let refused = run(&addr, &args).await.failed(1);
        assert!(
            refused
                .stderr
                .starts_with(&format!("error: cannot connect to {addr}: ")),
            "{args:?}: {refused:?}"
        );
    }
    // --server wins over the environment.
    let refused = run("127.0.0.1:9", &["stats", "--server", &addr])
        .await
        .failed(1);
    assert!(refused.stderr.contains(&addr), "{refused:?}");
}

#[tokio::test]
async fn a_server_list_uses_the_first_server_that_answers() {
    let server = TestServer::start().await;
    let addr = server.endpoint();
    // Ports that were just free: nothing listens there.
    let mut closed = Vec::new();
    for _ in 0..2 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        closed.push(listener.local_addr().unwrap().to_string());
    }
    let (bad, worse) = (&closed[0], &closed[1]);

    // The list `leasehold worker` takes, in the environment or in --server.
    let list = format!("{bad},{addr}");
    let id = created_id(&run(&list, &["task", "create", "scan_library"]).await.ok());
    let stats = run_json("127.0.0.1:9", &["stats", "--json", "--server", &list]).await;
    assert_eq!(stats["totals"]["pending"], 1);
    let task = run_json(&format!("{addr},{bad}"), &["task", "get", &id, "--json"]).await;
    assert_eq!(task["id"], id.as_str());

    // None answers: exit 1 naming every address tried.
    let refused = run(&format!("{bad},{worse}"), &["stats"]).await.failed(1);
    assert!(
        refused
            .stderr
            .starts_with(&format!("error: cannot connect to {bad}, {worse}: ")),
        "{refused:?}"
    );
    // Every address is checked before any is tried.
    let refused = run(&format!("{addr},http://[::1"), &["stats"])
        .await
        .failed(2);
    assert!(
        refused.stderr.contains("invalid server address"),
        "{refused:?}"
    );
    server.stop().await;
}

/// `serve --config FILE --print-config`: the file's settings, overridden by
/// the environment, overridden by flags; a bad file stops the start with
/// exit 2, naming the key.
#[tokio::test]
async fn a_config_file_is_overridden_by_the_environment_and_by_flags() {
    let dir = std::env::temp_dir().join(format!("leasehold-cli-config-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("leasehold.toml");
    std::fs::write(
        &file,
        "db-pool-size = 4\ndb-timeout = \"3s\"\nlease-duration = \"45s\"\nauth = \"required\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_leasehold"))
        .args([
            "serve",
            "--config",
            file.to_str().unwrap(),
            "--print-config",
        ])
        .args(["--lease-duration", "50s"])
        .env("LEASEHOLD_DB_TIMEOUT", "9s")
        .env_remove("LEASEHOLD_DB_POOL_SIZE")
        .env_remove("LEASEHOLD_LEASE_DURATION")
        .env_remove("LEASEHOLD_AUTH")
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8(out.stdout).unwrap();
    for line in [
        "db-pool-size = 4",
        "db-timeout = \"9s\"",
        "lease-duration = \"50s\"  # flag",
        "auth = \"required\"",
        "retain-finished = \"14d\"  # default",
    ] {
        assert!(printed.contains(line), "{line} missing from\n{printed}");
    }
    // What it printed is a config file that gives the same configuration.
    let again = dir.join("printed.toml");
    std::fs::write(&again, &printed).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_leasehold"))
        .args([
            "serve",
            "--config",
            again.to_str().unwrap(),
            "--print-config",
        ])
        .env_remove("LEASEHOLD_DB_TIMEOUT")
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8(out.stdout)
        .unwrap()
        .contains("lease-duration = \"50s\""));

    std::fs::write(&file, "db-pool-size = 4\nvacum-threshold = 10\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_leasehold"))
        .args(["serve", "--config", file.to_str().unwrap()])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("unknown setting `vacum-threshold`"),
        "{stderr}"
    );
    std::fs::write(&file, "retain-failed = \"forever\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_leasehold"))
        .args(["serve", "--config", file.to_str().unwrap()])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("retain-failed = \"forever\""), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}
