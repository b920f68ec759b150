//! Matches waiting workers (session slots and long polls) with claimable
//! tasks, wakes them when tasks arrive, and writes their outcomes in batches.
//!
//! One LISTEN connection per node hears every node: `leasehold_task` (tasks
//! became pending: claim again), `leasehold_revoke` (a lease was cancelled or
//! reclaimed: tell the session that holds it), and the event channels. The
//! dispatch loop claims for all free sessions of a group (same task types and
//! lease length) in one statement and spreads the tasks round-robin across
//! them. A slow poll and a timer on the next due task are the safety net.
//! This module never writes SQL: everything goes through the store.

mod batch;
mod session;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;
use uuid::Uuid;

use crate::events::{self, EventKind, Hub};
use crate::store::{self, Fenced, SessionRow, Store, WAKE_CHANNEL};
use crate::task::{Backoff, Claim, Failure, LeaseRef, LeaseState, Task};

use batch::Batcher;
pub use session::{CancelReason, Push, Session, SessionSpec};

/// Channel on which revoked leases are announced: lines of `<task id> <c|r>`.
pub const REVOKE_CHANNEL: &str = "leasehold_revoke";

/// Most tasks claimed by one statement.
const MAX_CLAIM: usize = 1000;
/// Most outcomes written by one statement.
const MAX_BATCH: usize = 1000;
/// How often the node refreshes its row and its sessions' rows.
const DIRECTORY_INTERVAL: Duration = Duration::from_secs(5);
/// NOTIFY payloads must stay under 8000 bytes.
const PAYLOAD_LIMIT: usize = 7000;

/// Hands out tasks, waiting for them when asked to.
#[derive(Debug, Clone)]
pub struct Dispatcher {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Store,
    node_id: Uuid,
    address: String,
    poll_interval: Duration,
    /// Bumped on every wake-up; long polls watch it.
    wake: watch::Sender<u64>,
    /// Wakes the dispatch loop (a permit is kept if it is busy).
    kick: Notify,
    /// Wakes the directory loop.
    sync: Notify,
    sessions: Mutex<HashMap<Uuid, Arc<Session>>>,
    /// Which local session holds which task.
    holders: Mutex<HashMap<Uuid, Uuid>>,
    draining: AtomicBool,
    /// Held while a dispatch pass claims and delivers, so that a drain
    /// starts only after the pass in flight has finished.
    dispatching: tokio::sync::Mutex<()>,
    rotation: AtomicUsize,
    shutdown: watch::Receiver<bool>,
    events: Hub,
    completes: Batcher<(LeaseRef, serde_json::Value), Fenced>,
    fails: Batcher<(LeaseRef, Failure), Fenced>,
    heartbeats: Batcher<(LeaseRef, Duration), LeaseState>,
}

/// Settings of a dispatcher.
#[derive(Debug, Clone)]
pub struct Settings {
    pub node_id: Uuid,
    /// Shown in the node directory.
    pub address: String,
    pub poll_interval: Duration,
    pub backoff: Backoff,
}

