//! What the worker holds and owes across streams ([`Leases`]): the leases
//! whose handlers run or wait for a slot, and the outcomes sent but not yet
//! acknowledged. The session loop owns one and talks to it only through its
//! methods, which keep these rules:
//!
//! - A lease is held from its hand-out until its handler finishes, the
//!   server cancels it, or a heartbeat answers it lost. Only held leases are
//!   heartbeated, and a handler's result is sent only while its lease is
//!   held, so a stale attempt never reports.
//! - An outcome stays queued until the server acknowledges it; the next
//!   session sends it again. Repeating an outcome with the same token is
//!   harmless, so each task completes exactly once.
//! - Never more handlers run than the worker has slots: a task pushed while
//!   every slot runs a handler (perhaps a cancelled one winding down) waits,
//!   its lease held and heartbeated.

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures_util::FutureExt;
use tokio::sync::mpsc;
use tokio::task::{JoinError, JoinSet};
use tokio_util::sync::CancellationToken;

use super::context::{Handler, HandlerResult, ProgressReport, TaskContext, TaskError};
use super::message;
use crate::client::from_struct;
use crate::proto::{self, connect_request, AckStatus, LeaseStatus, OutcomeKind};
use crate::wire::limit;

/// A lease whose handler is running.
struct Held {
    lease_token: String,
    /// The handler's token is a child of this one: a handler that cancels
    /// its own token (say, through a drop guard) stops nothing here.
    cancel: CancellationToken,
}

/// A handler ready to start.
struct Ready {
    task_id: String,
    lease_token: String,
    handler: Handler,
    ctx: TaskContext,
}

/// How a handler ended.
pub(super) struct Finished {
    task_id: String,
    lease_token: String,
    result: HandlerResult,
}

/// An outcome waiting for the server's acknowledgement.
struct Pending {
    kind: OutcomeKind,
    message: connect_request::Kind,
    /// The lease the outcome is about; answers name it.
    lease_token: String,
    /// Whether this is already the stand-in for an outcome the server
    /// refused as invalid (so a second refusal gives up).
    fallback: bool,
}

/// The server's limit on leases per heartbeat.
const MAX_HEARTBEAT_LEASES: usize = limit::MAX_HEARTBEAT_LEASES;

/// How long, when the worker stops, cancelled handlers may take to return
/// (a command runner kills its processes in that time) before they are
/// aborted.
const HANDLER_EXIT_WAIT: Duration = Duration::from_secs(10);

/// What a handler did: finished (or panicked past its guard, or was
/// aborted), or reported progress.
pub(super) enum Activity {
    Finished(Result<Finished, JoinError>),
    Progress(ProgressReport),
}

/// The leases a worker holds, the handlers that run them, and the outcomes
/// waiting for their acknowledgement.
pub(super) struct Leases {
    slots: usize,
    handlers: HashMap<String, Handler>,
    held: HashMap<String, Held>,
    pending: HashMap<String, Pending>,
    running: JoinSet<Finished>,
    /// Handlers of held leases waiting for a free slot, in arrival order.
    waiting: VecDeque<Ready>,
    progress_tx: mpsc::Sender<ProgressReport>,
    progress_rx: mpsc::Receiver<ProgressReport>,
}

impl Leases {
    /// Nothing held, for a worker of `slots` running `handlers`.
    pub(super) fn new(slots: usize, handlers: HashMap<String, Handler>) -> Self {
        let (progress_tx, progress_rx) = mpsc::channel(1024);
        Self {
            slots: slots.max(1),
            handlers,
            held: HashMap::new(),
            pending: HashMap::new(),
            running: JoinSet::new(),
            waiting: VecDeque::new(),
            progress_tx,
            progress_rx,
        }
    }

    /// Nothing held and nothing waiting for an acknowledgement.
    pub(super) fn idle(&self) -> bool {
        self.held.is_empty() && self.pending.is_empty()
    }

