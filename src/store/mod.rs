//! The only module that knows Postgres: connections, migrations and every
//! SQL statement, each behind one typed function.
//!
//! It must never decide policy (who may do what, defaults, limits): callers
//! pass validated values in and get rows, counts or fencing outcomes back.
//! Time-dependent statements use the database clock (`now()`).
//!
//! - `task`: creating, reading, listing, cancelling, retrying, purging and
//!   counting tasks;
//! - `lease`: claims, heartbeats, completions, failures, releases, progress
//!   and the reclaim: every write fenced by a lease token;
//! - `row`: the columns statements return and the one row-to-task mapping;
//! - `node`: the node directory behind ListWorkers;
//! - `token`: bearer tokens, stored as hashes of their secrets;
//! - `notify`: the notification channels and the node's LISTEN connection;
//! - `bench`: what the benchmarks do to a database around a node;
//! - `error`: the one mapping of Postgres and pool failures.

mod bench;
mod error;
#[macro_use]
mod row;
mod history;
mod lease;
mod node;
mod notify;
mod task;
mod token;

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;

pub(crate) use error::Error;
pub(crate) use lease::Fenced;
pub(crate) use notify::{payloads, Channel, Listener, Notice};

/// Result of a store call.
pub(crate) type Result<T> = std::result::Result<T, Error>;

/// Turns the tasks a write produced into event payloads to send on
/// [`Channel::Event`] inside the write's own transaction.
pub(crate) type Announce<'a> = &'a (dyn Fn(&[crate::model::Task]) -> Vec<String> + Sync);

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Handle to the task store: a connection pool plus what is needed to open
/// dedicated connections (for LISTEN).
#[derive(Clone)]
pub(crate) struct Store {
    pool: Pool,
    pg_config: tokio_postgres::Config,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dbname", &self.pg_config.get_dbname())
            .field("pool", &self.pool.status())
            .finish()
    }
}

