//! Whole requests into the domain's inputs: every field checked (with the
//! checks of [`super::field`]), defaults applied, so that nothing reaches
//! the domain half checked. The gRPC services call these; so do clients
//! that refuse locally what the server would refuse (the Rust `Worker`'s
//! registration, the CLI's task files), so the two can never disagree.
//!
//! Field names in errors are the request's own (`tasks[3].task_type`,
//! `register.slots`), as the proto files document them.

use std::time::{Duration, SystemTime};

use uuid::Uuid;

use super::field;
use super::limit::*;
use super::proto;
use crate::error::Error;
use crate::model::{
    Claim, EventFilter, Failure, LeaseRef, ListFilter, NewTask, NewToken, Progress, Role,
    SessionSpec, Status,
};

type Result<T> = std::result::Result<T, Error>;

/// A CreateTask request (or one entry of CreateTasks), with `params` of at
/// most `max_payload_bytes` encoded.
pub(crate) fn new_task(
    req: &proto::CreateTaskRequest,
    max_payload_bytes: usize,
) -> Result<NewTask> {
    let max_attempts = field::range("max_attempts", req.max_attempts, 0, MAX_ATTEMPTS_LIMIT)?;
    Ok(NewTask {
        id: Uuid::now_v7(),
        task_type: field::task_type("task_type", &req.task_type)?,
        params: field::payload("params", req.params.as_ref(), max_payload_bytes)?,
        priority: req.priority,
        max_attempts: if max_attempts == 0 {
            DEFAULT_MAX_ATTEMPTS
        } else {
            max_attempts
        },
        scheduled_for: field::timestamp("scheduled_for", req.scheduled_for.as_ref())?,
        library_id: field::opt_uuid("library_id", req.library_id.as_deref())?,
        series_id: field::opt_uuid("series_id", req.series_id.as_deref())?,
        book_id: field::opt_uuid("book_id", req.book_id.as_deref())?,
        dedup_key: field::dedup_key("dedup_key", req.dedup_key.as_deref())?,
    })
}

/// A CreateTasks request: 1 to [`MAX_BATCH`] entries, each checked as
/// [`new_task`] and named by its index.
pub(crate) fn new_tasks(
    req: &proto::CreateTasksRequest,
    max_payload_bytes: usize,
) -> Result<Vec<NewTask>> {
    if req.tasks.is_empty() {
        return Err(Error::invalid("tasks", "must hold at least one task"));
    }
    if req.tasks.len() > MAX_BATCH {
        return Err(Error::invalid(
            "tasks",
            format!("must hold at most {MAX_BATCH} tasks"),
        ));
    }
    req.tasks
        .iter()
        .enumerate()
        .map(|(i, task)| {
            new_task(task, max_payload_bytes).map_err(|e| e.within(&format!("tasks[{i}].")))
        })
        .collect()
}

/// The task a GetTask or RetryTask request names.
pub(crate) fn task_id(id: &str) -> Result<Uuid> {
    field::uuid("id", id)
}

/// A CancelTask request: the task, and the reason to keep as its
/// `last_error`.
pub(crate) fn cancel(req: &proto::CancelTaskRequest) -> Result<(Uuid, Option<String>)> {
    Ok((
        field::uuid("id", &req.id)?,
        field::reason("reason", &req.reason)?,
    ))
}

/// A ListTasks request: its filters and page position.
pub(crate) fn list_filter(req: &proto::ListTasksRequest) -> Result<ListFilter> {
    let page_size = field::range("page_size", req.page_size, 0, MAX_PAGE_SIZE)?;
    Ok(ListFilter {
        statuses: field::statuses("statuses", &req.statuses)?,
        task_types: field::task_types("task_types", &req.task_types)?,
        library_id: field::opt_uuid("library_id", req.library_id.as_deref())?,
        series_id: field::opt_uuid("series_id", req.series_id.as_deref())?,
        book_id: field::opt_uuid("book_id", req.book_id.as_deref())?,
        before_id: field::page_token("page_token", &req.page_token)?,
        limit: if page_size == 0 {
            DEFAULT_PAGE_SIZE
        } else {
            page_size
        } as i64,
    })
}

