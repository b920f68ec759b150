//! Domain values into messages: tasks, leases, events, statistics, worker
//! sessions, and times as `Timestamp` and `Duration`.

use std::time::{Duration, SystemTime};

use super::json::json_to_struct;
use super::proto;
use crate::model::{
    CancelReason, Counts, Event, EventKind, LeaseRef, LeaseState, Progress, SessionEntry, Stats,
    Status, Task, TypeStats,
};

/// A time as a `Timestamp`.
pub(crate) fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    t.into()
}

/// A duration as a protobuf `Duration`.
pub(crate) fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        // Saturates: a duration past i64 seconds (`Duration::MAX`, meant as
        // "never") must not wrap into a negative one.
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: d.subsec_nanos() as i32,
    }
}

/// The wire value of a status.
pub(crate) fn status_to_proto(status: Status) -> proto::TaskStatus {
    match status {
        Status::Pending => proto::TaskStatus::Pending,
        Status::Processing => proto::TaskStatus::Processing,
        Status::Completed => proto::TaskStatus::Completed,
        Status::Failed => proto::TaskStatus::Failed,
        Status::Cancelled => proto::TaskStatus::Cancelled,
    }
}

/// A task on the wire.
pub(crate) fn task_to_proto(task: &Task) -> proto::Task {
    proto::Task {
        id: task.id.to_string(),
        task_type: task.task_type.clone(),
        status: status_to_proto(task.status) as i32,
        priority: task.priority,
        attempts: task.attempts,
        max_attempts: task.max_attempts,
        scheduled_for: Some(timestamp(task.scheduled_for)),
        created_at: Some(timestamp(task.created_at)),
        started_at: task.started_at.map(timestamp),
        completed_at: task.completed_at.map(timestamp),
        locked_by: task.locked_by.clone(),
        locked_until: task.locked_until.map(timestamp),
        last_error: task.last_error.clone(),
        params: Some(json_to_struct(&task.params)),
        result: task.result.as_ref().map(json_to_struct),
        library_id: task.library_id.map(|id| id.to_string()),
        series_id: task.series_id.map(|id| id.to_string()),
        book_id: task.book_id.map(|id| id.to_string()),
        dedup_key: task.dedup_key.clone(),
        progress: task.progress.as_ref().map(progress_to_proto),
    }
}

/// Progress on the wire.
pub(crate) fn progress_to_proto(progress: &Progress) -> proto::TaskProgress {
    proto::TaskProgress {
        current: progress.current,
        total: progress.total,
        message: progress.message.clone(),
        updated_at: progress.updated_at.map(timestamp),
    }
}

fn event_kind_to_proto(kind: EventKind) -> proto::TaskEventKind {
    match kind {
        EventKind::Created => proto::TaskEventKind::Created,
        EventKind::Leased => proto::TaskEventKind::Leased,
        EventKind::Progress => proto::TaskEventKind::Progress,
        EventKind::Completed => proto::TaskEventKind::Completed,
        EventKind::Failed => proto::TaskEventKind::Failed,
        EventKind::Retried => proto::TaskEventKind::Retried,
        EventKind::Cancelled => proto::TaskEventKind::Cancelled,
        EventKind::LeaseExpired => proto::TaskEventKind::LeaseExpired,
        EventKind::Released => proto::TaskEventKind::Released,
    }
}

/// A task event on the wire.
pub(crate) fn event_to_proto(event: &Event) -> proto::TaskEvent {
    proto::TaskEvent {
        kind: event_kind_to_proto(event.kind) as i32,
        task_id: event.task_id.to_string(),
        task_type: event.task_type.clone(),
        status: status_to_proto(event.status) as i32,
        attempts: event.attempts,
        worker_id: event.worker_id.clone(),
        progress: event.progress.as_ref().map(progress_to_proto),
        library_id: event.library_id.map(|id| id.to_string()),
        series_id: event.series_id.map(|id| id.to_string()),
        book_id: event.book_id.map(|id| id.to_string()),
        occurred_at: Some(timestamp(event.at)),
        error: event.error.clone(),
    }
}

/// A worker session row on the wire.
pub(crate) fn session_to_proto(row: &SessionEntry) -> proto::WorkerSession {
    proto::WorkerSession {
        worker_id: row.worker_id.clone(),
        session_id: row.id.to_string(),
        node_id: row.node_id.to_string(),
        task_types: row.task_types.clone(),
        slots: row.slots,
        in_flight: row.in_flight,
        connected_at: Some(timestamp(row.connected_at)),
        last_seen_at: Some(timestamp(row.last_seen_at)),
        labels: row
            .labels
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                    .collect()
            })
            .unwrap_or_default(),
        draining: row.draining,
    }
}

