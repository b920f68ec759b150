//! Creating, reading, listing, cancelling, retrying, purging and counting
//! tasks. The writes that depend on a lease are in `lease`.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use uuid::Uuid;

use super::notify::NOTIFY;
use super::row::{seconds_to_duration, task_from_row, tasks_from_rows};
use super::{Announce, Channel, Error, Result, Store};
use crate::model::{Counts, Created, ListFilter, NewTask, Page, Stats, Status, Task, TypeStats};

/// Every statement of this module, so a test can prepare each one against
/// the migrated schema.
#[cfg(test)]
pub(super) const STATEMENTS: &[&str] = &[
    TASK_INSERT,
    TASK_INSERT_MANY,
    TASK_GET,
    TASK_GET_MANY,
    TASK_GET_LIVE_BY_DEDUP,
    TASK_CANCEL,
    TASK_RETRY,
    TASK_LIST,
    TASK_PURGE,
    TASK_STATS,
    TASK_QUEUE_SAMPLE,
];

// The dedup key is unique among live tasks (every live task is pending or
// processing): a create whose key a live task holds inserts nothing and
// returns that task instead.
const TASK_INSERT: &str = concat!(
    "INSERT INTO task (id, task_type, params, priority, max_attempts, scheduled_for, \
     library_id, series_id, book_id, dedup_key) \
     VALUES ($1, $2, $3, $4, $5, COALESCE($6, now()), $7, $8, $9, $10) \
     ON CONFLICT (dedup_key) WHERE dedup_key IS NOT NULL \
     DO NOTHING RETURNING ",
    columns!()
);

const TASK_INSERT_MANY: &str = concat!(
    "INSERT INTO task (id, task_type, params, priority, max_attempts, scheduled_for, \
     library_id, series_id, book_id, dedup_key) \
     SELECT id, task_type, params, priority, max_attempts, COALESCE(scheduled_for, now()), \
     library_id, series_id, book_id, dedup_key \
     FROM unnest($1::uuid[], $2::text[], $3::jsonb[], $4::int4[], $5::int4[], \
     $6::timestamptz[], $7::uuid[], $8::uuid[], $9::uuid[], $10::text[]) WITH ORDINALITY \
     AS r(id, task_type, params, priority, max_attempts, scheduled_for, library_id, \
     series_id, book_id, dedup_key, n) \
     ORDER BY n \
     ON CONFLICT (dedup_key) WHERE dedup_key IS NOT NULL \
     DO NOTHING RETURNING ",
    columns!()
);

// A task is live or finished, never both: both tables are read in one
// statement, so one snapshot, and a task that moves between them meanwhile
// is seen exactly once. `$2` bounds the completion time from below, so that
// only the history's partitions of days since the task was created are
// searched (see `history_bound`).
const TASK_GET: &str = concat!(
    "SELECT ",
    columns!(),
    " FROM task WHERE id = $1 \
     UNION ALL SELECT ",
    history_columns!(),
    " FROM task_history WHERE id = $1 AND completed_at >= $2 \
     LIMIT 1"
);

const TASK_GET_MANY: &str = concat!(
    "SELECT ",
    columns!(),
    " FROM task WHERE id = ANY($1::uuid[]) \
     UNION ALL SELECT ",
    history_columns!(),
    " FROM task_history WHERE id = ANY($1::uuid[]) AND completed_at >= $2"
);

const TASK_GET_LIVE_BY_DEDUP: &str = concat!(
    "SELECT ",
    columns!(),
    " FROM task WHERE dedup_key = ANY($1::text[])"
);

// Every live task can be cancelled: it leaves the live table and is
// finished, cancelled. The lease token stays on the row, so the holder's
// next heartbeat learns that its lease was cancelled rather than lost.
const TASK_CANCEL: &str = concat!(
    "WITH done AS (DELETE FROM task WHERE id = $1 RETURNING *) ",
    into_history!("'cancelled'", "COALESCE($2, last_error)", "NULL")
);

