//! `sessions`: what idle sessions cost the server. K sessions, each on its
//! own connection, hold L leases each and heartbeat them at the interval
//! the server recommends (a third of the lease), spread evenly over the
//! interval. Measured over a window: the server's resident memory and its
//! CPU use, and how long heartbeats wait for their answer. At the end every
//! session completes its leases (heartbeating them until the completion is
//! acknowledged, as a worker would) and closes.
//!
//! One scenario, one file (about 600 lines with its test): its arguments,
//! the opening of the sessions, the measuring window and the report are
//! read together.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::error::{Context, Error, Result};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};

use super::db::{self, UpdateCounts};
use super::producer::{set_up_tasks, unique_task_type};
use super::report::{mib, or_unknown, per_second, round, JsonLine, Report, Summary};
use super::system::{cpu_between, ensure_open_files, Usage};
use super::target::{parse_lease, Node, NodeKind, Target};
use super::workers::{complete, end_if_closing, SessionStream};
use crate::proto::{self, connect_request, connect_response};

/// Sessions being opened at once.
const OPEN_CONCURRENCY: usize = 64;

/// How long the sessions may take to register and receive their leases.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(120);

/// How long the sessions may take to complete their leases and close.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(60);

/// Open files needed besides one per session (libraries, the database,
/// stdio, listeners).
const SPARE_FILES: u64 = 256;

/// Arguments of `leasehold bench sessions`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct SessionsArgs {
    /// Which server to drive (by default a spawned node).
    #[command(flatten)]
    pub(crate) target: Target,

    /// Idle sessions held open, each on its own connection (about one open
    /// file each on both sides; the soft limit is raised up to the hard
    /// limit when needed).
    #[arg(
        long,
        default_value_t = 1000,
        value_parser = clap::value_parser!(u32).range(1..=100_000)
    )]
    pub(crate) sessions: u32,

    /// Leases each session holds and heartbeats.
    #[arg(
        long,
        default_value_t = 2,
        value_parser = clap::value_parser!(u32).range(0..=10_000)
    )]
    pub(crate) leases: u32,

    /// Lease length; the sessions heartbeat every third of it, as the
    /// server recommends.
    #[arg(long, default_value = "30s", value_parser = parse_lease)]
    pub(crate) lease: Duration,

    /// Measurement window, once every session holds its leases.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub(crate) duration: Duration,
}

impl SessionsArgs {
    /// Open files this process needs: one connection per session, and the
    /// node's side too when it runs in this process.
    pub(crate) fn open_files_needed(&self) -> u64 {
        let per_session = match self.target.kind(NodeKind::Spawned) {
            NodeKind::InProcess => 2,
            NodeKind::Spawned | NodeKind::Remote => 1,
        };
        u64::from(self.sessions) * per_session + SPARE_FILES
    }
}

/// What the sessions saw, counted across all of them.
#[derive(Debug, Default)]
struct Tally {
    leases: AtomicU64,
    heartbeats: AtomicU64,
    heartbeat_acks: AtomicU64,
    held: AtomicU64,
    lost: AtomicU64,
    cancels: AtomicU64,
    completed: AtomicU64,
    refused: AtomicU64,
    /// Each heartbeat answer: when it came and how long after its request.
    answers: Mutex<Vec<(Instant, Duration)>>,
}

