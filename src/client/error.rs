//! Why a client call failed: [`Error`], and [`CreateManyError`] for a
//! `create_many` that stopped part way.

use crate::proto;

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server address does not parse as a URI.
    #[error("invalid server address {address:?}: {source}")]
    InvalidAddress {
        /// The address as given.
        address: String,
        /// What the parser said.
        source: tonic::transport::Error,
    },
    /// No connection could be made to the server.
    #[error("cannot connect to {address}: {source}")]
    Connect {
        /// The address as given.
        address: String,
        /// What the transport said.
        source: tonic::transport::Error,
    },
    /// A builder was given a setting that cannot work; the message names it.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// The server answered with an error status. Boxed: a `Status` is large
    /// and errors are rare.
    #[error("{}: {}", .0.code(), .0.message())]
    Status(Box<tonic::Status>),
    /// A value the server sent could not be read (e.g. a result that is not
    /// valid JSON).
    #[error("invalid answer from the server: {0}")]
    InvalidAnswer(String),
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        Error::Status(Box::new(status))
    }
}

impl Error {
    /// The gRPC status, when the server answered with one.
    pub fn status(&self) -> Option<&tonic::Status> {
        match self {
            Error::Status(status) => Some(status),
            _ => None,
        }
    }
}

/// The result of a client call.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why [`Client::create_many`](super::Client::create_many) stopped, with what it had created by then.
///
/// Displays as its [`error`](CreateManyError::error), followed by how many
/// tasks were created before the failed call when there were any.
#[derive(Debug)]
pub struct CreateManyError {
    /// The results of the calls that succeeded, in input order: those of
    /// the first `created.len()` entries of the input. Empty when the
    /// first call failed or the input was refused before any call.
    pub created: Vec<proto::CreateTaskResponse>,
    /// Why the next call failed (or, with `created` empty, why the input
    /// was refused before any call). Entries after that call's were not
    /// sent.
    pub error: Error,
}

impl CreateManyError {
    /// The entry an INVALID_ARGUMENT names (`tasks[3].params: ...`), as
    /// its index in the whole input, with the rest of the message
    /// (`params: ...`). `None` for other errors.
    pub fn invalid_entry(&self) -> Option<(usize, &str)> {
        let status = self.error.status()?;
        if status.code() != tonic::Code::InvalidArgument {
            return None;
        }
        let rest = status.message().strip_prefix("tasks[")?;
        let (index, rest) = rest.split_once(']')?;
        let index: usize = index.parse().ok()?;
        let rest = rest.strip_prefix('.').unwrap_or(rest);
        // Indexes are within the failed call, which starts right after the
        // created entries (a refusal before any call names input indexes
        // and has nothing created).
        Some((self.created.len().checked_add(index)?, rest))
    }
}

impl std::fmt::Display for CreateManyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.error)?;
        match self.created.len() {
            0 => Ok(()),
            1 => write!(f, " (after 1 task was created)"),
            n => write!(f, " (after {n} tasks were created)"),
        }
    }
}

impl std::error::Error for CreateManyError {
    // The message already holds `error`'s, so its causes come next.
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&self.error)
    }
}

/// Keeps the error and drops the results of the calls that succeeded.
impl From<CreateManyError> for Error {
    fn from(err: CreateManyError) -> Self {
        err.error
    }
}

/// A response field the contract says is always set was missing.
pub(super) fn missing(field: &str) -> Error {
    Error::InvalidAnswer(format!("the response has no {field}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::NewTask;

    #[test]
    fn create_many_errors_name_the_input_entry_and_keep_what_was_created() {
        let created = |n: usize| vec![proto::CreateTaskResponse::default(); n];
        let invalid = |message: &str| Error::from(tonic::Status::invalid_argument(message));

        // A call after 10,000 created names its entries from 0.
        let err = CreateManyError {
            created: created(10_000),
            error: invalid("tasks[1].task_type: ' ' is not allowed"),
        };
        assert_eq!(
            err.invalid_entry(),
            Some((10_001, "task_type: ' ' is not allowed"))
        );
        assert_eq!(
            err.to_string(),
            format!("{} (after 10000 tasks were created)", err.error)
        );
        // `?` into an `Error` keeps the error.
        let plain: Error = err.into();
        assert!(plain.status().is_some());

        // Refused before any call: input indexes, nothing created.
        let err = CreateManyError {
            created: Vec::new(),
            error: NewTask::new("t")
                .params(serde_json::json!(1))
                .into_request(Some(4))
                .unwrap_err(),
        };
        assert_eq!(
            err.invalid_entry(),
            Some((4, "params: must be a JSON object"))
        );
        assert!(!err.to_string().contains("created"));

        // Other errors name no entry.
        for error in [
            Error::from(tonic::Status::unavailable("tasks[1] database down")),
            invalid("tasks: must hold at least one task"),
        ] {
            let err = CreateManyError {
                created: created(1),
                error,
            };
            assert_eq!(err.invalid_entry(), None);
            assert!(err.to_string().ends_with(" (after 1 task was created)"));
        }
    }
}
