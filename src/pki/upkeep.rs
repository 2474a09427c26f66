//! Certificate upkeep on the seed's schedules: CRL refresh, renewal of the broker's and the service's certificates
//! before they expire or after they were revoked, and a notification when the service's certificate changed.

use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Role, Store};
use crate::schedule::Schedule;
use crate::shutdown::Critical;

/// `CRL_UPDATE_TIME`, `CHECK_EXPIRATION_TIME`, `CHECK_BROKER_CERT_REVOKED_TIME`.
#[derive(Debug, Clone)]
pub struct UpkeepSettings {
    pub crl_update: Schedule,
    pub check_expiration: Schedule,
    pub check_revoked: Schedule,
}

#[derive(Clone, Copy)]
enum Job {
    Crl,
    Expiration,
    Revoked,
}

/// Starts the three upkeep loops on `tasks`, watched by `critical`; they stop when `shutdown` is cancelled. Returns the
/// "service certificate renewed" notification: the value counts renewals, so a receiver's `changed()` fires after
/// each one (the internal MQTT clients reconnect with the new files).
pub fn start(
    store: Arc<Store>,
    settings: UpkeepSettings,
    tasks: &TaskTracker,
    critical: &Critical,
    shutdown: CancellationToken,
) -> watch::Receiver<u64> {
    let (renewed, service_renewed) = watch::channel(0);
    let renewed = Arc::new(renewed);
    for (job, schedule) in [
        (Job::Crl, settings.crl_update),
        (Job::Expiration, settings.check_expiration),
        (Job::Revoked, settings.check_revoked),
    ] {
        let run = run(job, schedule, store.clone(), renewed.clone(), shutdown.clone());
        tasks.spawn(critical.watch("the PKI certificate upkeep", run));
    }
    service_renewed
}

async fn run(
    job: Job,
    schedule: Schedule,
    store: Arc<Store>,
    renewed: Arc<watch::Sender<u64>>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = schedule.wait() => {}
        }
        let store = store.clone();
        let outcome = tokio::task::spawn_blocking(move || once(job, &store)).await;
        match outcome {
            Ok(Ok(issued)) if issued.contains(&Role::Service) => {
                renewed.send_modify(|n| *n += 1);
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "PKI upkeep failed; retrying on the next schedule"),
            Err(e) => tracing::error!(error = %e, "PKI upkeep task failed"),
        }
    }
}

/// One run of a job; returns the roles whose certificates were issued again.
fn once(job: Job, store: &Store) -> Result<Vec<Role>, super::PkiError> {
    match job {
        Job::Crl => {
            store.write_crl()?;
            tracing::debug!("CRL refreshed");
            Ok(Vec::new())
        }
        // Both checks look at expiry and revocation alike (whichever runs first renews); they differ in what they log.
        Job::Expiration | Job::Revoked => {
            let issued = store.renew_own_certs()?;
            for role in &issued {
                let check = if matches!(job, Job::Expiration) {
                    "CHECK_EXPIRATION_TIME"
                } else {
                    "CHECK_BROKER_CERT_REVOKED_TIME"
                };
                tracing::warn!(certificate = ?role, check, "issued a new certificate (expiring, revoked or invalid)");
            }
            Ok(issued)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::pki::Settings;

    #[tokio::test]
    async fn renews_a_revoked_service_certificate_and_notifies() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::new(Settings::with_defaults(dir.path().to_path_buf())));
        store.init().unwrap();
        let crl_before = std::fs::read(dir.path().join("crl.pem")).unwrap();
        let service = std::fs::read(dir.path().join("service.crt")).unwrap();
        store.revoke_certificate(&service).unwrap();
        let every = |s: &str| s.parse::<Schedule>().unwrap();
        let shutdown = CancellationToken::new();
        let settings =
            UpkeepSettings { crl_update: every("1s"), check_expiration: every("1h"), check_revoked: every("1s") };
        let tasks = TaskTracker::new();
        let critical = Critical::new(shutdown.clone());
        let mut service_renewed = start(store.clone(), settings, &tasks, &critical, shutdown.clone());
        tokio::time::timeout(Duration::from_secs(10), service_renewed.changed()).await.unwrap().unwrap();
        assert_eq!(*service_renewed.borrow(), 1);
        assert_ne!(service, std::fs::read(dir.path().join("service.crt")).unwrap());
        assert_ne!(crl_before, std::fs::read(dir.path().join("crl.pem")).unwrap());
        shutdown.cancel();
        tasks.close();
        tokio::time::timeout(Duration::from_secs(5), tasks.wait()).await.unwrap();
        assert_eq!(critical.failure(), None);
    }
}
