//! V2K's counters: what reached Kafka, what was dead-lettered, and every way a record did not get there.

use metrics::{Counter, Gauge, Histogram};

use super::message::Invalid;
use crate::log_guard::LogGuard;
use crate::metrics::Metrics;

/// Why a device record did not reach its data topic: the `class` label of `iotagent_v2k_failed_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub(crate) enum Failure {
    /// The producer's local queue was full.
    QueueFull,
    /// Not acknowledged within V2K_DELIVERY_TIMEOUT_MS.
    Expired,
    /// Refused by Kafka for good.
    Final,
    /// The tenant has no data topic (V2K_REQUIRE_TENANT_TOPIC).
    UnknownTenant,
    /// The tenant already had V2K_TENANT_MAX_IN_FLIGHT records waiting: a QoS 0 publish (or any in on_publish mode
    /// without the gate) was dropped.
    TenantFull,
    /// on_publish was registered without the payload.
    NoPayload,
    /// Acknowledged to the broker (subscription mode) or answered as forwarded (a webhook mode's dead letter with
    /// nowhere to go), but neither the record nor its dead letter reached Kafka.
    Lost,
}

impl Failure {
    pub(crate) const ALL: [Failure; 7] = [
        Failure::QueueFull,
        Failure::Expired,
        Failure::Final,
        Failure::UnknownTenant,
        Failure::TenantFull,
        Failure::NoPayload,
        Failure::Lost,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Failure::QueueFull => "queue_full",
            Failure::Expired => "expired",
            Failure::Final => "final",
            Failure::UnknownTenant => "unknown_tenant",
            Failure::TenantFull => "tenant_full",
            Failure::NoPayload => "no_payload",
            Failure::Lost => "lost",
        }
    }
}

pub(super) struct V2kMetrics {
    pub produced_data: Counter,
    pub produced_dead_letter: Counter,
    pub answered_before_ack: Counter,
    /// Indexed like [`Failure::ALL`].
    failed: [Counter; Failure::ALL.len()],
    /// Indexed like [`Invalid::ALL`].
    dead_letter: [Counter; Invalid::ALL.len()],
    pub refused_unknown_tenant: Counter,
    pub known_tenants: Gauge,
    pub in_flight: Gauge,
    pub latency: Histogram,
    /// Samples the delivery-failure lines: a mass expiry logs a few, the rest are counted.
    pub failure_lines: LogGuard,
}

impl V2kMetrics {
    pub(super) fn new(m: &Metrics) -> Self {
        let produced =
            |kind| m.counter("iotagent_v2k_produced_total", "Records acknowledged by Kafka", &[("kind", kind)]);
        Self {
            produced_data: produced("data"),
            produced_dead_letter: produced("dead_letter"),
            answered_before_ack: m.counter(
                "iotagent_v2k_answered_before_ack_total",
                "Webhook publishes answered at the ack deadline while their record was still queued",
                &[],
            ),
            failed: m.counters(
                "iotagent_v2k_failed_total",
                "Records not delivered, by class",
                &[],
                ("class", Failure::as_str),
                Failure::ALL,
            ),
            dead_letter: m.counters(
                "iotagent_v2k_dead_lettered_total",
                "Payloads sent to the dead-letter topic",
                &[],
                ("reason", Invalid::as_str),
                Invalid::ALL,
            ),
            refused_unknown_tenant: m.counter(
                "iotagent_register_refused_total",
                "Registrations refused by live session control",
                &[("reason", "unknown_tenant")],
            ),
            known_tenants: m.gauge("iotagent_v2k_known_tenants", "Tenants whose data topic exists in Kafka", &[]),
            in_flight: m.gauge("iotagent_v2k_in_flight", "Records waiting for Kafka's ack", &[]),
            latency: m.histogram(
                "iotagent_v2k_produce_duration_seconds",
                "Time from queueing a record to Kafka's ack",
                &[],
            ),
            failure_lines: LogGuard::new(m),
        }
    }

    pub(super) fn failed(&self, failure: Failure) -> &Counter {
        // Declaration order is the order of ALL.
        &self.failed[failure as usize]
    }

    pub(super) fn dead_letter(&self, reason: Invalid) -> &Counter {
        &self.dead_letter[reason as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_indexed_by_variant() {
        for (i, f) in Failure::ALL.iter().enumerate() {
            assert_eq!(*f as usize, i, "{}", f.as_str());
        }
        for (i, r) in Invalid::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{}", r.as_str());
        }
    }
}