/// Result of the `sessions` scenario.
#[derive(Debug, Clone)]
pub(crate) struct SessionsReport {
    /// The server driven, in a few words.
    pub(crate) server: String,
    /// Where the node lives (what its figures cover).
    pub(crate) node_kind: NodeKind,
    /// The arguments of the run.
    pub(crate) args: SessionsArgs,
    /// Task type used by the run (unique to it).
    pub(crate) task_type: String,
    /// The recommended heartbeat interval the sessions used.
    pub(crate) heartbeat_interval: Duration,
    /// The node's resident memory before the sessions opened, in bytes.
    pub(crate) rss_before: Option<u64>,
    /// The node's largest resident memory seen in the window, in bytes.
    pub(crate) rss: Option<u64>,
    /// The node's CPU time over the window.
    pub(crate) cpu: Option<Duration>,
    /// This process's CPU time over the window.
    pub(crate) bench_cpu: Option<Duration>,
    /// Length of the window as measured.
    pub(crate) window: Duration,
    /// Heartbeats sent in the window.
    pub(crate) heartbeats_sent: u64,
    /// Heartbeats answered in the window.
    pub(crate) heartbeats: u64,
    /// Lease renewals answered `held` in the window.
    pub(crate) renewals: u64,
    /// Round trip of the heartbeats answered in the window.
    pub(crate) heartbeat_rtt: Option<Summary>,
    /// Updates of the live table in the window (the renewals), and how many
    /// were HOT.
    pub(crate) updates: Option<UpdateCounts>,
    /// Renewals answered lost or cancelled, and cancels pushed, over the
    /// whole run (zero unless something is wrong).
    pub(crate) lost: u64,
    /// Leases completed at the end.
    pub(crate) completed: u64,
    /// Why completing the leases and closing the sessions failed, if it
    /// did (the figures above stand; the run then exits with an error).
    pub(crate) close_failure: Option<String>,
}

impl SessionsReport {
    /// The node's resident memory in MiB.
    pub(crate) fn rss_mb(&self) -> Option<f64> {
        self.rss.map(mib)
    }

    /// The node's CPU use over the window, in percent of one core.
    pub(crate) fn cpu_percent(&self) -> Option<f64> {
        self.cpu.map(|cpu| percent(cpu, self.window))
    }
}

fn percent(cpu: Duration, window: Duration) -> f64 {
    100.0 * cpu.as_secs_f64() / window.as_secs_f64().max(1e-9)
}

impl Report for SessionsReport {
    fn table(&self) -> String {
        let args = &self.args;
        let mut out = String::new();
        out.push_str("sessions: idle sessions heartbeating their leases\n");
        out.push_str(&format!("  server      {}\n", self.server));
        out.push_str(&format!("  task type   {}\n", self.task_type));
        out.push_str(&format!(
            "  sessions    {} x {} leases of {}, heartbeat every {}\n",
            args.sessions,
            args.leases,
            humantime::format_duration(args.lease),
            humantime::format_duration(self.heartbeat_interval)
        ));
        out.push_str(&format!(
            "  window      {:.1} s: {:.1} heartbeats/s sent, {:.1} answered, {:.1} renewals/s\n",
            self.window.as_secs_f64(),
            per_second(self.heartbeats_sent, self.window),
            per_second(self.heartbeats, self.window),
            per_second(self.renewals, self.window)
        ));
        out.push_str(&format!(
            "  updates     {} of the live table in the window\n",
            UpdateCounts::describe(self.updates)
        ));
        if self.lost > 0 {
            out.push_str(&format!(
                "  anomalies   {} leases lost, cancelled or taken back\n",
                self.lost
            ));
        }
        out.push('\n');
        let whose = self.node_kind.caveat();
        out.push_str(&format!(
            "  server RSS  {} MiB{whose}",
            or_unknown(self.rss_mb(), 1)
        ));
        if let (Some(before), Some(rss)) = (self.rss_before, self.rss) {
            let per_session = rss.saturating_sub(before) as f64 / 1024.0 / f64::from(args.sessions);
            out.push_str(&format!(
                "; {:.1} MiB before the sessions: {per_session:.1} KiB per session",
                mib(before)
            ));
        }
        out.push('\n');
        out.push_str(&format!(
            "  server CPU  {} % of one core{whose}\n",
            or_unknown(self.cpu_percent(), 2)
        ));
        if self.node_kind != NodeKind::InProcess {
            out.push_str(&format!(
                "  bench CPU   {} % of one core (the sessions)\n",
                or_unknown(self.bench_cpu.map(|cpu| percent(cpu, self.window)), 2)
            ));
        }
        match &self.close_failure {
            None => out.push_str(&format!(
                "  clean-up    {} leases completed\n",
                self.completed
            )),
            Some(failure) => out.push_str(&format!(
                "  clean-up    FAILED after {} leases completed: {failure}\n",
                self.completed
            )),
        }
        if let Some(rtt) = &self.heartbeat_rtt {
            out.push_str(Summary::HEADER);
            out.push_str(&rtt.row("heartbeat (ms)"));
        }
        out
    }

