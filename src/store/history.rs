//! The history's partitions: one per status and UTC day, named
//! `task_history_<status>_<yyyymmdd>` (migration V6 made the first ones).
//!
//! Days are created ahead, so that a task finishing at any moment finds its
//! day, and dropped whole once older than their status' retention. Both are
//! done without blocking the tasks finishing meanwhile: a day is created as
//! a table of its own and then attached (a lock that does not conflict with
//! inserts, where `CREATE TABLE ... PARTITION OF` would wait for every
//! running insert and hold up the ones after it), and dropped only after it
//! is detached `CONCURRENTLY`. Nodes take turns on an advisory lock, so two
//! never create or drop the same day at once.

use std::time::{Duration, SystemTime};

use super::{Error, Result, Store};
use crate::model::Status;

/// The advisory lock nodes take turns on for partition upkeep ("lhhist").
const HISTORY_LOCK: i64 = 0x6c68_6869_7374;

/// The statuses of the history, each a partitioned table of its days.
const STATUSES: [Status; 3] = Status::TERMINAL;

/// One day of one status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Day {
    pub(crate) status: Status,
    /// Days since 1970-01-01 (UTC).
    pub(crate) day: i64,
}

const SECONDS_PER_DAY: i64 = 86_400;

impl Day {
    /// The partition's name.
    fn table(&self) -> String {
        format!("task_history_{}_{}", self.status.as_str(), ymd(self.day))
    }

    /// When the day ends (the partition's upper bound).
    pub(crate) fn end(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(((self.day + 1) * SECONDS_PER_DAY) as u64)
    }
}

/// `yyyymmdd` of a day since 1970-01-01 (the civil calendar, UTC).
fn ymd(day: i64) -> String {
    // Howard Hinnant's days-to-civil algorithm.
    let z = day + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}{m:02}{d:02}")
}

/// The start of a day, as a timestamp literal in UTC.
fn midnight(day: i64) -> String {
    let d = ymd(day);
    format!("{}-{}-{} 00:00:00+00", &d[..4], &d[4..6], &d[6..])
}

/// The day of a partition's name, if it is one of ours.
fn parse(table: &str) -> Option<Day> {
    let rest = table.strip_prefix("task_history_")?;
    let (status, date) = rest.rsplit_once('_')?;
    let status = Status::parse(status).filter(|s| s.is_terminal())?;
    if date.len() != 8 || !date.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (y, m, d): (i64, i64, i64) = (
        date[..4].parse().ok()?,
        date[4..6].parse().ok()?,
        date[6..].parse().ok()?,
    );
    // Civil-to-days, the inverse of `ymd`.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let day = era * 146_097 + doe - 719_468;
    (ymd(day) == date).then_some(Day { status, day })
}

const HISTORY_DAYS: &str = "SELECT c.relname::text, i.inhdetachpending \
     FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
     WHERE i.inhparent = ANY(ARRAY['task_history_completed', 'task_history_failed', \
       'task_history_cancelled']::regclass[])";

// Tables of days (by their name) that are not partitions: detached, and not
// dropped after.
const HISTORY_DETACHED: &str = "SELECT c.relname::text FROM pg_class c \
     WHERE c.relkind = 'r' AND NOT c.relispartition \
       AND c.relnamespace = (SELECT oid FROM pg_namespace WHERE nspname = current_schema()) \
       AND c.relname ~ '^task_history_(completed|failed|cancelled)_[0-9]{8}$'";

const NOW: &str = "SELECT EXTRACT(EPOCH FROM now())::float8";

/// Every fixed statement of this module, so a test can prepare each one
/// against the migrated schema.
#[cfg(test)]
pub(super) const STATEMENTS: &[&str] = &[HISTORY_DAYS, HISTORY_DETACHED, NOW];

