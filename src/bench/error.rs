//! The bench's error: why a scenario could not run or did not finish.
//!
//! Each variant says what failed; those that wrap another error keep it as
//! their `source` and say what the bench was doing in `what`, so that a
//! message reads `cannot connect to the database: <cause>`. [`Context`]
//! adds that `what` at a call site: `.context("...")` or
//! `.with_context(|| format!(...))` on a `Result` whose error the bench
//! wraps, or on an `Option` whose `None` means the scenario cannot go on.

/// Why `leasehold bench` failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A scenario could not run as planned, or what it measured is wrong
    /// (the message says what happened).
    #[error("{0}")]
    Scenario(String),
    /// A step of a scenario (`what`) failed with another bench error.
    #[error("{what}: {source}")]
    Step {
        /// What the bench was doing.
        what: String,
        /// Why it failed.
        source: Box<Error>,
    },
    /// A file, process or system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What the bench was doing.
        what: String,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// `/proc` did not read as expected.
    #[error("{0}")]
    Proc(String),
    /// A statement of the store failed (`sql-only`'s, or what a scenario
    /// does to the database around the node).
    #[error("{what}: {source}")]
    Store {
        /// What the bench was doing.
        what: String,
        /// What the store said.
        source: StoreError,
    },
    /// A gRPC call was answered with an error status. Boxed: a `Status` is
    /// large and errors are rare.
    #[error("{what}: {source}")]
    Status {
        /// Which call, or what the bench was doing.
        what: String,
        /// The server's answer.
        source: Box<tonic::Status>,
    },
    /// A server address (`--server`, or a node's) is not a valid URI.
    #[error("`{address}` is not a valid server address: {source}")]
    Address {
        /// The address as given.
        address: String,
        /// What the parser said.
        source: tonic::codegen::http::uri::InvalidUri,
    },
    /// No connection could be made to the server.
    #[error("{what}: {}", crate::error::chain(.source))]
    Transport {
        /// What the bench was doing.
        what: String,
        /// What the transport said.
        source: tonic::transport::Error,
    },
    /// A worker session's outgoing messages could not be sent: its stream
    /// has ended.
    #[error("{what}: {source}")]
    Closed {
        /// Which session, or what the bench was sending.
        what: String,
        /// The channel's error (the unsent message is dropped).
        source: tokio::sync::mpsc::error::SendError<()>,
    },
    /// A step did not finish in time.
    #[error("{what}: {source}")]
    Timeout {
        /// What did not finish.
        what: String,
        /// The timer's error.
        source: tokio::time::error::Elapsed,
    },
    /// A task of the bench panicked or was cancelled.
    #[error("{what}: {source}")]
    Join {
        /// Which task.
        what: String,
        /// How it ended.
        source: tokio::task::JoinError,
    },
    /// The node started for the run failed to start or to stop.
    #[error("{what}: {source}")]
    Node {
        /// What the bench was doing.
        what: String,
        /// What the node said.
        source: crate::server::Error,
    },
}

/// An error of the node's store, which the `sql-only` scenario drives
/// directly.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct StoreError(crate::store::Error);

/// The result of a bench step.
pub(crate) type Result<T, E = Error> = std::result::Result<T, E>;

/// An error the bench wraps: becomes the variant of [`Error`] for its type,
/// with `what` the bench was doing.
pub(crate) trait Wrap {
    /// The error, as the source of the variant for its type.
    fn wrap(self, what: String) -> Error;
}

impl Wrap for Error {
    fn wrap(self, what: String) -> Error {
        Error::Step {
            what,
            source: Box::new(self),
        }
    }
}

impl Wrap for std::io::Error {
    fn wrap(self, what: String) -> Error {
        Error::Io { what, source: self }
    }
}

impl Wrap for crate::store::Error {
    fn wrap(self, what: String) -> Error {
        Error::Store {
            what,
            source: StoreError(self),
        }
    }
}

impl Wrap for tonic::Status {
    fn wrap(self, what: String) -> Error {
        Error::Status {
            what,
            source: Box::new(self),
        }
    }
}

impl Wrap for tonic::transport::Error {
    fn wrap(self, what: String) -> Error {
        Error::Transport { what, source: self }
    }
}

impl<T> Wrap for tokio::sync::mpsc::error::SendError<T> {
    fn wrap(self, what: String) -> Error {
        Error::Closed {
            what,
            source: tokio::sync::mpsc::error::SendError(()),
        }
    }
}

impl Wrap for tokio::time::error::Elapsed {
    fn wrap(self, what: String) -> Error {
        Error::Timeout { what, source: self }
    }
}

impl Wrap for tokio::task::JoinError {
    fn wrap(self, what: String) -> Error {
        Error::Join { what, source: self }
    }
}

impl Wrap for crate::server::Error {
    fn wrap(self, what: String) -> Error {
        Error::Node { what, source: self }
    }
}

/// Says what the bench was doing when a step failed.
pub(crate) trait Context<T> {
    /// The error wrapped with `what`; for an `Option`, `None` becomes
    /// [`Error::Scenario`] with `what` as its message.
    fn context(self, what: impl Into<String>) -> Result<T>;

    /// As [`Context::context`], with `what` built only on failure.
    fn with_context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: Wrap> Context<T> for std::result::Result<T, E> {
    fn context(self, what: impl Into<String>) -> Result<T> {
        self.map_err(|err| err.wrap(what.into()))
    }

    fn with_context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|err| err.wrap(what()))
    }
}

impl<T> Context<T> for Option<T> {
    fn context(self, what: impl Into<String>) -> Result<T> {
        self.ok_or_else(|| Error::Scenario(what.into()))
    }

    fn with_context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.ok_or_else(|| Error::Scenario(what()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_say_what_failed_then_why() {
        let io = Err::<(), _>(std::io::Error::other("disk on fire"))
            .context("cannot read /proc/self/stat")
            .unwrap_err();
        assert_eq!(io.to_string(), "cannot read /proc/self/stat: disk on fire");
        assert!(std::error::Error::source(&io).is_some());

        let step = Err::<(), _>(io)
            .context("--preexisting-finished")
            .unwrap_err();
        assert_eq!(
            step.to_string(),
            "--preexisting-finished: cannot read /proc/self/stat: disk on fire"
        );

        let none = None::<u8>
            .with_context(|| format!("no VmRSS in {}", "/proc/1/status"))
            .unwrap_err();
        assert!(matches!(&none, Error::Scenario(m) if m == "no VmRSS in /proc/1/status"));

        let status = Err::<(), _>(tonic::Status::unavailable("draining"))
            .context("CreateTask failed")
            .unwrap_err();
        assert!(status.to_string().starts_with("CreateTask failed: "));
    }
}
