//! Live session control: the device sessions connected to this VerneMQ node, and closing those whose device was
//! removed or whose certificate was revoked, through VerneMQ's HTTP API (README "Live session control").

pub mod admin;
pub mod crl;
mod disconnect;
pub mod registry;
pub mod removed;
pub mod vernemq_api;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime};

use metrics::{Counter, Gauge};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use crate::cert::ClientCertificate;
use crate::metrics::Metrics;
use crate::policy::{DenyReason, IdCharset};
use crate::schedule::Schedule;
use crate::secret::Secret;
pub use disconnect::Cause;
use disconnect::Target;
use registry::{Issuers, NEVER, NO_ISSUER, NewSession, Registry, Secs};
use removed::{Change, RemovedSet};
pub use vernemq_api::VernemqApi;

/// VerneMQ closes a connection at the lifetime the service handed out, counted from CONNACK, which follows our reply:
/// the entry outlives it by this much so it never expires before the connection.
const LIFETIME_GRACE: Secs = 5;
/// With lifetimes off, how long an accepted CONNECT waits for `on_register` before its entry is dropped (a client
/// that vanished before CONNACK).
const UNCONFIRMED_TTL: Secs = 60;
/// How often expired entries are swept.
const SWEEP_INTERVAL: Duration = Duration::from_secs(30);
/// How often the CRL file's size and mtime are looked at, to re-read it on change between scheduled reads.
const CRL_POLL: Duration = Duration::from_secs(1);

/// What live session control needs, validated (`config/sessions.rs`).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Without it nothing is disconnected; removed and revoked devices are still refused at connect.
    pub api: Option<VernemqApi>,
    pub crl_file: Option<PathBuf>,
    pub crl_schedule: Schedule,
    pub admin_token: Option<Secret>,
    pub disconnect_concurrency: usize,
    /// `<tenant>.<suffix>` topics carry device-manager events (K2V's suffix).
    pub topic_suffix: String,
    /// The regex subscription for that suffix.
    pub topic_pattern: String,
    pub id_charset: IdCharset,
    /// Whether device sessions get a connection lifetime (then entries expire with it and no other hook is needed).
    pub lifetimes: bool,
}

#[derive(Debug)]
struct SessionMetrics {
    refused_removed: Counter,
    refused_revoked: Counter,
    record_failed: Counter,
    removed_gauge: Gauge,
    revoked_gauge: Gauge,
    api_errors: HashMap<&'static str, Counter>,
    disconnected: HashMap<(&'static str, &'static str), Counter>,
    event_skipped: HashMap<&'static str, Counter>,
    crl_failures: HashMap<&'static str, Counter>,
    crl_loaded: Counter,
}

impl SessionMetrics {
    fn new(m: &Metrics) -> Self {
        let refused = |reason| {
            m.counter(
                "iotagent_register_refused_total",
                "Registrations refused by live session control",
                &[("reason", reason)],
            )
        };
        let labelled = |name, help, values: &[&'static str]| {
            values.iter().map(|v| (*v, m.counter(name, help, &[("reason", v)]))).collect::<HashMap<_, _>>()
        };
        let mut disconnected = HashMap::new();
        for cause in [Cause::Removed, Cause::Revoked, Cause::Operator] {
            for outcome in ["done", "not_needed"] {
                let counter = m.counter(
                    "iotagent_session_disconnects_total",
                    "Forced disconnects by cause and outcome",
                    &[("cause", cause.name()), ("outcome", outcome)],
                );
                disconnected.insert((cause.name(), outcome), counter);
            }
        }
        Self {
            refused_removed: refused("removed"),
            refused_revoked: refused("revoked"),
            record_failed: m.counter(
                "iotagent_session_record_failures_total",
                "Sessions that could not be recorded",
                &[],
            ),
            removed_gauge: m.gauge("iotagent_removed_devices", "Devices removed according to the device manager", &[]),
            revoked_gauge: m.gauge("iotagent_revoked_certificates", "Serials listed in CRL_FILE", &[]),
            api_errors: labelled(
                "iotagent_vernemq_api_errors_total",
                "Failed VerneMQ API calls (retried)",
                &["unreachable", "unauthorized", "status"],
            ),
            disconnected,
            event_skipped: labelled(
                "iotagent_removed_events_skipped_total",
                "Device-manager events skipped by the removed-device reader",
                &["malformed", "topic", "tenant_mismatch", "invalid_device", "kafka"],
            ),
            crl_failures: labelled(
                "iotagent_crl_reload_failures_total",
                "CRL_FILE reads that failed (the last good CRL is kept)",
                &["unreadable", "invalid"],
            ),
            crl_loaded: m.counter("iotagent_crl_reloads_total", "CRL_FILE contents loaded", &[]),
        }
    }
}