// A failed or cancelled task moves back to the live table, pending, with
// its attempts reset and no lease: a token of an earlier attempt can never
// act on it again. It keeps its creation number. A live task holding its
// dedup key makes the insert, and with it the whole move, fail.
const TASK_RETRY: &str = concat!(
    "WITH moved AS ( \
       DELETE FROM task_history WHERE id = $1 AND status IN ('failed', 'cancelled') \
       RETURNING *) \
     INSERT INTO task (id, seq, task_type, status, priority, attempts, max_attempts, \
       scheduled_for, created_at, started_at, locked_by, locked_until, lease_token, \
       last_error, params, library_id, series_id, book_id, dedup_key, progress_current, \
       progress_total, progress_message, progress_updated_at) \
     OVERRIDING SYSTEM VALUE \
     SELECT id, seq, task_type, 'pending', priority, 0, max_attempts, now(), created_at, \
       started_at, NULL, NULL, NULL, last_error, params, library_id, series_id, book_id, \
       dedup_key, progress_current, progress_total, progress_message, progress_updated_at \
     FROM moved RETURNING ",
    columns!()
);

// A listing's filters and first page, the same in either table.
macro_rules! list_page {
    () => {
        " WHERE (cardinality($1::text[]) = 0 OR status = ANY($1::text[])) \
           AND (cardinality($2::text[]) = 0 OR task_type = ANY($2::text[])) \
           AND ($3::uuid IS NULL OR library_id = $3) \
           AND ($4::uuid IS NULL OR series_id = $4) \
           AND ($5::uuid IS NULL OR book_id = $5) \
           AND ($6::uuid IS NULL OR id < $6) \
         ORDER BY id DESC LIMIT $7"
    };
}

// Newest first across live and finished tasks, by the time-ordered id: each
// table gives its own first page, in one snapshot, and the two are merged.
const TASK_LIST: &str = concat!(
    "SELECT * FROM ((SELECT ",
    columns!(),
    " FROM task",
    list_page!(),
    ") UNION ALL (SELECT ",
    history_columns!(),
    " FROM task_history",
    list_page!(),
    ")) t ORDER BY id DESC LIMIT $7"
);

// A finer cut than the retention's whole days: rows, in bounded batches.
const TASK_PURGE: &str = "WITH doomed AS ( \
       SELECT id, status, completed_at FROM task_history \
       WHERE status = ANY($1::text[]) AND completed_at < COALESCE($2, now()) \
       LIMIT $3 FOR UPDATE SKIP LOCKED) \
     DELETE FROM task_history h USING doomed \
     WHERE h.id = doomed.id AND h.status = doomed.status \
       AND h.completed_at = doomed.completed_at \
       AND h.status = ANY($1::text[]) AND h.completed_at < COALESCE($2, now())";

const TASK_STATS: &str = "SELECT task_type, status, count(*) AS n, \
       EXTRACT(EPOCH FROM now() - min(scheduled_for) \
         FILTER (WHERE status = 'pending' AND scheduled_for <= now()))::float8 AS oldest \
     FROM task GROUP BY task_type, status \
     UNION ALL \
     SELECT task_type, status, count(*), NULL FROM task_history GROUP BY task_type, status";

// The live half of TASK_STATS: the queue's gauges, sampled on a timer.
// The live table stays small whatever the history holds.
const TASK_QUEUE_SAMPLE: &str = "SELECT task_type, status, count(*) AS n, \
       EXTRACT(EPOCH FROM now() - min(scheduled_for) \
         FILTER (WHERE status = 'pending' AND scheduled_for <= now()))::float8 AS oldest \
     FROM task GROUP BY task_type, status";

/// How far before a task's creation its completion may lie, by the clocks
/// involved: the id's time is a node's clock, the completion the
/// database's.
const CLOCK_MARGIN: Duration = Duration::from_secs(24 * 3600);

/// A lower bound of the completion time of the tasks `ids`, so that a read
/// searches only the history's days since they were created: ids are
/// UUIDv7, whose first 48 bits are their creation time (on the node that
/// made them). An id of another version bounds nothing.
fn history_bound(ids: &[Uuid]) -> SystemTime {
    ids.iter()
        .map(|id| match id.get_timestamp() {
            Some(ts) if id.get_version_num() == 7 => {
                let (secs, nanos) = ts.to_unix();
                (SystemTime::UNIX_EPOCH + Duration::new(secs, nanos))
                    .checked_sub(CLOCK_MARGIN)
                    .unwrap_or(SystemTime::UNIX_EPOCH)
            }
            _ => SystemTime::UNIX_EPOCH,
        })
        .min()
        .unwrap_or(SystemTime::UNIX_EPOCH)
        .max(SystemTime::UNIX_EPOCH)
}

