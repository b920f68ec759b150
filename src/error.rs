//! The domain error: why a request was not carried out, classified once.
//!
//! Every way of answering a client derives from the variant, in one match
//! each: [`Error::into_status`] for gRPC calls (and a session stream that
//! must end), [`Error::into_ack`] for an outcome acknowledged on a session
//! (and, later, an HTTP status). The message a client sees comes from one
//! place too ([`Error::public_message`]): internal details go to the log,
//! never to the client.

use crate::model::Status;
use crate::wire::proto::AckStatus;

/// Why a request was not carried out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Error {
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
    /// A state that does not allow the call, or a call out of protocol order.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A lease-fenced write found the lease gone: the token is stale, the
    /// task was handed to someone else, finished or cancelled.
    #[error("{message}")]
    LeaseLost {
        /// Status of the task now.
        status: Status,
        /// What happened, for the client.
        message: String,
    },
    /// No usable bearer token: missing, malformed, unknown, expired or
    /// revoked.
    #[error("{0}")]
    Unauthenticated(String),
    /// A valid token whose role or task types do not allow the call.
    #[error("{0}")]
    PermissionDenied(String),
    /// Database down, pool exhausted, or node shutting down. Safe to retry.
    #[error("{0}")]
    Unavailable(String),
    /// A bug. The message is logged, never sent.
    #[error("{0}")]
    Internal(String),
}

impl Error {
    /// An `InvalidArgument` naming `field`.
    pub(crate) fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::InvalidArgument {
            field: field.into(),
            message: message.into(),
        }
    }

    /// Prefixes the field of an `InvalidArgument`, e.g. `tasks[3].` + field.
    pub(crate) fn within(self, prefix: &str) -> Self {
        match self {
            Error::InvalidArgument { field, message } => Error::InvalidArgument {
                field: format!("{prefix}{field}"),
                message,
            },
            other => other,
        }
    }

    /// The node is draining (shutting down): new sessions and new claims are
    /// refused so that workers move to another node.
    pub(crate) fn draining() -> Self {
        Error::Unavailable("this node is draining: connect to another node".into())
    }

    /// What the client is told. An internal error's detail is logged here,
    /// and replaced by a generic message.
    fn public_message(self) -> String {
        match self {
            Error::Internal(detail) => {
                tracing::error!(error = %detail, "internal error");
                "internal error".to_owned()
            }
            other => other.to_string(),
        }
    }

    /// The gRPC status of a failed call.
    pub(crate) fn into_status(self) -> tonic::Status {
        let code = match &self {
            Error::InvalidArgument { .. } => tonic::Code::InvalidArgument,
            Error::NotFound(_) => tonic::Code::NotFound,
            Error::FailedPrecondition(_) | Error::LeaseLost { .. } => {
                tonic::Code::FailedPrecondition
            }
            Error::Unauthenticated(_) => tonic::Code::Unauthenticated,
            Error::PermissionDenied(_) => tonic::Code::PermissionDenied,
            Error::Unavailable(_) => tonic::Code::Unavailable,
            Error::Internal(_) => tonic::Code::Internal,
        };
        tonic::Status::new(code, self.public_message())
    }

    /// The acknowledgement of an outcome sent on a session that was not
    /// recorded, with the message to send along.
    pub(crate) fn into_ack(self) -> (AckStatus, String) {
        let status = match &self {
            Error::LeaseLost {
                status: Status::Cancelled,
                ..
            } => AckStatus::Cancelled,
            Error::LeaseLost { .. } | Error::FailedPrecondition(_) => AckStatus::LeaseLost,
            Error::NotFound(_) => AckStatus::NotFound,
            // A session's outcomes are checked when it opens, not one by
            // one; should one be refused, it is as good as invalid.
            Error::InvalidArgument { .. }
            | Error::Unauthenticated(_)
            | Error::PermissionDenied(_) => AckStatus::Invalid,
            Error::Unavailable(_) | Error::Internal(_) => AckStatus::Unavailable,
        };
        (status, self.public_message())
    }
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        err.into_status()
    }
}

