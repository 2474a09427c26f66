//! The service's own certificates, by fingerprint: SERVICE_CERT_FINGERPRINTS plus the certificate in MQTT_CERT_FILE,
//! re-read when the file changes (the PKI renews it in place).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use openssl::x509::X509;
use parking_lot::{Mutex, RwLock};
use tokio_util::sync::CancellationToken;

use crate::file_watch::FileWatch;
use crate::policy::Fingerprint;

/// How often the certificate file is compared with what was read.
const CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// Certificates read from the file that stay accepted: the current one and a few before it, so that a client
/// still connected with the previous certificate reconnects (a revoked one is refused by VerneMQ's CRL first).
const KEEP_FROM_FILE: usize = 4;

/// Where the service's own certificates come from.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// Fingerprints of other instances' certificates, or of certificates about to be rotated in.
    pub pinned: Vec<Fingerprint>,
    /// The service's client certificate (MQTT_CERT_FILE), PEM; its first certificate is pinned.
    pub file: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("{0} holds no PEM certificate")]
    Pem(PathBuf, #[source] openssl::error::ErrorStack),
}

/// The current set; cheap to read on every `auth_on_register`.
#[derive(Debug, Default)]
pub struct ServiceCertificates {
    settings: Settings,
    from_file: RwLock<Vec<Fingerprint>>,
    current: RwLock<Arc<[Fingerprint]>>,
    /// Made when the file is first read, taken by [`ServiceCertificates::watch`].
    file_watch: Mutex<Option<FileWatch>>,
}

impl ServiceCertificates {
    /// Reads the file once; a file that cannot be read is an error at start (the watcher tolerates it later).
    ///
    /// # Errors
    /// MQTT_CERT_FILE unreadable or not a PEM certificate.
    pub fn load(settings: Settings) -> Result<Self, LoadError> {
        let this = Self { settings, ..Self::default() };
        if let Some(file) = &this.settings.file {
            *this.file_watch.lock() = Some(FileWatch::new(vec![file.clone()], CHECK_INTERVAL));
            this.remember(read_fingerprint(file)?);
        } else {
            this.publish();
        }
        Ok(this)
    }

    /// The fingerprints accepted now.
    pub fn current(&self) -> Arc<[Fingerprint]> {
        self.current.read().clone()
    }

    fn remember(&self, fingerprint: Fingerprint) {
        let mut from_file = self.from_file.write();
        if from_file.last() != Some(&fingerprint) {
            from_file.retain(|f| *f != fingerprint);
            from_file.push(fingerprint);
            let excess = from_file.len().saturating_sub(KEEP_FROM_FILE);
            from_file.drain(..excess);
        }
        drop(from_file);
        self.publish();
    }

    fn publish(&self) {
        let all: Vec<Fingerprint> = self.settings.pinned.iter().chain(self.from_file.read().iter()).copied().collect();
        *self.current.write() = all.into();
    }

    /// Re-reads MQTT_CERT_FILE whenever its contents change, until `shutdown`.
    pub fn watch(self: &Arc<Self>, shutdown: CancellationToken) -> Option<tokio::task::JoinHandle<()>> {
        let mut file_watch = self.file_watch.lock().take()?;
        let file = self.settings.file.clone()?;
        let this = self.clone();
        Some(tokio::spawn(async move {
            loop {
                let read = tokio::select! {
                    () = shutdown.cancelled() => return,
                    read = file_watch.changed(|| read_fingerprint(&file)) => read,
                };
                match read {
                    Ok(fingerprint) => {
                        this.remember(fingerprint);
                        tracing::info!(file = %file.display(), %fingerprint, "service certificate reloaded");
                    }
                    // Half-written or missing: keep what was accepted and read it again once it changes.
                    Err(error) => tracing::warn!(%error, "service certificate not reloaded"),
                }
            }
        }))
    }
}

fn read_fingerprint(file: &Path) -> Result<Fingerprint, LoadError> {
    let pem = std::fs::read(file).map_err(|e| LoadError::Read(file.to_path_buf(), e))?;
    let cert = X509::from_pem(&pem).map_err(|e| LoadError::Pem(file.to_path_buf(), e))?;
    let der = cert.to_der().map_err(|e| LoadError::Pem(file.to_path_buf(), e))?;
    Ok(Fingerprint(openssl::sha::sha256(&der)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinned_and_file_fingerprints_with_a_bounded_history() {
        let pinned = Fingerprint([9; 32]);
        let certs = ServiceCertificates::load(Settings { pinned: vec![pinned], file: None }).unwrap();
        assert_eq!(&*certs.current(), &[pinned]);
        for i in 0..6u8 {
            certs.remember(Fingerprint([i; 32]));
            certs.remember(Fingerprint([i; 32]));
        }
        let current = certs.current();
        assert_eq!(current.len(), 1 + KEEP_FROM_FILE);
        assert_eq!(current[0], pinned);
        assert_eq!(current.last(), Some(&Fingerprint([5; 32])));
        assert!(!current.contains(&Fingerprint([1; 32])));
    }

    #[test]
    fn a_missing_or_bad_file_fails_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let missing = Settings { pinned: Vec::new(), file: Some(dir.path().join("none.pem")) };
        assert!(matches!(ServiceCertificates::load(missing), Err(LoadError::Read(..))));
        std::fs::write(dir.path().join("bad.pem"), "not a certificate").unwrap();
        let bad = Settings { pinned: Vec::new(), file: Some(dir.path().join("bad.pem")) };
        assert!(matches!(ServiceCertificates::load(bad), Err(LoadError::Pem(..))));
    }
}