/// Reads one task, live or finished. A finished task is searched among the
/// days since its creation first, then, should a clock have been off by
/// more than a day, among all.
pub(super) async fn task_read(
    client: &deadpool_postgres::Object,
    id: Uuid,
) -> Result<Option<Task>> {
    let stmt = client.prepare_cached(TASK_GET).await?;
    let bound = history_bound(&[id]);
    if let Some(row) = client.query_opt(&stmt, &[&id, &bound]).await? {
        return Ok(Some(task_from_row(&row)?));
    }
    if bound == SystemTime::UNIX_EPOCH {
        return Ok(None);
    }
    client
        .query_opt(&stmt, &[&id, &SystemTime::UNIX_EPOCH])
        .await?
        .as_ref()
        .map(task_from_row)
        .transpose()
}

/// Reads tasks by id, live or finished, as [`task_read`] does; the ones not
/// found are missing from the answer.
pub(super) async fn task_read_many(
    client: &deadpool_postgres::Object,
    ids: &[Uuid],
) -> Result<Vec<Task>> {
    let stmt = client.prepare_cached(TASK_GET_MANY).await?;
    let bound = history_bound(ids);
    let mut tasks = tasks_from_rows(&client.query(&stmt, &[&ids, &bound]).await?)?;
    if tasks.len() < ids.len() && bound != SystemTime::UNIX_EPOCH {
        let found: std::collections::HashSet<Uuid> = tasks.iter().map(|t| t.id).collect();
        let missing: Vec<Uuid> = ids
            .iter()
            .filter(|id| !found.contains(id))
            .copied()
            .collect();
        let rows = client
            .query(&stmt, &[&missing, &SystemTime::UNIX_EPOCH])
            .await?;
        tasks.extend(tasks_from_rows(&rows)?);
    }
    Ok(tasks)
}

/// Rows deleted per purge statement: bounded so one pass never locks much.
const PURGE_BATCH: i64 = 1000;

impl Store {
    /// Inserts one task, or returns the live task holding its dedup key.
    /// With `announce`, the creation's events are sent in its transaction.
    pub(crate) async fn task_insert(
        &self,
        new: &NewTask,
        announce: Option<Announce<'_>>,
    ) -> Result<Created> {
        if announce.is_some() {
            let mut created = self
                .task_insert_many(std::slice::from_ref(new), announce)
                .await?;
            return created
                .pop()
                .ok_or_else(|| Error::Other("insert returned no task".into()));
        }
        let client = self.client().await?;
        let insert = client.prepare_cached(TASK_INSERT).await?;
        // The loop only repeats if the task holding the key finished between
        // our insert and our read: then the next insert goes through.
        for _ in 0..5 {
            let rows = client
                .query(
                    &insert,
                    &[
                        &new.id,
                        &new.task_type,
                        &new.params,
                        &new.priority,
                        &new.max_attempts,
                        &new.scheduled_for,
                        &new.library_id,
                        &new.series_id,
                        &new.book_id,
                        &new.dedup_key,
                    ],
                )
                .await?;
            if let Some(row) = rows.first() {
                return Ok(Created {
                    task: task_from_row(row)?,
                    deduplicated: false,
                });
            }
            let keys = vec![new.dedup_key.clone()];
            let rows = client.query(TASK_GET_LIVE_BY_DEDUP, &[&keys]).await?;
            if let Some(row) = rows.first() {
                return Ok(Created {
                    task: task_from_row(row)?,
                    deduplicated: true,
                });
            }
        }
        Err(Error::Conflict(
            "dedup key kept changing hands; try again".into(),
        ))
    }

