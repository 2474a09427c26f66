//! Device data into Kafka (V2K): the dojot contract applied to device publishes, with the delivery guarantee of the
//! configured mode (ARCHITECTURE.md §3, §5). Kafka specifics live in `crate::kafka`, MQTT ones in `crate::mqtt`.

pub(crate) mod message;
mod metrics;
pub(crate) mod plain;
pub(crate) mod subscription;
mod tenants;

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;

pub(crate) use self::message::{Contract, Invalid, Outcome};
pub(crate) use self::metrics::Failure;
use self::metrics::V2kMetrics;
use self::tenants::{Slot, Tenants};
use crate::kafka::producer::{Delivery, ProduceError, Producer};
use crate::kafka::relay::ReportRelay;
use crate::kafka::topics::{TenantStatus, TenantTopics};
use crate::log_guard::{LogKind, clip};
use crate::metrics::Metrics;
use crate::policy::DeviceId;

/// How device publishes reach Kafka (ARCHITECTURE.md §3, §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Produce from the on_publish webhook; the device's PUBACK waits for Kafka's ack (up to V2K_ACK_TIMEOUT_MS), but
    /// VerneMQ sends it whatever the hook answers, so a service outage loses acknowledged data.
    #[value(name = "on_publish")]
    OnPublish,
    /// Produce inside auth_on_publish and refuse the publish when Kafka does not ack: end-to-end at-least-once.
    #[value(name = "auth_on_publish")]
    AuthOnPublish,
    /// Shared subscription `$share/<group>/+/attrs` with manual acks: no per-message webhook.
    #[value(name = "subscription")]
    Subscription,
}

/// V2K's answer to auth_on_publish for a device's publish.
#[derive(Debug)]
pub enum Admission {
    /// Let it through (in strict mode: Kafka holds the record).
    Admit,
    /// Strict mode needs the payload, and the hook was registered without it.
    NeedsPayload,
    /// Kafka cannot take it now: refuse, so that the device keeps the message and sends it again.
    Unavailable(Unavailable),
}

/// Why V2K cannot take a device publish now.
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    #[error("V2K gate closed: Kafka is behind")]
    GateClosed,
    #[error("the tenant has no data topic in Kafka")]
    UnknownTenant,
    #[error("the tenant already has V2K_TENANT_MAX_IN_FLIGHT records waiting for Kafka")]
    TenantFull,
    #[error(transparent)]
    NotAcknowledged(ProduceError),
}

/// V2K's answer to on_publish for a device's publish.
#[derive(Debug)]
pub enum Notice {
    /// Forwarded (acknowledged, or still queued past the ack deadline), or nothing to do in this mode.
    Done,
    /// on_publish mode needs the payload, and the hook was registered without it.
    NeedsPayload,
    /// The record cannot be delivered (counted in `iotagent_v2k_failed_total`).
    NotDelivered(Unavailable),
}

/// How the payload arrived.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Payload<'a> {
    /// As VerneMQ's webhooks send it (`base64encode = on`, the default).
    Base64(&'a str),
    Raw(&'a [u8]),
}

impl<'a> Payload<'a> {
    /// The bytes the device sent (the text itself when it is not valid base64).
    fn bytes(self) -> Cow<'a, [u8]> {
        match self {
            Payload::Raw(bytes) => Cow::Borrowed(bytes),
            Payload::Base64(text) => base64::engine::general_purpose::STANDARD
                .decode(text)
                .map_or(Cow::Borrowed(text.as_bytes()), Cow::Owned),
        }
    }
}

/// Settings of the forwarder, from configuration.
#[derive(Debug, Clone)]
pub struct V2kSettings {
    pub mode: Mode,
    pub contract: Contract,
    pub ack_timeout: Duration,
    /// Some(bound) when the on_publish gate is on.
    pub gate_max_queue: Option<usize>,
    /// Records of one tenant that may wait for Kafka at once (V2K_TENANT_MAX_IN_FLIGHT).
    pub tenant_max_in_flight: usize,
    /// Some(refresh period) when devices of tenants without a data topic are refused (V2K_REQUIRE_TENANT_TOPIC).
    pub tenant_refresh: Option<Duration>,
}