fn count(counters: &HashMap<&'static str, Counter>, reason: &str) {
    if let Some(c) = counters.get(reason) {
        c.increment(1);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Revoked serials per issuer id.
type Revoked = HashMap<u32, HashSet<Box<[u8]>>>;

/// The node's sessions and the state that decides which of them must go. Shared by the hooks, the admin routes and
/// the background tasks.
pub struct SessionRegistry {
    epoch: Instant,
    lifetimes: bool,
    registry: Mutex<Registry>,
    issuers: Mutex<Issuers>,
    removed: RwLock<RemovedSet>,
    revoked: RwLock<Revoked>,
    /// Devices removed since the last scan, batched so that a burst of events costs one pass over the registry.
    newly_removed: Mutex<Vec<String>>,
    scan: Notify,
    /// Sessions queued or being disconnected: one job per session at a time.
    in_flight: Mutex<HashSet<(Box<str>, Box<str>)>>,
    queue: Mutex<Option<mpsc::UnboundedSender<Target>>>,
    metrics: SessionMetrics,
}

impl std::fmt::Debug for SessionRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionRegistry").field("sessions", &self.len()).finish_non_exhaustive()
    }
}

impl Default for SessionRegistry {
    fn default() -> Self {
        Self::new(&Metrics::new(), true)
    }
}

/// A session as the admin route shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SessionInfo {
    pub mountpoint: String,
    pub client_id: String,
    pub device: String,
    /// Upper-case hex, as `openssl x509 -serial` prints it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certificate_serial: Option<String>,
    /// Seconds until the entry expires with the connection lifetime; `None` without lifetime.
    pub expires_in: Option<u32>,
}

impl SessionRegistry {
    pub fn new(metrics: &Metrics, lifetimes: bool) -> Self {
        Self {
            epoch: Instant::now(),
            lifetimes,
            registry: Mutex::default(),
            issuers: Mutex::default(),
            removed: RwLock::default(),
            revoked: RwLock::default(),
            newly_removed: Mutex::default(),
            scan: Notify::new(),
            in_flight: Mutex::default(),
            queue: Mutex::default(),
            metrics: SessionMetrics::new(metrics),
        }
    }

    fn now(&self) -> Secs {
        Secs::try_from(self.epoch.elapsed().as_secs()).unwrap_or(NEVER - 1)
    }

    fn is_revoked(&self, issuer: u32, serial: &[u8]) -> bool {
        issuer != NO_ISSUER
            && self
                .revoked
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .get(&issuer)
                .is_some_and(|s| s.contains(serial))
    }

    pub fn is_removed(&self, device: &str) -> bool {
        self.removed.read().unwrap_or_else(PoisonError::into_inner).contains(device)
    }

    /// `auth_on_register` accepted a device: refuse it if removed or its certificate revoked, otherwise record the
    /// session under its final key (after the client-id policy's rewrite) until `lifetime` seconds from now.
    ///
    /// # Errors
    /// The reason to refuse the connection.
    pub fn admit(
        &self,
        device: &str,
        mountpoint: &str,
        client_id: &str,
        certificate: Option<&ClientCertificate>,
        lifetime: Option<u64>,
    ) -> Result<(), DenyReason> {
        if self.is_removed(device) {
            self.metrics.refused_removed.increment(1);
            return Err(DenyReason::Removed);
        }
        let (issuer, serial) = match certificate {
            Some(c) => (lock(&self.issuers).intern(&c.issuer_der).unwrap_or(NO_ISSUER), c.serial_bytes.as_slice()),
            None => (NO_ISSUER, &[][..]),
        };
        if self.is_revoked(issuer, serial) {
            self.metrics.refused_revoked.increment(1);
            return Err(DenyReason::Revoked);
        }
        let now = self.now();
        let expires = match lifetime {
            Some(seconds) => {
                now.saturating_add(Secs::try_from(seconds).unwrap_or(NEVER)).saturating_add(LIFETIME_GRACE)
            }
            None if self.lifetimes => NEVER,
            None => now.saturating_add(UNCONFIRMED_TTL),
        };
        let session = NewSession { mountpoint, client_id, device, issuer, serial, expires };
        if let Err(e) = lock(&self.registry).insert(session) {
            self.metrics.record_failed.increment(1);
            tracing::warn!(client_id, error = %e, "session not recorded; it cannot be force-disconnected");
        }
        Ok(())
    }

