//! Channels to a server: addresses, TLS, timeouts and keepalive.

use std::path::Path;
use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::{Error, Result};

/// TLS settings of a client: the certificate authorities it trusts (the
/// system's unless given), and its own certificate for a server that asks
/// for one (mutual TLS).
///
/// ```no_run
/// # async fn demo() -> Result<(), leasehold::client::Error> {
/// use leasehold::client::{Client, Tls};
///
/// let tls = Tls::new().ca_file("/etc/leasehold/ca.pem")?;
/// let client = Client::connect_with("https://leasehold.internal:50051", &tls).await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Default)]
pub struct Tls {
    ca_pem: Option<Vec<u8>>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl Tls {
    /// Trusts the system's certificate authorities, and presents no client
    /// certificate.
    pub fn new() -> Self {
        Self::default()
    }

    /// Trusts only the certificate authorities in `pem` (one or more PEM
    /// certificates) instead of the system's.
    pub fn ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.ca_pem = Some(pem.into());
        self
    }

    /// Trusts only the certificate authorities in the PEM file at `path`;
    /// fails with [`Error::InvalidConfig`] naming the file if it cannot be
    /// read.
    pub fn ca_file(self, path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let pem = std::fs::read(path).map_err(|err| {
            Error::InvalidConfig(format!("tls ca file {}: {err}", path.display()))
        })?;
        Ok(self.ca_pem(pem))
    }

    /// Presents this certificate chain and private key (PEM) to a server
    /// that requires client certificates.
    pub fn identity_pem(mut self, cert: impl Into<Vec<u8>>, key: impl Into<Vec<u8>>) -> Self {
        self.identity = Some((cert.into(), key.into()));
        self
    }

    fn config(&self) -> ClientTlsConfig {
        let config = ClientTlsConfig::new();
        let config = match &self.ca_pem {
            Some(pem) => config.ca_certificate(Certificate::from_pem(pem)),
            None => config.with_native_roots(),
        };
        match &self.identity {
            Some((cert, key)) => config.identity(Identity::from_pem(cert, key)),
            None => config,
        }
    }
}

/// Default server address, as `leasehold serve` listens by default.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:50051";

/// Adds `authorization: Bearer <token>` to every call made through it (a
/// tonic interceptor); without a token it adds nothing.
#[derive(Debug, Clone, Default)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl Bearer {
    /// Sends `token` with every call; [`Error::InvalidConfig`] if it cannot
    /// be a header value (tokens are ASCII).
    pub fn new(token: &str) -> Result<Self> {
        format!("Bearer {}", token.trim())
            .parse()
            .map(|value| Self(Some(value)))
            .map_err(|_| Error::InvalidConfig("token: must be printable ASCII".into()))
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> std::result::Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A channel whose calls carry the client's token.
pub type AuthChannel = tonic::service::interceptor::InterceptedService<Channel, Bearer>;

/// An endpoint for `address`: `host:port` or a full `http://` or
/// `https://` URI. An `https://` address trusts the system's certificate
/// authorities; [`endpoint_with`] takes others.
///
/// Keepalive pings notice a dead server on an idle stream within a minute,
/// so a worker never waits forever on a half-open connection.
pub fn endpoint(address: &str) -> Result<Endpoint> {
    endpoint_with(address, None)
}

/// An endpoint for `address` with these TLS settings. With `tls`, a bare
/// `host:port` means `https://host:port`; an `http://` address with `tls`
/// is [`Error::InvalidConfig`] (a CA for a plaintext connection is a
/// mistake, not something to ignore).
pub fn endpoint_with(address: &str, tls: Option<&Tls>) -> Result<Endpoint> {
    let uri = if address.contains("://") {
        address.to_owned()
    } else if tls.is_some() {
        format!("https://{address}")
    } else {
        format!("http://{address}")
    };
    let endpoint = Endpoint::from_shared(uri.clone()).map_err(|source| Error::InvalidAddress {
        address: address.to_owned(),
        source,
    })?;
    let endpoint = endpoint
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    let secure = uri.starts_with("https://");
    if !secure {
        return match tls {
            Some(_) => Err(Error::InvalidConfig(format!(
                "tls: {address} is a plaintext address; use https:// with a CA file"
            ))),
            None => Ok(endpoint),
        };
    }
    let config = tls.cloned().unwrap_or_default().config();
    endpoint
        .tls_config(config)
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