/// Forwards device publishes to Kafka.
pub struct V2k {
    producer: Producer,
    /// Wakes the tasks waiting for delivery reports, on their runtime.
    relay: ReportRelay,
    settings: V2kSettings,
    metrics: Arc<V2kMetrics>,
    tenants: Tenants,
    /// The tenants with a data topic, when V2K_REQUIRE_TENANT_TOPIC is on.
    topics: Option<TenantTopics>,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Pause between attempts when the producer's queue is full or a record expired.
const RETRY_PAUSE: Duration = Duration::from_millis(200);

impl V2k {
    /// `relay` runs where the publishes wait for Kafka: the webhooks' runtime in the webhook modes.
    pub fn new(producer: Producer, relay: ReportRelay, settings: V2kSettings, metrics: &Metrics) -> Self {
        if settings.mode == Mode::OnPublish {
            tracing::warn!(
                "V2K_MODE=on_publish: VerneMQ acknowledges device publishes whatever on_publish answers, so while this \
                 service is down or restarting acknowledged data is lost; V2K_MODE=auth_on_publish (strict) loses none"
            );
        }
        let tenants = Tenants::new(settings.tenant_max_in_flight);
        let topics = settings.tenant_refresh.map(|_| TenantTopics::new(&settings.contract.topic_suffix));
        Self { producer, relay, settings, metrics: Arc::new(V2kMetrics::new(metrics)), tenants, topics }
    }

    /// How often the known tenants are refreshed, when they are tracked.
    pub fn tenant_refresh(&self) -> Option<Duration> {
        self.settings.tenant_refresh
    }

    /// Reads the data topics from Kafka's metadata; on failure the last known set stays.
    pub async fn refresh_tenants(&self) {
        let Some(topics) = &self.topics else { return };
        match topics.refresh(&self.producer).await {
            Ok(count) => self.metrics.known_tenants.set(count as f64),
            Err(e) => tracing::warn!(error = %e, "cannot refresh the known tenants; keeping the last set"),
        }
    }

    /// Whether the set of known tenants was read at least once (always true with the check off).
    pub fn tenants_loaded(&self) -> bool {
        self.topics.as_ref().is_none_or(TenantTopics::is_loaded)
    }

    /// Whether the tenant's data topic is missing. False with the check off and until Kafka first answered (then
    /// nothing is known; refusing every device while Kafka is away at start would only cause a reconnect storm).
    fn tenant_unknown(&self, tenant: &str) -> bool {
        self.topics.as_ref().is_some_and(|t| t.status(tenant) == TenantStatus::Unknown)
    }

    /// Whether the tenant's dead-letter topic is known to be missing (tenant check on, Kafka answered): a dead letter
    /// for it would only wait for its delivery timeout.
    fn dead_letter_topic_missing(&self, tenant: &str) -> bool {
        self.topics.as_ref().is_some_and(|t| t.dead_letter_status(tenant) == TenantStatus::Unknown)
    }

    /// auth_on_register of a device: whether its tenant may connect (counted when not).
    pub fn tenant_admitted(&self, tenant: &str) -> bool {
        let unknown = self.tenant_unknown(tenant);
        if unknown {
            self.metrics.refused_unknown_tenant.increment(1);
        }
        !unknown
    }

    pub fn producer(&self) -> &Producer {
        &self.producer
    }

    /// Whether VerneMQ may cache an allowed publish: not in strict mode nor with the gate, which decide per message.
    pub fn publish_cacheable(&self) -> bool {
        self.settings.mode != Mode::AuthOnPublish && self.settings.gate_max_queue.is_none()
    }

    /// auth_on_publish of a device: strict mode forwards and admits once Kafka holds the record; the other modes
    /// admit unless the gate is closed.
    pub async fn admit(&self, device: DeviceId<'_>, mqtt_topic: &str, payload: Option<&str>, qos: u8) -> Admission {
        if self.settings.mode != Mode::AuthOnPublish {
            return if self.accepting(device.tenant) {
                Admission::Admit
            } else {
                Admission::Unavailable(Unavailable::GateClosed)
            };
        }
        let Some(payload) = payload else { return Admission::NeedsPayload };
        // Strict: admitted only once Kafka holds the record; otherwise the device keeps it and sends it again.
        match self.forward(device, mqtt_topic, Payload::Base64(payload), qos).await {
            Ok(()) => Admission::Admit,
            Err(e) => Admission::Unavailable(e),
        }
    }

