//! Liveness and readiness: live while the process serves HTTP; ready when every configured dependency is up.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::Serialize;

/// One dependency's up/down flag, set by the component that owns the connection.
#[derive(Debug, Clone, Default)]
pub struct Probe(Arc<AtomicBool>);

impl Probe {
    pub fn set(&self, up: bool) {
        self.0.store(up, Ordering::Relaxed);
    }

    pub fn is_up(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// The probes of the dependencies this instance was configured with.
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    probes: Vec<(&'static str, Probe)>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub ready: bool,
    pub checks: Vec<Check>,
}

#[derive(Debug, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub up: bool,
}

impl Readiness {
    /// Registers a dependency, down until its owner says otherwise.
    pub fn probe(&mut self, name: &'static str) -> Probe {
        let probe = Probe::default();
        self.probes.push((name, probe.clone()));
        probe
    }

    pub fn report(&self) -> Report {
        let checks: Vec<Check> = self.probes.iter().map(|(name, p)| Check { name, up: p.is_up() }).collect();
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
        let kafka = r.probe("kafka");
        let mqtt = r.probe("mqtt");
        assert!(!r.report().ready);
        kafka.set(true);
        assert!(!r.report().ready);
        mqtt.set(true);
        assert!(r.report().ready);
        kafka.set(false);
        let report = r.report();
        assert!(!report.ready);
        assert!(!report.checks[0].up && report.checks[1].up);
    }
}
