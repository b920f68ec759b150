//! Leases: claiming, renewing, completing, failing, releasing and
//! reclaiming them, and progress reports. Every write that depends on a
//! lease carries the lease token in its `WHERE`; zero rows affected means
//! the lease is gone, which is a normal outcome reported as [`Fenced`], not
//! an error.
//!
//! Lease design, in short: a hand-out sets `status = 'processing'`,
//! `locked_by`, `locked_until` and a fresh random `lease_token` on the live
//! row. Heartbeats move `locked_until`. A task that ends (completed, failed
//! for good, cancelled) moves to the history with its token, so a repeated
//! call with the same token is recognised there as already applied; a
//! failure with attempts left stays live, pending, with its token for the
//! same reason. Release, expiry and an operator retry clear the token, so a
//! stale worker can never act again. The reclaimer re-checks status and
//! expiry in the same statement that takes the lease back, so it cannot
//! clobber a completion that landed a moment earlier.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime};

use tokio_postgres::error::SqlState;
use tokio_postgres::Row;
use uuid::Uuid;

use super::notify::NOTIFY;
use super::row::{millis, seconds_to_duration, task_from_row};
use super::task::{task_read, task_read_many};
use super::{Announce, Channel, Result, Store};
use crate::model::{
    Backoff, CancelReason, Claim, Failure, LeaseRef, LeaseState, Progress, Reclaimed, Status, Task,
};

/// Every statement of this module, so a test can prepare each one against
/// the migrated schema.
#[cfg(test)]
pub(super) const STATEMENTS: &[&str] = &[
    TASK_CLAIM_ANY,
    TASK_CLAIM_TYPED,
    TASK_NEXT_DUE,
    LEASE_EXTEND,
    TASK_COMPLETE_MANY,
    TASK_FAIL_MANY,
    TASK_PROGRESS,
    TASK_RELEASE,
    LEASE_RECHECK,
    LEASE_RECLAIM_EXPIRED,
    LEASE_NEXT_EXPIRY,
];

/// The outcome of a write fenced by a lease token.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Fenced {
    /// The write took effect now, or had already taken effect with the same
    /// token (a retried call); the task as it is now.
    Applied(Box<Task>),
    /// The token does not match a processing task, which is in this status.
    Stale(Status),
    /// No task has that id.
    NotFound,
}

// The pending indexes serve the ORDER BY; SKIP LOCKED lets concurrent
// claimers take disjoint rows without waiting on each other. One statement
// serves many takers: `$2` holds one worker id per slot, and the n-th task in
// claim order goes to the n-th slot, so a node fills every waiting session
// of a group in one round trip. `$1` names the task types the takers run
// (empty: any); the two claim statements below differ only in how they find
// the candidates.
//
// Batch statements read their per-row inputs by position (`$2[n]`) rather
// than joining an `unnest` of them on it: such a join is n x n comparisons
// whenever the planner picks a nested loop for it, as generic plans (which
// guess ten rows for an `unnest`) did: a 700-task claim spent 120 of its
// 130 ms there.
macro_rules! claim {
    ($candidates:expr) => {
        concat!(
            "WITH picked AS ( \
               SELECT id, row_number() OVER (ORDER BY priority DESC, scheduled_for, seq) AS n \
               FROM (",
            $candidates,
            ") p) \
             UPDATE task t SET status = 'processing', attempts = t.attempts + 1, \
               locked_by = ($2::text[])[picked.n], \
               locked_until = now() + $3 * interval '1 millisecond', \
               reclaim_at = now() + $3 * interval '1 millisecond', \
               started_at = now(), lease_token = gen_random_uuid(), progress_current = NULL, \
               progress_total = NULL, progress_message = NULL, progress_updated_at = NULL \
             FROM picked \
             WHERE t.id = picked.id \
             RETURNING picked.n, ",
            t_columns!()
        )
    };
}

// Takers of any type walk the pending index in claim order. (`$1` is empty
// here; the comparison only gives the parameter its type.)
const TASK_CLAIM_ANY: &str = claim!(
    "SELECT id, priority, scheduled_for, seq FROM task \
     WHERE status = 'pending' AND scheduled_for <= now() AND $1::text[] = '{}' \
     ORDER BY priority DESC, scheduled_for, seq \
     LIMIT cardinality($2::text[]) FOR UPDATE SKIP LOCKED"
);