impl Store {
    /// Now, by the database clock.
    async fn history_now(&self, client: &tokio_postgres::Client) -> Result<SystemTime> {
        let secs: f64 = client.query_one(NOW, &[]).await?.try_get(0)?;
        Ok(SystemTime::UNIX_EPOCH + Duration::from_secs_f64(secs.max(0.0)))
    }

    /// The days the history has, and the tables of days that are not (or
    /// not fully) part of it any more: a detach that a node stopping half
    /// way left pending, or a detached day whose drop failed.
    async fn history_days(&self, client: &tokio_postgres::Client) -> Result<(Vec<Day>, Vec<Day>)> {
        let (mut days, mut loose) = (Vec::new(), Vec::new());
        for row in client.query(HISTORY_DAYS, &[]).await? {
            let table: String = row.try_get(0)?;
            let Some(day) = parse(&table) else {
                continue;
            };
            if row.try_get::<_, bool>(1)? {
                loose.push(day);
            } else {
                days.push(day);
            }
        }
        days.sort_by_key(|d| (d.day, d.status.as_str()));
        Ok((days, loose))
    }

    /// Makes sure every status has a partition from yesterday to `ahead`
    /// days after today (by the database clock), and drops the days of
    /// each status that ended `retention(status)` ago or longer (`None`:
    /// kept forever). Returns the days dropped. With `wait`, waits for
    /// another node doing the same and then does it too; without, skips the
    /// pass (returns nothing) while another node does it.
    ///
    /// The pass runs in a task of its own on a connection of its own: a
    /// caller that gives up never leaves a pooled connection holding the
    /// nodes' advisory lock.
    pub(crate) async fn history_upkeep(
        &self,
        ahead: i64,
        retention: impl Fn(Status) -> Option<Duration>,
        wait: bool,
    ) -> Result<Vec<Day>> {
        let keep: Vec<(Status, Option<Duration>)> =
            STATUSES.iter().map(|s| (*s, retention(*s))).collect();
        let store = self.clone();
        tokio::spawn(async move {
            let client = store.connect_dedicated(None).await?;
            let lock = if wait {
                "SELECT pg_advisory_lock($1) IS NULL"
            } else {
                "SELECT NOT pg_try_advisory_lock($1)"
            };
            let busy: bool = client.query_one(lock, &[&HISTORY_LOCK]).await?.try_get(0)?;
            if busy {
                return Ok(Vec::new());
            }
            let outcome = store.history_upkeep_locked(&client, ahead, &keep).await;
            // Closing the connection lets go of the lock.
            drop(client);
            outcome
        })
        .await
        .map_err(|err| Error::Other(format!("history upkeep stopped: {err}")))?
    }