    /// How many leases are held.
    pub(super) fn held(&self) -> usize {
        self.held.len()
    }

    /// Waits until a handler finishes or reports progress; never, when no
    /// handler runs.
    pub(super) async fn activity(&mut self) -> Activity {
        tokio::select! {
            Some(joined) = self.running.join_next(), if !self.running.is_empty() => {
                Activity::Finished(joined)
            }
            Some(report) = self.progress_rx.recv() => Activity::Progress(report),
        }
    }

    /// Waits until a handler finishes; never, when none runs. (Progress
    /// reports wait in their queue.)
    pub(super) async fn finished_handler(&mut self) -> Activity {
        match self.running.join_next().await {
            Some(joined) => Activity::Finished(joined),
            None => std::future::pending().await,
        }
    }

    /// What to send about `activity`: a progress report while its lease is
    /// held; for a finished handler, the progress it reported before it
    /// returned, then its outcome. A freed slot starts the next waiting
    /// handler.
    pub(super) fn settle(&mut self, activity: Activity) -> Vec<connect_request::Kind> {
        let mut out = Vec::new();
        match activity {
            Activity::Progress(report) => out.extend(self.progress(report)),
            Activity::Finished(joined) => {
                while let Ok(report) = self.progress_rx.try_recv() {
                    out.extend(self.progress(report));
                }
                if let Ok(finished) = joined {
                    out.extend(self.finished(finished));
                }
                self.start_waiting();
            }
        }
        out
    }

    /// What to send about the handlers that have finished by now, without
    /// waiting for any (see [`Leases::settle`]).
    pub(super) fn settle_ready(&mut self) -> Vec<connect_request::Kind> {
        let mut out = Vec::new();
        while let Some(joined) = self.running.try_join_next() {
            out.extend(self.settle(Activity::Finished(joined)));
        }
        out
    }

    /// The outcomes sent and not acknowledged, to send again on a new
    /// stream.
    pub(super) fn unacknowledged(&self) -> Vec<connect_request::Kind> {
        self.pending.values().map(|p| p.message.clone()).collect()
    }

    /// The outcomes of these tasks, to send again (the server could not
    /// record them a moment ago).
    pub(super) fn resend(&self, task_ids: Vec<String>) -> Vec<connect_request::Kind> {
        task_ids
            .iter()
            .filter_map(|task_id| self.pending.get(task_id))
            .map(|pending| pending.message.clone())
            .collect()
    }

    /// The server took a task away: its handler is cancelled, if it runs
    /// that very lease.
    pub(super) fn cancel(&mut self, cancel: &proto::CancelLease) {
        if !self.holds(&cancel.task_id, &cancel.lease_token) {
            return;
        }
        if let Some(held) = self.forget(&cancel.task_id) {
            tracing::info!(task_id = %cancel.task_id, reason = ?cancel.reason(), "task taken away; cancelling its handler");
            held.cancel.cancel();
        }
    }

    /// Gives up on everything held (shutdown with no server reachable, or a
    /// refused registration): handlers are cancelled; the leases expire and
    /// the server hands the tasks out again, so nothing is lost.
    pub(super) fn abandon(&mut self) {
        for (_, held) in self.held.drain() {
            held.cancel.cancel();
        }
        if !self.pending.is_empty() {
            tracing::warn!(
                outcomes = self.pending.len(),
                "stopping with unacknowledged outcomes; their leases will expire and the tasks run again"
            );
        }
        self.pending.clear();
    }

    /// When the worker stops: handlers cancelled at the end get a moment to
    /// clean up before they are aborted.
    pub(super) async fn wind_down(&mut self) {
        let _ = tokio::time::timeout(HANDLER_EXIT_WAIT, async {
            while self.running.join_next().await.is_some() {}
        })
        .await;
        self.running.abort_all();
    }

    /// Takes a lease out of `held`.
    fn forget(&mut self, task_id: &str) -> Option<Held> {
        self.held.remove(task_id)
    }