    /// `{"scenario":"sessions","sessions":K,"leases_per_session":L,"rss_mb":..,
    /// "cpu_percent":..}`.
    fn json_line(&self) -> String {
        JsonLine::new("sessions")
            .field("sessions", self.args.sessions)
            .field("leases_per_session", self.args.leases)
            .field("rss_mb", self.rss_mb().map(|v| round(v, 1)))
            .field("cpu_percent", self.cpu_percent().map(|v| round(v, 2)))
            .field("live_updates", self.updates.map(|u| u.updates))
            .field("live_hot_updates", self.updates.map(|u| u.hot))
            .finish()
    }

    fn failure(&self) -> Option<String> {
        self.close_failure
            .as_ref()
            .map(|failure| format!("the sessions did not close cleanly: {failure}"))
    }
}

/// Figures of the measurement window.
struct Window {
    heartbeat_interval: Duration,
    elapsed: Duration,
    rss: Option<u64>,
    cpu: Option<Duration>,
    bench_cpu: Option<Duration>,
    heartbeats_sent: u64,
    heartbeats: u64,
    renewals: u64,
    rtt: Option<Summary>,
    updates: Option<UpdateCounts>,
}

/// The `sessions` scenario against `node`. The caller raises the open-file
/// limit ([`SessionsArgs::open_files_needed`]) before it starts a spawned
/// node, so that the node inherits it. Should the run fail, the tasks of
/// the run still unfinished are deleted through `--database-url`.
pub(crate) async fn run(node: &Node, args: &SessionsArgs) -> Result<SessionsReport> {
    ensure_open_files(args.open_files_needed())?;
    let task_type = unique_task_type("sessions");
    let outcome = measure(node, args, &task_type).await;
    if !matches!(&outcome, Ok(report) if report.close_failure.is_none()) {
        db::tidy(&args.target.database_url, &task_type).await;
    }
    outcome
}