// Takers of some types walk the per-type pending index once per type and
// merge: walking the shared index instead would step over every pending
// task of other types that comes first in claim order (a backlog of 100,000
// high-priority tasks no taker of this group runs, on every claim). Each
// type locks at most as many rows as there are slots; the surplus of a
// multi-type claim is unlocked at its commit.
const TASK_CLAIM_TYPED: &str = claim!(
    "SELECT c.id, c.priority, c.scheduled_for, c.seq \
     FROM (SELECT DISTINCT unnest($1::text[])) AS k(task_type) CROSS JOIN LATERAL ( \
       SELECT id, priority, scheduled_for, seq FROM task \
       WHERE status = 'pending' AND task_type = k.task_type AND scheduled_for <= now() \
       ORDER BY priority DESC, scheduled_for, seq \
       LIMIT cardinality($2::text[]) FOR UPDATE SKIP LOCKED) c \
     ORDER BY c.priority DESC, c.scheduled_for, c.seq \
     LIMIT cardinality($2::text[])"
);

// A claim commits without waiting for its WAL to reach disk
// (`synchronous_commit = off`): it accepts nothing from a user, so a claim a
// database crash loses is a lost lease, not lost work. The task is pending
// again and its next claim mints a new token, which fences the old worker's
// outcome (LEASE_LOST). Any later heartbeat, completion or failure commits
// synchronously, and that flush carries the claim's WAL with it, so a durable
// outcome implies a durable claim. Measured: 1.15x drain (docs/performance.md).
const CLAIM_PLAN: &str = "SET LOCAL enable_bitmapscan = off; SET LOCAL enable_sort = off; \
                          SET LOCAL synchronous_commit = off";

const TASK_NEXT_DUE: &str =
    "SELECT EXTRACT(EPOCH FROM (min(scheduled_for) - clock_timestamp()))::float8 \
     FROM task WHERE status = 'pending' \
       AND (cardinality($1::text[]) = 0 OR task_type = ANY($1::text[]))";

// Batched writes lock their rows in id order first (`locked`), so that two
// batches touching the same tasks in different orders queue up instead of
// deadlocking. Only renewed leases come back; the store classifies the rest.
//
// A renewal moves `locked_until` only, which no index holds, so it is an
// update in place (HOT); `reclaim_at`, which the reclaimer's index holds,
// changes only when the lease gets shorter than the reclaimer expects.
const LEASE_EXTEND: &str = "WITH locked AS ( \
       SELECT t.id, r.n FROM unnest($1::uuid[]) WITH ORDINALITY AS r(id, n) \
       JOIN task t ON t.id = r.id ORDER BY t.id FOR UPDATE OF t) \
     UPDATE task t SET \
       locked_until = now() + ($3::float8[])[locked.n] * interval '1 millisecond', \
       reclaim_at = LEAST(t.reclaim_at, \
         now() + ($3::float8[])[locked.n] * interval '1 millisecond') \
     FROM locked \
     WHERE t.id = locked.id AND t.lease_token = ($2::uuid[])[locked.n] \
       AND t.status = 'processing' \
     RETURNING t.id, t.lease_token, t.locked_until";

// Completions and failures are written in batches (group commit): one
// statement for every outcome that arrived together. A task that ends
// leaves the live table in the statement that ends it and lands in the
// history, in one transaction: a `DELETE` (which writes no index entry)
// feeding an `INSERT` into today's partition.
//
// Completions, the hottest batch, skip the `locked` pass (a row-lock record
// per task, 15-25 % of `sql-only` throughput): they lock rows in the order
// the plan visits them, which can cross a heartbeat's id order. Postgres
// then aborts one of the two as a deadlock victim, and `write_retried`
// runs it again.
const TASK_COMPLETE_MANY: &str = concat!(
    "WITH done AS ( \
       DELETE FROM task t \
       USING unnest($1::uuid[], $2::uuid[], $3::jsonb[]) AS r(id, token, result) \
       WHERE t.id = r.id AND t.lease_token = r.token AND t.status = 'processing' \
       RETURNING t.*, r.result AS new_result) ",
    into_history!("'completed'", "last_error", "new_result")
);

