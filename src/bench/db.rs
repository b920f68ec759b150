//! Direct SQL for what a scenario does around the server rather than
//! through it: seeding finished rows, counting them, and removing the
//! pending tasks of a run that no worker will ever take.

use super::error::{Context, Error, Result};
use tokio_postgres::NoTls;

/// Statuses of finished tasks.
const FINISHED: &str = "('completed', 'failed', 'cancelled')";

/// A connection to `database_url`, driven on a background task.
pub(crate) async fn connect(database_url: &str) -> Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(database_url, NoTls)
        .await
        .context("cannot connect to the database")?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::debug!(error = %err, "bench database connection closed");
        }
    });
    Ok(client)
}

/// Inserts `count` completed tasks of `task_type` in one statement, then
/// vacuums and analyzes the table so that the run that follows sees it as a
/// long-lived table would be (statistics, visibility map, hint bits).
pub(crate) async fn insert_finished(
    client: &tokio_postgres::Client,
    task_type: &str,
    count: u64,
) -> Result<()> {
    let inserted = client
        .execute(
            "INSERT INTO task (id, task_type, status, attempts, started_at, completed_at, \
               locked_by, lease_token, result) \
             SELECT gen_random_uuid(), $1, 'completed', 1, now(), now(), \
               'bench-preexisting', gen_random_uuid(), '{}'::jsonb \
             FROM generate_series(1, $2::int8)",
            &[&task_type, &(count as i64)],
        )
        .await
        .context("cannot insert the finished rows")?;
    if inserted != count {
        return Err(Error::Scenario(format!(
            "inserted {inserted} of {count} rows"
        )));
    }
    client
        .batch_execute("VACUUM (ANALYZE) task")
        .await
        .context("cannot vacuum the task table")?;
    Ok(())
}

/// How many finished tasks the table holds.
pub(crate) async fn count_finished(client: &tokio_postgres::Client) -> Result<u64> {
    let row = client
        .query_one(
            &format!("SELECT count(*) FROM task WHERE status IN {FINISHED}"),
            &[],
        )
        .await
        .context("cannot count the finished rows")?;
    Ok(row.get::<_, i64>(0) as u64)
}

/// Deletes every task of `task_type` and vacuums what that left behind;
/// returns how many there were. Without the vacuum, the next run's claims
/// would walk the deleted rows' index entries until a node got to them.
pub(crate) async fn delete_type(client: &tokio_postgres::Client, task_type: &str) -> Result<u64> {
    let deleted = client
        .execute("DELETE FROM task WHERE task_type = $1", &[&task_type])
        .await
        .with_context(|| format!("cannot delete the tasks of {task_type}"))?;
    client
        .batch_execute("VACUUM (SKIP_LOCKED) task")
        .await
        .context("cannot vacuum the task table")?;
    Ok(deleted)
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
        let client = connect(database_url).await?;
        client
            .execute(
                "DELETE FROM task WHERE task_type = $1 AND status IN ('pending', 'processing')",
                &[&task_type],
            )
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
    let client = match connect(database_url).await {
        Ok(client) => client,
        Err(err) if insert == 0 => {
            tracing::warn!(error = err.to_string(), "cannot count the finished rows");
            return Ok(None);
        }
        Err(err) => return Err(err),
    };
    if insert > 0 {
        let started = tokio::time::Instant::now();
        insert_finished(
            &client,
            &super::producer::unique_task_type("preexisting"),
            insert,
        )
        .await
        .context("--preexisting-finished")?;
        tracing::info!(
            rows = insert,
            took_ms = super::report::millis(started.elapsed()),
            "finished rows inserted and vacuumed"
        );
    }
    match count_finished(&client).await {
        Ok(n) => Ok(Some(n)),
        Err(err) => {
            tracing::warn!(error = err.to_string(), "cannot count the finished rows");
            Ok(None)
        }
    }
}