impl Store {
    /// Builds a store for `database_url`. Opens no connection yet: the pool
    /// connects on demand, so a server can start while the database is down
    /// and recovers by itself when it returns.
    ///
    /// `timeout` bounds the wait for a connection; `statement_timeout` (zero:
    /// none) every statement on every connection but the migrations'.
    pub(crate) fn new(
        database_url: &str,
        pool_size: usize,
        timeout: Duration,
        statement_timeout: Duration,
    ) -> Result<Self> {
        let mut pg_config: tokio_postgres::Config = database_url
            .parse()
            .map_err(|err| Error::Other(format!("invalid database URL: {err}")))?;
        if pg_config.get_application_name().is_none() {
            pg_config.application_name("leasehold");
        }
        // Queue statements are short and run thousands of times a second;
        // JIT compiling one (as Postgres does past a cost threshold, which a
        // 1,000-row batch crosses) costs a hundred times more than running it.
        //
        // Prepared statements are planned for their actual inputs on every
        // run. A generic plan (what Postgres settles on after five runs)
        // knows neither how many rows a batch's arrays hold nor which
        // optional filters are set, and with the statistics of a queue
        // table it can join every input row against every processing row:
        // completions ran 3-4x slower per task once 400,000 finished rows
        // were present. Planning costs tens of microseconds per statement;
        // parsing, the larger share, is still done once per connection.
        //
        // A statement stuck behind a lock (an operator's long transaction, a
        // table lock) fails after `statement_timeout` instead of holding a
        // request or a claim forever: callers retry or answer UNAVAILABLE.
        let session = format!(
            "-c jit=off -c plan_cache_mode=force_custom_plan -c statement_timeout={}",
            statement_timeout.as_millis()
        );
        let options = match pg_config.get_options() {
            Some(options) => format!("{options} {session}"),
            None => session,
        };
        pg_config.options(&options);
        pg_config
            .connect_timeout(timeout)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(10))
            // A peer that vanished without a FIN must not hold a request past
            // its deadline: unacknowledged writes fail after this long.
            .tcp_user_timeout(timeout.max(Duration::from_secs(1)));
        let manager = Manager::from_config(
            pg_config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(timeout))
            .create_timeout(Some(timeout))
            .recycle_timeout(Some(timeout))
            .build()
            .map_err(|err| Error::Other(format!("cannot build connection pool: {err}")))?;
        Ok(Self { pool, pg_config })
    }

    /// Opens a connection that is not pooled, driving it on a background
    /// task that forwards asynchronous messages (notifications) to `tx` when
    /// given. The connection closes when the returned client is dropped.
    pub(crate) async fn connect_dedicated(
        &self,
        tx: Option<tokio::sync::mpsc::UnboundedSender<tokio_postgres::Notification>>,
    ) -> Result<tokio_postgres::Client> {
        let (client, mut connection) = self.pg_config.connect(NoTls).await?;
        tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            use futures_util::StreamExt;
            while let Some(message) = messages.next().await {
                match message {
                    Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                        if let Some(tx) = &tx {
                            let _ = tx.send(n);
                        }
                    }
                    Ok(_) => {}
                    Err(err) => {
                        tracing::debug!(error = %err, "dedicated connection closed");
                        break;
                    }
                }
            }
        });
        Ok(client)
    }

    /// Creates the database named in the URL if it does not exist, by
    /// connecting to the `postgres` database with the same settings.
    pub(crate) async fn database_create_if_missing(&self) -> Result<()> {
        match self.pg_config.connect(NoTls).await {
            Ok((client, connection)) => {
                // Dropping the client makes the connection say goodbye
                // (Terminate) before it closes; dropping the connection
                // unpolled would leave "unexpected EOF" in the server's log.
                drop(client);
                let _ = connection.await;
                return Ok(());
            }
            Err(err) if err.code() == Some(&SqlState::INVALID_CATALOG_NAME) => {}
            Err(err) => return Err(err.into()),
        }
        let name = self
            .pg_config
            .get_dbname()
            .ok_or_else(|| Error::Other("database URL names no database".into()))?
            .to_owned();
        let mut admin = self.pg_config.clone();
        admin.dbname("postgres");
        let (client, connection) = admin.connect(NoTls).await?;
        let driver = tokio::spawn(connection);
        let quoted = format!("\"{}\"", name.replace('"', "\"\""));
        let created = client
            .batch_execute(&format!("CREATE DATABASE {quoted}"))
            .await;
        drop(client);
        let _ = driver.await;
        match created {
            Ok(()) => {
                tracing::info!(database = %name, "created database");
                Ok(())
            }
            // Another node created it first.
            Err(err) if err.code() == Some(&SqlState::DUPLICATE_DATABASE) => Ok(()),
            Err(err) => Err(err.into()),
        }
    }

    /// Applies pending migrations. Nodes starting together take turns on an
    /// advisory lock, so each migration runs once.
    pub(crate) async fn migrate(&self) -> Result<()> {
        self.migrate_to(refinery::Target::Latest).await
    }

    /// Applies the migrations up to `target`.
    async fn migrate_to(&self, target: refinery::Target) -> Result<()> {
        const MIGRATION_LOCK: i64 = 0x6c65_6173_6568_6f6c; // "leasehol"
        let mut client = self.connect_dedicated(None).await?;
        // A migration may rebuild an index of a large table: it runs as long
        // as it needs (and waits as long as another node migrates).
        client.batch_execute("SET statement_timeout = 0").await?;
        client
            .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
            .await?;
        let mut runner = embedded::migrations::runner().set_target(target);
        let report = runner
            .set_migration_table_name("leasehold_schema_history")
            .run_async(&mut client)
            .await;
        client
            .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
            .await?;
        let report = report.map_err(|err| Error::Other(format!("migration failed: {err}")))?;
        for migration in report.applied_migrations() {
            tracing::info!(migration = %migration, "applied migration");
        }
        Ok(())
    }

    /// Answers whether the database responds to a trivial query.
    pub(crate) async fn ping(&self) -> Result<()> {
        let client = self.pool.get().await?;
        client.simple_query("SELECT 1").await?;
        Ok(())
    }

    /// The pool now: connections in use, idle, and requests waiting for one.
    pub(crate) fn pool_usage(&self) -> (usize, usize, usize) {
        let status = self.pool.status();
        (
            status.size.saturating_sub(status.available),
            status.available,
            status.waiting,
        )
    }

    /// Dead row versions in the task table, as Postgres' statistics count
    /// them (flushed by each backend at most about once a second, and
    /// re-estimated by ANALYZE).
    pub(crate) async fn task_dead_rows(&self) -> Result<i64> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT n_dead_tup FROM pg_stat_user_tables WHERE relid = 'task'::regclass",
                &[],
            )
            .await?;
        Ok(row.map_or(0, |row| row.get(0)))
    }

    /// Vacuums and analyzes the task table, unless another session (a node,
    /// or autovacuum) is vacuuming it right now: then it returns at once.
    ///
    /// Index cleanup is forced: by default Postgres skips the indexes when
    /// under 2 % of the table's pages hold dead rows, which on a table with
    /// a large history is always, and the dead entries the claims walk in
    /// the pending indexes are the very thing this vacuum is for.
    ///
    /// It runs on a connection of its own with no statement timeout: a
    /// vacuum cancelled at the timeout would start over every time and
    /// never finish.
    pub(crate) async fn task_vacuum(&self) -> Result<()> {
        let client = self.connect_dedicated(None).await?;
        client.batch_execute("SET statement_timeout = 0").await?;
        client
            .batch_execute("VACUUM (SKIP_LOCKED, INDEX_CLEANUP ON, ANALYZE) task")
            .await?;
        Ok(())
    }

    async fn client(&self) -> Result<deadpool_postgres::Object> {
        Ok(self.pool.get().await?)
    }

    /// Prepares every statement of the store; fails on the first that the
    /// migrated schema rejects.
    #[cfg(test)]
    pub(crate) async fn statements_prepare(&self) -> Result<()> {
        let client = self.client().await?;
        for sql in task::STATEMENTS
            .iter()
            .chain(lease::STATEMENTS)
            .chain(node::STATEMENTS)
            .chain(notify::STATEMENTS)
            .chain(bench::STATEMENTS)
            .chain(history::STATEMENTS)
            .chain(token::STATEMENTS)
        {
            client.prepare(sql).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
