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
];

const TASK_INSERT: &str = concat!(
    "INSERT INTO task (id, task_type, params, priority, max_attempts, scheduled_for, \
     library_id, series_id, book_id, dedup_key) \
     VALUES ($1, $2, $3, $4, $5, COALESCE($6, now()), $7, $8, $9, $10) \
     ON CONFLICT (dedup_key) WHERE dedup_key IS NOT NULL AND status IN ('pending', 'processing') \
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
     ON CONFLICT (dedup_key) WHERE dedup_key IS NOT NULL AND status IN ('pending', 'processing') \
     DO NOTHING RETURNING ",
    columns!()
);

pub(super) const TASK_GET: &str = concat!("SELECT ", columns!(), " FROM task WHERE id = $1");

pub(super) const TASK_GET_MANY: &str = concat!(
    "SELECT ",
    columns!(),
    " FROM task WHERE id = ANY($1::uuid[])"
);

const TASK_GET_LIVE_BY_DEDUP: &str = concat!(
    "SELECT ",
    columns!(),
    " FROM task WHERE dedup_key = ANY($1::text[]) AND status IN ('pending', 'processing')"
);

const TASK_CANCEL: &str = concat!(
    "UPDATE task SET status = 'cancelled', completed_at = now(), locked_until = NULL, \
       last_error = COALESCE($2, last_error) \
     WHERE id = $1 AND status IN ('pending', 'processing') \
     RETURNING ",
    columns!()
);

const TASK_RETRY: &str = concat!(
    "UPDATE task SET status = 'pending', attempts = 0, scheduled_for = now(), \
       completed_at = NULL, locked_by = NULL, locked_until = NULL, lease_token = NULL, \
       result = NULL \
     WHERE id = $1 AND status IN ('failed', 'cancelled') \
     RETURNING ",
    columns!()
);

const TASK_LIST: &str = concat!(
    "SELECT ",
    columns!(),
    " FROM task \
     WHERE (cardinality($1::text[]) = 0 OR status = ANY($1::text[])) \
       AND (cardinality($2::text[]) = 0 OR task_type = ANY($2::text[])) \
       AND ($3::uuid IS NULL OR library_id = $3) \
       AND ($4::uuid IS NULL OR series_id = $4) \
       AND ($5::uuid IS NULL OR book_id = $5) \
       AND ($6::uuid IS NULL OR id < $6) \
     ORDER BY id DESC LIMIT $7"
);

const TASK_PURGE: &str = "WITH doomed AS ( \
       SELECT id FROM task \
       WHERE status = ANY($1::text[]) AND completed_at < COALESCE($2, now()) \
       ORDER BY completed_at LIMIT $3 FOR UPDATE SKIP LOCKED) \
     DELETE FROM task t USING doomed WHERE t.id = doomed.id";

const TASK_STATS: &str = "SELECT task_type, status, count(*) AS n, \
       EXTRACT(EPOCH FROM now() - min(scheduled_for) \
         FILTER (WHERE status = 'pending' AND scheduled_for <= now()))::float8 AS oldest \
     FROM task GROUP BY task_type, status";

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

    /// Reads one task.
    pub(crate) async fn task_get(&self, id: Uuid) -> Result<Option<Task>> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(TASK_GET).await?;
        client
            .query_opt(&stmt, &[&id])
            .await?
            .as_ref()
            .map(task_from_row)
            .transpose()
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
        if let Some(row) = client.query_opt(&stmt, &[&id, &reason]).await? {
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
        let stmt = client.prepare_cached(TASK_GET).await?;
        Ok(match client.query_opt(&stmt, &[&id]).await? {
            Some(row) => Some(Err(task_from_row(&row)?)),
            None => None,
        })
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
