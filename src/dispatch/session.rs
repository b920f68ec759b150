//! A worker session as the dispatcher sees it: who it is, how many slots it
//! has, which leases are out on it, and the channel to its stream.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use uuid::Uuid;

use crate::task::{LeaseRef, Task};

/// Why a task was taken away from a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelReason {
    /// An operator cancelled the task.
    Cancelled,
    /// The lease expired and was reclaimed.
    LeaseReclaimed,
}

impl CancelReason {
    pub(crate) fn code(self) -> char {
        match self {
            CancelReason::Cancelled => 'c',
            CancelReason::LeaseReclaimed => 'r',
        }
    }

    pub(crate) fn from_code(code: &str) -> Option<Self> {
        match code {
            "c" => Some(CancelReason::Cancelled),
            "r" => Some(CancelReason::LeaseReclaimed),
            _ => None,
        }
    }
}

/// What the dispatcher sends down a session's stream.
#[derive(Debug, Clone)]
pub enum Push {
    /// A task leased to the session.
    Task(Box<Task>),
    /// Stop working on a task.
    Cancel { task_id: Uuid, reason: CancelReason },
    /// The node is shutting down; outcomes are accepted for `grace`.
    Drain { grace: Duration },
    /// End the stream.
    Close,
}

/// What a worker asks for when it registers.
#[derive(Debug, Clone)]
pub struct SessionSpec {
    pub worker_id: String,
    /// Sorted and without duplicates; empty means any type.
    pub task_types: Vec<String>,
    pub slots: usize,
    pub lease_duration: Duration,
    /// A JSON object of string values.
    pub labels: serde_json::Value,
}

/// A registered session.
#[derive(Debug)]
pub struct Session {
    pub id: Uuid,
    pub spec: SessionSpec,
    pub connected_at: SystemTime,
    /// Leases out on this session: task id to lease token.
    held: Mutex<HashMap<Uuid, Uuid>>,
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
                held: Mutex::new(HashMap::new()),
                draining: AtomicBool::new(false),
                last_seen: Mutex::new(now),
                tx,
            },
            rx,
        )
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Uuid>> {
        self.held.lock().expect("session lock poisoned")
    }

    /// Slots not taken by a lease.
    pub fn free(&self) -> usize {
        self.spec.slots.saturating_sub(self.held().len())
    }

    /// Leases out on this session.
    pub fn in_flight(&self) -> usize {
        self.held().len()
    }

    /// Every lease out on this session.
    pub fn leases(&self) -> Vec<LeaseRef> {
        self.held()
            .iter()
            .map(|(task_id, lease_token)| LeaseRef {
                task_id: *task_id,
                lease_token: *lease_token,
            })
            .collect()
    }

    pub(crate) fn hold(&self, lease: LeaseRef) {
        self.held().insert(lease.task_id, lease.lease_token);
    }

    /// Drops a lease; true if the session held it.
    pub(crate) fn drop_lease(&self, task_id: Uuid) -> bool {
        self.held().remove(&task_id).is_some()
    }

    /// Whether the worker asked for nothing new.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub(crate) fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Records that the worker was just heard from.
    pub fn touch(&self) {
        *self.last_seen.lock().expect("session lock poisoned") = SystemTime::now();
    }

    /// When the worker was last heard from.
    pub fn last_seen(&self) -> SystemTime {
        *self.last_seen.lock().expect("session lock poisoned")
    }

    /// Sends down the stream; false if the stream is gone.
    pub(crate) fn push(&self, push: Push) -> bool {
        self.tx.send(push).is_ok()
    }
}
