//! Clients of a Leasehold server, for Rust programs.
//!
//! - [`Client`]: producers and operators create, inspect, cancel, retry and
//!   purge tasks, read statistics and watch live events.
//! - [`Worker`]: runs async handlers per task type over a worker session,
//!   with slots, automatic heartbeats, progress, cancellation, reconnects
//!   that keep held leases, and graceful drain.
//!
//! ```no_run
//! use leasehold::client::{Client, NewTask};
//!
//! # async fn demo() -> Result<(), leasehold::client::Error> {
//! let client = Client::connect("http://127.0.0.1:50051").await?;
//! let created = client
//!     .create(NewTask::new("generate_thumbnail").params(serde_json::json!({"book": 7})))
//!     .await?;
//! println!("created {}", created.task.map(|t| t.id).unwrap_or_default());
//! # Ok(())
//! # }
//! ```

mod producer;
mod worker;

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

pub use producer::{Client, CreateManyError, NewTask, TaskFilter, WatchFilter, MAX_CREATE_BATCH};
pub use worker::{Shutdown, TaskContext, TaskError, Worker, WorkerBuilder};

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

/// Default server address, as `leasehold serve` listens by default.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:50051";

/// An endpoint for `address`: `host:port` or a full `http://` URI.
///
/// Keepalive pings notice a dead server on an idle stream within a minute,
/// so a worker never waits forever on a half-open connection.
pub fn endpoint(address: &str) -> Result<Endpoint> {
    let uri = if address.contains("://") {
        address.to_owned()
    } else {
        format!("http://{address}")
    };
    Endpoint::from_shared(uri)
        .map(|endpoint| {
            endpoint
                .connect_timeout(Duration::from_secs(5))
                .http2_keep_alive_interval(Duration::from_secs(20))
                .keep_alive_timeout(Duration::from_secs(20))
                .keep_alive_while_idle(true)
        })
        .map_err(|source| Error::InvalidAddress {
            address: address.to_owned(),
            source,
        })
}

/// A connected channel to `address`.
pub async fn connect(address: &str) -> Result<Channel> {
    endpoint(address)?
        .connect()
        .await
        .map_err(|source| Error::Connect {
            address: address.to_owned(),
            source,
        })
}

/// A JSON object as a protobuf `Struct` (anything but an object becomes an
/// empty one, as the server stores objects only).
pub fn to_struct(json: &serde_json::Value) -> prost_types::Struct {
    crate::wire::json::json_to_struct(json)
}

/// A protobuf `Struct` as a JSON object.
pub fn from_struct(value: &prost_types::Struct) -> Result<serde_json::Value> {
    crate::wire::json::struct_to_json(value).map_err(|e| Error::InvalidAnswer(e.0))
}
