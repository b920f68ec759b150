//! Task rows: the column lists every statement returns, live or finished,
//! the move of a live row into the history, and the one mapping of a row to
//! [`Task`].

use std::time::{Duration, SystemTime};

use tokio_postgres::Row;

use super::{Error, Result};
use crate::model::{Progress, Status, Task};

/// The columns of a live task, in the shape every task statement returns
/// (a live task has no completion time and no result yet).
macro_rules! columns {
    () => {
        "id, seq, task_type, status, priority, attempts, max_attempts, scheduled_for, \
         created_at, started_at, NULL::timestamptz AS completed_at, locked_by, locked_until, \
         lease_token, last_error, params, NULL::jsonb AS result, library_id, series_id, \
         book_id, dedup_key, progress_current, progress_total, progress_message, \
         progress_updated_at"
    };
}

/// The same columns qualified by the alias `t`, for statements with joins.
macro_rules! t_columns {
    () => {
        "t.id, t.seq, t.task_type, t.status, t.priority, t.attempts, t.max_attempts, \
         t.scheduled_for, t.created_at, t.started_at, NULL::timestamptz AS completed_at, \
         t.locked_by, t.locked_until, t.lease_token, t.last_error, t.params, \
         NULL::jsonb AS result, t.library_id, t.series_id, t.book_id, t.dedup_key, \
         t.progress_current, t.progress_total, t.progress_message, t.progress_updated_at"
    };
}

/// The columns of a finished task in the same shape (a finished task holds
/// no lease any more).
macro_rules! history_columns {
    () => {
        "id, seq, task_type, status, priority, attempts, max_attempts, scheduled_for, \
         created_at, started_at, completed_at, locked_by, NULL::timestamptz AS locked_until, \
         lease_token, last_error, params, result, library_id, series_id, book_id, dedup_key, \
         progress_current, progress_total, progress_message, progress_updated_at"
    };
}

/// Moves the live rows of the `done` CTE (a `DELETE ... RETURNING t.*` that
/// may add `new_error` and `new_result`) into the history, as `$status`,
/// finished now, with last error `$error` and result `$result` (column
/// expressions over `done`); returns them as [`history_columns!`].
macro_rules! into_history {
    ($status:literal, $error:literal, $result:literal) => {
        concat!(
            "INSERT INTO task_history (id, seq, task_type, status, priority, attempts, \
               max_attempts, scheduled_for, created_at, started_at, completed_at, locked_by, \
               lease_token, last_error, params, result, library_id, series_id, book_id, \
               dedup_key, progress_current, progress_total, progress_message, \
               progress_updated_at) \
             SELECT id, seq, task_type, ",
            $status,
            ", priority, attempts, max_attempts, scheduled_for, created_at, started_at, \
               now(), locked_by, lease_token, ",
            $error,
            ", params, ",
            $result,
            ", library_id, series_id, book_id, dedup_key, progress_current, progress_total, \
               progress_message, progress_updated_at \
             FROM done RETURNING ",
            history_columns!()
        )
    };
}

/// The task of a row holding [`columns!`].
pub(super) fn task_from_row(row: &Row) -> Result<Task> {
    let status: &str = row.try_get("status")?;
    Ok(Task {
        id: row.try_get("id")?,
        seq: row.try_get("seq")?,
        task_type: row.try_get("task_type")?,
        status: Status::parse(status)
            .ok_or_else(|| Error::Other(format!("unknown task status {status:?}")))?,
        priority: row.try_get("priority")?,
        attempts: row.try_get("attempts")?,
        max_attempts: row.try_get("max_attempts")?,
        scheduled_for: row.try_get("scheduled_for")?,
        created_at: row.try_get("created_at")?,
        started_at: row.try_get("started_at")?,
        completed_at: row.try_get("completed_at")?,
        locked_by: row.try_get("locked_by")?,
        locked_until: row.try_get("locked_until")?,
        lease_token: row.try_get("lease_token")?,
        last_error: row.try_get("last_error")?,
        params: row.try_get("params")?,
        result: row.try_get("result")?,
        library_id: row.try_get("library_id")?,
        series_id: row.try_get("series_id")?,
        book_id: row.try_get("book_id")?,
        dedup_key: row.try_get("dedup_key")?,
        progress: match row.try_get::<_, Option<SystemTime>>("progress_updated_at")? {
            Some(updated_at) => Some(Progress {
                current: row
                    .try_get::<_, Option<i64>>("progress_current")?
                    .unwrap_or(0),
                total: row
                    .try_get::<_, Option<i64>>("progress_total")?
                    .unwrap_or(0),
                message: row
                    .try_get::<_, Option<String>>("progress_message")?
                    .unwrap_or_default(),
                updated_at: Some(updated_at),
            }),
            None => None,
        },
    })
}

/// The tasks of rows holding [`columns!`].
pub(super) fn tasks_from_rows(rows: &[Row]) -> Result<Vec<Task>> {
    rows.iter().map(task_from_row).collect()
}

/// A duration in (fractional) milliseconds, as statements take it.
pub(super) fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A number of seconds the database computed; negative means now.
pub(super) fn seconds_to_duration(secs: Option<f64>) -> Option<Duration> {
    secs.map(|s| Duration::from_secs_f64(s.max(0.0)))
}