    /// Inserts many tasks in one transaction and one statement. Results come
    /// in input order; entries whose dedup key is already held by a live task
    /// (or by an earlier entry of the same batch) return that task.
    ///
    /// With `announce`, the events of the new tasks are sent in the same
    /// transaction.
    pub(crate) async fn task_insert_many(
        &self,
        news: &[NewTask],
        announce: Option<Announce<'_>>,
    ) -> Result<Vec<Created>> {
        let mut client = self.client().await?;
        let ids: Vec<Uuid> = news.iter().map(|n| n.id).collect();
        let types: Vec<&str> = news.iter().map(|n| n.task_type.as_str()).collect();
        let params: Vec<&serde_json::Value> = news.iter().map(|n| &n.params).collect();
        let priorities: Vec<i32> = news.iter().map(|n| n.priority).collect();
        let max_attempts: Vec<i32> = news.iter().map(|n| n.max_attempts).collect();
        let scheduled: Vec<Option<SystemTime>> = news.iter().map(|n| n.scheduled_for).collect();
        let libraries: Vec<Option<Uuid>> = news.iter().map(|n| n.library_id).collect();
        let series: Vec<Option<Uuid>> = news.iter().map(|n| n.series_id).collect();
        let books: Vec<Option<Uuid>> = news.iter().map(|n| n.book_id).collect();
        let keys: Vec<Option<&str>> = news.iter().map(|n| n.dedup_key.as_deref()).collect();

        for _ in 0..5 {
            let tx = client.transaction().await?;
            let insert = tx.prepare_cached(TASK_INSERT_MANY).await?;
            let rows = tx
                .query(
                    &insert,
                    &[
                        &ids,
                        &types,
                        &params,
                        &priorities,
                        &max_attempts,
                        &scheduled,
                        &libraries,
                        &series,
                        &books,
                        &keys,
                    ],
                )
                .await?;
            let mut inserted: HashMap<Uuid, Task> = HashMap::with_capacity(rows.len());
            for row in &rows {
                let task = task_from_row(row)?;
                inserted.insert(task.id, task);
            }
            let mut by_key: HashMap<String, Task> = HashMap::new();
            if inserted.len() < news.len() {
                let missing: Vec<&str> = news
                    .iter()
                    .filter(|n| !inserted.contains_key(&n.id))
                    .filter_map(|n| n.dedup_key.as_deref())
                    .collect();
                for row in tx.query(TASK_GET_LIVE_BY_DEDUP, &[&missing]).await? {
                    let task = task_from_row(&row)?;
                    if let Some(key) = task.dedup_key.clone() {
                        by_key.insert(key, task);
                    }
                }
            }
            let mut results = Vec::with_capacity(news.len());
            for new in news {
                if let Some(task) = inserted.remove(&new.id) {
                    results.push(Created {
                        task,
                        deduplicated: false,
                    });
                } else if let Some(task) = new.dedup_key.as_ref().and_then(|k| by_key.get(k)) {
                    results.push(Created {
                        task: task.clone(),
                        deduplicated: true,
                    });
                } else {
                    // The holder of a key finished between insert and read.
                    break;
                }
            }
            if results.len() == news.len() {
                if let Some(announce) = announce {
                    let fresh: Vec<Task> = results
                        .iter()
                        .filter(|c| !c.deduplicated)
                        .map(|c| c.task.clone())
                        .collect();
                    for payload in announce(&fresh) {
                        tx.execute(NOTIFY, &[&Channel::Event.name(), &payload])
                            .await?;
                    }
                }
                tx.commit().await?;
                return Ok(results);
            }
            tx.rollback().await?;
        }
        Err(Error::Conflict(
            "dedup keys kept changing hands; try again".into(),
        ))
    }

    /// Reads one task, live or finished.
    pub(crate) async fn task_get(&self, id: Uuid) -> Result<Option<Task>> {
        let client = self.client().await?;
        task_read(&client, id).await
    }