    /// Queues an outcome until the server acknowledges it, and returns the
    /// message to send.
    fn queue(
        &mut self,
        task_id: String,
        kind: OutcomeKind,
        message: connect_request::Kind,
    ) -> connect_request::Kind {
        self.pending.insert(
            task_id,
            Pending {
                kind,
                message: message.clone(),
                lease_token: message::lease_token_of(&message)
                    .unwrap_or_default()
                    .to_owned(),
                fallback: false,
            },
        );
        message
    }

    /// Records a finished handler: its outcome is queued if the lease is
    /// still held by that very attempt.
    fn finished(&mut self, finished: Finished) -> Option<connect_request::Kind> {
        let held = self.held.get(&finished.task_id)?;
        if held.lease_token != finished.lease_token {
            return None;
        }
        self.forget(&finished.task_id);
        let task_id = finished.task_id;
        let lease_token = finished.lease_token;
        let (kind, message) = match finished.result {
            Ok(result) => (
                OutcomeKind::Complete,
                message::complete(&task_id, lease_token, result),
            ),
            Err(error) => (
                OutcomeKind::Fail,
                message::fail(&task_id, lease_token, error),
            ),
        };
        Some(self.queue(task_id, kind, message))
    }

    /// Starts the handler of a pushed task, or queues it until a slot is
    /// free. Answers with a release when the worker is `draining` or far
    /// over its slots, and with a fail when the task cannot be run at all.
    pub(super) fn start(
        &mut self,
        leased: proto::LeasedTask,
        draining: bool,
    ) -> Option<connect_request::Kind> {
        let (task, lease) = match (leased.task, leased.lease) {
            (Some(task), Some(lease)) => (task, lease),
            _ => {
                tracing::warn!("pushed task without its task or lease; ignored");
                return None;
            }
        };
        if let Some(held) = self.held.get(&task.id) {
            if held.lease_token == lease.lease_token {
                return None;
            }
            // A newer lease of a task we still run: the old attempt is stale.
            if let Some(old) = self.forget(&task.id) {
                old.cancel.cancel();
            }
        }
        // The server handed the task out again, so the outcome of an old
        // lease is moot (answers name their lease, so a late one settles
        // nothing of the new lease).
        self.pending.remove(&task.id);
        if draining || self.held.len() >= 2 * self.slots {
            // Pushed while draining, or far beyond the slots (a new session
            // is dealt tasks before it has re-attached the leases it still
            // runs): give it back at once, without using an attempt.
            let message = message::release(&task.id, lease.lease_token);
            return Some(self.queue(task.id, OutcomeKind::Release, message));
        }
        let Some(handler) = self.handlers.get(&task.task_type).cloned() else {
            let error = format!(
                "no handler for task type {:?} on this worker",
                task.task_type
            );
            return Some(self.fail_at_once(task.id, lease.lease_token, error));
        };
        let params = match task.params.as_ref().map(from_struct).transpose() {
            Ok(params) => params.unwrap_or_else(|| serde_json::json!({})),
            Err(error) => {
                return Some(self.fail_at_once(
                    task.id,
                    lease.lease_token,
                    format!("params: {error}"),
                ))
            }
        };
        let cancel = CancellationToken::new();
        self.held.insert(
            task.id.clone(),
            Held {
                lease_token: lease.lease_token.clone(),
                cancel: cancel.clone(),
            },
        );
        let ready = Ready {
            task_id: task.id.clone(),
            lease_token: lease.lease_token.clone(),
            handler,
            ctx: TaskContext {
                task,
                lease,
                params,
                cancel: cancel.child_token(),
                progress: self.progress_tx.clone(),
            },
        };
        if self.running.len() < self.slots {
            self.spawn(ready);
        } else {
            // Every slot runs a handler (perhaps a cancelled one still
            // winding down): the lease is held and heartbeated, and its
            // handler starts when one of them returns.
            self.waiting.push_back(ready);
        }
        None
    }

