//! The I/O side of live session control: the disconnect worker, the removal scanner and expiry sweep, the CRL
//! watcher and the removed-device reader, all stopped by the shutdown token.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::removed::{self, SkipReason};
use super::{SessionRegistry, Settings, crl, disconnect};
use crate::kafka::removed::{KafkaError, ReaderEvents, RemovedReaderSettings};
use crate::policy::IdCharset;
use crate::readiness::ReadyFlag;
use crate::schedule::Schedule;

/// The `removed_devices` probe's reason until the history is read.
const REPLAYING: &str = "reading the device-manager events Kafka held at start";
/// How often expired entries are swept.
const SWEEP_INTERVAL: Duration = Duration::from_secs(30);
/// How often the CRL file's size and mtime are looked at, to re-read it on change between scheduled reads.
const CRL_POLL: Duration = Duration::from_secs(1);

/// Starts the disconnect worker (with `VERNEMQ_API_URL`), the removal scanner with the expiry sweep, and the CRL
/// watcher (with `CRL_FILE`).
pub fn start(
    sessions: &Arc<SessionRegistry>,
    settings: &Settings,
    shutdown: &CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    if let Some(api) = settings.api.clone() {
        let (tx, rx) = mpsc::unbounded_channel();
        *sessions.queue.lock() = Some(tx);
        tasks.push(tokio::spawn(disconnect::run(
            api,
            sessions.clone(),
            rx,
            settings.disconnect_concurrency,
            shutdown.clone(),
        )));
    }
    tasks.push(tokio::spawn({
        let (sessions, shutdown) = (sessions.clone(), shutdown.clone());
        async move {
            let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = sessions.scan.notified() => sessions.scan_removed(),
                    _ = sweep.tick() => { sessions.sweep(); }
                }
            }
        }
    }));
    if let Some(path) = settings.crl_file.clone() {
        tasks.push(tokio::spawn(watch_crl(sessions.clone(), path, settings.crl_schedule.clone(), shutdown.clone())));
    }
    tasks
}

/// Where the reader's events go: the registry, and the readiness probe once the history is replayed.
struct Sink {
    sessions: Arc<SessionRegistry>,
    suffix: String,
    charset: IdCharset,
    ready: ReadyFlag,
    caught_up: bool,
}

impl ReaderEvents for Sink {
    fn message(&mut self, topic: &str, value: Option<&[u8]>) {
        match removed::interpret(topic, &self.suffix, value.unwrap_or_default(), &self.charset) {
            Ok(change) => self.sessions.device_event(&change),
            Err(skip) => {
                self.sessions.event_skipped(skip.reason());
                tracing::warn!(topic, error = %skip, "device-manager event skipped");
            }
        }
    }

    fn error(&mut self, error: &KafkaError) {
        self.sessions.event_skipped(SkipReason::Kafka);
        if !self.caught_up {
            self.ready.down(format!("{REPLAYING}: {error}"));
        }
    }

    fn caught_up(&mut self) {
        self.caught_up = true;
        tracing::info!(removed = self.sessions.removed_count(), "removed devices replayed up to the end at start");
        self.ready.set(true);
    }
}

/// Starts the removed-device reader on the device-manager topics (`^.+\.<suffix>$`, as K2V reads them); `ready` goes
/// up once the events Kafka held at start are read.
///
/// # Errors
/// The Kafka consumer cannot be created.
pub fn start_removed_reader(
    sessions: &Arc<SessionRegistry>,
    settings: &Settings,
    reader: RemovedReaderSettings,
    ready: ReadyFlag,
    shutdown: &CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, KafkaError> {
    ready.down(REPLAYING);
    let sink = Sink {
        sessions: sessions.clone(),
        suffix: settings.topic_suffix.clone(),
        charset: settings.id_charset.clone(),
        ready,
        caught_up: false,
    };
    crate::kafka::removed::spawn(&reader, sink, shutdown.clone())
}

/// What identifies one version of the CRL file without reading it.
fn file_signature(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// Loads the CRL now, then at every scheduled time and whenever the file's size or mtime changes. A file that is
/// missing, truncated or not a CRL is logged and counted and the last good CRL stays in force.
async fn watch_crl(sessions: Arc<SessionRegistry>, path: PathBuf, schedule: Schedule, shutdown: CancellationToken) {
    let mut seen: Option<Option<(SystemTime, u64)>> = None;
    let mut next_scheduled = Instant::now();
    loop {
        let signature = file_signature(&path);
        if seen.as_ref() != Some(&signature) || Instant::now() >= next_scheduled {
            next_scheduled = Instant::now() + schedule.delay_from(chrono::Utc::now());
            seen = Some(signature);
            load_crl(&sessions, &path).await;
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(CRL_POLL) => {}
        }
    }
}

pub(super) async fn load_crl(sessions: &SessionRegistry, path: &Path) {
    let result = match tokio::fs::read(path).await {
        Ok(bytes) => crl::parse(&bytes),
        Err(e) => Err(crl::CrlError::Read(e)),
    };
    match result {
        Ok(crls) => {
            sessions.set_revocations(&crls);
        }
        Err(e) => {
            sessions.crl_failed(e.kind());
            tracing::error!(path = %path.display(), error = %e, "CRL_FILE not loaded; keeping the last good CRL");
        }
    }
}