/// An error and its causes, `: `-separated, for messages and logs: some
/// errors leave their cause out of their message (a transport error says
/// only `transport error`, tokio-postgres `error connecting to server`),
/// others embed it (thiserror's `{0}`). A cause whose text the message
/// already holds is not repeated.
pub(crate) fn chain(err: &dyn std::error::Error) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

#[cfg(feature = "server")]
impl From<crate::store::Error> for Error {
    fn from(err: crate::store::Error) -> Self {
        use crate::store::Error as Store;
        match err {
            Store::Unavailable(msg) => {
                // The detail (hosts, SQLSTATEs) is for the log only.
                tracing::warn!(error = %msg, "database unavailable");
                Error::Unavailable("database unavailable, try again".into())
            }
            Store::Conflict(msg) => Error::FailedPrecondition(msg),
            Store::Other(msg) => Error::Internal(msg),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chains_skip_repeated_causes() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer: {0}")]
        struct Outer(#[source] std::io::Error);
        let err = Outer(std::io::Error::other("refused"));
        assert_eq!(chain(&err), "outer: refused");
    }

    /// An error whose message leaves its cause out, as the transport's.
    #[derive(Debug, thiserror::Error)]
    #[error("{message}")]
    struct Terse {
        message: &'static str,
        source: Option<Box<Terse>>,
    }

    #[test]
    fn causes_left_out_of_a_message_are_shown_once() {
        fn terse(message: &'static str, source: Option<Terse>) -> Terse {
            Terse {
                message,
                source: source.map(Box::new),
            }
        }
        let err = terse(
            "transport error",
            Some(terse(
                "tcp connect error",
                Some(terse(
                    "tcp connect error",
                    Some(terse("Connection refused", None)),
                )),
            )),
        );
        assert_eq!(
            chain(&err),
            "transport error: tcp connect error: Connection refused"
        );
        assert_eq!(chain(&terse("db error", None)), "db error");
    }

    #[test]
    fn invalid_argument_names_the_field() {
        let status = tonic::Status::from(
            Error::invalid("task_type", "must not be empty").within("tasks[3]."),
        );
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(status.message(), "tasks[3].task_type: must not be empty");
    }

    #[cfg(feature = "server")]
    #[test]
    fn refused_tokens_map_to_their_codes_with_their_message() {
        let status = Error::Unauthenticated("authorization: unknown token".into()).into_status();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        assert_eq!(status.message(), "authorization: unknown token");
        let status = Error::PermissionDenied("task_types: no".into()).into_status();
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
    }

    #[test]
    fn store_errors_map_to_codes() {
        use crate::store;
        let unavailable: tonic::Status = Error::from(store::Error::Unavailable("x".into())).into();
        assert_eq!(unavailable.code(), tonic::Code::Unavailable);
        let internal: tonic::Status =
            Error::from(store::Error::Other("SELECT secret".into())).into();
        assert_eq!(internal.code(), tonic::Code::Internal);
        assert!(!internal.message().contains("SELECT"));
    }

    #[test]
    fn acks_and_statuses_follow_the_same_classification() {
        let lost = |status| Error::LeaseLost {
            status,
            message: "gone".into(),
        };
        assert_eq!(lost(Status::Cancelled).into_ack().0, AckStatus::Cancelled);
        assert_eq!(lost(Status::Pending).into_ack().0, AckStatus::LeaseLost);
        assert_eq!(
            lost(Status::Cancelled).into_status().code(),
            tonic::Code::FailedPrecondition
        );
        let (status, message) = Error::Internal("SELECT secret".into()).into_ack();
        assert_eq!(status, AckStatus::Unavailable);
        assert_eq!(message, "internal error");
        assert_eq!(
            Error::draining().into_status().code(),
            tonic::Code::Unavailable
        );
    }
}