    fn spawn(&mut self, ready: Ready) {
        let Ready {
            task_id,
            lease_token,
            handler,
            ctx,
        } = ready;
        self.running.spawn(async move {
            // A panic becomes a failed attempt; the worker goes on. The
            // handler is called inside the guarded future, so a panic
            // before it returns its future is caught too.
            let run = async move { handler(ctx).await };
            let result = match AssertUnwindSafe(run).catch_unwind().await {
                Ok(result) => result,
                Err(panic) => Err(TaskError::retry(format!(
                    "handler panicked: {}",
                    panic_message(panic.as_ref())
                ))),
            };
            Finished {
                task_id,
                lease_token,
                result,
            }
        });
    }

    /// Starts waiting handlers while slots are free, skipping leases that
    /// were taken away meanwhile.
    fn start_waiting(&mut self) {
        while self.running.len() < self.slots {
            let Some(ready) = self.waiting.pop_front() else {
                return;
            };
            let current = self.holds(&ready.task_id, &ready.lease_token);
            if current {
                self.spawn(ready);
            }
        }
    }

    /// Gives back the leases whose handlers have not started (on shutdown:
    /// they would only wait out the drain).
    pub(super) fn release_waiting(&mut self) -> Vec<connect_request::Kind> {
        let mut out = Vec::new();
        while let Some(ready) = self.waiting.pop_front() {
            let current = self.holds(&ready.task_id, &ready.lease_token);
            if current {
                self.forget(&ready.task_id);
                let message = message::release(&ready.task_id, ready.lease_token);
                out.push(self.queue(ready.task_id, OutcomeKind::Release, message));
            }
        }
        out
    }

    /// The message for a progress report, if its lease is still held.
    fn progress(&self, report: ProgressReport) -> Option<connect_request::Kind> {
        let current = self.holds(&report.task_id, &report.lease_token);
        current.then_some(connect_request::Kind::Progress(proto::ReportProgress {
            task_id: report.task_id,
            lease_token: report.lease_token,
            current: report.current,
            total: report.total,
            message: report.message,
        }))
    }

    /// Fails a pushed task for good without running it, and queues that
    /// outcome until it is acknowledged.
    fn fail_at_once(
        &mut self,
        task_id: String,
        lease_token: String,
        error: String,
    ) -> connect_request::Kind {
        let message = message::fail(&task_id, lease_token, TaskError::permanent(error));
        self.queue(task_id, OutcomeKind::Fail, message)
    }

    /// Heartbeats naming every held lease explicitly, so that leases taken
    /// on an earlier session are re-attached to this one; split to the
    /// server's per-heartbeat limit. None when nothing is held.
    pub(super) fn heartbeat(&self) -> Vec<connect_request::Kind> {
        let leases: Vec<proto::LeaseRenewal> = self
            .held
            .iter()
            .map(|(task_id, held)| proto::LeaseRenewal {
                task_id: task_id.clone(),
                lease_token: held.lease_token.clone(),
            })
            .collect();
        leases
            .chunks(MAX_HEARTBEAT_LEASES)
            .map(|chunk| {
                connect_request::Kind::Heartbeat(proto::SessionHeartbeat {
                    leases: chunk.to_vec(),
                })
            })
            .collect()
    }

    /// Stops the handlers of leases a heartbeat found gone. Each answer
    /// names its lease, so one about an earlier lease of a task (answers
    /// may arrive in any order) leaves a newer lease alone.
    pub(super) fn heartbeat_ack(&mut self, ack: proto::HeartbeatResponse) {
        for lease in ack.leases {
            let status = LeaseStatus::try_from(lease.status).unwrap_or(LeaseStatus::Unspecified);
            if !matches!(status, LeaseStatus::Lost | LeaseStatus::Cancelled) {
                continue;
            }
            if self.holds(&lease.task_id, &lease.lease_token) {
                if let Some(held) = self.forget(&lease.task_id) {
                    tracing::warn!(task_id = %lease.task_id, ?status, "lease gone; cancelling its handler");
                    held.cancel.cancel();
                }
            }
        }
    }

