//! Prometheus metrics: one registry per running service (no process-global recorder, so tests can run several
//! services in one process), with handles created once and updated lock-free on the hot path.

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Label, Level, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

/// Latency buckets in seconds: webhook answers are expected well under a millisecond, Kafka acks in milliseconds,
/// and VerneMQ gives up at 5 s.
const LATENCY_BUCKETS: &[f64] =
    &[0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];

pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

static METADATA: Metadata<'static> = Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

fn key(name: &'static str, labels: &[(&'static str, &str)]) -> Key {
    let labels: Vec<Label> = labels.iter().map(|(k, v)| Label::new(*k, v.to_string())).collect();
    Key::from_parts(name, labels)
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
            .expect("bucket list is a non-empty constant")
            .build_recorder();
        let handle = recorder.handle();
        Self { recorder, handle }
    }

    pub fn counter(&self, name: &'static str, help: &'static str, labels: &[(&'static str, &str)]) -> Counter {
        self.recorder.describe_counter(KeyName::from(name), None, SharedString::from(help));
        self.recorder.register_counter(&key(name, labels), &METADATA)
    }

    /// One counter per value of the label `key`, in the order of `values`, each also carrying the `fixed` labels.
    /// Given an enum's `ALL` (its variants in declaration order), `variant as usize` indexes the result, so the hot
    /// path never builds a label.
    pub(crate) fn counters<E: Copy, const N: usize>(
        &self,
        name: &'static str,
        help: &'static str,
        fixed: &[(&'static str, &str)],
        (key, label): (&'static str, fn(E) -> &'static str),
        values: [E; N],
    ) -> [Counter; N] {
        values.map(|value| {
            let mut labels = fixed.to_vec();
            labels.push((key, label(value)));
            self.counter(name, help, &labels)
        })
    }

    pub fn gauge(&self, name: &'static str, help: &'static str, labels: &[(&'static str, &str)]) -> Gauge {
        self.recorder.describe_gauge(KeyName::from(name), None, SharedString::from(help));
        self.recorder.register_gauge(&key(name, labels), &METADATA)
    }

    pub fn histogram(&self, name: &'static str, help: &'static str, labels: &[(&'static str, &str)]) -> Histogram {
        self.recorder.describe_histogram(KeyName::from(name), Some(Unit::Seconds), SharedString::from(help));
        self.recorder.register_histogram(&key(name, labels), &METADATA)
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        self.handle.render()
    }

    /// Folds recorded histogram samples into their buckets. Must run periodically: samples accumulate until then.
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }
}

/// For the tests: `all` lists an enum's variants in declaration order, so that `variant as usize` indexes the
/// counters [`Metrics::counters`] registered for it.
#[cfg(test)]
pub(crate) fn assert_declaration_order<E: Copy>(all: &[E], index: fn(E) -> usize, name: fn(E) -> &'static str) {
    for (i, variant) in all.iter().enumerate() {
        assert_eq!(index(*variant), i, "{}", name(*variant));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_registered_metrics() {
        let m = Metrics::new();
        m.counter("iotagent_test_total", "A test counter", &[("hook", "auth_on_publish")]).increment(2);
        m.histogram("iotagent_test_duration_seconds", "A test histogram", &[]).record(0.0003);
        m.upkeep();
        let text = m.render();
        assert!(text.contains(r#"iotagent_test_total{hook="auth_on_publish"} 2"#), "{text}");
        assert!(text.contains(r#"iotagent_test_duration_seconds_bucket{le="0.0005"} 1"#), "{text}");
    }

    #[test]
    fn a_counter_per_value_in_the_order_given() {
        #[derive(Clone, Copy)]
        enum Kind {
            First,
            Second,
        }
        fn name(kind: Kind) -> &'static str {
            match kind {
                Kind::First => "first",
                Kind::Second => "second",
            }
        }
        let m = Metrics::new();
        let family = m.counters(
            "iotagent_test_kinds_total",
            "Kinds",
            &[("hook", "h")],
            ("kind", name),
            [Kind::First, Kind::Second],
        );
        family[Kind::Second as usize].increment(3);
        let text = m.render();
        assert!(text.contains(r#"iotagent_test_kinds_total{hook="h",kind="second"} 3"#), "{text}");
        assert!(text.contains(r#"iotagent_test_kinds_total{hook="h",kind="first"} 0"#), "{text}");
    }
}
