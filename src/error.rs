//! The domain error, and the one mapping from it to gRPC status codes.

use crate::store;

/// Why a request was not carried out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A field is malformed, out of range, or an unknown/UNSPECIFIED enum.
    #[error("{field}: {message}")]
    InvalidArgument {
        /// The request field, e.g. `tasks[3].task_type`.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// No such task.
    #[error("{0}")]
    NotFound(String),
    /// Stale lease token, or a state that does not allow the call.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A lease-fenced write found the lease gone; the task is in `status`.
    #[error("{message}")]
    LeaseLost {
        /// Status of the task now.
        status: crate::task::Status,
        /// What happened, for the client.
        message: String,
    },
    /// Database down, pool exhausted, or node shutting down.
    #[error("{0}")]
    Unavailable(String),
    /// Too many requests or streams.
    #[error("{0}")]
    ResourceExhausted(String),
    /// A bug. The message is logged, never sent.
    #[error("{0}")]
    Internal(String),
}

impl Error {
    /// An `InvalidArgument` naming `field`.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::InvalidArgument {
            field: field.into(),
            message: message.into(),
        }
    }

    /// Prefixes the field of an `InvalidArgument`, e.g. `tasks[3].` + field.
    pub fn within(self, prefix: &str) -> Self {
        match self {
            Error::InvalidArgument { field, message } => Error::InvalidArgument {
                field: format!("{prefix}{field}"),
                message,
            },
            other => other,
        }
    }
}

impl From<store::Error> for Error {
    fn from(err: store::Error) -> Self {
        match err {
            store::Error::Unavailable(msg) => {
                // The detail (hosts, SQLSTATEs) is for the log only.
                tracing::warn!(error = %msg, "database unavailable");
                Error::Unavailable("database unavailable, try again".into())
            }
            store::Error::Conflict(msg) => Error::FailedPrecondition(msg),
            store::Error::Other(msg) => Error::Internal(msg),
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        match err {
            Error::InvalidArgument { field, message } => {
                tonic::Status::invalid_argument(format!("{field}: {message}"))
            }
            Error::NotFound(msg) => tonic::Status::not_found(msg),
            Error::FailedPrecondition(msg) => tonic::Status::failed_precondition(msg),
            Error::LeaseLost { message, .. } => tonic::Status::failed_precondition(message),
            Error::Unavailable(msg) => tonic::Status::unavailable(msg),
            Error::ResourceExhausted(msg) => tonic::Status::resource_exhausted(msg),
            Error::Internal(msg) => {
                tracing::error!(error = %msg, "internal error");
                tonic::Status::internal("internal error")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_argument_names_the_field() {
        let status = tonic::Status::from(
            Error::invalid("task_type", "must not be empty").within("tasks[3]."),
        );
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(status.message(), "tasks[3].task_type: must not be empty");
    }

    #[test]
    fn store_errors_map_to_codes() {
        let unavailable: tonic::Status = Error::from(store::Error::Unavailable("x".into())).into();
        assert_eq!(unavailable.code(), tonic::Code::Unavailable);
        let internal: tonic::Status =
            Error::from(store::Error::Other("SELECT secret".into())).into();
        assert_eq!(internal.code(), tonic::Code::Internal);
        assert!(!internal.message().contains("SELECT"));
    }
}