    /// Whether `lease_token` is the lease held on `task_id`.
    fn holds(&self, task_id: &str, lease_token: &str) -> bool {
        self.held
            .get(task_id)
            .is_some_and(|held| held.lease_token == lease_token)
    }

    /// Settles an acknowledged outcome.
    pub(super) fn ack(&mut self, ack: proto::OutcomeAck) -> AckNext {
        let kind = OutcomeKind::try_from(ack.kind).unwrap_or(OutcomeKind::Unspecified);
        let status = AckStatus::try_from(ack.status).unwrap_or(AckStatus::Unspecified);
        if kind == OutcomeKind::Progress {
            tracing::debug!(task_id = %ack.task_id, ?status, message = %ack.message, "progress refused");
            return AckNext::Nothing;
        }
        let Some(pending) = self.pending.get_mut(&ack.task_id) else {
            return AckNext::Nothing;
        };
        // An answer about another message (an earlier lease's outcome, or
        // the outcome this one replaced) settles nothing.
        if pending.kind != kind || pending.lease_token != ack.lease_token {
            return AckNext::Nothing;
        }
        match status {
            AckStatus::Unavailable => return AckNext::Later(ack.task_id),
            AckStatus::Ok => {}
            AckStatus::Invalid if !pending.fallback => {
                // The server refused the outcome itself (a result over its
                // size limit, say): the lease is still ours. Fail the task
                // instead of letting the lease run out and the task run
                // again to the same end.
                if let Some(message) = message::fallback(&pending.message, &ack.message) {
                    tracing::warn!(task_id = %ack.task_id, kind = ?kind, message = %ack.message, "outcome refused as invalid; failing the task instead");
                    pending.kind = OutcomeKind::Fail;
                    pending.message = message.clone();
                    pending.fallback = true;
                    return AckNext::Send(message);
                }
            }
            other => {
                tracing::warn!(task_id = %ack.task_id, status = ?other, message = %ack.message, "outcome not recorded")
            }
        }
        self.pending.remove(&ack.task_id);
        AckNext::Nothing
    }

    /// The drain deadline passed: a handler that finished just now keeps
    /// its result; the ones still running are cancelled and their leases
    /// given back (the attempts do not count).
    pub(super) fn release_all(&mut self) -> Vec<connect_request::Kind> {
        let mut out = Vec::new();
        while let Some(joined) = self.running.try_join_next() {
            if let Ok(finished) = joined {
                out.extend(self.finished(finished));
            }
        }
        let task_ids: Vec<String> = self.held.keys().cloned().collect();
        let mut released = 0;
        for task_id in task_ids {
            let Some(held) = self.forget(&task_id) else {
                continue;
            };
            held.cancel.cancel();
            let message = message::release(&task_id, held.lease_token);
            out.push(self.queue(task_id, OutcomeKind::Release, message));
            released += 1;
        }
        if released > 0 {
            tracing::warn!(released, "drain timeout: released the tasks still running");
        }
        out
    }
}

/// What an acknowledgement asks of the session loop.
pub(super) enum AckNext {
    Nothing,
    /// The server could not record it now: send it again in a moment.
    Later(String),
    /// Send this instead.
    Send(connect_request::Kind),
}

impl AckNext {
    /// Does it: a message to send goes to `out`, a task whose outcome is to
    /// be sent again later to `later`.
    pub(super) fn apply(self, out: &mut Vec<connect_request::Kind>, later: &mut Vec<String>) {
        match self {
            AckNext::Nothing => {}
            AckNext::Later(task_id) => later.push(task_id),
            AckNext::Send(message) => out.push(message),
        }
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(message) = panic.downcast_ref::<&str>() {
        (*message).to_owned()
    } else if let Some(message) = panic.downcast_ref::<String>() {
        message.clone()
    } else {
        "(no message)".to_owned()
    }
}
