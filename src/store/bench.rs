//! Statements the benchmarks run around a node rather than through it:
//! seeding a history of finished tasks, counting it, and deleting the
//! tasks of a run. Never used by a node.

use super::{Result, Store};

/// Inserts finished (completed) tasks of a type into today's history, in
/// one statement.
const TASK_SEED_FINISHED: &str = "INSERT INTO task_history (id, seq, task_type, status, \
       priority, attempts, max_attempts, scheduled_for, created_at, started_at, \
       completed_at, locked_by, lease_token, params, result) \
     SELECT gen_random_uuid(), n, $1, 'completed', 0, 1, 3, now(), now(), now(), now(), \
       'bench-preexisting', gen_random_uuid(), '{}'::jsonb, '{}'::jsonb \
     FROM generate_series(1, $2::int8) AS n";

const TASK_COUNT_FINISHED: &str = "SELECT count(*) FROM task_history";

const TASK_DELETE_TYPE: &str = "WITH live AS (DELETE FROM task WHERE task_type = $1 RETURNING 1), \
       finished AS (DELETE FROM task_history WHERE task_type = $1 RETURNING 1) \
     SELECT (SELECT count(*) FROM live) + (SELECT count(*) FROM finished)";

const TASK_DELETE_UNFINISHED: &str =
    "DELETE FROM task WHERE task_type = $1 AND status IN ('pending', 'processing')";

/// Updates of the live table, and how many of them were heap-only (HOT):
/// written in place, with no index entry.
const TASK_UPDATE_COUNTS: &str = "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables \
     WHERE relid = 'task'::regclass";

/// Every statement of this module, for the preparation test.
#[cfg(test)]
pub(super) const STATEMENTS: &[&str] = &[
    TASK_SEED_FINISHED,
    TASK_COUNT_FINISHED,
    TASK_DELETE_TYPE,
    TASK_DELETE_UNFINISHED,
    TASK_UPDATE_COUNTS,
];

impl Store {
    /// Inserts `count` completed tasks of `task_type` into the history,
    /// then vacuums and analyzes it so that what follows sees it as a
    /// long-lived history would be (statistics, visibility map, hint bits).
    /// Returns how many rows were inserted.
    pub(crate) async fn bench_seed_finished(&self, task_type: &str, count: u64) -> Result<u64> {
        let client = self.client().await?;
        let count = i64::try_from(count).unwrap_or(i64::MAX);
        let inserted = client
            .execute(TASK_SEED_FINISHED, &[&task_type, &count])
            .await?;
        client
            .batch_execute("VACUUM (ANALYZE) task_history")
            .await?;
        Ok(inserted)
    }

    /// How many finished tasks the table holds.
    pub(crate) async fn bench_count_finished(&self) -> Result<u64> {
        let client = self.client().await?;
        let row = client.query_one(TASK_COUNT_FINISHED, &[]).await?;
        Ok(row.try_get::<_, i64>(0)? as u64)
    }

    /// Deletes the tasks of `task_type` (only the pending and processing
    /// ones with `unfinished_only`); returns how many there were. After a
    /// full delete the table is vacuumed: without it, the next run's claims
    /// would walk the deleted rows' index entries until a node got to them.
    pub(crate) async fn bench_delete_type(
        &self,
        task_type: &str,
        unfinished_only: bool,
    ) -> Result<u64> {
        let client = self.client().await?;
        if unfinished_only {
            return Ok(client
                .execute(TASK_DELETE_UNFINISHED, &[&task_type])
                .await?);
        }
        let row = client.query_one(TASK_DELETE_TYPE, &[&task_type]).await?;
        client.batch_execute("VACUUM (SKIP_LOCKED) task").await?;
        Ok(row.try_get::<_, i64>(0)? as u64)
    }

    /// Updates of the live table since its statistics were reset, and how
    /// many were heap-only, as far as the database's backends have
    /// published them (each does within a second or so of its work).
    pub(crate) async fn bench_update_counts(&self) -> Result<(u64, u64)> {
        let client = self.client().await?;
        let row = client.query_one(TASK_UPDATE_COUNTS, &[]).await?;
        Ok((
            row.try_get::<_, i64>(0)? as u64,
            row.try_get::<_, i64>(1)? as u64,
        ))
    }
}