// $6 backoff base ms, $7 backoff cap ms; per row a NULL retry_ms means
// backoff. The delay is base * 2^(attempt-1), capped, then scaled by a random
// factor in [0.5, 1) so that a burst of failures spreads out. A failure with
// attempts left stays live, pending again, and keeps its token (a repeated
// fail is recognised); a final one moves to the history.
const TASK_FAIL_MANY: &str = concat!(
    "WITH locked AS ( \
       SELECT t.id, r.n, t.attempts >= t.max_attempts AS exhausted \
       FROM unnest($1::uuid[]) WITH ORDINALITY AS r(id, n) \
       JOIN task t ON t.id = r.id ORDER BY t.id FOR UPDATE OF t), \
     r AS ( \
       SELECT id, ($2::uuid[])[n] AS token, ($3::bool[])[n] OR exhausted AS is_final, \
         ($4::float8[])[n] AS retry_ms, ($5::text[])[n] AS error FROM locked), \
     retried AS ( \
       UPDATE task t SET status = 'pending', \
         scheduled_for = now() + COALESCE(r.retry_ms, \
           LEAST($7::float8, $6::float8 * power(2, LEAST(t.attempts - 1, 60))) \
           * (0.5 + random() / 2)) * interval '1 millisecond', \
         locked_by = NULL, locked_until = NULL, last_error = r.error \
       FROM r \
       WHERE t.id = r.id AND t.lease_token = r.token AND t.status = 'processing' \
         AND NOT r.is_final \
       RETURNING ",
    t_columns!(),
    "), \
     done AS ( \
       DELETE FROM task t USING r \
       WHERE t.id = r.id AND t.lease_token = r.token AND t.status = 'processing' AND r.is_final \
       RETURNING t.*, r.error AS new_error), \
     failed AS (",
    into_history!("'failed'", "new_error", "NULL"),
    ") \
     SELECT * FROM retried UNION ALL SELECT * FROM failed"
);

// Progress changes no indexed column: an update in place (HOT).
const TASK_PROGRESS: &str = concat!(
    "UPDATE task SET progress_current = $3, progress_total = $4, progress_message = $5, \
       progress_updated_at = now() \
     WHERE id = $1 AND lease_token = $2 AND status = 'processing' \
     RETURNING ",
    columns!()
);

const TASK_RELEASE: &str = concat!(
    "UPDATE task SET status = 'pending', attempts = attempts - 1, scheduled_for = now(), \
       locked_by = NULL, locked_until = NULL, lease_token = NULL \
     WHERE id = $1 AND lease_token = $2 AND status = 'processing' \
     RETURNING ",
    columns!()
);

// Leases the reclaimer looked at because their `reclaim_at` passed, but
// that were renewed since: it looks again when they now expire.
const LEASE_RECHECK: &str = "UPDATE task SET reclaim_at = locked_until \
     WHERE id IN ( \
       SELECT id FROM task \
       WHERE status = 'processing' AND reclaim_at <= now() AND locked_until > now() \
       ORDER BY reclaim_at LIMIT $1 FOR UPDATE SKIP LOCKED) \
       AND status = 'processing' AND locked_until > now()";

// An expired lease with attempts left makes its task pending again at once;
// without, the task fails and moves to the history. Either way the token is
// cleared: the late worker can never act again.
const LEASE_RECLAIM_EXPIRED: &str = concat!(
    "WITH expired AS ( \
       SELECT id, lease_token, locked_until FROM task \
       WHERE status = 'processing' AND reclaim_at <= now() AND locked_until <= now() \
       ORDER BY reclaim_at LIMIT $1 FOR UPDATE SKIP LOCKED), \
     retried AS ( \
       UPDATE task t SET status = 'pending', scheduled_for = now(), \
         last_error = format('lease expired: worker %s did not renew it (attempt %s of %s)', \
           t.locked_by, t.attempts, t.max_attempts), \
         locked_by = NULL, locked_until = NULL, lease_token = NULL \
       FROM expired \
       WHERE t.id = expired.id AND t.status = 'processing' AND t.locked_until <= now() \
         AND t.attempts < t.max_attempts \
       RETURNING expired.lease_token AS old_token, \
         EXTRACT(EPOCH FROM now() - expired.locked_until)::float8 AS lag_seconds, ",
    t_columns!(),
    "), \
     done AS ( \
       DELETE FROM task t USING expired \
       WHERE t.id = expired.id AND t.status = 'processing' AND t.locked_until <= now() \
         AND t.attempts >= t.max_attempts \
       RETURNING t.id, t.seq, t.task_type, t.priority, t.attempts, t.max_attempts, \
         t.scheduled_for, t.created_at, t.started_at, t.locked_by, NULL::uuid AS lease_token, \
         format('lease expired: worker %s did not renew it (attempt %s of %s)', \
           t.locked_by, t.attempts, t.max_attempts) AS last_error, \
         t.params, t.library_id, t.series_id, t.book_id, t.dedup_key, t.progress_current, \
         t.progress_total, t.progress_message, t.progress_updated_at, \
         expired.lease_token AS old_token, expired.locked_until AS old_until), \
     failed AS (",
    into_history!("'failed'", "last_error", "NULL"),
    ") \
     SELECT * FROM retried \
     UNION ALL SELECT done.old_token, \
       EXTRACT(EPOCH FROM now() - done.old_until)::float8, failed.* \
     FROM failed JOIN done ON done.id = failed.id"
);