impl Dispatcher {
    /// Starts the node's listener, dispatch loop and directory loop, and
    /// returns once the listener hears notifications (or after `ready_within`
    /// if the database does not answer). They reconnect by themselves when
    /// the database goes away, and stop when `shutdown` turns true.
    pub async fn start(
        store: Store,
        settings: Settings,
        events: Hub,
        shutdown: watch::Receiver<bool>,
        ready_within: Duration,
    ) -> Self {
        let (wake, _) = watch::channel(0u64);
        let completes = {
            let store = store.clone();
            Batcher::start(
                MAX_BATCH,
                4,
                move |items: Vec<(LeaseRef, serde_json::Value)>| {
                    let store = store.clone();
                    async move { store.task_complete_many(&items).await }
                },
            )
        };
        let fails = {
            let store = store.clone();
            let backoff = settings.backoff;
            Batcher::start(MAX_BATCH, 2, move |items: Vec<(LeaseRef, Failure)>| {
                let store = store.clone();
                async move { store.task_fail_many(&items, backoff).await }
            })
        };
        let heartbeats = {
            let store = store.clone();
            Batcher::start(
                10 * MAX_BATCH,
                2,
                move |items: Vec<(LeaseRef, Duration)>| {
                    let store = store.clone();
                    async move { store.lease_extend(&items).await }
                },
            )
        };
        let dispatcher = Self {
            inner: Arc::new(Inner {
                store,
                node_id: settings.node_id,
                address: settings.address,
                poll_interval: settings.poll_interval,
                wake,
                kick: Notify::new(),
                sync: Notify::new(),
                sessions: Mutex::new(HashMap::new()),
                holders: Mutex::new(HashMap::new()),
                draining: AtomicBool::new(false),
                dispatching: tokio::sync::Mutex::new(()),
                rotation: AtomicUsize::new(0),
                shutdown,
                events,
                completes,
                fails,
                heartbeats,
            }),
        };
        let (listening, ready) = tokio::sync::oneshot::channel();
        tokio::spawn(dispatcher.clone().listen(listening));
        if tokio::time::timeout(ready_within, ready).await.is_err() {
            tracing::warn!("not yet listening for notifications; starting anyway");
        }
        tokio::spawn(dispatcher.clone().dispatch_loop());
        tokio::spawn(dispatcher.clone().directory_loop());
        dispatcher
    }

    /// This node's id.
    pub fn node_id(&self) -> Uuid {
        self.inner.node_id
    }

