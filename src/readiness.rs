//! Liveness and readiness: live while the process serves HTTP; ready when every configured dependency is up and the
//! service is not stopping.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

/// One dependency's up/down flag, and why it is down when its owner knows, set by the component that owns the
/// connection.
#[derive(Debug, Clone, Default)]
pub struct ReadyFlag(Arc<ProbeState>);

#[derive(Debug, Default)]
struct ProbeState {
    up: AtomicBool,
    reason: Mutex<Option<String>>,
    /// Shown while up: which role a ready component has (for example a standby).
    note: Mutex<Option<String>>,
}

impl ReadyFlag {
    /// Up or down without a reason (an earlier reason is cleared).
    pub fn set(&self, up: bool) {
        // Steady "up" is the hot path (the K2V consumer says so per message): no lock.
        if self.0.up.swap(up, Ordering::Relaxed) && up {
            return;
        }
        *self.0.reason.lock() = None;
        *self.0.note.lock() = None;
    }

    /// Down, with the reason shown on `/health/ready`.
    pub fn down(&self, reason: impl Into<String>) {
        *self.0.reason.lock() = Some(reason.into());
        *self.0.note.lock() = None;
        self.0.up.store(false, Ordering::Relaxed);
    }

    /// Up, with a note shown on `/health/ready` (cleared by the next `down`, or `set` after a change).
    pub fn up_with(&self, note: impl Into<String>) {
        *self.0.note.lock() = Some(note.into());
        *self.0.reason.lock() = None;
        self.0.up.store(true, Ordering::Relaxed);
    }

    /// The note of an up probe.
    pub fn note(&self) -> Option<String> {
        if self.is_up() { self.0.note.lock().clone() } else { None }
    }

    pub fn is_up(&self) -> bool {
        self.0.up.load(Ordering::Relaxed)
    }

    /// Why it is down, if its owner said.
    pub fn reason(&self) -> Option<String> {
        if self.is_up() { None } else { self.0.reason.lock().clone() }
    }
}

/// The probes of the dependencies this instance was configured with, and whether it is stopping.
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    probes: Vec<(&'static str, ReadyFlag)>,
    stopping: CancellationToken,
}

/// The check a stopping service reports, down with the reason [`SHUTTING_DOWN`].
pub const SHUTDOWN_CHECK: &str = "shutdown";
pub const SHUTTING_DOWN: &str = "shutting_down";

#[derive(Debug, Serialize)]
pub struct Report {
    pub ready: bool,
    pub checks: Vec<Check>,
}

#[derive(Debug, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub up: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl Readiness {
    /// Not ready from the moment `shutdown` is cancelled, whatever the probes say: whoever routes work by readiness
    /// stops sending it while the service drains (the webhooks still answer meanwhile).
    pub fn new(shutdown: CancellationToken) -> Self {
        Self { probes: Vec::new(), stopping: shutdown }
    }

    /// Registers a dependency, down until its owner says otherwise.
    pub fn flag(&mut self, name: &'static str) -> ReadyFlag {
        let probe = ReadyFlag::default();
        self.probes.push((name, probe.clone()));
        probe
    }

    pub fn report(&self) -> Report {
        let mut checks: Vec<Check> = self
            .probes
            .iter()
            .map(|(name, p)| Check { name, up: p.is_up(), reason: p.reason(), note: p.note() })
            .collect();
        if self.stopping.is_cancelled() {
            checks.push(Check { name: SHUTDOWN_CHECK, up: false, reason: Some(SHUTTING_DOWN.into()), note: None });
        }
        Report { ready: checks.iter().all(|c| c.up), checks }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_probe_is_up() {
        let mut r = Readiness::default();
        assert!(r.report().ready, "nothing configured: the webhook alone is ready");
        let kafka = r.flag("kafka");
        let mqtt = r.flag("mqtt");
        assert!(!r.report().ready);
        kafka.set(true);
        assert!(!r.report().ready);
        mqtt.set(true);
        assert!(r.report().ready);
        kafka.set(false);
        let report = r.report();
        assert!(!report.ready);
        assert!(!report.checks[0].up && report.checks[1].up);
        mqtt.down("subscription refused (SUBACK 0x87 not_authorized)");
        let report = r.report();
        assert_eq!(report.checks[1].reason.as_deref(), Some("subscription refused (SUBACK 0x87 not_authorized)"));
        let json = serde_json::to_value(&report).unwrap();
        assert!(json["checks"][0].get("reason").is_none(), "no reason, no field");
        mqtt.set(true);
        assert_eq!(r.report().checks[1].reason, None, "up clears the reason");
        kafka.set(true);
        mqtt.up_with("standby");
        assert!(r.report().ready, "a standby is ready");
        assert_eq!(r.report().checks[1].note.as_deref(), Some("standby"));
        mqtt.down("connecting");
        mqtt.set(true);
        assert_eq!(r.report().checks[1].note, None, "a change clears the note");
    }

    #[test]
    fn not_ready_once_shutdown_starts() {
        let shutdown = CancellationToken::new();
        let mut r = Readiness::new(shutdown.clone());
        r.flag("kafka").set(true);
        let report = serde_json::to_value(r.report()).unwrap();
        assert_eq!(report, serde_json::json!({"ready": true, "checks": [{"name": "kafka", "up": true}]}));
        shutdown.cancel();
        let report = serde_json::to_value(r.report()).unwrap();
        assert_eq!(
            report,
            serde_json::json!({"ready": false, "checks": [
                {"name": "kafka", "up": true},
                {"name": "shutdown", "up": false, "reason": "shutting_down"},
            ]}),
            "every dependency up, and still not ready"
        );
    }
}
