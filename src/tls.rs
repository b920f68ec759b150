//! TLS on the node's gRPC port (rustls, no OpenSSL): the certificate and
//! key, and for mutual TLS the client CA, read from PEM files at start and
//! read again on SIGHUP.
//!
//! A reload swaps the configuration new connections are accepted with;
//! connections already open keep theirs, so no session is dropped. A
//! reload that fails (a file half written, a key that does not match)
//! keeps the previous configuration and says why in the log.
//!
//! Handshakes run off the accept loop, each bounded in time, so a client
//! that connects and says nothing holds up no one.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_util::Stream;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// Longest a client may take over its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes in progress at once; past it, accepting waits.
const HANDSHAKES_AT_ONCE: usize = 256;

/// The PEM files a node's TLS is read from.
#[derive(Debug, Clone)]
pub(crate) struct Files {
    /// The certificate chain, leaf first.
    pub(crate) cert: PathBuf,
    /// Its private key.
    pub(crate) key: PathBuf,
    /// The CAs whose client certificates are accepted; every client must
    /// present one when given.
    pub(crate) client_ca: Option<PathBuf>,
}

/// The TLS configuration new connections are accepted with.
#[derive(Debug)]
pub(crate) struct Acceptor {
    files: Files,
    current: RwLock<Arc<ServerConfig>>,
}

impl Acceptor {
    /// Reads the files; the error names the flag and the file at fault.
    pub(crate) fn load(files: Files) -> Result<Self, String> {
        let config = server_config(&files)?;
        Ok(Self {
            files,
            current: RwLock::new(Arc::new(config)),
        })
    }

    /// Reads the files again and, if they make a valid configuration, uses
    /// it for every connection from now on.
    pub(crate) fn reload(&self) -> Result<(), String> {
        let config = server_config(&self.files)?;
        *self.current.write().expect("lock poisoned") = Arc::new(config);
        Ok(())
    }

    fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.read().expect("lock poisoned").clone())
    }
}

fn read_certs(flag: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|err| format!("{flag} {}: {err}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{flag} {}: no PEM certificate in the file",
            path.display()
        ));
    }
    Ok(certs)
}

fn server_config(files: &Files) -> Result<ServerConfig, String> {
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let certs = read_certs("--tls-cert", &files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|err| format!("--tls-key {}: {err}", files.key.display()))?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|err| format!("tls: {err}"))?;
    let builder = match &files.client_ca {
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certs("--tls-client-ca", path)? {
                roots
                    .add(cert)
                    .map_err(|err| format!("--tls-client-ca {}: {err}", path.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|err| format!("--tls-client-ca {}: {err}", path.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|err| {
        format!(
            "--tls-cert {} and --tls-key {}: {err}",
            files.cert.display(),
            files.key.display()
        )
    })?;
    // gRPC is HTTP/2; clients choose it by ALPN.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// The TLS connections accepted on `listener`, handshakes done, until
/// `shutdown` turns true or the stream is dropped.
pub(crate) fn incoming(
    listener: TcpListener,
    acceptor: Arc<Acceptor>,
    mut shutdown: watch::Receiver<bool>,
) -> impl Stream<Item = Result<TlsStream<TcpStream>, std::io::Error>> {
    let (tx, rx) = mpsc::channel::<TlsStream<TcpStream>>(64);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(HANDSHAKES_AT_ONCE));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = handshakes.clone().acquire_owned().await else {
                return;
            };
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = tx.closed() => return,
                _ = shutdown.wait_for(|stop| *stop) => return,
            };
            let tcp = match accepted {
                Ok((tcp, _)) => tcp,
                Err(err) => {
                    // Out of file descriptors, most likely: try again shortly.
                    tracing::warn!(error = %err, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx) = (acceptor.acceptor(), tx.clone());
            tokio::spawn(async move {
                let _permit = permit;
                let peer = tcp.peer_addr().ok();
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(stream).await;
                    }
                    Ok(Err(err)) => {
                        tracing::debug!(?peer, error = %err, "TLS handshake failed");
                    }
                    Err(_) => tracing::debug!(?peer, "TLS handshake timed out"),
                }
            });
        }
    });
    futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|stream| (Ok(stream), rx))
    })
}

/// Reloads `acceptor` on every SIGHUP until `shutdown` turns true. The
/// handler is installed before this returns, so a SIGHUP sent once the
/// node has started never falls to the default action (ending the process).
pub(crate) fn reload_on_hangup(
    acceptor: Arc<Acceptor>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<impl std::future::Future<Output = ()>> {
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    Ok(async move {
        loop {
            tokio::select! {
                received = hangups.recv() => if received.is_none() { return },
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
            match acceptor.reload() {
                Ok(()) => tracing::info!("SIGHUP: TLS certificates reloaded"),
                Err(err) => tracing::warn!(
                    error = %err,
                    "SIGHUP: TLS certificates not reloaded, keeping the previous ones"
                ),
            }
        }
    })
}