const LEASE_NEXT_EXPIRY: &str =
    "SELECT EXTRACT(EPOCH FROM (min(reclaim_at) - clock_timestamp()))::float8 \
     FROM task WHERE status = 'processing'";

/// A statement parameter, borrowed for `'a`.
type Param<'a> = dyn tokio_postgres::types::ToSql + Sync + 'a;

/// Times a write is run when Postgres keeps aborting it (a deadlock
/// victim, a day of the history not made yet).
const WRITE_ATTEMPTS: u32 = 3;

/// Whether Postgres refused a row because no partition of the history
/// takes its day.
fn is_missing_day(err: &tokio_postgres::Error) -> bool {
    err.as_db_error().is_some_and(|db| {
        *db.code() == SqlState::CHECK_VIOLATION && db.message().starts_with("no partition of")
    })
}

impl Store {
    /// Runs a write again when Postgres aborted it as the victim of a
    /// deadlock with another batch over the same tasks (see
    /// `TASK_COMPLETE_MANY`), or because the history has no partition for
    /// the day a task it ends finishes on. The history job makes the days
    /// a week ahead; a node whose job could not run for that long, or a
    /// database clock that jumped, would otherwise leave every outcome and
    /// every reclaim failing, so the write makes the day (as the job would)
    /// and runs again. Each write is one statement in its own transaction:
    /// an aborted run applied nothing, and running it again is safe.
    pub(super) async fn write_retried<T, Fut>(&self, mut write: impl FnMut() -> Fut) -> Result<T>
    where
        Fut: std::future::Future<Output = std::result::Result<T, tokio_postgres::Error>>,
    {
        let mut attempt = 1;
        loop {
            match write().await {
                Err(err) if attempt < WRITE_ATTEMPTS && is_missing_day(&err) => {
                    tracing::warn!(
                        attempt,
                        error = %super::Error::from(err),
                        "no history partition for today; making it"
                    );
                    self.history_upkeep(1, |_| None, true).await?;
                }
                Err(err)
                    if attempt < WRITE_ATTEMPTS
                        && err.code() == Some(&SqlState::T_R_DEADLOCK_DETECTED) =>
                {
                    tracing::warn!(
                        attempt,
                        "batch write chosen as a deadlock victim; running it again"
                    );
                }
                other => return Ok(other?),
            }
            attempt += 1;
        }
    }
}

/// What a fenced write that matched no row means, given the task as it is
/// now (`None`: no such task): already applied by an earlier call with the
/// same token, or refused because the lease is gone.
fn verdict(
    task: Option<Task>,
    lease: LeaseRef,
    already_applied: &impl Fn(&Task) -> bool,
) -> Fenced {
    match task {
        None => Fenced::NotFound,
        Some(task) if task.lease_token == Some(lease.lease_token) && already_applied(&task) => {
            Fenced::Applied(Box::new(task))
        }
        Some(task) => Fenced::Stale(task.status),
    }
}

