//! Matches waiting workers (session slots and long polls) with claimable
//! tasks, wakes them when tasks arrive, and writes their outcomes in
//! batches. One file per job:
//!
//! - `registry`: the node's sessions, and which session holds which lease;
//! - `claim`: the dispatch loop, one claim statement for the free slots of a
//!   group of sessions, dealt round-robin and pushed down their streams,
//!   several claims in flight at once;
//! - `poll`: long polls of unary AcquireTasks;
//! - `outcome`: heartbeats, completions, failures and releases, written in
//!   batches with whatever arrives at the same time (`batch`);
//! - `revoke`: telling the session that holds a lease to stop, on any node;
//! - `drain`: a node shutting down without dropping work.
//!
//! Wake-ups come from outside: the node routes what its LISTEN connection
//! hears (tasks pending, leases revoked) to [`Dispatcher::wake`] and
//! [`Dispatcher::on_revoke`]. A slow poll and a timer on the next due task
//! are the safety net. The lease itself always lives in the database: what
//! this module remembers about sessions is a cache for pushing cancels and
//! counting slots, never the truth about who holds a task. It never writes
//! SQL: everything goes through the store.

mod batch;
mod claim;
mod drain;
mod outcome;
mod poll;
mod registry;
mod revoke;
mod session;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{watch, Notify, Semaphore};
use uuid::Uuid;

use crate::events::Hub;
use crate::metrics::Metrics;
use crate::model::{Backoff, Claim, EventKind, Task};
use crate::store::{self, Store};

pub(crate) use session::{Push, Session};

/// Hands out tasks, waiting for them when asked to. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Dispatcher {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Store,
    node_id: Uuid,
    poll_interval: Duration,
    /// Bumped on every wake-up; long polls watch it.
    wake: watch::Sender<u64>,
    /// Wakes the dispatch loop (a permit is kept if it is busy).
    kick: Notify,
    /// Fired when the set of sessions or their state changed, for the node
    /// directory.
    changed: Arc<Notify>,
    sessions: Mutex<HashMap<Uuid, Arc<Session>>>,
    /// Which local session holds which task.
    holders: Mutex<HashMap<Uuid, Uuid>>,
    draining: AtomicBool,
    /// One permit per claim in flight; a drain takes them all, so that it
    /// starts only after the claims in flight have delivered (or given back)
    /// what they got.
    claims: Arc<Semaphore>,
    /// Claims in flight per group of sessions.
    group_claims: Mutex<HashMap<claim::GroupKey, usize>>,
    /// Groups whose last claim found fewer due tasks than it asked for, with
    /// the wake-up count (`wake`) its statement started after: nothing more
    /// is due for them until the next wake-up or due time.
    idle_groups: Mutex<HashMap<claim::GroupKey, claim::Idle>>,
    rotation: AtomicUsize,
    shutdown: watch::Receiver<bool>,
    events: Hub,
    outcomes: outcome::Batchers,
    metrics: Arc<Metrics>,
}

/// Settings of a dispatcher.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) node_id: Uuid,
    pub(crate) poll_interval: Duration,
    pub(crate) backoff: Backoff,
    pub(crate) metrics: Arc<Metrics>,
}

impl Dispatcher {
    /// Starts the dispatch loop; it stops when `shutdown` turns true.
    pub(crate) fn start(
        store: Store,
        settings: Settings,
        events: Hub,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let (wake, _) = watch::channel(0u64);
        let outcomes = outcome::Batchers::start(&store, settings.backoff);
        let dispatcher = Self {
            inner: Arc::new(Inner {
                store,
                node_id: settings.node_id,
                poll_interval: settings.poll_interval,
                wake,
                kick: Notify::new(),
                changed: Arc::new(Notify::new()),
                sessions: Mutex::new(HashMap::new()),
                holders: Mutex::new(HashMap::new()),
                draining: AtomicBool::new(false),
                claims: Arc::new(Semaphore::new(claim::MAX_CLAIMS_IN_FLIGHT)),
                group_claims: Mutex::new(HashMap::new()),
                idle_groups: Mutex::new(HashMap::new()),
                rotation: AtomicUsize::new(0),
                shutdown,
                events,
                outcomes,
                metrics: settings.metrics,
            }),
        };
        tokio::spawn(dispatcher.clone().dispatch_loop());
        dispatcher
    }

