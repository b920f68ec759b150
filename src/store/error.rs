//! Store errors and the one place that maps Postgres and pool failures to
//! them.

use tokio_postgres::error::SqlState;

/// What can go wrong talking to the database.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum Error {
    /// The database cannot be reached, is restarting, or no connection was
    /// free in time. Safe to retry.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// A unique constraint was violated.
    #[error("conflict: {0}")]
    Conflict(String),
    /// Anything else: a bug or an unexpected database state.
    #[error("database error: {0}")]
    Other(String),
}

impl From<tokio_postgres::Error> for Error {
    fn from(err: tokio_postgres::Error) -> Self {
        // "db error" alone says nothing: keep the server's message (for the
        // log; clients never see it).
        let detail = match err.as_db_error() {
            Some(db) => format!("{}: {}", db.code().code(), db),
            None => crate::error::chain(&err),
        };
        let Some(code) = err.code() else {
            // No SQLSTATE: the connection broke, timed out or never opened.
            return Error::Unavailable(detail);
        };
        if *code == SqlState::UNIQUE_VIOLATION {
            return Error::Conflict(detail);
        }
        // Class 08 (connection exception), 53 (insufficient resources) and
        // 57P0x (shutdown, restart) all mean: try again later.
        let class = &code.code()[..2];
        // Deadlocks and serialization failures are worth a retry too, and so
        // is a statement cancelled by `statement_timeout` (stuck behind a
        // lock, most likely: the lock holder is gone by the next try).
        if class == "08"
            || *code == SqlState::QUERY_CANCELED
            || class == "53"
            || class == "40"
            || *code == SqlState::ADMIN_SHUTDOWN
            || *code == SqlState::CRASH_SHUTDOWN
            || *code == SqlState::CANNOT_CONNECT_NOW
            || *code == SqlState::READ_ONLY_SQL_TRANSACTION
        {
            return Error::Unavailable(detail);
        }
        if err.is_closed() {
            return Error::Unavailable(detail);
        }
        Error::Other(detail)
    }
}

impl From<deadpool_postgres::PoolError> for Error {
    fn from(err: deadpool_postgres::PoolError) -> Self {
        match err {
            deadpool_postgres::PoolError::Backend(err) => err.into(),
            other => Error::Unavailable(other.to_string()),
        }
    }
}