/// A freshly claimed task with its lease.
pub(crate) fn leased_to_proto(task: &Task) -> proto::LeasedTask {
    proto::LeasedTask {
        lease: Some(proto::Lease {
            task_id: task.id.to_string(),
            lease_token: task.lease_token.map(|t| t.to_string()).unwrap_or_default(),
            worker_id: task.locked_by.clone().unwrap_or_default(),
            locked_until: task.locked_until.map(timestamp),
            attempt: task.attempts,
        }),
        task: Some(task_to_proto(task)),
    }
}

/// A lease state on the wire, naming its lease.
pub(crate) fn lease_state(lease: LeaseRef, state: LeaseState) -> proto::LeaseState {
    let (status, locked_until) = match state {
        LeaseState::Held(until) => (proto::LeaseStatus::Held, Some(timestamp(until))),
        LeaseState::Lost => (proto::LeaseStatus::Lost, None),
        LeaseState::Cancelled => (proto::LeaseStatus::Cancelled, None),
    };
    proto::LeaseState {
        task_id: lease.task_id.to_string(),
        lease_token: lease.lease_token.to_string(),
        status: status as i32,
        locked_until,
    }
}

/// A cancel push: stop working on this lease, and why.
pub(crate) fn cancel_to_proto(lease: LeaseRef, reason: CancelReason) -> proto::CancelLease {
    proto::CancelLease {
        task_id: lease.task_id.to_string(),
        lease_token: lease.lease_token.to_string(),
        reason: match reason {
            CancelReason::Cancelled => proto::CancelReason::Cancelled,
            CancelReason::LeaseReclaimed => proto::CancelReason::LeaseReclaimed,
        } as i32,
    }
}

/// The acknowledgement of an outcome message, naming the message as it was
/// sent (`task_id`, `lease_token` and `kind`): the task as it is now, or
/// why the outcome was not recorded.
pub(crate) fn outcome_ack(
    task_id: String,
    lease_token: String,
    kind: proto::OutcomeKind,
    outcome: Result<Task, crate::error::Error>,
) -> proto::OutcomeAck {
    let (status, message, task) = match outcome {
        Ok(task) => (
            proto::AckStatus::Ok,
            String::new(),
            Some(task_to_proto(&task)),
        ),
        Err(err) => {
            let (status, message) = err.into_ack();
            (status, message, None)
        }
    };
    proto::OutcomeAck {
        task_id,
        lease_token,
        kind: kind as i32,
        status: status as i32,
        message,
        task,
    }
}

fn counts_to_proto(counts: &Counts) -> proto::StatusCounts {
    proto::StatusCounts {
        pending: counts.pending,
        processing: counts.processing,
        completed: counts.completed,
        failed: counts.failed,
        cancelled: counts.cancelled,
        total: counts.total(),
    }
}

/// Statistics on the wire.
pub(crate) fn stats_to_proto(stats: &Stats) -> proto::GetStatsResponse {
    proto::GetStatsResponse {
        totals: Some(counts_to_proto(&stats.totals)),
        task_types: stats
            .task_types
            .iter()
            .map(|t: &TypeStats| proto::TaskTypeStats {
                task_type: t.task_type.clone(),
                counts: Some(counts_to_proto(&t.counts)),
                oldest_due_pending_age: t.oldest_due_pending_age.map(duration),
            })
            .collect(),
        oldest_due_pending_age: stats.oldest_due_pending_age.map(duration),
    }
}

/// A token's role on the wire.
pub(crate) fn role_to_proto(role: crate::model::Role) -> proto::TokenRole {
    match role {
        crate::model::Role::Worker => proto::TokenRole::Worker,
        crate::model::Role::Producer => proto::TokenRole::Producer,
        crate::model::Role::Admin => proto::TokenRole::Admin,
    }
}

/// A token on the wire (never its secret).
pub(crate) fn token_to_proto(token: &crate::model::Token) -> proto::Token {
    proto::Token {
        id: token.id.to_string(),
        role: role_to_proto(token.role) as i32,
        task_types: token.task_types.clone(),
        description: token.description.clone(),
        created_at: Some(timestamp(token.created_at)),
        expires_at: token.expires_at.map(timestamp),
        revoked_at: token.revoked_at.map(timestamp),
    }
}

/// The canonical name of a gRPC code, as grpcurl and the contract spell it.
pub(crate) fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_past_i64_seconds_saturate() {
        assert_eq!(duration(Duration::MAX).seconds, i64::MAX);
        assert_eq!(duration(Duration::from_millis(1500)).nanos, 500_000_000);
    }
}