    /// Whether the node is draining (shutting down).
    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::Relaxed)
    }

    /// Wakes every local waiter and the dispatch loop, as a notification
    /// would.
    pub fn wake(&self) {
        self.inner.wake.send_modify(|n| *n = n.wrapping_add(1));
        self.inner.kick.notify_one();
    }

    fn sessions(&self) -> Vec<Arc<Session>> {
        self.inner
            .sessions
            .lock()
            .expect("lock poisoned")
            .values()
            .cloned()
            .collect()
    }

    async fn listen(self, listening: tokio::sync::oneshot::Sender<()>) {
        let mut listening = Some(listening);
        let mut shutdown = self.inner.shutdown.clone();
        let mut backoff = Duration::from_millis(100);
        loop {
            let (tx, mut rx) = mpsc::unbounded_channel();
            let client = match self.inner.store.connect_dedicated(Some(tx)).await {
                Ok(client) => client,
                Err(err) => {
                    tracing::warn!(error = %err, "cannot open listen connection, retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.wait_for(|stop| *stop) => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            let listen = format!(
                "LISTEN {WAKE_CHANNEL}; LISTEN {REVOKE_CHANNEL}; LISTEN {}; LISTEN {}",
                events::EVENT_CHANNEL,
                events::WATCH_CHANNEL
            );
            if let Err(err) = client.batch_execute(&listen).await {
                tracing::warn!(error = %err, "listen failed, retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.wait_for(|stop| *stop) => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
            backoff = Duration::from_millis(100);
            tracing::debug!("listening for notifications");
            if let Some(listening) = listening.take() {
                let _ = listening.send(());
            }
            // Anything may have arrived while we were not listening.
            self.wake();
            loop {
                tokio::select! {
                    message = rx.recv() => match message {
                        Some(first) => {
                            let mut woken = false;
                            let mut batch = vec![first];
                            while let Ok(more) = rx.try_recv() {
                                batch.push(more);
                            }
                            for n in batch {
                                match n.channel() {
                                    WAKE_CHANNEL => woken = true,
                                    REVOKE_CHANNEL => self.on_revoke(n.payload()),
                                    events::EVENT_CHANNEL => self.inner.events.receive(n.payload()),
                                    events::WATCH_CHANNEL => self.inner.events.remote_watcher_seen(),
                                    _ => {}
                                }
                            }
                            // A burst of notifications is one wake-up.
                            if woken {
                                self.wake();
                            }
                        }
                        None => break,
                    },
                    _ = shutdown.wait_for(|stop| *stop) => return,
                }
            }
            tracing::warn!("listen connection lost, reconnecting");
        }
    }

    /// Claims due tasks for one worker. With a `wait`, when nothing is due it
    /// waits for a wake-up (a notification, the next task becoming due, or
    /// the safety poll) and tries again until `wait` runs out; it returns
    /// empty at the deadline or when the node shuts down.
    pub async fn acquire(&self, claim: &Claim, wait: Duration) -> store::Result<Vec<Task>> {
        let deadline = Instant::now() + wait;
        let mut wake = self.inner.wake.subscribe();
        let mut shutdown = self.inner.shutdown.clone();
        loop {
            // Mark the current wake-up as seen before claiming, so one that
            // arrives during the claim is not lost.
            wake.mark_unchanged();
            let stopping = *shutdown.borrow() || self.inner.draining.load(Ordering::Relaxed);
            let tasks: Vec<Task> = if stopping {
                Vec::new()
            } else {
                let announce = self.inner.events.announcer(EventKind::Leased);
                self.inner
                    .store
                    .task_claim(claim, announce.as_ref().map(|a| a as store::Announce))
                    .await?
                    .into_iter()
                    .map(|(_, task)| task)
                    .collect()
            };
            if !tasks.is_empty() || Instant::now() >= deadline || stopping {
                return Ok(tasks);
            }
            let mut until = deadline.min(Instant::now() + self.inner.poll_interval);
            if let Some(due) = self.inner.store.task_next_due(&claim.task_types).await? {
                // A due task we could not claim is locked by another claimer
                // that will commit within moments: check back shortly.
                until = until.min(Instant::now() + due.max(Duration::from_millis(5)));
            }
            tokio::select! {
                _ = wake.changed() => {}
                _ = tokio::time::sleep_until(until) => {}
                _ = shutdown.wait_for(|stop| *stop) => return Ok(Vec::new()),
            }
        }
    }

    async fn dispatch_loop(self) {
        let mut shutdown = self.inner.shutdown.clone();
        loop {
            if *shutdown.borrow() {
                return;
            }
            let mut pause = self.inner.poll_interval;
            if !self.inner.draining.load(Ordering::Relaxed) {
                match self.dispatch_once().await {
                    Ok(true) => continue,
                    Ok(false) => match self.next_due().await {
                        Ok(Some(due)) => pause = pause.min(due.max(Duration::from_millis(5))),
                        Ok(None) => {}
                        Err(err) => tracing::debug!(error = %err, "next due check failed"),
                    },
                    Err(err) => {
                        tracing::warn!(error = %err, "dispatch failed");
                        pause = pause.min(Duration::from_secs(1));
                    }
                }
            }
            tokio::select! {
                _ = self.inner.kick.notified() => {}
                _ = tokio::time::sleep(pause) => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
        }
    }

    /// Sessions that can take work now.
    fn takers(&self) -> Vec<Arc<Session>> {
        self.sessions()
            .into_iter()
            .filter(|s| !s.is_draining() && s.free() > 0)
            .collect()
    }

    /// One claim per group of free sessions; true if some group got all it
    /// asked for (more may be due).
    async fn dispatch_once(&self) -> store::Result<bool> {
        let _pass = self.inner.dispatching.lock().await;
        let mut groups: BTreeMap<(Vec<String>, Duration), Vec<Arc<Session>>> = BTreeMap::new();
        for session in self.takers() {
            let key = (session.spec.task_types.clone(), session.spec.lease_duration);
            groups.entry(key).or_default().push(session);
        }
        let mut more = false;
        for ((task_types, lease_duration), members) in groups {
            // Deal the slots round-robin from a rotating start, so work is
            // spread across sessions rather than piled onto the first.
            let start = self.inner.rotation.fetch_add(1, Ordering::Relaxed) % members.len();
            let mut free: Vec<usize> = members.iter().map(|s| s.free()).collect();
            let mut owners = Vec::new();
            let mut workers = Vec::new();
            'deal: while free.iter().any(|f| *f > 0) {
                for k in 0..members.len() {
                    let i = (start + k) % members.len();
                    if free[i] > 0 {
                        free[i] -= 1;
                        owners.push(i);
                        workers.push(members[i].spec.worker_id.clone());
                        if owners.len() == MAX_CLAIM {
                            break 'deal;
                        }
                    }
                }
            }
            let claim = Claim {
                task_types,
                slots: workers,
                lease_duration,
            };
            let announce = self.inner.events.announcer(EventKind::Leased);
            let claimed = self
                .inner
                .store
                .task_claim(&claim, announce.as_ref().map(|a| a as store::Announce))
                .await?;
            more |= claimed.len() == claim.slots.len();
            for (slot, task) in claimed {
                self.deliver(&members[owners[slot]], task);
            }
        }
        Ok(more)
    }

    fn deliver(&self, session: &Arc<Session>, task: Task) {
        let Some(lease_token) = task.lease_token else {
            return;
        };
        let lease = LeaseRef {
            task_id: task.id,
            lease_token,
        };
        session.hold(lease);
        self.inner
            .holders
            .lock()
            .expect("lock poisoned")
            .insert(task.id, session.id);
        // Claimed just as the node or the session began to drain, or the
        // stream ended between the claim and now: give it back.
        let draining = self.inner.draining.load(Ordering::Relaxed) || session.is_draining();
        if draining || !session.push(Push::Task(Box::new(task))) {
            self.forget(lease);
            let store = self.inner.store.clone();
            tokio::spawn(async move {
                if let Err(err) = store.task_release(lease).await {
                    tracing::warn!(task_id = %lease.task_id, error = %err, "cannot release undeliverable task");
                }
            });
        }
    }

    /// Time until the next pending task that a free session could take is
    /// due; `None` when no session is free or nothing is pending.
    async fn next_due(&self) -> store::Result<Option<Duration>> {
        let takers = self.takers();
        if takers.is_empty() {
            return Ok(None);
        }
        let mut types: Vec<String> = Vec::new();
        for session in &takers {
            if session.spec.task_types.is_empty() {
                types.clear();
                return self.inner.store.task_next_due(&types).await;
            }
            types.extend(session.spec.task_types.iter().cloned());
        }
        types.sort();
        types.dedup();
        self.inner.store.task_next_due(&types).await
    }

    /// Registers a session; the returned receiver yields what to send down
    /// its stream.
    pub fn register(
        &self,
        spec: SessionSpec,
    ) -> Option<(Arc<Session>, mpsc::UnboundedReceiver<Push>)> {
        if self.inner.draining.load(Ordering::Relaxed) || *self.inner.shutdown.borrow() {
            return None;
        }
        let (session, rx) = Session::new(spec);
        let session = Arc::new(session);
        self.inner
            .sessions
            .lock()
            .expect("lock poisoned")
            .insert(session.id, session.clone());
        tracing::info!(session_id = %session.id, worker = %session.spec.worker_id, slots = session.spec.slots, "session registered");
        self.inner.sync.notify_one();
        self.inner.kick.notify_one();
        Some((session, rx))
    }

    /// Forgets a session whose stream ended. Its leases stay in the
    /// database until they expire or a new session re-attaches them.
    pub fn unregister(&self, session: &Session) {
        self.inner
            .sessions
            .lock()
            .expect("lock poisoned")
            .remove(&session.id);
        let mut holders = self.inner.holders.lock().expect("lock poisoned");
        for lease in session.leases() {
            if holders.get(&lease.task_id) == Some(&session.id) {
                holders.remove(&lease.task_id);
            }
        }
        drop(holders);
        tracing::info!(session_id = %session.id, worker = %session.spec.worker_id, in_flight = session.in_flight(), "session closed");
        self.inner.sync.notify_one();
    }

    /// The worker asked for nothing new on this session.
    pub fn session_drain(&self, session: &Session) {
        session.set_draining();
        self.inner.sync.notify_one();
    }

    /// The local session that holds `task_id`, if any.
    fn holder(&self, task_id: Uuid) -> Option<Arc<Session>> {
        let session_id = *self
            .inner
            .holders
            .lock()
            .expect("lock poisoned")
            .get(&task_id)?;
        self.inner
            .sessions
            .lock()
            .expect("lock poisoned")
            .get(&session_id)
            .cloned()
    }

    /// A lease is finished or void: the local session holding it with this
    /// very token lets it go and its slot is free. A stale token frees
    /// nothing. True if a session held it.
    fn forget(&self, lease: LeaseRef) -> bool {
        let Some(session) = self.holder(lease.task_id) else {
            return false;
        };
        if !session.drop_lease(lease) {
            return false;
        }
        let mut holders = self.inner.holders.lock().expect("lock poisoned");
        if holders.get(&lease.task_id) == Some(&session.id) {
            holders.remove(&lease.task_id);
        }
        drop(holders);
        self.inner.kick.notify_one();
        true
    }

    fn on_revoke(&self, payload: &str) {
        for line in payload.lines() {
            let mut parts = line.split(' ');
            let (Some(Ok(task_id)), Some(Ok(lease_token)), Some(Some(reason))) = (
                parts.next().map(Uuid::parse_str),
                parts.next().map(Uuid::parse_str),
                parts.next().map(CancelReason::from_code),
            ) else {
                tracing::warn!("malformed revoke notification ignored");
                continue;
            };
            let lease = LeaseRef {
                task_id,
                lease_token,
            };
            let session = self.holder(task_id);
            // Only the session holding this very lease is told; a newer
            // lease on the same task is not touched.
            if let Some(session) = session.filter(|_| self.forget(lease)) {
                tracing::info!(task_id = %task_id, session_id = %session.id, ?reason, "pushing cancel");
                session.push(Push::Cancel { lease, reason });
            }
        }
    }

    /// Tells every node that these leases are void, so the sessions holding
    /// them are told to stop.
    pub async fn revoke(&self, leases: &[LeaseRef], reason: CancelReason) {
        let mut payload = String::new();
        for lease in leases {
            if payload.len() + 80 > PAYLOAD_LIMIT {
                self.send_revoke(&payload).await;
                payload.clear();
            }
            if !payload.is_empty() {
                payload.push('\n');
            }
            payload.push_str(&format!(
                "{} {} {}",
                lease.task_id,
                lease.lease_token,
                reason.code()
            ));
        }
        if !payload.is_empty() {
            self.send_revoke(&payload).await;
        }
    }

    async fn send_revoke(&self, payload: &str) {
        if let Err(err) = self.inner.store.notify(REVOKE_CHANNEL, payload).await {
            tracing::warn!(error = %err, "cannot announce revoked leases");
        }
    }

    /// Renews leases, together with whatever else arrives at the same time.
    /// With a session, leases renewed are attached to it (a re-attach after
    /// a reconnect) and leases lost or cancelled are dropped from it.
    pub async fn heartbeat(
        &self,
        session: Option<&Arc<Session>>,
        leases: Vec<LeaseRef>,
        duration: Duration,
    ) -> store::Result<Vec<(LeaseRef, LeaseState)>> {
        // One submission for the whole heartbeat: one queue entry and one
        // answer, however many leases it names.
        let states = self
            .inner
            .heartbeats
            .submit_many(leases.iter().map(|lease| (*lease, duration)).collect())
            .await?;
        let mut out = Vec::with_capacity(leases.len());
        for (lease, state) in leases.into_iter().zip(states) {
            if let Some(session) = session {
                match state {
                    LeaseState::Held(_) => self.attach(session, lease),
                    LeaseState::Lost | LeaseState::Cancelled => {
                        self.forget(lease);
                    }
                }
            }
            out.push((lease, state));
        }
        Ok(out)
    }

    fn attach(&self, session: &Arc<Session>, lease: LeaseRef) {
        // Refused if the lease finished meanwhile (an outcome that raced
        // with this heartbeat's answer).
        if !session.hold(lease) {
            return;
        }
        let previous = self
            .inner
            .holders
            .lock()
            .expect("lock poisoned")
            .insert(lease.task_id, session.id);
        if let Some(previous) = previous.filter(|id| *id != session.id) {
            let old = self
                .inner
                .sessions
                .lock()
                .expect("lock poisoned")
                .get(&previous)
                .cloned();
            if let Some(old) = old {
                old.drop_lease(lease);
            }
        }
    }

    /// Completes a leased task (batched with concurrent completions).
    pub async fn complete(
        &self,
        lease: LeaseRef,
        result: serde_json::Value,
    ) -> store::Result<Fenced> {
        let outcome = self.inner.completes.submit((lease, result)).await?;
        self.forget(lease);
        Ok(outcome)
    }

    /// Records a failed attempt (batched with concurrent failures).
    pub async fn fail(&self, lease: LeaseRef, failure: Failure) -> store::Result<Fenced> {
        let outcome = self.inner.fails.submit((lease, failure)).await?;
        self.forget(lease);
        Ok(outcome)
    }

    /// Gives a lease back.
    pub async fn release(&self, lease: LeaseRef) -> store::Result<Fenced> {
        let outcome = self.inner.store.task_release(lease).await?;
        self.forget(lease);
        Ok(outcome)
    }

    /// Drains the node: nothing new is handed out, every session is told to
    /// finish or release its tasks, outcomes are accepted until the sessions
    /// hold nothing or `grace` ends, then every session stream is closed.
    pub async fn drain(&self, grace: Duration) {
        self.inner.draining.store(true, Ordering::Relaxed);
        // Let a pass in flight finish: it gives back what it claimed.
        if tokio::time::timeout(grace, self.inner.dispatching.lock())
            .await
            .is_err()
        {
            tracing::warn!("a claim in flight did not finish within the drain grace");
        }
        let sessions = self.sessions();
        tracing::info!(sessions = sessions.len(), grace = ?grace, "draining sessions");
        for session in &sessions {
            session.push(Push::Drain { grace });
        }
        self.inner.sync.notify_one();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline && self.sessions().iter().any(|s| s.in_flight() > 0) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for session in self.sessions() {
            session.push(Push::Close);
        }
    }

    fn directory_rows(&self) -> Vec<SessionRow> {
        let draining = self.inner.draining.load(Ordering::Relaxed);
        self.sessions()
            .iter()
            .map(|s| SessionRow {
                id: s.id,
                node_id: self.inner.node_id,
                worker_id: s.spec.worker_id.clone(),
                task_types: s.spec.task_types.clone(),
                slots: s.spec.slots as i32,
                labels: s.spec.labels.clone(),
                in_flight: s.in_flight() as i32,
                draining: draining || s.is_draining(),
                connected_at: s.connected_at,
                last_seen_at: s.last_seen(),
            })
            .collect()
    }

    async fn directory_loop(self) {
        let mut shutdown = self.inner.shutdown.clone();
        loop {
            let rows = self.directory_rows();
            let draining = self.inner.draining.load(Ordering::Relaxed);
            if let Err(err) = self
                .inner
                .store
                .node_sync(self.inner.node_id, &self.inner.address, draining, &rows)
                .await
            {
                tracing::debug!(error = %err, "cannot refresh the node directory");
            }
            if let Err(err) = self.inner.store.node_expire().await {
                tracing::debug!(error = %err, "cannot expire dead nodes");
            }
            let stop = tokio::select! {
                _ = tokio::time::sleep(DIRECTORY_INTERVAL) => false,
                _ = self.inner.sync.notified() => false,
                _ = shutdown.wait_for(|stop| *stop) => true,
            };
            if stop {
                if let Err(err) = self.inner.store.node_delete(self.inner.node_id).await {
                    tracing::debug!(error = %err, "cannot remove the node from the directory");
                }
                return;
            }
        }
    }
}