    /// on_publish of a device's data: forwards in on_publish mode, does nothing in the others.
    pub async fn notify(&self, device: DeviceId<'_>, mqtt_topic: &str, payload: Option<&str>, qos: u8) -> Notice {
        if self.settings.mode != Mode::OnPublish {
            return Notice::Done;
        }
        let Some(payload) = payload else {
            self.metrics.failed(Failure::NoPayload).increment(1);
            return Notice::NeedsPayload;
        };
        // VerneMQ sends the device's PUBACK only after the reply: waiting for Kafka's ack makes the PUBACK mean "in
        // Kafka" whenever Kafka answers within the deadline.
        match self.forward(device, mqtt_topic, Payload::Base64(payload), qos).await {
            Ok(()) | Err(Unavailable::NotAcknowledged(ProduceError::Pending(_))) => Notice::Done,
            Err(e) => Notice::NotDelivered(e),
        }
    }

    /// The gate: whether this tenant's publishes should be accepted now (always true without the gate). It closes
    /// per tenant; the overall bound only backs up memory when many tenants are busy at once.
    fn accepting(&self, tenant: &str) -> bool {
        match self.settings.gate_max_queue {
            None => true,
            Some(bound) => {
                self.producer.is_healthy() && self.tenants.has_room(tenant) && self.producer.in_flight() < bound
            }
        }
    }

    /// Refreshes the in-flight gauge and forgets idle tenants (called at every upkeep tick, 5 s).
    pub fn observe(&self) {
        self.metrics.in_flight.set(self.producer.in_flight() as f64);
        self.tenants.sweep();
    }

    fn outcome(&self, device: DeviceId<'_>, mqtt_topic: &str, payload: Payload<'_>) -> Outcome {
        let received = now_ms();
        match payload {
            Payload::Raw(bytes) => self.settings.contract.build(device, mqtt_topic, bytes, received),
            Payload::Base64(text) => match base64::engine::general_purpose::STANDARD.decode(text) {
                Ok(bytes) => self.settings.contract.build(device, mqtt_topic, &bytes, received),
                Err(_) => self.settings.contract.dead_letter(
                    device,
                    mqtt_topic,
                    text.as_bytes(),
                    received,
                    Invalid::BadEncoding,
                ),
            },
        }
    }

    /// Queues the record, holding the tenant's `slot` until its delivery report, and returns its delivery. The report
    /// is counted where it arrives (on the producer's thread, no task per record), even when the caller stops
    /// waiting: that is how expired records are counted. A refused record gives its slot back.
    fn enqueue(&self, outcome: &Outcome, slot: Slot) -> Result<Delivery, ProduceError> {
        let metrics = self.metrics.clone();
        let dead_letter = match outcome {
            Outcome::DeadLetter { reason, .. } => Some(*reason),
            Outcome::Data(_) => None,
        };
        let started = Instant::now();
        let (on_delivery, delivery) = self.relay.observed(move |result| {
            drop(slot);
            count_report(&metrics, result, dead_letter, started);
        });
        match self.producer.send_then(outcome.record(), on_delivery) {
            Ok(()) => Ok(delivery),
            Err(e) => {
                let failure = if matches!(e, ProduceError::QueueFull) { Failure::QueueFull } else { Failure::Final };
                self.metrics.failed(failure).increment(1);
                Err(e)
            }
        }
    }