    /// `on_register(_m5)`: with lifetimes off, the connection is confirmed and its entry kept until it goes.
    pub fn registered(&self, mountpoint: &str, client_id: &str) {
        if !self.lifetimes {
            lock(&self.registry).set_expiry(mountpoint, client_id, NEVER);
        }
    }

    /// `on_client_offline` / `on_client_gone`: no connection is left under this key.
    pub fn gone(&self, mountpoint: &str, client_id: &str) {
        lock(&self.registry).remove(mountpoint, client_id);
    }

    /// Entries held (expired ones are swept every 30 s).
    pub fn len(&self) -> usize {
        lock(&self.registry).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The sessions of one device on this node.
    pub fn of_device(&self, device: &str) -> Vec<SessionInfo> {
        let now = self.now();
        lock(&self.registry).select(now, |s| {
            (s.device == device).then(|| SessionInfo {
                mountpoint: s.mountpoint.into(),
                client_id: s.client_id.into(),
                device: s.device.into(),
                certificate_serial: (!s.serial.is_empty())
                    .then(|| s.serial.iter().map(|b| format!("{b:02X}")).collect::<String>()),
                expires_in: (s.expires != NEVER).then(|| s.expires.saturating_sub(now)),
            })
        })
    }

    /// A device-manager event: keeps the removed set, and queues a scan for a newly removed device.
    pub fn device_event(&self, change: &Change) {
        let newly = {
            let mut removed = self.removed.write().unwrap_or_else(PoisonError::into_inner);
            let newly = removed.apply(change);
            self.metrics.removed_gauge.set(removed.len() as f64);
            newly
        };
        if let (true, Change::Removed(device)) = (newly, change) {
            tracing::info!(device, "device removed; closing its sessions on this node");
            lock(&self.newly_removed).push(device.clone());
            self.scan.notify_one();
        }
    }

    /// Counts an event the removed-device reader skipped.
    pub fn event_skipped(&self, reason: &str) {
        count(&self.metrics.event_skipped, reason);
    }

    /// Installs a new CRL; whether the revoked set changed (its sessions are then closed).
    pub fn set_revocations(&self, crls: &[crl::Revocations]) -> bool {
        let mut new: Revoked = HashMap::new();
        {
            let mut issuers = lock(&self.issuers);
            for crl in crls {
                let Some(issuer) = issuers.intern(&crl.issuer_der) else { continue };
                new.entry(issuer).or_default().extend(crl.serials.iter().map(|s| s.clone().into_boxed_slice()));
            }
        }
        let flatten = |r: &Revoked| -> HashSet<(u32, Box<[u8]>)> {
            r.iter().flat_map(|(i, s)| s.iter().map(move |serial| (*i, serial.clone()))).collect()
        };
        let mut revoked = self.revoked.write().unwrap_or_else(PoisonError::into_inner);
        let (added, dropped) = crl::diff(&flatten(&revoked), &flatten(&new));
        self.metrics.crl_loaded.increment(1);
        if added == 0 && dropped == 0 {
            return false;
        }
        let total: usize = new.values().map(HashSet::len).sum();
        tracing::info!(added, dropped, total, "CRL changed");
        self.metrics.revoked_gauge.set(total as f64);
        *revoked = new;
        drop(revoked);
        if added > 0 {
            self.scan_revoked();
        }
        true
    }

    fn scan_revoked(&self) {
        let now = self.now();
        let targets = {
            let revoked = self.revoked.read().unwrap_or_else(PoisonError::into_inner);
            lock(&self.registry).select(now, |s| {
                (s.issuer != NO_ISSUER && revoked.get(&s.issuer).is_some_and(|set| set.contains(s.serial)))
                    .then(|| Target::new(s, Cause::Revoked))
            })
        };
        self.enqueue(targets);
    }

    fn scan_removed(&self) {
        let devices: HashSet<String> = lock(&self.newly_removed).drain(..).collect();
        if devices.is_empty() {
            return;
        }
        let now = self.now();
        let targets =
            lock(&self.registry).select(now, |s| devices.contains(s.device).then(|| Target::new(s, Cause::Removed)));
        self.enqueue(targets);
    }

    /// Operator request: closes every session of `device` on this node; how many were queued.
    pub fn disconnect_device(&self, device: &str) -> usize {
        let now = self.now();
        let targets =
            lock(&self.registry).select(now, |s| (s.device == device).then(|| Target::new(s, Cause::Operator)));
        self.enqueue(targets)
    }

    fn enqueue(&self, targets: Vec<Target>) -> usize {
        let queue = lock(&self.queue);
        let Some(queue) = queue.as_ref() else {
            if !targets.is_empty() {
                tracing::warn!(
                    sessions = targets.len(),
                    "VERNEMQ_API_URL is not set: sessions to close stay connected until their lifetime ends"
                );
            }
            return 0;
        };
        let mut in_flight = lock(&self.in_flight);
        let mut queued = 0;
        for target in targets {
            if in_flight.insert(target.key()) && queue.send(target).is_ok() {
                queued += 1;
            }
        }
        queued
    }

    /// Whether a queued disconnect is still wanted: the session is still here, and (but for an operator's request)
    /// its device is still removed or its certificate still revoked.
    fn still_to_close(&self, target: &Target) -> bool {
        let now = self.now();
        let registry = lock(&self.registry);
        let Some(session) = registry.get(&target.mountpoint, &target.client_id, now) else { return false };
        match target.cause {
            Cause::Operator => true,
            Cause::Removed => self.is_removed(session.device),
            Cause::Revoked => self.is_revoked(session.issuer, session.serial),
        }
    }

    /// VerneMQ closed the session (or will momentarily): forget it, whether or not a gone hook is registered.
    fn closed(&self, target: &Target, done: bool) {
        lock(&self.in_flight).remove(&target.key());
        let outcome = if done { "done" } else { "not_needed" };
        if let Some(c) = self.metrics.disconnected.get(&(target.cause.name(), outcome)) {
            c.increment(1);
        }
        if done {
            lock(&self.registry).remove(&target.mountpoint, &target.client_id);
        }
    }

    fn api_error(&self, reason: &str) {
        count(&self.metrics.api_errors, reason);
    }

    fn sweep(&self) -> usize {
        let now = self.now();
        lock(&self.registry).sweep(now)
    }
}

/// Starts the background tasks of live session control: the disconnect worker (with `VERNEMQ_API_URL`), the removal
/// scanner, the CRL watcher (with `CRL_FILE`) and the expiry sweep. They stop with `shutdown`.
pub fn start(
    sessions: &Arc<SessionRegistry>,
    settings: &Settings,
    shutdown: &CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    if let Some(api) = settings.api.clone() {
        let (tx, rx) = mpsc::unbounded_channel();
        *lock(&sessions.queue) = Some(tx);
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

/// Starts the removed-device reader on the device-manager topics (`^.+\.<suffix>$`, as K2V reads them).
///
/// # Errors
/// The Kafka consumer cannot be created.
pub fn start_removed_reader(
    sessions: &Arc<SessionRegistry>,
    settings: &Settings,
    brokers: &str,
    client_id: &str,
    shutdown: &CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, crate::kafka::removed::KafkaError> {
    let reader = crate::kafka::removed::RemovedReaderSettings {
        brokers: brokers.to_string(),
        topic_pattern: settings.topic_pattern.clone(),
        client_id: client_id.to_string(),
        metadata_refresh: Duration::from_secs(10),
    };
    let (suffix, charset) = (settings.topic_suffix.clone(), settings.id_charset.clone());
    let sink_sessions = sessions.clone();
    let error_sessions = sessions.clone();
    crate::kafka::removed::spawn(
        &reader,
        move |topic, value| match removed::interpret(topic, &suffix, value.unwrap_or_default(), &charset) {
            Ok(change) => sink_sessions.device_event(&change),
            Err(skip) => {
                sink_sessions.event_skipped(skip.reason());
                tracing::warn!(topic, error = %skip, "device-manager event skipped");
            }
        },
        move || error_sessions.event_skipped("kafka"),
        shutdown.clone(),
    )
}

/// What identifies one version of the CRL file without reading it.
fn file_signature(path: &std::path::Path) -> Option<(SystemTime, u64)> {
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

async fn load_crl(sessions: &SessionRegistry, path: &std::path::Path) {
    let result = match tokio::fs::read(path).await {
        Ok(bytes) => crl::parse(&bytes),
        Err(e) => Err(crl::CrlError::Read(e)),
    };
    match result {
        Ok(crls) => {
            sessions.set_revocations(&crls);
        }
        Err(e) => {
            count(&sessions.metrics.crl_failures, e.reason());
            tracing::error!(path = %path.display(), error = %e, "CRL_FILE not loaded; keeping the last good CRL");
        }
    }
}

#[cfg(test)]
mod tests;
