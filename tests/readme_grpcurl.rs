//! The README's worked grpcurl session runs as written against a real server,
//! and leaves the task it describes in the database.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use leasehold::proto;

const START_MARKER: &str = "<!-- grpcurl-session:start -->";
const END_MARKER: &str = "<!-- grpcurl-session:end -->";

/// How long the whole session may take before it counts as hung.
const SESSION_LIMIT: Duration = Duration::from_secs(60);

/// The body of the one ```bash block between the session markers.
fn session_block(readme: &str) -> String {
    let start = readme
        .find(START_MARKER)
        .unwrap_or_else(|| panic!("README.md has no `{START_MARKER}` marker"));
    let after_start = &readme[start + START_MARKER.len()..];
    let end = after_start
        .find(END_MARKER)
        .unwrap_or_else(|| panic!("README.md has no `{END_MARKER}` marker after `{START_MARKER}`"));
    let between = after_start[..end].trim();
    let body = between
        .strip_prefix("```bash\n")
        .and_then(|rest| rest.strip_suffix("```"))
        .unwrap_or_else(|| {
            panic!(
                "between the grpcurl-session markers README.md must hold exactly one ```bash \
                 fenced block and nothing else; found:\n{between}"
            )
        });
    assert!(
        !body.contains("```"),
        "more than one fenced block between the grpcurl-session markers:\n{between}"
    );
    assert!(
        !body.trim().is_empty(),
        "the grpcurl-session block is empty"
    );
    body.to_owned()
}

/// Where `program` is on `path`, if anywhere (an executable file).
fn find_program(path: &std::ffi::OsStr, program: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::env::split_paths(path)
        .map(|dir| dir.join(program))
        .find(|candidate| {
            candidate
                .metadata()
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// Runs `script` with `bash -euo pipefail -c`, killing it after `limit`.
/// Returns (exit status, stdout, stderr).
fn run_bash(
    script: &str,
    envs: Vec<(&'static str, std::ffi::OsString)>,
    limit: Duration,
) -> (std::process::ExitStatus, String, String) {
    let mut child = Command::new("bash")
        .args(["-euo", "pipefail", "-c", script])
        .envs(envs)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("bash starts");
    // Drain both pipes on threads so a chatty script cannot block on them.
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for bash") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the README grpcurl session did not finish within {limit:?}\n\
                 --- stdout ---\n{}\n--- stderr ---\n{}",
                stdout.join().unwrap_or_default(),
                stderr.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (
        status,
        stdout.join().unwrap_or_default(),
        stderr.join().unwrap_or_default(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn readme_grpcurl_session_runs_verbatim() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md is readable");
    let block = session_block(&readme);

    // grpcurl comes from .ci/tools/bin, jq from the system; both are required.
    let tools_bin = root.join(".ci/tools/bin");
    let mut dirs = vec![tools_bin.clone()];
    dirs.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    let path = std::env::join_paths(dirs).expect("PATH entries are valid");
    for tool in ["grpcurl", "jq"] {
        assert!(
            find_program(&path, tool).is_some(),
            "`{tool}` not found in {} or on PATH: run `.ci/tools.sh` (or \
             `source .ci/tools.sh`) from the repository root to install it",
            tools_bin.display()
        );
    }

    let server = TestServer::start().await;
    let addr = server.running.as_ref().unwrap().addr().to_string();
    let envs = vec![("ADDR", addr.into()), ("PATH", path)];
    let (status, stdout, stderr) =
        tokio::task::spawn_blocking(move || run_bash(&block, envs, SESSION_LIMIT))
            .await
            .unwrap();
    assert!(
        status.success(),
        "the README grpcurl session failed ({status})\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
    );

    // Exactly the one task the session created, completed with its result.
    let tasks = server
        .tasks()
        .await
        .list_tasks(proto::ListTasksRequest::default())
        .await
        .expect("ListTasks")
        .into_inner()
        .tasks;
    assert_eq!(
        tasks.len(),
        1,
        "the session creates exactly one task: {tasks:#?}"
    );
    let task = &tasks[0];
    assert_eq!(task.task_type, "scan_library");
    assert_eq!(status_of(task), proto::TaskStatus::Completed);
    assert_eq!(task.priority, 600);
    assert_eq!(task.attempts, 1);
    assert_eq!(task.locked_until, None);
    assert_eq!(
        task.library_id.as_deref(),
        Some("3f2b8c1e-7a4d-4e6f-9b0a-5c1d2e3f4a5b")
    );
    assert_eq!(task.params, Some(json(serde_json::json!({"mode": "deep"}))));
    let expected_result =
        serde_json::json!({"files_processed": 812, "books_created": 40, "errors": []});
    assert_eq!(task.result, Some(json(expected_result.clone())));

    // The session printed the created id, a held lease, the completion and
    // the final GetTask of that same task.
    assert!(
        stdout.lines().next() == Some(task.id.as_str()),
        "the session's first line is the created task id {}:\n{stdout}",
        task.id
    );
    assert!(
        stdout.contains("LEASE_STATUS_HELD"),
        "heartbeat output:\n{stdout}"
    );
    assert!(
        stdout.contains("TASK_STATUS_COMPLETED"),
        "completion output:\n{stdout}"
    );

    // And the row itself, as stored.
    let id: uuid::Uuid = task.id.parse().unwrap();
    let row = server
        .sql()
        .await
        .query_one(
            "SELECT status, result, params, locked_until IS NULL FROM task_all WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "completed");
    assert_eq!(row.get::<_, serde_json::Value>(1), expected_result);
    assert_eq!(
        row.get::<_, serde_json::Value>(2),
        serde_json::json!({"mode": "deep"})
    );
    assert!(row.get::<_, bool>(3), "the lease expiry is cleared");

    server.stop().await;
}