    /// Webhook modes: forwards one publish. QoS 0 returns once queued; QoS 1/2 waits for Kafka's ack up to the ack
    /// deadline. `Pending` means the record is still queued and will be retried by the producer until it expires.
    /// A tenant at its bound gets `TenantFull` for QoS 1/2; its QoS 0 publishes are dropped and counted.
    /// A record Kafka refuses for good (a final error) goes to the dead-letter topic (`reason=refused`), as a payload
    /// that cannot be data does. A dead letter that cannot be delivered either (no dead-letter topic, or refused for
    /// good) is given up as subscription mode does: counted lost, and answered as forwarded, because sending it
    /// again cannot change that (and a refused publish disconnects an MQTT 3.1.1 device, which then sends the same
    /// message first again, for ever). One ack deadline covers the record and its dead letter.
    async fn forward(
        &self,
        device: DeviceId<'_>,
        mqtt_topic: &str,
        payload: Payload<'_>,
        qos: u8,
    ) -> Result<(), Unavailable> {
        if self.tenant_unknown(device.tenant) {
            self.metrics.failed(Failure::UnknownTenant).increment(1);
            return Err(Unavailable::UnknownTenant);
        }
        let Some(slot) = self.tenants.try_slot(device.tenant) else { return self.tenant_full(qos) };
        let deadline = tokio::time::Instant::now() + self.settings.ack_timeout;
        let outcome = self.outcome(device, mqtt_topic, payload);
        let (letter, slot, why) = match outcome {
            Outcome::DeadLetter { reason, .. } => (outcome, slot, reason.to_string()),
            Outcome::Data(_) => match self.produce(device, &outcome, slot, qos, deadline).await {
                Err(Unavailable::NotAcknowledged(e @ ProduceError::Final(_))) => {
                    self.refused(device, &e);
                    let letter = not_taken_letter(&self.settings.contract, device, mqtt_topic, &payload.bytes(), &e);
                    // The record's slot went back with its refusal.
                    let Some(slot) = self.tenants.try_slot(device.tenant) else { return self.tenant_full(qos) };
                    (letter, slot, format!("refused: {e}"))
                }
                result => return result,
            },
        };
        if self.dead_letter_topic_missing(device.tenant) {
            drop(slot);
            self.lost(device, &format!("{why}; the tenant has no dead-letter topic"));
            return Ok(());
        }
        match self.produce(device, &letter, slot, qos, deadline).await {
            Err(Unavailable::NotAcknowledged(e @ ProduceError::Final(_))) => {
                self.lost(device, &format!("{why}; dead letter: {e}"));
                Ok(())
            }
            result => result,
        }
    }

    /// Queues the record (again while the local queue is full, up to the ack `deadline`) and, for QoS 1/2, waits for
    /// Kafka's ack up to that deadline.
    async fn produce(
        &self,
        device: DeviceId<'_>,
        outcome: &Outcome,
        mut slot: Slot,
        qos: u8,
        deadline: tokio::time::Instant,
    ) -> Result<(), Unavailable> {
        let delivery = loop {
            match self.enqueue(outcome, slot) {
                Ok(delivery) => break delivery,
                Err(ProduceError::QueueFull) if tokio::time::Instant::now() + RETRY_PAUSE < deadline => {
                    tokio::time::sleep(RETRY_PAUSE).await;
                    slot = match self.tenants.try_slot(device.tenant) {
                        Some(slot) => slot,
                        None => return self.tenant_full(qos),
                    };
                }
                Err(e) => return Err(Unavailable::NotAcknowledged(e)),
            }
        };
        if qos == 0 {
            return Ok(());
        }
        let waited = delivery.wait(Some(deadline.saturating_duration_since(tokio::time::Instant::now()))).await;
        if let Err(ProduceError::Pending(_)) = waited {
            self.metrics.answered_before_ack.increment(1);
            return Err(Unavailable::NotAcknowledged(ProduceError::Pending(self.settings.ack_timeout)));
        }
        waited.map_err(Unavailable::NotAcknowledged)
    }

    /// A message given up, though the broker acknowledged it (subscription mode) or is told to (webhook modes):
    /// neither its record nor its dead letter is in Kafka. Counted, and logged with its origin (sampled per device, so
    /// that a device sending nothing but such messages cannot flood the log).
    fn lost(&self, device: DeviceId<'_>, reason: &str) {
        self.metrics.failed(Failure::Lost).increment(1);
        if let Some(suppressed) = self.metrics.failure_lines.admit(LogKind::DeliveryFailure, &device.key()) {
            tracing::error!(
                tenant = %clip(device.tenant),
                device = %clip(device.device),
                reason,
                suppressed,
                "device message acknowledged to the broker but not in Kafka (lost)"
            );
        }
    }

    /// Kafka refused a device record for good: logged with its origin (sampled per device) before it is dead-lettered.
    fn refused(&self, device: DeviceId<'_>, error: &ProduceError) {
        if let Some(suppressed) = self.metrics.failure_lines.admit(LogKind::DeliveryFailure, &device.key()) {
            tracing::warn!(
                tenant = %clip(device.tenant),
                device = %clip(device.device),
                %error,
                suppressed,
                "Kafka refused a device record for good; it goes to the dead-letter topic"
            );
        }
    }

