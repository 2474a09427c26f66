//! Renewed TLS material for the internal clients without a restart: the certificate files are watched (the PKI
//! upkeep's notification, and a cheap poll for renewals by another instance or an operator) and rebuilt on change.

use std::time::Duration;

use rumqttc::Transport;
use rumqttc::v5::{EventLoop, Request};

use super::TlsFiles;
use crate::file_watch::FileWatch;

/// How often the files are compared with what the connection uses, when nothing notifies a renewal.
pub(super) const POLL_EVERY: Duration = Duration::from_secs(5);

/// Watches one client's TLS files; [`Reload::changed`] yields a transport built from the new ones.
pub(super) struct Reload {
    files: TlsFiles,
    /// The files the current transport was built from; a changed set that did not build (e.g. the key renamed in,
    /// its certificate not yet) is not retried or logged again until the files change once more.
    watch: FileWatch,
}

impl Reload {
    /// Watching `files` (none for a plain connection), polled `every`; call before building the first transport so
    /// that a change in between is not missed.
    pub(super) fn new(files: Option<&TlsFiles>, every: Duration) -> Option<Self> {
        let files = files?.clone();
        let paths = [Some(&files.ca), files.cert.as_ref(), files.key.as_ref()].into_iter().flatten().cloned().collect();
        Some(Self { watch: FileWatch::new(paths, every), files })
    }

    /// Resolves once the files changed and make a usable configuration. Cancel-safe: meant for a `select!` branch.
    pub(super) async fn changed(&mut self) -> Transport {
        loop {
            match self.files.renewed.as_mut() {
                Some(renewed) => tokio::select! {
                    () = self.watch.tick() => {}
                    notified = renewed.changed() => if notified.is_err() {
                        // The PKI upkeep stopped: polling is all that is left.
                        self.files.renewed = None;
                    },
                },
                None => self.watch.tick().await,
            }
            match self.watch.check(|| self.files.connector()) {
                None => {}
                Some(Ok(connector)) => {
                    tracing::info!(cert = ?self.files.cert, "MQTT TLS files changed; reconnecting with them");
                    return Transport::tls_with_config(connector.into());
                }
                // The previous transport stays; the next change of the files is tried again.
                Some(Err(error)) => {
                    tracing::warn!(%error, "MQTT TLS files changed but are not usable (yet); keeping the current ones");
                }
            }
        }
    }
}

/// [`Reload::changed`] when there is something to watch, never otherwise.
pub(super) async fn next(reload: &mut Option<Reload>) -> Transport {
    match reload {
        Some(reload) => reload.changed().await,
        None => std::future::pending().await,
    }
}

/// Cycles a live connection gracefully: a DISCONNECT (normal disconnection) goes out before anything queued, and
/// the caller drops the connection when rumqttc reports it sent ([`end_cycle`]); the next connect uses the options'
/// new transport.
pub(super) fn start_cycle(eventloop: &mut EventLoop) {
    eventloop.pending.push_front(Request::Disconnect);
}

/// Drops the connection after the cycle's DISCONNECT: what was in flight moves to the pending queue, as after a
/// lost connection.
pub(super) fn end_cycle(eventloop: &mut EventLoop) {
    eventloop.clean();
}

/// A connection lost before the cycle's DISCONNECT went out must not send it after the reconnect.
pub(super) fn forget_cycle(eventloop: &mut EventLoop) {
    eventloop.pending.retain(|request| !matches!(request, Request::Disconnect));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{Settings, Store};

    #[tokio::test]
    async fn a_renewed_certificate_is_picked_up_once_it_matches_its_key() {
        let pki = tempfile::tempdir().unwrap();
        Store::new(Settings::with_defaults(pki.path().to_path_buf())).init().unwrap();
        let used = tempfile::tempdir().unwrap();
        let copy = |name: &str| std::fs::copy(pki.path().join(name), used.path().join(name)).unwrap();
        for name in ["ca.crt", "service.crt", "service.key"] {
            copy(name);
        }
        let files = TlsFiles {
            ca: used.path().join("ca.crt"),
            cert: Some(used.path().join("service.crt")),
            key: Some(used.path().join("service.key")),
            renewed: None,
        };
        let mut reload = Reload::new(Some(&files), Duration::from_millis(20)).unwrap();
        let quiet = tokio::time::timeout(Duration::from_millis(150), reload.changed()).await;
        assert!(quiet.is_err(), "unchanged files do not reconnect");

        // Renewed (a window longer than the validity renews at once), then copied key first, as the PKI renames.
        let mut renewing = Settings::with_defaults(pki.path().to_path_buf());
        renewing.renew_before = Duration::from_secs(400 * 24 * 3600);
        Store::new(renewing).renew_own_certs().unwrap();
        copy("service.key");
        let half = tokio::time::timeout(Duration::from_millis(150), reload.changed()).await;
        assert!(half.is_err(), "a key without its certificate is not used");
        copy("service.crt");
        let full = tokio::time::timeout(Duration::from_secs(2), reload.changed()).await;
        assert!(matches!(full, Ok(Transport::Tls(_))), "the renewed pair is used");
    }
}