    /// Cancels a pending or processing task. `Err(task)` in the inner result
    /// when the task is already terminal.
    pub(crate) async fn task_cancel(
        &self,
        id: Uuid,
        reason: Option<&str>,
    ) -> Result<Option<std::result::Result<Task, Task>>> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(TASK_CANCEL).await?;
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&id, &reason];
        let row = self
            .write_retried(|| client.query_opt(&stmt, &params))
            .await?;
        if let Some(row) = row {
            return Ok(Some(Ok(task_from_row(&row)?)));
        }
        self.current(&client, id).await
    }

    /// Puts a failed or cancelled task back to pending with attempts reset.
    /// `Err(task)` in the inner result when the task is in another state.
    pub(crate) async fn task_retry(
        &self,
        id: Uuid,
    ) -> Result<Option<std::result::Result<Task, Task>>> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(TASK_RETRY).await?;
        if let Some(row) = client.query_opt(&stmt, &[&id]).await? {
            return Ok(Some(Ok(task_from_row(&row)?)));
        }
        self.current(&client, id).await
    }

    async fn current(
        &self,
        client: &deadpool_postgres::Object,
        id: Uuid,
    ) -> Result<Option<std::result::Result<Task, Task>>> {
        Ok(task_read(client, id).await?.map(Err))
    }

    /// One page of tasks, newest first.
    pub(crate) async fn task_list(&self, filter: &ListFilter) -> Result<Page> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(TASK_LIST).await?;
        let statuses: Vec<&str> = filter.statuses.iter().map(|s| s.as_str()).collect();
        // One extra row tells whether another page follows.
        let rows = client
            .query(
                &stmt,
                &[
                    &statuses,
                    &filter.task_types,
                    &filter.library_id,
                    &filter.series_id,
                    &filter.book_id,
                    &filter.before_id,
                    &(filter.limit + 1),
                ],
            )
            .await?;
        let mut tasks = tasks_from_rows(&rows)?;
        let next_id = if tasks.len() as i64 > filter.limit {
            tasks.truncate(filter.limit as usize);
            tasks.last().map(|t| t.id)
        } else {
            None
        };
        Ok(Page { tasks, next_id })
    }

    /// Deletes terminal tasks finished before `before` (now when `None`), in
    /// batches; returns how many were deleted.
    pub(crate) async fn task_purge(
        &self,
        statuses: &[Status],
        before: Option<SystemTime>,
    ) -> Result<i64> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(TASK_PURGE).await?;
        let statuses: Vec<&str> = statuses.iter().map(|s| s.as_str()).collect();
        let mut deleted = 0i64;
        loop {
            let n = client
                .execute(&stmt, &[&statuses, &before, &PURGE_BATCH])
                .await? as i64;
            deleted += n;
            if n < PURGE_BATCH {
                return Ok(deleted);
            }
        }
    }

    /// Live tasks per type and status, each with the age of its oldest due
    /// pending task (`None` for processing, or when none is due).
    pub(crate) async fn task_queue_sample(
        &self,
    ) -> Result<Vec<(String, Status, i64, Option<Duration>)>> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(TASK_QUEUE_SAMPLE).await?;
        client
            .query(&stmt, &[])
            .await?
            .iter()
            .map(|row| {
                let status: &str = row.try_get("status")?;
                let status = Status::parse(status)
                    .ok_or_else(|| Error::Other(format!("unknown task status {status:?}")))?;
                Ok((
                    row.try_get("task_type")?,
                    status,
                    row.try_get("n")?,
                    seconds_to_duration(row.try_get("oldest")?),
                ))
            })
            .collect()
    }

    /// Counts per type and status, computed by the database.
    pub(crate) async fn task_stats(&self) -> Result<Stats> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(TASK_STATS).await?;
        let rows = client.query(&stmt, &[]).await?;
        let mut totals = Counts::default();
        let mut oldest_overall: Option<Duration> = None;
        let mut by_type: std::collections::BTreeMap<String, TypeStats> = Default::default();
        for row in rows {
            let task_type: String = row.try_get("task_type")?;
            let status: &str = row.try_get("status")?;
            let status = Status::parse(status)
                .ok_or_else(|| Error::Other(format!("unknown task status {status:?}")))?;
            let n: i64 = row.try_get("n")?;
            let oldest = seconds_to_duration(row.try_get("oldest")?);
            totals.add(status, n);
            oldest_overall = oldest_overall.max(oldest);
            let entry = by_type.entry(task_type.clone()).or_insert(TypeStats {
                task_type,
                counts: Counts::default(),
                oldest_due_pending_age: None,
            });
            entry.counts.add(status, n);
            entry.oldest_due_pending_age = entry.oldest_due_pending_age.max(oldest);
        }
        Ok(Stats {
            totals,
            task_types: by_type.into_values().collect(),
            oldest_due_pending_age: oldest_overall,
        })
    }
}
