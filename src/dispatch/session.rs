//! A worker session as the dispatcher sees it: who it is, how many slots it
//! has, which leases are out on it, and the channel to its stream.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use uuid::Uuid;

use crate::model::{CancelReason, LeaseRef, SessionSpec, Task};

/// What the dispatcher sends down a session's stream.
#[derive(Debug, Clone)]
pub(crate) enum Push {
    /// Tasks leased to the session, in claim order.
    Tasks(Vec<Task>),
    /// Stop working on a task.
    Cancel {
        lease: LeaseRef,
        reason: CancelReason,
    },
    /// The node is shutting down; outcomes are accepted for `grace`.
    Drain { grace: Duration },
    /// End the stream.
    Close,
}

/// The leases out on a session, and the ones recently finished there.
#[derive(Debug, Default)]
struct Held {
    /// Task id to lease token.
    leases: HashMap<Uuid, Uuid>,
    /// Leases finished (completed, failed, released, lost) lately: a
    /// heartbeat answer that raced with their outcome must not bring them
    /// back. Bounded: the oldest are forgotten first.
    finished: HashSet<(Uuid, Uuid)>,
    finished_order: VecDeque<(Uuid, Uuid)>,
    /// Slots promised to claims in flight: not free, not yet leased.
    reserved: usize,
}

/// A registered session.
#[derive(Debug)]
pub(crate) struct Session {
    pub(crate) id: Uuid,
    pub(crate) spec: SessionSpec,
    pub(crate) connected_at: SystemTime,
    held: Mutex<Held>,
    draining: AtomicBool,
    last_seen: Mutex<SystemTime>,
    tx: mpsc::UnboundedSender<Push>,
}

impl Session {
    pub(crate) fn new(spec: SessionSpec) -> (Self, mpsc::UnboundedReceiver<Push>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let now = SystemTime::now();
        (
            Self {
                id: Uuid::now_v7(),
                spec,
                connected_at: now,
                held: Mutex::new(Held::default()),
                draining: AtomicBool::new(false),
                last_seen: Mutex::new(now),
                tx,
            },
            rx,
        )
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().expect("session lock poisoned")
    }

    /// Slots neither taken by a lease nor promised to a claim in flight.
    pub(crate) fn free(&self) -> usize {
        let held = self.held();
        self.spec
            .slots
            .saturating_sub(held.leases.len() + held.reserved)
    }

    /// Promises `n` free slots to a claim about to run; they stay out of
    /// [`Session::free`] until [`Session::unreserve`]. False (and nothing
    /// promised) if fewer are free.
    pub(crate) fn reserve(&self, n: usize) -> bool {
        let mut held = self.held();
        if held.leases.len() + held.reserved + n > self.spec.slots {
            return false;
        }
        held.reserved += n;
        true
    }

    /// Takes back the promise of `n` slots once their claim has delivered
    /// (the tasks it got now hold their slots as leases).
    pub(crate) fn unreserve(&self, n: usize) {
        let mut held = self.held();
        held.reserved = held.reserved.saturating_sub(n);
    }

    /// Leases out on this session.
    pub(crate) fn in_flight(&self) -> usize {
        self.held().leases.len()
    }

    /// Every lease out on this session.
    pub(crate) fn leases(&self) -> Vec<LeaseRef> {
        self.held()
            .leases
            .iter()
            .map(|(task_id, lease_token)| LeaseRef {
                task_id: *task_id,
                lease_token: *lease_token,
            })
            .collect()
    }

    /// Counts a lease as out on this session, unless it finished already.
    pub(crate) fn hold(&self, lease: LeaseRef) -> bool {
        let mut held = self.held();
        if held.finished.contains(&(lease.task_id, lease.lease_token)) {
            return false;
        }
        held.leases.insert(lease.task_id, lease.lease_token);
        true
    }

    /// Marks a lease finished and drops it if this session holds it with
    /// that very token; true if it did (a stale token frees nothing).
    pub(crate) fn drop_lease(&self, lease: LeaseRef) -> bool {
        let mut held = self.held();
        let key = (lease.task_id, lease.lease_token);
        if held.finished.insert(key) {
            held.finished_order.push_back(key);
            let cap = (4 * self.spec.slots).max(1024);
            while held.finished_order.len() > cap {
                if let Some(old) = held.finished_order.pop_front() {
                    held.finished.remove(&old);
                }
            }
        }
        if held.leases.get(&lease.task_id) == Some(&lease.lease_token) {
            held.leases.remove(&lease.task_id);
            true
        } else {
            false
        }
    }

    /// Whether the worker asked for nothing new.
    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub(crate) fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Records that the worker was just heard from.
    pub(crate) fn touch(&self) {
        *self.last_seen.lock().expect("session lock poisoned") = SystemTime::now();
    }

    /// When the worker was last heard from.
    pub(crate) fn last_seen(&self) -> SystemTime {
        *self.last_seen.lock().expect("session lock poisoned")
    }

    /// Sends down the stream; false if the stream is gone.
    pub(crate) fn push(&self, push: Push) -> bool {
        self.tx.send(push).is_ok()
    }
}
