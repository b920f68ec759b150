//! Channels to a server: addresses, timeouts and keepalive.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use super::{Error, Result};

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