    async fn history_upkeep_locked(
        &self,
        client: &tokio_postgres::Client,
        ahead: i64,
        keep: &[(Status, Option<Duration>)],
    ) -> Result<Vec<Day>> {
        let now = self.history_now(client).await?;
        let today = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64 / SECONDS_PER_DAY);
        let (existing, loose) = self.history_days(client).await?;
        // The days ahead first: nothing below may keep tasks from finding
        // theirs.
        for status in STATUSES {
            for day in today - 1..=today + ahead {
                let day = Day { status, day };
                if !existing.contains(&day) {
                    self.history_create(client, &day).await?;
                }
            }
        }
        let retention = |status: Status| keep.iter().find(|(s, _)| *s == status).and_then(|k| k.1);
        let mut dropped = Vec::new();
        let mut failed = None;
        // A day left half detached or detached but not dropped by a node
        // that stopped (or failed) half way is finished off.
        for day in &loose {
            if let Err(err) = self.history_finish_drop(client, day).await {
                tracing::warn!(partition = %day.table(), error = %err, "cannot finish dropping a history day");
                failed.get_or_insert(err);
            }
        }
        for table in self.history_detached(client).await? {
            let Some(day) = parse(&table) else { continue };
            let past = retention(day.status).is_some_and(|keep| day.end() + keep <= now);
            if past {
                match client.batch_execute(&format!("DROP TABLE {table}")).await {
                    Ok(()) => tracing::info!(partition = %table, "detached history day dropped"),
                    Err(err) => {
                        tracing::warn!(partition = %table, error = %err, "cannot drop a detached history day");
                        failed.get_or_insert(err.into());
                    }
                }
            }
        }
        for day in existing {
            let Some(keep) = retention(day.status) else {
                continue;
            };
            // The day's last task finished at its end: it is kept at least
            // `keep` from then (and at most a day longer).
            if day.end() + keep <= now {
                match self.history_drop(client, &day).await {
                    Ok(()) => dropped.push(day),
                    Err(err) => {
                        tracing::warn!(partition = %day.table(), error = %err, "cannot drop a history day");
                        failed.get_or_insert(err);
                    }
                }
            }
        }
        match failed {
            Some(err) => Err(err),
            None => Ok(dropped),
        }
    }

    /// The tables named as days of the history that are not attached to it.
    async fn history_detached(&self, client: &tokio_postgres::Client) -> Result<Vec<String>> {
        let rows = client.query(HISTORY_DETACHED, &[]).await?;
        rows.iter().map(|row| Ok(row.try_get(0)?)).collect()
    }

    /// Finishes a detach that was left pending, and drops the day.
    async fn history_finish_drop(&self, client: &tokio_postgres::Client, day: &Day) -> Result<()> {
        let table = day.table();
        let parent = format!("task_history_{}", day.status.as_str());
        client
            .batch_execute(&format!(
                "ALTER TABLE {parent} DETACH PARTITION {table} FINALIZE"
            ))
            .await?;
        client.batch_execute(&format!("DROP TABLE {table}")).await?;
        tracing::info!(partition = %table, "history day dropped");
        Ok(())
    }

    async fn history_create(&self, client: &tokio_postgres::Client, day: &Day) -> Result<()> {
        let table = day.table();
        let parent = format!("task_history_{}", day.status.as_str());
        let (from, to) = (midnight(day.day), midnight(day.day + 1));
        // Attaching builds the day's copy of every history index on the new,
        // empty table, and checks its rows (none) against the bounds.
        client
            .batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS {table} \
                   (LIKE {parent} INCLUDING DEFAULTS INCLUDING CONSTRAINTS); \
                 ALTER TABLE {parent} ATTACH PARTITION {table} \
                   FOR VALUES FROM ('{from}') TO ('{to}')"
            ))
            .await
            .map_err(|err| match Error::from(err) {
                Error::Other(msg) => Error::Other(format!("cannot create {table}: {msg}")),
                other => other,
            })?;
        tracing::info!(partition = %table, "history day created");
        Ok(())
    }

    async fn history_drop(&self, client: &tokio_postgres::Client, day: &Day) -> Result<()> {
        let table = day.table();
        let parent = format!("task_history_{}", day.status.as_str());
        // Two statements, each in its own transaction: DETACH CONCURRENTLY
        // may not run inside one.
        client
            .batch_execute(&format!(
                "ALTER TABLE {parent} DETACH PARTITION {table} CONCURRENTLY"
            ))
            .await?;
        client.batch_execute(&format!("DROP TABLE {table}")).await?;
        tracing::info!(partition = %table, "history day dropped");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_are_named_by_their_civil_date_and_read_back() {
        assert_eq!(ymd(0), "19700101");
        assert_eq!(ymd(20_791), "20261204");
        assert_eq!(ymd(11_016), "20000229");
        for day in [0, 59, 60, 11_016, 20_791, 2_932_896] {
            let d = Day {
                status: Status::Failed,
                day,
            };
            assert_eq!(parse(&d.table()), Some(d));
        }
        assert_eq!(parse("task_history_completed_20261332"), None);
        assert_eq!(parse("task_history_pending_20261204"), None);
        assert_eq!(parse("task_history_completed"), None);
    }
}
