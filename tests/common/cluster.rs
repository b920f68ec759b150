//! Real `leasehold serve` processes on one fresh database, for tests that
//! signal or kill a node (SIGTERM drain, SIGKILL crash).

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use super::eventually;

pub const BIN: &str = env!("CARGO_BIN_EXE_leasehold");

/// Longest wait for a cluster-wide condition (reclaims, drains, exits).
pub const PATIENCE: Duration = Duration::from_secs(20);

/// Flags of every node: a short drain, a fast reclaimer, a small pool (three
/// tests run three nodes each at once on one Postgres).
pub const BASE_ARGS: &[&str] = &[
    "--drain-grace",
    "5s",
    "--reclaim-interval",
    "100ms",
    "--db-pool-size",
    "4",
];

// ---------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------

/// One `leasehold serve` process.
pub struct Node {
    pub name: &'static str,
    pub child: Child,
    pub endpoint: String,
    pub log: PathBuf,
}

/// Nodes on one fresh database. Dropping it SIGKILLs every node still
/// running, prints their logs if the test is failing, and drops the database.
pub struct Cluster {
    pub url: String,
    pub db_name: String,
    pub nodes: Vec<Node>,
}

impl Cluster {
    /// Creates and migrates a fresh database with `leasehold migrate`, then
    /// starts one node per `(name, extra flags)`, in order.
    pub fn start(specs: &[(&'static str, &[&str])]) -> Self {
        let (url, db_name) = super::fresh_database_url();
        let status = Command::new(BIN)
            .arg("migrate")
            .env("DATABASE_URL", &url)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "leasehold migrate failed: {status}");
        let mut cluster = Cluster {
            url,
            db_name,
            nodes: Vec::new(),
        };
        for (name, extra) in specs {
            let node = cluster.spawn(name, extra);
            cluster.nodes.push(node);
        }
        cluster
    }

    pub fn spawn(&self, name: &'static str, extra: &[&str]) -> Node {
        let dir = std::env::temp_dir().join("leasehold-cluster");
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join(format!("{}-{name}.log", self.db_name));
        let mut file = std::fs::File::create(&log).unwrap();
        let mut child = Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(BASE_ARGS)
            .args(extra)
            .env("DATABASE_URL", &self.url)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::from(file.try_clone().unwrap()))
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Logs go to standard error.
        let stdout = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        // Copies the log to the file until the process exits, and hands over
        // the address from the `listening` line.
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = writeln!(file, "{line}");
                if line.contains("listening") {
                    if let Some(addr) = line.split("addr=").nth(1) {
                        if let Some(tx) = tx.take() {
                            let addr = addr.split_whitespace().next().unwrap_or_default();
                            let _ = tx.send(addr.to_owned());
                        }
                    }
                }
            }
        });
        match rx.recv_timeout(PATIENCE) {
            Ok(addr) => Node {
                name,
                child,
                endpoint: format!("http://{addr}"),
                log,
            },
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "node {name} did not log its address:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
        }
    }

    pub fn endpoint(&self, node: usize) -> String {
        self.nodes[node].endpoint.clone()
    }

    /// Sends `signal` (e.g. `TERM`, `KILL`) with the `kill` command.
    pub fn signal(&self, node: usize, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.nodes[node].child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Waits until the node's process has exited.
    pub async fn exited(&mut self, node: usize) -> ExitStatus {
        let child = &mut self.nodes[node].child;
        eventually(PATIENCE, || {
            let status = child.try_wait().unwrap();
            async move { status }
        })
        .await
    }

    /// A direct connection to the cluster's database.
    pub async fn sql(&self) -> tokio_postgres::Client {
        super::connect_sql(&self.url).await
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            let _ = node.child.kill();
            let _ = node.child.wait();
        }
        for node in &self.nodes {
            if std::thread::panicking() {
                eprintln!(
                    "===== log of node {} ({}) =====\n{}",
                    node.name,
                    node.log.display(),
                    std::fs::read_to_string(&node.log).unwrap_or_default()
                );
            } else {
                let _ = std::fs::remove_file(&node.log);
            }
        }
        // Drop may run on a runtime thread: use a runtime of its own.
        let name = self.db_name.clone();
        let _ = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(super::drop_database(&name))
        })
        .join();
    }
}