async fn measure(node: &Node, args: &SessionsArgs, task_type: &str) -> Result<SessionsReport> {
    let endpoint = node.endpoint().to_owned();
    let sessions = args.sessions as usize;
    let leases = args.leases as usize;
    let rss_before = node.usage().map(|u| u.rss_bytes);
    set_up_tasks(&endpoint, task_type, sessions * leases).await?;

    let tally = Arc::new(Tally::default());
    let (stop, stop_rx) = watch::channel(false);
    let run = uuid::Uuid::new_v4().simple().to_string();
    let opening = Arc::new(Semaphore::new(OPEN_CONCURRENCY));
    let mut set = JoinSet::new();
    let (interval_tx, mut interval_rx) = tokio::sync::mpsc::unbounded_channel();
    for index in 0..sessions {
        let register = proto::RegisterWorker {
            worker_id: format!("bench-idle-{}-{index}", &run[..8]),
            task_types: vec![task_type.to_owned()],
            slots: leases.max(1) as i32,
            lease_duration: Some(crate::wire::convert::duration(args.lease)),
            ..Default::default()
        };
        let endpoint = endpoint.clone();
        let opening = opening.clone();
        let tally = tally.clone();
        let stop = stop_rx.clone();
        let interval_tx = interval_tx.clone();
        set.spawn(async move {
            let permit = opening.acquire_owned().await.expect("never closed");
            let stream = SessionStream::open(&endpoint, register, index)
                .await
                .with_context(|| format!("cannot open session {index}"))?;
            drop(permit);
            let interval = stream.heartbeat_interval();
            let _ = interval_tx.send(interval);
            // Spread the first heartbeats evenly over one interval.
            let offset = interval.mul_f64(index as f64 / sessions as f64);
            idle(stream, leases, offset, tally, stop).await
        });
    }
    drop(interval_tx);

    let window = measure_window(node, args, &tally, &mut set, &mut interval_rx).await;

    // Complete the leases and close, whatever happened.
    let _ = stop.send(true);
    let close_deadline = Instant::now() + CLOSE_TIMEOUT;
    let mut close_failure = None;
    while !set.is_empty() {
        match tokio::time::timeout_at(close_deadline, set.join_next()).await {
            Ok(Some(Ok(Ok(())))) => {}
            Ok(Some(Ok(Err(err)))) => {
                close_failure.get_or_insert(err.to_string());
            }
            Ok(Some(Err(err))) => {
                close_failure.get_or_insert(format!("a session task panicked: {err}"));
            }
            Ok(None) => break,
            Err(_) => {
                close_failure.get_or_insert(format!(
                    "{} sessions had not closed {CLOSE_TIMEOUT:?} after being told to",
                    set.len()
                ));
                set.abort_all();
                break;
            }
        }
    }
    let window = window?;
    let refused = tally.refused.load(Ordering::Relaxed);
    if refused > 0 {
        tracing::warn!(refused, "completions refused at the end");
    }
    Ok(SessionsReport {
        server: node.describe(),
        node_kind: node.kind(),
        args: args.clone(),
        task_type: task_type.to_owned(),
        heartbeat_interval: window.heartbeat_interval,
        rss_before,
        rss: window.rss,
        cpu: window.cpu,
        bench_cpu: window.bench_cpu,
        window: window.elapsed,
        heartbeats_sent: window.heartbeats_sent,
        heartbeats: window.heartbeats,
        renewals: window.renewals,
        heartbeat_rtt: window.rtt,
        updates: window.updates,
        lost: tally.lost.load(Ordering::Relaxed) + tally.cancels.load(Ordering::Relaxed),
        completed: tally.completed.load(Ordering::Relaxed),
        close_failure,
    })
}

