//! Live session control's counters and gauges, each labelled series indexed by its enum variant.

use metrics::{Counter, Gauge};

use super::crl::CrlFailure;
use super::disconnect::{Cause, Outcome};
use super::removed::SkipReason;
use super::vernemq_api::ApiFailure;
use crate::metrics::Metrics;

#[derive(Debug)]
pub(super) struct SessionMetrics {
    pub refused_removed: Counter,
    pub refused_revoked: Counter,
    pub record_failed: Counter,
    pub removed_gauge: Gauge,
    pub revoked_gauge: Gauge,
    pub crl_loaded: Counter,
    api_errors: [Counter; ApiFailure::ALL.len()],
    disconnected: [[Counter; Outcome::ALL.len()]; Cause::ALL.len()],
    event_skipped: [Counter; SkipReason::ALL.len()],
    crl_failures: [Counter; CrlFailure::ALL.len()],
}

impl SessionMetrics {
    pub(super) fn new(m: &Metrics) -> Self {
        let refused = |reason| {
            m.counter(
                "iotagent_register_refused_total",
                "Registrations refused by live session control",
                &[("reason", reason)],
            )
        };
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
            crl_loaded: m.counter("iotagent_crl_reloads_total", "CRL_FILE contents loaded", &[]),
            api_errors: m.counters(
                "iotagent_vernemq_api_errors_total",
                "Failed VerneMQ API calls (retried)",
                &[],
                ("reason", ApiFailure::name),
                ApiFailure::ALL,
            ),
            disconnected: Cause::ALL.map(|cause| {
                m.counters(
                    "iotagent_session_disconnects_total",
                    "Forced disconnects by cause and outcome",
                    &[("cause", cause.name())],
                    ("outcome", Outcome::name),
                    Outcome::ALL,
                )
            }),
            event_skipped: m.counters(
                "iotagent_removed_events_skipped_total",
                "Device-manager events skipped by the removed-device reader",
                &[],
                ("reason", SkipReason::name),
                SkipReason::ALL,
            ),
            crl_failures: m.counters(
                "iotagent_crl_reload_failures_total",
                "CRL_FILE reads that failed (the last good CRL is kept)",
                &[],
                ("reason", CrlFailure::name),
                CrlFailure::ALL,
            ),
        }
    }

    pub(super) fn api_error(&self, reason: ApiFailure) {
        self.api_errors[reason as usize].increment(1);
    }

    pub(super) fn disconnected(&self, cause: Cause, outcome: Outcome) {
        self.disconnected[cause as usize][outcome as usize].increment(1);
    }

    pub(super) fn event_skipped(&self, reason: SkipReason) {
        self.event_skipped[reason as usize].increment(1);
    }

    pub(super) fn crl_failed(&self, reason: CrlFailure) {
        self.crl_failures[reason as usize].increment(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_enum_lists_its_variants_in_declaration_order() {
        use crate::metrics::assert_declaration_order;
        assert_declaration_order(&ApiFailure::ALL, |r| r as usize, ApiFailure::name);
        assert_declaration_order(&Cause::ALL, |c| c as usize, Cause::name);
        assert_declaration_order(&Outcome::ALL, |o| o as usize, Outcome::name);
        assert_declaration_order(&SkipReason::ALL, |r| r as usize, SkipReason::name);
        assert_declaration_order(&CrlFailure::ALL, |r| r as usize, CrlFailure::name);
    }
}