    /// This node's id.
    pub(crate) fn node_id(&self) -> Uuid {
        self.inner.node_id
    }

    /// Whether the node is draining (shutting down).
    pub(crate) fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::Relaxed)
    }

    /// Whether nothing may be handed out any more: the node drains or stops.
    fn stopping(&self) -> bool {
        *self.inner.shutdown.borrow() || self.is_draining()
    }

    /// Runs one claim statement (announcing the leases to watchers in its
    /// transaction) and counts what it leased.
    async fn claim_counted(&self, claim: &Claim) -> store::Result<Vec<(usize, Task)>> {
        let announce = self.inner.events.announcer(EventKind::Leased);
        let claimed = self
            .inner
            .store
            .task_claim(claim, announce.as_ref().map(|a| a as store::Announce))
            .await?;
        self.inner
            .metrics
            .tasks_leased(claimed.iter().map(|(_, task)| task.task_type.as_str()));
        Ok(claimed)
    }

    /// Wakes every local waiter and the dispatch loop: tasks may have become
    /// claimable.
    pub(crate) fn wake(&self) {
        self.inner.wake.send_modify(|n| *n = n.wrapping_add(1));
        self.inner.kick.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::model::{NewTask, SessionSpec, Status};
    use crate::testing::FreshDatabase;

    /// A task pushed to a session whose stream has gone is given back: the
    /// session's slot is free, and the task is pending again with its
    /// attempt not counted, however many times it was pushed in vain.
    #[tokio::test]
    async fn a_task_that_cannot_be_pushed_is_given_back_without_using_an_attempt() {
        let db = FreshDatabase::new();
        let store = Store::new(
            &db.url(),
            4,
            Duration::from_secs(5),
            Duration::from_secs(30),
        )
        .unwrap();
        store.database_create_if_missing().await.unwrap();
        store.migrate().await.unwrap();
        let (stop, shutdown) = watch::channel(false);
        let events = Hub::start(store.clone(), shutdown.clone());
        let settings = Settings {
            node_id: Uuid::now_v7(),
            poll_interval: Duration::from_millis(50),
            backoff: Backoff {
                base: Duration::from_secs(1),
                max: Duration::from_secs(1),
            },
            metrics: Arc::new(Metrics::new()),
        };
        let dispatcher = Dispatcher::start(store.clone(), settings, events, shutdown);
        let (session, pushes) = dispatcher
            .register(SessionSpec {
                worker_id: "w".into(),
                task_types: vec!["gone".into()],
                slots: 1,
                lease_duration: Duration::from_secs(30),
                labels: serde_json::json!({}),
                batched_pushes: true,
            })
            .unwrap();
        // The stream has ended: nothing pushed reaches a worker.
        drop(pushes);
        let task = NewTask {
            id: Uuid::now_v7(),
            task_type: "gone".into(),
            params: serde_json::json!({}),
            priority: 0,
            max_attempts: 3,
            scheduled_for: None,
            library_id: None,
            series_id: None,
            book_id: None,
            dedup_key: None,
        };
        store.task_insert(&task, None).await.unwrap();
        dispatcher.wake();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        // Pushed (and given back) at least once.
        loop {
            let row = store.task_get(task.id).await.unwrap().unwrap();
            if row.started_at.is_some() {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "never pushed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        dispatcher.unregister(&session);
        // A claim launched before the unregister may still hold the slot
        // (reserved) when the row is seen given back; it frees it once its
        // task is given back too.
        loop {
            let row = store.task_get(task.id).await.unwrap().unwrap();
            if row.status == Status::Pending && row.lease_token.is_none() {
                assert_eq!(row.attempts, 0);
                if session.free() == 1 {
                    break;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "never given back, or its slot kept: {row:?}, {} free",
                session.free()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = stop.send(true);
        drop(store);
        db.drop_it().await;
    }
}
