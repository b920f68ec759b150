//! Worker sessions: what a worker asks for when it registers, why a task is
//! taken away from it, and a session as the node directory records it.

use std::time::{Duration, SystemTime};

use uuid::Uuid;

/// What a worker asks for when it registers.
#[derive(Debug, Clone)]
pub(crate) struct SessionSpec {
    pub(crate) worker_id: String,
    /// Sorted and without duplicates; empty means any type.
    pub(crate) task_types: Vec<String>,
    pub(crate) slots: usize,
    pub(crate) lease_duration: Duration,
    /// A JSON object of string values.
    pub(crate) labels: serde_json::Value,
    /// Whether several tasks pushed at once may travel in one message.
    pub(crate) batched_pushes: bool,
}

/// Why a task was taken away from a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CancelReason {
    /// An operator cancelled the task.
    Cancelled,
    /// The lease expired and was reclaimed.
    LeaseReclaimed,
}

/// A session as the node directory records it for ListWorkers: a view for
/// operators, never a source of truth for leases.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SessionEntry {
    pub(crate) id: Uuid,
    pub(crate) node_id: Uuid,
    pub(crate) worker_id: String,
    pub(crate) task_types: Vec<String>,
    pub(crate) slots: i32,
    pub(crate) labels: serde_json::Value,
    pub(crate) in_flight: i32,
    pub(crate) draining: bool,
    pub(crate) connected_at: SystemTime,
    pub(crate) last_seen_at: SystemTime,
}
