//! The decisions of live session control, without I/O: who is refused at connect, which sessions must be closed,
//! and the bookkeeping of the disconnects queued to the worker.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::time::Instant;

use parking_lot::{Mutex, RwLock};
use tokio::sync::{Notify, mpsc};

use super::crl::{self, CrlFailure};
use super::disconnect::{Cause, Outcome, Target};
use super::metrics::SessionMetrics;
use super::registry::{Issuers, NEVER, NO_ISSUER, NewSession, Registry, Secs, Session, generations_apart};
use super::removed::{Change, RemovedSet, SkipReason};
use super::vernemq_api::ApiFailure;
use crate::cert::ClientCertificate;
use crate::metrics::Metrics;
use crate::policy::DenyReason;

/// VerneMQ closes a connection at the lifetime the service handed out, counted from CONNACK, which follows our reply:
/// the entry outlives it by this much so it never expires before the connection.
const LIFETIME_GRACE: Secs = 5;
/// With lifetimes off, how long an accepted CONNECT waits for `on_register` before its entry is dropped (a client
/// that vanished before CONNACK).
const UNCONFIRMED_TTL: Secs = 60;

/// Revoked serials per issuer id.
type Revoked = HashMap<u16, HashSet<Box<[u8]>>>;

fn is_listed(revoked: &Revoked, issuer: u16, serial: &[u8]) -> bool {
    issuer != NO_ISSUER && revoked.get(&issuer).is_some_and(|s| s.contains(serial))
}
/// A session key: mountpoint, client id.
type Key = (Box<str>, Box<str>);

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
    pub(super) scan: Notify,
    /// Sessions queued or being disconnected: one job per session at a time.
    in_flight: Mutex<HashSet<Key>>,
    pub(super) queue: Mutex<Option<mpsc::UnboundedSender<Target>>>,
    pub(super) metrics: SessionMetrics,
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

    fn is_revoked(&self, issuer: u16, serial: &[u8]) -> bool {
        is_listed(&self.revoked.read(), issuer, serial)
    }

    pub fn is_removed(&self, device: &str) -> bool {
        self.removed.read().contains(device)
    }

    /// Devices in the removed set.
    pub fn removed_count(&self) -> usize {
        self.removed.read().len()
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
            Some(c) => (self.issuers.lock().intern(&c.issuer_der).unwrap_or(NO_ISSUER), c.serial_bytes.as_slice()),
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
        if let Err(e) = self.registry.lock().admit(session) {
            self.metrics.record_failed.increment(1);
            tracing::warn!(client_id, error = %e, "session not recorded; it cannot be force-disconnected");
        }
        Ok(())
    }

    /// `on_register(_m5)`: VerneMQ registered the connection admitted under this key, which takes the place of the
    /// one registered before; with lifetimes off its entry is then kept until it goes.
    pub fn registered(&self, mountpoint: &str, client_id: &str) {
        let expires = (!self.lifetimes).then_some(NEVER);
        let now = self.now();
        self.registry.lock().registered(mountpoint, client_id, now, expires);
    }

    /// `on_client_offline` / `on_client_gone`: the registered connection under this key went, or, after a takeover,
    /// the one it took over did.
    pub fn gone(&self, mountpoint: &str, client_id: &str) {
        let now = self.now();
        self.registry.lock().gone(mountpoint, client_id, now);
    }

    /// Entries held (expired ones are swept every 30 s).
    pub fn len(&self) -> usize {
        self.registry.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The sessions of one device on this node.
    pub fn of_device(&self, device: &str) -> Vec<SessionInfo> {
        let now = self.now();
        self.registry.lock().select(now, |&Session { recorded: s, .. }| {
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
            let mut removed = self.removed.write();
            let newly = removed.apply(change);
            self.metrics.removed_gauge.set(removed.len() as f64);
            newly
        };
        if let (true, Change::Removed(device)) = (newly, change) {
            tracing::info!(device, "device removed; closing its sessions on this node");
            self.newly_removed.lock().push(device.clone());
            self.scan.notify_one();
        }
    }

    /// Counts an event the removed-device reader skipped.
    pub fn event_skipped(&self, reason: SkipReason) {
        self.metrics.event_skipped(reason);
    }

    pub(super) fn crl_failed(&self, reason: CrlFailure) {
        self.metrics.crl_failed(reason);
    }

    /// Installs a new CRL; whether the revoked set changed (its sessions are then closed).
    pub fn set_revocations(&self, crls: &[crl::Revocations]) -> bool {
        let mut new: Revoked = HashMap::new();
        {
            let mut issuers = self.issuers.lock();
            for crl in crls {
                let Some(issuer) = issuers.intern(&crl.issuer_der) else { continue };
                new.entry(issuer).or_default().extend(crl.serials.iter().map(|s| s.clone().into_boxed_slice()));
            }
        }
        let flatten = |r: &Revoked| -> HashSet<(u16, Box<[u8]>)> {
            r.iter().flat_map(|(i, s)| s.iter().map(move |serial| (*i, serial.clone()))).collect()
        };
        let mut revoked = self.revoked.write();
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
            let revoked = self.revoked.read();
            self.registry.lock().select(now, |s| {
                let r = &s.recorded;
                (r.issuer != NO_ISSUER && revoked.get(&r.issuer).is_some_and(|set| set.contains(r.serial)))
                    .then(|| Target::new(s, Cause::Revoked))
            })
        };
        self.enqueue(targets);
    }

    /// Closes the sessions of the devices removed since the last scan (the scanner task calls it when notified).
    pub(super) fn scan_removed(&self) {
        let devices: HashSet<String> = self.newly_removed.lock().drain(..).collect();
        if devices.is_empty() {
            return;
        }
        let now = self.now();
        let targets = self
            .registry
            .lock()
            .select(now, |s| devices.contains(s.recorded.device).then(|| Target::new(s, Cause::Removed)));
        self.enqueue(targets);
    }

    /// Operator request: closes every session of `device` on this node; how many were queued.
    pub fn disconnect_device(&self, device: &str) -> usize {
        let now = self.now();
        let targets = self
            .registry
            .lock()
            .select(now, |s| (s.recorded.device == device).then(|| Target::new(s, Cause::Operator)));
        self.enqueue(targets)
    }

    /// Queues one job per key. A key in a takeover holds two entries (the registered connection and one admitted
    /// since), and a scan may select both: the job is for the newer. While that one is not registered its job still
    /// closes the older (`Registry::get_for`); a job for the older would end as not needed once the newer registered,
    /// leaving the new connection, admitted before the cause, connected.
    fn enqueue(&self, targets: Vec<Target>) -> usize {
        let mut newest: HashMap<Key, Target> = HashMap::with_capacity(targets.len());
        for target in targets {
            match newest.entry(target.key()) {
                Entry::Occupied(mut kept) => {
                    if generations_apart(target.generation, kept.get().generation).is_some_and(|apart| apart > 0) {
                        kept.insert(target);
                    }
                }
                Entry::Vacant(slot) => {
                    slot.insert(target);
                }
            }
        }
        let targets: Vec<Target> = newest.into_values().collect();
        let queue = self.queue.lock();
        let Some(queue) = queue.as_ref() else {
            if !targets.is_empty() {
                tracing::warn!(
                    sessions = targets.len(),
                    "VERNEMQ_API_URL is not set: sessions to close stay connected until their lifetime ends"
                );
            }
            return 0;
        };
        let mut in_flight = self.in_flight.lock();
        let mut queued = 0;
        for target in targets {
            if in_flight.insert(target.key()) && queue.send(target).is_ok() {
                queued += 1;
            }
        }
        queued
    }

    /// Whether a queued disconnect is still wanted: the connection it was queued for, or the registered one it had
    /// not yet taken over, is still here, and (but for an operator's request) its device is still removed or its
    /// certificate still revoked.
    pub(super) fn still_to_close(&self, target: &Target) -> bool {
        self.still_to_close_at(target, self.now())
    }

    pub(super) fn still_to_close_at(&self, target: &Target, now: Secs) -> bool {
        // In the scans' order (the lists, then the registry): the other way round, a CRL install waiting for the
        // write lock between a scan and this check would deadlock all three.
        let (removed, revoked) = (self.removed.read(), self.revoked.read());
        let registry = self.registry.lock();
        // Only a later connection under the key means a reconnect since: admitted again, so not removed or revoked at
        // that moment, and an operator's request named the connections of its time.
        let Some(session) = registry.get_for(&target.mountpoint, &target.client_id, target.generation, now) else {
            return false;
        };
        match target.cause {
            // The older connection may be another device's (free client ids): the operator named this one.
            Cause::Operator => session.recorded.device == &*target.device,
            Cause::Removed => removed.contains(session.recorded.device),
            Cause::Revoked => is_listed(&revoked, session.recorded.issuer, session.recorded.serial),
        }
    }

    /// The job ended. A done disconnect forgets the session whether or not a gone hook is registered — but only the
    /// connection it was queued for: a device that reconnected under the same key meanwhile keeps its new entry.
    pub(super) fn closed(&self, target: &Target, outcome: Outcome) {
        self.in_flight.lock().remove(&target.key());
        self.metrics.disconnected(target.cause, outcome);
        if outcome == Outcome::Done {
            self.registry.lock().remove_generation(&target.mountpoint, &target.client_id, target.generation);
        }
    }

    pub(super) fn api_error(&self, reason: ApiFailure) {
        self.metrics.api_error(reason);
    }

    pub(super) fn sweep(&self) -> usize {
        let now = self.now();
        self.registry.lock().sweep(now)
    }
}