impl Store {
    /// Leases due tasks, one per slot at most, in claim order; returns each
    /// task with the index of the slot it went to.
    ///
    /// With `announce`, the events of the claimed tasks are sent in the
    /// claim's transaction.
    pub(crate) async fn task_claim(
        &self,
        claim: &Claim,
        announce: Option<Announce<'_>>,
    ) -> Result<Vec<(usize, Task)>> {
        let mut client = self.client().await?;
        let stmt = client
            .prepare_cached(if claim.task_types.is_empty() {
                TASK_CLAIM_ANY
            } else {
                TASK_CLAIM_TYPED
            })
            .await?;
        // A queue's statistics are stale by nature (a batch of 100,000 tasks
        // arrives long before autovacuum analyzes it); with them the planner
        // may scan and sort every pending row instead of walking the pending
        // index in claim order and stopping at the limit. The index walk is
        // right at any size, so the claim pins it.
        let tx = client.transaction().await?;
        tx.batch_execute(CLAIM_PLAN).await?;
        let rows = tx
            .query(
                &stmt,
                &[
                    &claim.task_types,
                    &claim.slots,
                    &millis(claim.lease_duration),
                ],
            )
            .await?;
        let mut tasks = rows
            .iter()
            .map(|row| {
                Ok((
                    (row.try_get::<_, i64>("n")? - 1) as usize,
                    task_from_row(row)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        // UPDATE ... RETURNING does not keep the order of the picked rows.
        tasks.sort_by_key(|(slot, _)| *slot);
        if let Some(announce) = announce.filter(|_| !tasks.is_empty()) {
            let claimed: Vec<Task> = tasks.iter().map(|(_, t)| t.clone()).collect();
            for payload in announce(&claimed) {
                tx.execute(NOTIFY, &[&Channel::Event.name(), &payload])
                    .await?;
            }
        }
        tx.commit().await?;
        Ok(tasks)
    }

    /// How long until the earliest pending task of these types is due (zero
    /// if one is due now); `None` when there is no pending task.
    pub(crate) async fn task_next_due(&self, task_types: &[String]) -> Result<Option<Duration>> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(TASK_NEXT_DUE).await?;
        let row = client.query_one(&stmt, &[&task_types]).await?;
        Ok(seconds_to_duration(row.try_get(0)?))
    }

    /// Renews leases, each by its own duration, in one statement; one answer
    /// per lease, in input order.
    pub(crate) async fn lease_extend(
        &self,
        leases: &[(LeaseRef, Duration)],
    ) -> Result<Vec<LeaseState>> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(LEASE_EXTEND).await?;
        let ids: Vec<Uuid> = leases.iter().map(|(l, _)| l.task_id).collect();
        let tokens: Vec<Uuid> = leases.iter().map(|(l, _)| l.lease_token).collect();
        let ms: Vec<f64> = leases.iter().map(|(_, d)| millis(*d)).collect();
        let params: [&Param<'_>; 3] = [&ids, &tokens, &ms];
        let rows = self.write_retried(|| client.query(&stmt, &params)).await?;
        let mut renewed: HashMap<(Uuid, Uuid), SystemTime> = HashMap::with_capacity(rows.len());
        for row in &rows {
            renewed.insert((row.try_get(0)?, row.try_get(1)?), row.try_get(2)?);
        }
        let mut answers: Vec<LeaseState> = leases
            .iter()
            .map(|(l, _)| match renewed.get(&(l.task_id, l.lease_token)) {
                Some(until) => LeaseState::Held(*until),
                None => LeaseState::Lost,
            })
            .collect();
        if renewed.len() < leases.len() {
            let missed: Vec<Uuid> = answers
                .iter()
                .zip(leases)
                .filter(|(s, _)| **s == LeaseState::Lost)
                .map(|(_, (l, _))| l.task_id)
                .collect();
            // Why they were not renewed: cancelled (the token is still on
            // the cancelled task, now finished) or lost.
            let cancelled: HashSet<(Uuid, Uuid)> = task_read_many(&client, &missed)
                .await?
                .into_iter()
                .filter(|task| task.status == Status::Cancelled)
                .filter_map(|task| Some((task.id, task.lease_token?)))
                .collect();
            for (state, (lease, _)) in answers.iter_mut().zip(leases) {
                if *state == LeaseState::Lost
                    && cancelled.contains(&(lease.task_id, lease.lease_token))
                {
                    *state = LeaseState::Cancelled;
                }
            }
        }
        Ok(answers)
    }

    /// Completes leased tasks in one statement; one outcome per input, in
    /// input order.
    pub(crate) async fn task_complete_many(
        &self,
        completions: &[(LeaseRef, serde_json::Value)],
    ) -> Result<Vec<Fenced>> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(TASK_COMPLETE_MANY).await?;
        // Sorted by id: when the plan is driven by the input (small
        // batches), rows are locked in the order heartbeats lock them.
        let mut order: Vec<&(LeaseRef, serde_json::Value)> = completions.iter().collect();
        order.sort_by_key(|(l, _)| l.task_id);
        let ids: Vec<Uuid> = order.iter().map(|(l, _)| l.task_id).collect();
        let tokens: Vec<Uuid> = order.iter().map(|(l, _)| l.lease_token).collect();
        let results: Vec<&serde_json::Value> = order.iter().map(|(_, r)| r).collect();
        let params: [&Param<'_>; 3] = [&ids, &tokens, &results];
        let rows = self.write_retried(|| client.query(&stmt, &params)).await?;
        let leases: Vec<LeaseRef> = completions.iter().map(|(l, _)| *l).collect();
        self.fenced_many(&client, rows, &leases, |t| t.status == Status::Completed)
            .await
    }

    /// Records failed attempts in one statement: each task pending again
    /// after a backoff, or failed. One outcome per input, in input order.
    pub(crate) async fn task_fail_many(
        &self,
        failures: &[(LeaseRef, Failure)],
        backoff: Backoff,
    ) -> Result<Vec<Fenced>> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(TASK_FAIL_MANY).await?;
        let ids: Vec<Uuid> = failures.iter().map(|(l, _)| l.task_id).collect();
        let tokens: Vec<Uuid> = failures.iter().map(|(l, _)| l.lease_token).collect();
        let permanent: Vec<bool> = failures.iter().map(|(_, f)| f.permanent).collect();
        let retry_ms: Vec<Option<f64>> = failures
            .iter()
            .map(|(_, f)| f.retry_after.map(millis))
            .collect();
        let errors: Vec<&str> = failures.iter().map(|(_, f)| f.error.as_str()).collect();
        let (base, max) = (millis(backoff.base), millis(backoff.max));
        let params: [&Param<'_>; 7] = [&ids, &tokens, &permanent, &retry_ms, &errors, &base, &max];
        let rows = self.write_retried(|| client.query(&stmt, &params)).await?;
        let leases: Vec<LeaseRef> = failures.iter().map(|(l, _)| *l).collect();
        // A repeated fail finds the task failed, or pending with this token
        // still on it (no one has leased it since).
        self.fenced_many(&client, rows, &leases, |t| {
            matches!(t.status, Status::Failed | Status::Pending)
        })
        .await
    }

    /// Stores the progress of a leased task.
    pub(crate) async fn task_progress(
        &self,
        lease: LeaseRef,
        progress: &Progress,
    ) -> Result<Fenced> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(TASK_PROGRESS).await?;
        let row = client
            .query_opt(
                &stmt,
                &[
                    &lease.task_id,
                    &lease.lease_token,
                    &progress.current,
                    &progress.total,
                    &progress.message,
                ],
            )
            .await?;
        self.fenced(&client, row, lease, &|_: &Task| false).await
    }

    /// Gives a lease back: pending now, the attempt not counted.
    pub(crate) async fn task_release(&self, lease: LeaseRef) -> Result<Fenced> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(TASK_RELEASE).await?;
        let row = client
            .query_opt(&stmt, &[&lease.task_id, &lease.lease_token])
            .await?;
        // Release clears the token, so a repeated release is stale.
        self.fenced(&client, row, lease, &|_: &Task| false).await
    }

    /// Turns the row of a fenced write into its outcome. When the write
    /// matched nothing, the current row decides: the same token on a task in
    /// the state the write leads to means the call had already been applied.
    async fn fenced(
        &self,
        client: &deadpool_postgres::Object,
        row: Option<Row>,
        lease: LeaseRef,
        already_applied: &impl Fn(&Task) -> bool,
    ) -> Result<Fenced> {
        if let Some(row) = row {
            return Ok(Fenced::Applied(Box::new(task_from_row(&row)?)));
        }
        let task = task_read(client, lease.task_id).await?;
        Ok(verdict(task, lease, already_applied))
    }

    /// Outcomes of a batch of fenced writes: the rows written, by task id,
    /// and for every lease that matched nothing, the verdict of `fenced`.
    async fn fenced_many(
        &self,
        client: &deadpool_postgres::Object,
        rows: Vec<Row>,
        leases: &[LeaseRef],
        already_applied: impl Fn(&Task) -> bool,
    ) -> Result<Vec<Fenced>> {
        let mut written: HashMap<Uuid, Task> = HashMap::with_capacity(rows.len());
        for row in &rows {
            let task = task_from_row(row)?;
            written.insert(task.id, task);
        }
        let written_by = |lease: &LeaseRef| {
            written
                .get(&lease.task_id)
                .filter(|task| task.lease_token == Some(lease.lease_token))
        };
        // The leases that matched nothing are read back in one statement
        // (after a reclaim, a whole batch of late outcomes can miss).
        let missed: Vec<Uuid> = leases
            .iter()
            .filter(|lease| written_by(lease).is_none())
            .map(|lease| lease.task_id)
            .collect();
        let mut current: HashMap<Uuid, Task> = HashMap::new();
        if !missed.is_empty() {
            for task in task_read_many(client, &missed).await? {
                current.insert(task.id, task);
            }
        }
        Ok(leases
            .iter()
            .map(|lease| match written_by(lease) {
                Some(task) => Fenced::Applied(Box::new(task.clone())),
                None => verdict(
                    current.get(&lease.task_id).cloned(),
                    *lease,
                    &already_applied,
                ),
            })
            .collect())
    }

    /// Of these leases, the void ones and why: the task was cancelled with
    /// this very lease on it, or the lease is gone otherwise (expired and
    /// reclaimed, released, the task purged). A lease still held, or whose
    /// task ended or went pending again by an outcome under this token (one
    /// that landed a moment ago), is not void.
    pub(crate) async fn lease_voided(
        &self,
        leases: &[LeaseRef],
    ) -> Result<Vec<(LeaseRef, CancelReason)>> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let client = self.client().await?;
        let ids: Vec<Uuid> = leases.iter().map(|l| l.task_id).collect();
        let current: HashMap<Uuid, Task> = task_read_many(&client, &ids)
            .await?
            .into_iter()
            .map(|task| (task.id, task))
            .collect();
        Ok(leases
            .iter()
            .filter_map(|lease| {
                let task = current
                    .get(&lease.task_id)
                    .filter(|task| task.lease_token == Some(lease.lease_token));
                match task.map(|task| task.status) {
                    Some(Status::Cancelled) => Some((*lease, CancelReason::Cancelled)),
                    Some(_) => None,
                    None => Some((*lease, CancelReason::LeaseReclaimed)),
                }
            })
            .collect())
    }

