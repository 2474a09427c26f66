//! The HTTPS webhook listener: VerneMQ must present a client certificate that IOTAGENT_TLS_CLIENT_CA_FILE verifies,
//! so only the broker reaches the hooks. Files are re-read when they change (the PKI renews them in place).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use openssl::ssl::{Ssl, SslAcceptor, SslFiletype, SslMethod, SslVerifyMode, SslVersion};
use openssl::x509::X509Name;
use tokio::net::TcpListener;
use tokio_openssl::SslStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::file_watch::FileWatch;

/// A client that has not finished its handshake by then is dropped, so half-open connections cost little (a request
/// head that trickles in is bounded by WEBHOOK_IDLE_TIMEOUT, in `http::serve_connection`).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the files are compared with what the acceptor was built from.
const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// The listener's files, PEM.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// Server certificate, optionally followed by its chain; its SAN must name the host in VerneMQ's endpoint URLs.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CA certificates that sign the clients allowed in (VerneMQ's `vmq_webhooks.certfile`).
    pub client_ca: PathBuf,
    /// Common names a client certificate may have (empty: any the CA signed). The development CA also signs
    /// devices, so a device certificate must not pass for the broker.
    pub client_names: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum TlsError {
    #[error("HTTPS webhook listener: {what} {path}: {source}")]
    File {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: openssl::error::ErrorStack,
    },
    #[error("HTTPS webhook listener: {0}")]
    Ssl(#[from] openssl::error::ErrorStack),
}

/// Builds the acceptor: TLS 1.2 and 1.3 (VerneMQ offers exactly one version, by default 1.2), client certificate
/// required and verified.
///
/// # Errors
/// A file that is missing or not what it should be, or a key that does not match the certificate.
pub(crate) fn acceptor(settings: &TlsSettings) -> Result<SslAcceptor, TlsError> {
    fn file(what: &'static str, path: &Path) -> impl FnOnce(openssl::error::ErrorStack) -> TlsError {
        let path = path.to_path_buf();
        move |source| TlsError::File { what, path, source }
    }
    let mut builder = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server())?;
    builder.set_min_proto_version(Some(SslVersion::TLS1_2))?;
    builder.set_certificate_chain_file(&settings.cert).map_err(file("certificate", &settings.cert))?;
    builder.set_private_key_file(&settings.key, SslFiletype::PEM).map_err(file("key", &settings.key))?;
    builder.check_private_key().map_err(file("key does not match", &settings.key))?;
    builder.set_ca_file(&settings.client_ca).map_err(file("client CA", &settings.client_ca))?;
    let names = X509Name::load_client_ca_file(&settings.client_ca).map_err(file("client CA", &settings.client_ca))?;
    builder.set_client_ca_list(names);
    let names = settings.client_names.clone();
    builder.set_verify_callback(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT, move |chained, ctx| {
        // Only the leaf (depth 0) names the client; the chain itself was verified by OpenSSL.
        if !chained || ctx.error_depth() != 0 || names.is_empty() {
            return chained;
        }
        let cn = ctx.current_cert().and_then(|cert| {
            let mut entries = cert.subject_name().entries_by_nid(openssl::nid::Nid::COMMONNAME);
            let cn = openssl::asn1::Asn1StringRef::to_string(entries.next()?.data()).ok()?;
            entries.next().is_none().then_some(cn)
        });
        cn.is_some_and(|cn| names.contains(&cn))
    });
    Ok(builder.build())
}

/// A bound HTTPS listener and the acceptor its files make, rebuilt when they change.
pub(crate) struct TlsListener {
    listener: TcpListener,
    settings: TlsSettings,
    acceptor: Arc<SslAcceptor>,
    files: FileWatch,
}

impl std::fmt::Debug for TlsListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsListener").field("listener", &self.listener).finish_non_exhaustive()
    }
}

impl TlsListener {
    /// # Errors
    /// As [`acceptor`].
    pub(crate) fn new(listener: TcpListener, settings: TlsSettings) -> Result<Self, TlsError> {
        let paths = vec![settings.cert.clone(), settings.key.clone(), settings.client_ca.clone()];
        let files = FileWatch::new(paths, CHECK_INTERVAL);
        let acceptor = Arc::new(acceptor(&settings)?);
        Ok(Self { listener, settings, acceptor, files })
    }

    pub(crate) fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves `router` until `shutdown`, then lets open requests finish (connections close after their reply);
    /// connections idle for `idle` are closed.
    pub(crate) async fn serve(self, router: Router, idle: Duration, shutdown: CancellationToken) {
        let Self { listener, settings, acceptor: mut current, mut files } = self;
        let connections = TaskTracker::new();
        loop {
            let accepted = tokio::select! {
                () = shutdown.cancelled() => break,
                // Renewed files are read here, between accepts: a new connection only takes the current acceptor.
                rebuilt = files.changed(|| acceptor(&settings)) => {
                    match rebuilt {
                        Ok(rebuilt) => {
                            tracing::info!("HTTPS webhook certificates reloaded");
                            current = Arc::new(rebuilt);
                        }
                        Err(error) => {
                            tracing::warn!(%error, "HTTPS webhook certificates not reloaded; keeping the last good");
                        }
                    }
                    continue;
                }
                accepted = crate::http::accept(&listener, "HTTPS") => accepted,
            };
            let Some((tcp, peer)) = accepted else { continue };
            let acceptor = current.clone();
            let router = router.clone();
            let shutdown = shutdown.clone();
            connections.spawn(async move {
                let Ok(ssl) = Ssl::new(acceptor.context()) else { return };
                let Ok(mut stream) = SslStream::new(ssl, tcp) else { return };
                let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, std::pin::Pin::new(&mut stream).accept());
                match handshake.await {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => {
                        tracing::debug!(%peer, %error, "HTTPS handshake refused");
                        return;
                    }
                    Err(_) => return,
                }
                crate::http::serve_connection(stream, router, idle, shutdown).await;
            });
        }
        drop(listener);
        connections.close();
        connections.wait().await;
    }
}
