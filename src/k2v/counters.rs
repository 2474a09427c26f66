//! K2V's metrics: consumed, published, acknowledged and re-sent events, skips by reason, dead letters by outcome.

use metrics::{Counter, Gauge};

use super::SkipReason;
use crate::metrics::Metrics;

/// What became of a refused event's dead letter: the `outcome` label of `iotagent_k2v_dead_letters_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum DeadLetter {
    /// Acknowledged by Kafka.
    Written,
    /// The dead-letter topic does not exist (it is never created by the service).
    NoTopic,
    /// Kafka unreachable, refused the record, or no ack within the bound.
    Failed,
}

impl DeadLetter {
    /// Every variant, in declaration order (so `outcome as usize` indexes it).
    const ALL: [DeadLetter; 3] = [DeadLetter::Written, DeadLetter::NoTopic, DeadLetter::Failed];

    fn name(self) -> &'static str {
        match self {
            DeadLetter::Written => "written",
            DeadLetter::NoTopic => "no_topic",
            DeadLetter::Failed => "failed",
        }
    }
}

pub(super) struct K2vMetrics {
    pub(super) consumed: Counter,
    pub(super) published: Counter,
    pub(super) acked: Counter,
    pub(super) resent: Counter,
    /// Indexed by [`SkipReason`].
    pub(super) skipped: [Counter; SkipReason::ALL.len()],
    /// Indexed by [`DeadLetter`].
    pub(super) dead_letters: [Counter; DeadLetter::ALL.len()],
    pub(super) in_flight: Gauge,
    pub(super) lag: Gauge,
}

impl K2vMetrics {
    pub(super) fn new(metrics: &Metrics) -> Self {
        Self {
            dead_letters: metrics.counters(
                "iotagent_k2v_dead_letters_total",
                "Refused events written (or not) to their dead-letter topic, by outcome",
                &[],
                ("outcome", DeadLetter::name),
                DeadLetter::ALL,
            ),
            consumed: metrics.counter("iotagent_k2v_consumed_total", "Device-manager events consumed from Kafka", &[]),
            published: metrics.counter("iotagent_k2v_published_total", "Configurations published to devices", &[]),
            acked: metrics.counter("iotagent_k2v_acked_total", "Publishes accepted by the broker (PUBACK < 0x80)", &[]),
            resent: metrics.counter(
                "iotagent_k2v_resent_total",
                "Publishes sent again: the connection was lost before their PUBACK, or the broker answered quota exceeded",
                &[],
            ),
            skipped: metrics.counters(
                "iotagent_k2v_skipped_total",
                "Kafka messages completed without a publish, by reason",
                &[],
                ("reason", SkipReason::name),
                SkipReason::ALL,
            ),
            in_flight: metrics.gauge("iotagent_k2v_in_flight", "Publishes awaiting the broker's PUBACK", &[]),
            lag: metrics.gauge(
                "iotagent_k2v_lag",
                "Events not yet acknowledged in the partitions consumed so far (high watermark minus commit point)",
                &[],
            ),
        }
    }

    pub(super) fn skip(&self, reason: SkipReason) {
        // `SkipReason::ALL` lists the variants in declaration order.
        self.skipped[reason as usize].increment(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letter_outcomes_are_listed_in_declaration_order() {
        crate::metrics::assert_declaration_order(&DeadLetter::ALL, |o| o as usize, DeadLetter::name);
    }
}