/// A PurgeTasks request: terminal statuses only (all three when none is
/// given), and the completion time before which tasks go.
pub(crate) fn purge(req: &proto::PurgeTasksRequest) -> Result<(Vec<Status>, Option<SystemTime>)> {
    let before = field::timestamp("completed_before", req.completed_before.as_ref())?;
    let statuses = field::statuses("statuses", &req.statuses)?;
    if let Some((i, s)) = statuses.iter().enumerate().find(|(_, s)| !s.is_terminal()) {
        return Err(Error::invalid(
            format!("statuses[{i}]"),
            format!(
                "only completed, failed or cancelled tasks can be purged, not {}",
                s.as_str()
            ),
        ));
    }
    if statuses.is_empty() {
        return Ok((Status::TERMINAL.to_vec(), before));
    }
    Ok((statuses, before))
}

/// A WatchTasks request: which events the watcher wants.
pub(crate) fn watch_filter(req: &proto::WatchTasksRequest) -> Result<EventFilter> {
    if req.task_ids.len() > MAX_FILTER_VALUES {
        return Err(Error::invalid(
            "task_ids",
            format!("at most {MAX_FILTER_VALUES} values"),
        ));
    }
    Ok(EventFilter {
        task_types: field::task_types("task_types", &req.task_types)?
            .into_iter()
            .collect(),
        statuses: field::statuses("statuses", &req.statuses)?
            .into_iter()
            .collect(),
        task_ids: req
            .task_ids
            .iter()
            .enumerate()
            .map(|(i, id)| field::uuid(&format!("task_ids[{i}]"), id))
            .collect::<Result<_>>()?,
        library_id: field::opt_uuid("library_id", req.library_id.as_deref())?,
        series_id: field::opt_uuid("series_id", req.series_id.as_deref())?,
        book_id: field::opt_uuid("book_id", req.book_id.as_deref())?,
    })
}

/// A lease length: unset gives `default`.
fn lease_duration(
    field: &str,
    value: Option<&prost_types::Duration>,
    default: Duration,
) -> Result<Duration> {
    field::duration(field, value, MIN_LEASE, MAX_LEASE, default)
}

/// An AcquireTasks request: the claim for its worker, and how long to wait
/// for tasks when none is due.
pub(crate) fn acquire(
    req: &proto::AcquireTasksRequest,
    default_lease: Duration,
) -> Result<(Claim, Duration)> {
    let max_tasks = field::range("max_tasks", req.max_tasks, 0, MAX_CLAIM)?;
    let claim = Claim::for_worker(
        &field::worker_id("worker_id", &req.worker_id)?,
        field::task_types("task_types", &req.task_types)?,
        max_tasks.max(1) as usize,
        lease_duration("lease_duration", req.lease_duration.as_ref(), default_lease)?,
    );
    let wait = field::duration(
        "wait",
        req.wait.as_ref(),
        Duration::ZERO,
        MAX_WAIT,
        Duration::ZERO,
    )?;
    Ok((claim, wait))
}

/// A unary Heartbeat request: the leases to renew and for how long.
pub(crate) fn heartbeat(
    req: &proto::HeartbeatRequest,
    default_lease: Duration,
) -> Result<(Vec<LeaseRef>, Duration)> {
    field::worker_id("worker_id", &req.worker_id)?;
    let leases = field::lease_renewals("leases", &req.leases)?;
    let duration = lease_duration("lease_duration", req.lease_duration.as_ref(), default_lease)?;
    Ok((leases, duration))
}

/// A session's heartbeat: the leases it names (empty: every lease of the
/// session).
pub(crate) fn session_heartbeat(req: &proto::SessionHeartbeat) -> Result<Vec<LeaseRef>> {
    field::lease_renewals("heartbeat.leases", &req.leases)
}

/// A completion (CompleteTask, or `complete` on a session): the lease and
/// its result of at most `max_payload_bytes` encoded.
pub(crate) fn complete(
    req: &proto::CompleteTaskRequest,
    max_payload_bytes: usize,
) -> Result<(LeaseRef, serde_json::Value)> {
    let lease = field::lease_ref(&req.task_id, &req.lease_token)?;
    let result = field::payload("result", req.result.as_ref(), max_payload_bytes)?;
    Ok((lease, result))
}