    /// Moves the reclaimer's next look at up to `limit` leases that were
    /// renewed since it was due to their new expiry; returns how many.
    pub(crate) async fn lease_recheck(&self, limit: i64) -> Result<u64> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(LEASE_RECHECK).await?;
        Ok(client.execute(&stmt, &[&limit]).await?)
    }

    /// Takes back up to `limit` expired leases; returns each task as it is
    /// now (pending, or failed when no attempts are left) with the lease it
    /// took back.
    pub(crate) async fn lease_reclaim_expired(&self, limit: i64) -> Result<Vec<Reclaimed>> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(LEASE_RECLAIM_EXPIRED).await?;
        let params: [&Param<'_>; 1] = [&limit];
        let rows = self.write_retried(|| client.query(&stmt, &params)).await?;
        rows.iter()
            .map(|row| {
                let task = task_from_row(row)?;
                let lease = LeaseRef {
                    task_id: task.id,
                    lease_token: row.try_get("old_token")?,
                };
                let lag = Duration::from_secs_f64(row.try_get::<_, f64>("lag_seconds")?.max(0.0));
                Ok(Reclaimed { task, lease, lag })
            })
            .collect()
    }

    /// How long until the reclaimer should look at a lease next (zero if
    /// it should now); `None` when no task is processing.
    pub(crate) async fn lease_next_expiry(&self) -> Result<Option<Duration>> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(LEASE_NEXT_EXPIRY).await?;
        let row = client.query_one(&stmt, &[]).await?;
        Ok(seconds_to_duration(row.try_get(0)?))
    }
}
