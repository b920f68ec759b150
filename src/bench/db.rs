//! What a scenario does to the database around the server rather than
//! through it (seeding finished rows, counting them, removing the tasks of
//! a run), through the store's own statements.

use std::time::Duration;

use super::error::{Context, Error, Result};
use crate::store::Store;

/// A store over `database_url` with one connection, opened on first use.
/// Its statements have no time limit: seeding a million finished rows, or
/// deleting them, takes as long as it takes.
pub(crate) fn connect(database_url: &str) -> Result<Store> {
    Store::new(database_url, 1, Duration::from_secs(10), Duration::ZERO)
        .context("cannot connect to the database")
}

/// Deletes every task of `task_type` and vacuums what that left behind;
/// returns how many there were.
pub(crate) async fn delete_type(database_url: &str, task_type: &str) -> Result<u64> {
    connect(database_url)?
        .bench_delete_type(task_type, false)
        .await
        .with_context(|| format!("cannot delete the tasks of {task_type}"))
}

/// Runs `measure` with a task type unique to this run of `scenario`; if it
/// fails, the run's unfinished tasks are deleted ([`tidy`]).
pub(crate) async fn with_own_task_type<T, Fut>(
    scenario: &str,
    database_url: &str,
    measure: impl FnOnce(String) -> Fut,
) -> Result<T>
where
    Fut: std::future::Future<Output = Result<T>>,
{
    let task_type = super::producer::unique_task_type(scenario);
    let outcome = measure(task_type.clone()).await;
    if outcome.is_err() {
        tidy(database_url, &task_type).await;
    }
    outcome
}

/// After a failed run: deletes the tasks of `task_type` that are not
/// finished, so that no later claim has to step over them. Best effort: a
/// failure is only logged.
pub(crate) async fn tidy(database_url: &str, task_type: &str) {
    let deleted = async {
        connect(database_url)?
            .bench_delete_type(task_type, true)
            .await
            .context("cannot delete them")
    }
    .await;
    match deleted {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            task_type,
            tasks = n,
            "unfinished tasks of the failed run deleted"
        ),
        Err(err) => tracing::warn!(
            task_type,
            error = err.to_string(),
            "cannot delete the unfinished tasks of the failed run"
        ),
    }
}

/// Inserts the `--preexisting-finished` rows if asked, then counts the
/// finished rows of the table. A database that cannot be read only makes
/// the count unknown, unless rows were to be inserted.
pub(crate) async fn history(database_url: &str, insert: u64) -> Result<Option<u64>> {
    let store = connect(database_url)?;
    if insert > 0 {
        let started = tokio::time::Instant::now();
        let inserted = store
            .bench_seed_finished(&super::producer::unique_task_type("preexisting"), insert)
            .await
            .context("cannot insert the finished rows")
            .context("--preexisting-finished")?;
        if inserted != insert {
            return Err(Error::Scenario(format!(
                "--preexisting-finished: inserted {inserted} of {insert} rows"
            )));
        }
        tracing::info!(
            rows = insert,
            took_ms = super::report::millis(started.elapsed()),
            "finished rows inserted and vacuumed"
        );
    }
    match store.bench_count_finished().await {
        Ok(n) => Ok(Some(n)),
        Err(err) => {
            tracing::warn!(error = %err, "cannot count the finished rows");
            Ok(None)
        }
    }
}

/// Updates of the live table so far, and how many of them were HOT; `None`
/// (and a warning) if the database cannot be read.
pub(crate) async fn update_counts(database_url: &str) -> Option<UpdateCounts> {
    let counts = async {
        connect(database_url)?
            .bench_update_counts()
            .await
            .context("cannot read the table statistics")
    }
    .await;
    match counts {
        Ok((updates, hot)) => Some(UpdateCounts { updates, hot }),
        Err(err) => {
            tracing::warn!(error = %err, "cannot read the live table's update counts");
            None
        }
    }
}

/// Updates of the live table (claims, renewals, progress, retries), and how
/// many were heap-only (written in place, no index entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct UpdateCounts {
    pub(crate) updates: u64,
    pub(crate) hot: u64,
}

impl UpdateCounts {
    /// What happened between `before` and `after`.
    pub(crate) fn between(before: Option<Self>, after: Option<Self>) -> Option<Self> {
        let (before, after) = (before?, after?);
        Some(Self {
            updates: after.updates.saturating_sub(before.updates),
            hot: after.hot.saturating_sub(before.hot),
        })
    }

    /// The table row: `updates N (HOT M, x %)`.
    pub(crate) fn describe(counts: Option<Self>) -> String {
        match counts {
            Some(c) if c.updates > 0 => format!(
                "{} ({} HOT, {:.1} %)",
                c.updates,
                c.hot,
                100.0 * c.hot as f64 / c.updates as f64
            ),
            Some(c) => format!("{} (none HOT)", c.updates),
            None => "unknown".to_owned(),
        }
    }
}