/// A failed attempt (FailTask, or `fail` on a session): the lease and how
/// to retry.
pub(crate) fn fail(req: &proto::FailTaskRequest) -> Result<(LeaseRef, Failure)> {
    let lease = field::lease_ref(&req.task_id, &req.lease_token)?;
    let failure = Failure {
        error: field::error_text("error", &req.error)?,
        permanent: req.permanent,
        retry_after: req
            .retry_after
            .as_ref()
            .map(|d| {
                field::duration(
                    "retry_after",
                    Some(d),
                    Duration::ZERO,
                    MAX_RETRY_AFTER,
                    Duration::ZERO,
                )
            })
            .transpose()?,
    };
    Ok((lease, failure))
}

/// The envelope of an `outcomes` message: 1 to [`MAX_OUTCOMES`] outcomes,
/// each setting its kind. (Each outcome's own fields are checked when it is
/// written, so that a bad one gets its own INVALID answer.)
pub(crate) fn outcomes(batch: &proto::OutcomeBatch) -> Result<()> {
    if batch.outcomes.is_empty() || batch.outcomes.len() > MAX_OUTCOMES {
        return Err(Error::invalid(
            "outcomes.outcomes",
            format!("must hold 1 to {MAX_OUTCOMES} outcomes"),
        ));
    }
    if let Some(i) = batch.outcomes.iter().position(|o| o.kind.is_none()) {
        return Err(Error::invalid(
            format!("outcomes.outcomes[{i}].kind"),
            "must set one field",
        ));
    }
    Ok(())
}

/// A release (ReleaseTask, or `release` on a session): the lease to give
/// back.
pub(crate) fn release(req: &proto::ReleaseTaskRequest) -> Result<LeaseRef> {
    field::lease_ref(&req.task_id, &req.lease_token)
}

/// A progress report on a session: the lease and what it reports.
pub(crate) fn progress(req: &proto::ReportProgress) -> Result<(LeaseRef, Progress)> {
    let lease = field::lease_ref(&req.task_id, &req.lease_token)?;
    let progress = Progress {
        current: field::range64("progress.current", req.current)?,
        total: field::range64("progress.total", req.total)?,
        message: field::progress_message("progress.message", &req.message)?,
        updated_at: None,
    };
    Ok((lease, progress))
}

/// The session a `register` asks for. Task types come back sorted and
/// without duplicates; an unset lease gives `default_lease`.
pub(crate) fn register(
    register: &proto::RegisterWorker,
    default_lease: Duration,
) -> Result<SessionSpec> {
    let mut task_types = field::task_types("register.task_types", &register.task_types)?;
    task_types.sort();
    task_types.dedup();
    let slots = field::range("register.slots", register.slots, 1, MAX_SLOTS)?;
    Ok(SessionSpec {
        worker_id: field::worker_id("register.worker_id", &register.worker_id)?,
        task_types,
        slots: slots as usize,
        lease_duration: lease_duration(
            "register.lease_duration",
            register.lease_duration.as_ref(),
            default_lease,
        )?,
        labels: field::labels("register.labels", &register.labels)?,
        batched_pushes: register.batched_pushes,
    })
}

/// The longest a token may be made to last.
const TOKEN_MAX_LIFETIME: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// A CreateToken request, expiring `expires_in` after `now`.
pub(crate) fn token_create(req: &proto::CreateTokenRequest, now: SystemTime) -> Result<NewToken> {
    let role = field::role("role", req.role)?;
    let task_types = field::task_types("task_types", &req.task_types)?;
    if role != Role::Worker && !task_types.is_empty() {
        return Err(Error::invalid(
            "task_types",
            "only worker tokens are limited to task types",
        ));
    }
    let expires_at = match &req.expires_in {
        None => None,
        Some(d) => Some(
            now + field::duration(
                "expires_in",
                Some(d),
                Duration::from_secs(1),
                TOKEN_MAX_LIFETIME,
                Duration::ZERO,
            )?,
        ),
    };
    Ok(NewToken {
        role,
        task_types,
        description: field::description("description", &req.description)?,
        expires_at,
    })
}

/// A RevokeToken request: the token's id.
pub(crate) fn token_id(id: &str) -> Result<Uuid> {
    field::uuid("id", id)
}