    /// The tenant is at its bound: a refused QoS 1/2 publish in strict mode stays with the device; everything else is
    /// dropped here and counted. A refused publish disconnects an MQTT 3.1.1 device, and a QoS 0 message would not be
    /// resent anyway, so QoS 0 is answered as done.
    fn tenant_full(&self, qos: u8) -> Result<(), Unavailable> {
        if qos == 0 || self.settings.mode != Mode::AuthOnPublish {
            self.metrics.failed(Failure::TenantFull).increment(1);
        }
        if qos == 0 { Ok(()) } else { Err(Unavailable::TenantFull) }
    }
}

/// The dead letter of a valid payload whose record Kafka did not take: `refused` when Kafka refused it for good,
/// `undeliverable` when it was not delivered in time; its `kafka_error` header names the error.
fn not_taken_letter(
    contract: &Contract,
    device: DeviceId<'_>,
    mqtt_topic: &str,
    payload: &[u8],
    error: &ProduceError,
) -> Outcome {
    let reason = if matches!(error, ProduceError::Final(_)) { Invalid::Refused } else { Invalid::Undeliverable };
    let mut letter = contract.dead_letter(device, mqtt_topic, payload, now_ms(), reason);
    if let Outcome::DeadLetter { record, .. } = &mut letter {
        record.headers.push(("kafka_error", error.name()));
    }
    letter
}

/// Counts a record's delivery report (on the producer's polling thread: counters and one log line, nothing more).
fn count_report(
    metrics: &V2kMetrics,
    result: &Result<(), ProduceError>,
    dead_letter: Option<Invalid>,
    started: Instant,
) {
    match result {
        Ok(()) => {
            metrics.latency.record(started.elapsed().as_secs_f64());
            match dead_letter {
                None => metrics.produced_data.increment(1),
                Some(reason) => {
                    metrics.produced_dead_letter.increment(1);
                    metrics.dead_letter(reason).increment(1);
                }
            }
        }
        Err(e) => {
            let (failure, what) = match e {
                ProduceError::Final(_) => (Failure::Final, "Kafka refused a device record for good"),
                _ => (Failure::Expired, "device record expired before Kafka acknowledged it"),
            };
            metrics.failed(failure).increment(1);
            if let Some(suppressed) = metrics.failure_lines.admit(LogKind::DeliveryFailure, failure.as_str()) {
                tracing::error!(error = %e, suppressed, "{what}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::error::{KafkaError, RDKafkaErrorCode};

    use super::*;

    #[test]
    fn a_record_kafka_did_not_take_is_dead_lettered_naming_the_error() {
        let contract =
            Contract { topic_suffix: "device-data".into(), max_payload_bytes: 100, max_dead_letter_bytes: 1024 };
        let device = DeviceId { tenant: "admin", device: "d1" };
        let produce = |code| KafkaError::MessageProduction(code);
        let cases = [
            (
                ProduceError::Final(produce(RDKafkaErrorCode::TopicAuthorizationFailed)),
                "refused",
                "TopicAuthorizationFailed",
            ),
            (ProduceError::Expired(produce(RDKafkaErrorCode::MessageTimedOut)), "undeliverable", "MessageTimedOut"),
        ];
        for (error, reason, name) in cases {
            let Outcome::DeadLetter { record, reason: invalid } =
                not_taken_letter(&contract, device, "admin:d1/attrs", br#"{"n": 1}"#, &error)
            else {
                panic!("not a dead letter");
            };
            assert_eq!(invalid.as_str(), reason);
            assert_eq!(record.topic, "admin.device-data.dead-letter");
            assert_eq!(record.value, br#"{"n": 1}"#);
            let header = |key| record.headers.iter().find(|(k, _)| *k == key).map(|(_, v)| v.as_str());
            assert_eq!((header("reason"), header("kafka_error")), (Some(reason), Some(name)));
        }
    }

    #[test]
    fn a_mass_expiry_logs_a_few_lines_and_counts_every_record() {
        let registry = Metrics::new();
        let metrics = V2kMetrics::new(&registry);
        for _ in 0..100 {
            let expired = Err(ProduceError::Pending(Duration::from_secs(1)));
            count_report(&metrics, &expired, None, Instant::now());
        }
        registry.upkeep();
        let text = registry.render();
        for line in [
            r#"iotagent_v2k_failed_total{class="expired"} 100"#,
            r#"iotagent_log_lines_suppressed_total{kind="delivery_failure"} 97"#,
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
    }
}