/// Waits until every session is registered and holds its leases, then
/// measures the window.
async fn measure_window(
    node: &Node,
    args: &SessionsArgs,
    tally: &Tally,
    set: &mut JoinSet<Result<()>>,
    intervals: &mut tokio::sync::mpsc::UnboundedReceiver<Duration>,
) -> Result<Window> {
    let sessions = args.sessions as usize;
    let settle = Instant::now() + SETTLE_TIMEOUT;
    let mut registered = 0usize;
    let mut heartbeat_interval = Duration::ZERO;
    while registered < sessions {
        tokio::select! {
            interval = intervals.recv() => match interval {
                Some(interval) => {
                    registered += 1;
                    heartbeat_interval = interval;
                }
                None => break,
            },
            Some(joined) = set.join_next() => {
                joined.context("session task panicked")??;
                return Err(Error::Scenario(
                    "a session ended while the others were opening".into(),
                ));
            }
            _ = tokio::time::sleep_until(settle) => {
                return Err(Error::Scenario(format!(
                    "only {registered} of {sessions} sessions registered in {SETTLE_TIMEOUT:?}"
                )));
            }
        }
    }
    tracing::info!(sessions, "sessions registered");
    let wanted = u64::from(args.sessions) * u64::from(args.leases);
    while tally.leases.load(Ordering::Relaxed) < wanted {
        if Instant::now() >= settle {
            return Err(Error::Scenario(format!(
                "only {} of {wanted} leases were handed out in {SETTLE_TIMEOUT:?}",
                tally.leases.load(Ordering::Relaxed)
            )));
        }
        if let Some(joined) = set.try_join_next() {
            joined.context("session task panicked")??;
            return Err(Error::Scenario(
                "a session ended while the leases were handed out".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tracing::info!(leases = wanted, window = ?args.duration, "leases held: measuring");

    let updates_before = db::update_counts(&args.target.database_url).await;
    let server_before = node.usage();
    let bench_before = Usage::of(None).ok();
    let sent_before = tally.heartbeats.load(Ordering::Relaxed);
    let acks_before = tally.heartbeat_acks.load(Ordering::Relaxed);
    let held_before = tally.held.load(Ordering::Relaxed);
    let started = Instant::now();
    let end = started + args.duration;
    let mut rss = server_before.map(|u| u.rss_bytes);
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = tokio::time::sleep_until(end) => break,
            Some(joined) = set.join_next() => {
                joined.context("session task panicked")??;
                return Err(Error::Scenario("a session ended during the measurement".into()));
            }
        }
        if let Some(now) = node.usage() {
            rss = Some(rss.unwrap_or(0).max(now.rss_bytes));
        }
    }
    let ended = Instant::now();
    let updates = UpdateCounts::between(
        updates_before,
        db::update_counts(&args.target.database_url).await,
    );
    let server_after = node.usage();
    let bench_after = Usage::of(None).ok();
    if let Some(now) = server_after {
        rss = Some(rss.unwrap_or(0).max(now.rss_bytes));
    }
    let rtt: Vec<Duration> = tally
        .answers
        .lock()
        .expect("lock poisoned")
        .iter()
        .filter(|(at, _)| (started..=ended).contains(at))
        .map(|(_, rtt)| *rtt)
        .collect();
    Ok(Window {
        heartbeat_interval,
        elapsed: ended - started,
        rss,
        cpu: cpu_between(server_before, server_after),
        bench_cpu: cpu_between(bench_before, bench_after),
        heartbeats_sent: tally.heartbeats.load(Ordering::Relaxed) - sent_before,
        heartbeats: tally.heartbeat_acks.load(Ordering::Relaxed) - acks_before,
        renewals: tally.held.load(Ordering::Relaxed) - held_before,
        rtt: Summary::of(rtt),
        updates,
    })
}

/// One idle session: keeps the leases pushed to it (up to `leases`) and
/// heartbeats them every recommended interval, the first time after
/// `offset`. When told to stop, completes them and keeps heartbeating the
/// ones not yet acknowledged; closes its side once every completion is
/// answered.
async fn idle(
    stream: SessionStream,
    leases: usize,
    offset: Duration,
    tally: Arc<Tally>,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let interval = stream.heartbeat_interval();
    let SessionStream {
        index, tx, mut rx, ..
    } = stream;
    let mut tx = Some(tx);
    // Leases held until their completion is acknowledged.
    let mut held: Vec<proto::Lease> = Vec::with_capacity(leases);
    // When each unanswered heartbeat was sent (answers come in order).
    let mut sent: VecDeque<Instant> = VecDeque::new();
    let mut ticker = tokio::time::interval_at(Instant::now() + offset, interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut stopping = false;
    loop {
        if stopping && held.is_empty() {
            // Closing our side makes the server end the stream.
            tx = None;
        }
        tokio::select! {
            message = rx.message() => {
                let at = Instant::now();
                let kind = match end_if_closing(message, index, tx.is_none()) {
                    Ok(Some(message)) => message.kind,
                    Ok(None) => break,
                    Err(status) => {
                        let what = format!("the server ended session {index}");
                        return Err(status).context(what);
                    }
                };
                match kind {
                    Some(connect_response::Kind::Task(leased)) => {
                        let lease = leased.lease.context("a task was pushed without its lease")?;
                        tally.leases.fetch_add(1, Ordering::Relaxed);
                        if stopping {
                            if let Some(tx) = &tx {
                                tx.send(complete(&lease)).await.context("session closed")?;
                            }
                        }
                        held.push(lease);
                    }
                    Some(connect_response::Kind::HeartbeatAck(ack)) => {
                        tally.heartbeat_acks.fetch_add(1, Ordering::Relaxed);
                        if let Some(sent_at) = sent.pop_front() {
                            tally.answers.lock().expect("lock poisoned").push((at, at - sent_at));
                        }
                        for state in ack.leases {
                            if state.status == proto::LeaseStatus::Held as i32 {
                                tally.held.fetch_add(1, Ordering::Relaxed);
                            } else if !stopping {
                                // (While closing, a lease completed after the
                                // heartbeat left is rightly no longer held.)
                                tally.lost.fetch_add(1, Ordering::Relaxed);
                                tracing::warn!(session = index, task_id = %state.task_id, status = state.status, "lease not renewed");
                            }
                        }
                    }
                    Some(connect_response::Kind::Ack(ack)) => {
                        held.retain(|lease| lease.task_id != ack.task_id);
                        if ack.status == proto::AckStatus::Ok as i32 {
                            tally.completed.fetch_add(1, Ordering::Relaxed);
                        } else {
                            tally.refused.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Some(connect_response::Kind::Cancel(cancel)) => {
                        tally.cancels.fetch_add(1, Ordering::Relaxed);
                        held.retain(|lease| lease.task_id != cancel.task_id);
                        tracing::warn!(session = index, task_id = %cancel.task_id, "lease taken back");
                    }
                    Some(connect_response::Kind::Drain(_)) => {
                        tracing::warn!(session = index, "the server is draining this session");
                    }
                    Some(connect_response::Kind::Tasks(_)) | Some(connect_response::Kind::Acks(_)) => {
                        // Batches come only to sessions that ask for them,
                        // and these send single completions.
                        return Err(Error::Scenario(format!(
                            "session {index} got a batch it did not ask for"
                        )));
                    }
                    Some(connect_response::Kind::Registered(_)) | None => {}
                }
            }
            _ = ticker.tick(), if tx.is_some() && (!stopping || !held.is_empty()) => {
                let heartbeat = proto::SessionHeartbeat {
                    leases: held
                        .iter()
                        .map(|lease| proto::LeaseRenewal {
                            task_id: lease.task_id.clone(),
                            lease_token: lease.lease_token.clone(),
                        })
                        .collect(),
                };
                if let Some(tx) = &tx {
                    tx.send(proto::ConnectRequest {
                        kind: Some(connect_request::Kind::Heartbeat(heartbeat)),
                    })
                    .await
                    .context("session closed")?;
                    sent.push_back(Instant::now());
                    tally.heartbeats.fetch_add(1, Ordering::Relaxed);
                }
            }
            _ = stop.changed(), if !stopping => {
                stopping = true;
                if let Some(tx) = &tx {
                    for lease in &held {
                        tx.send(complete(lease)).await.context("session closed")?;
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::testing::{on_node, FreshDatabase};

    /// A few sessions hold and heartbeat their leases over a short window,
    /// then complete them. Counts only.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sessions_runs_end_to_end_in_process() {
        let db = FreshDatabase::new();
        let args = SessionsArgs {
            target: Target::in_process_at(db.url()),
            sessions: 3,
            leases: 2,
            lease: Duration::from_secs(3),
            duration: Duration::from_millis(1500),
        };
        let report = on_node(db, &args.target, NodeKind::Spawned, async |node| {
            run(node, &args).await
        })
        .await;

        let report = report.unwrap();
        assert_eq!(report.close_failure, None);
        assert_eq!(report.completed, 6, "every lease is completed at the end");
        assert_eq!(report.lost, 0);
        assert_eq!(report.heartbeat_interval, Duration::from_secs(1));
        assert!(report.rss.is_some() && report.cpu.is_some());
        let line = report.json_line();
        assert!(
            line.starts_with(
                r#"{"scenario":"sessions","sessions":3,"leases_per_session":2,"rss_mb":"#
            ),
            "{line}"
        );
        let json: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert!(json["cpu_percent"].is_f64());
    }
}
