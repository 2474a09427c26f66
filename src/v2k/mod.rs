//! Device data into Kafka (V2K): the dojot contract applied to device publishes, with the delivery guarantee of the
//! configured mode (ARCHITECTURE.md §3, §5). Kafka specifics live in `crate::kafka`, MQTT ones in `crate::mqtt`.

pub mod message;
pub mod plain;
pub mod subscription;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use metrics::{Counter, Gauge, Histogram};
use tokio::sync::oneshot;

pub use self::message::{Contract, Invalid, Outcome};
use crate::kafka::producer::{ProduceError, Producer};
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
    /// The record cannot be delivered.
    NotDelivered(ProduceError),
}

/// How the payload arrived.
#[derive(Debug, Clone, Copy)]
pub enum Payload<'a> {
    /// As VerneMQ's webhooks send it (`base64encode = on`, the default).
    Base64(&'a str),
    Raw(&'a [u8]),
}

struct V2kMetrics {
    produced_data: Counter,
    produced_dead_letter: Counter,
    answered_before_ack: Counter,
    queue_full: Counter,
    expired: Counter,
    failed: Counter,
    dead_letter: [Counter; 4],
    in_flight: Gauge,
    latency: Histogram,
}

impl V2kMetrics {
    fn new(m: &Metrics) -> Self {
        let produced =
            |kind| m.counter("iotagent_v2k_produced_total", "Records acknowledged by Kafka", &[("kind", kind)]);
        let failed =
            |class| m.counter("iotagent_v2k_failed_total", "Records not delivered, by class", &[("class", class)]);
        let reasons = [Invalid::NotJson, Invalid::NotObject, Invalid::TooLarge, Invalid::BadEncoding];
        Self {
            produced_data: produced("data"),
            produced_dead_letter: produced("dead_letter"),
            answered_before_ack: m.counter(
                "iotagent_v2k_answered_before_ack_total",
                "Webhook publishes answered at the ack deadline while their record was still queued",
                &[],
            ),
            queue_full: failed("queue_full"),
            expired: failed("expired"),
            failed: failed("final"),
            dead_letter: reasons.map(|r| {
                m.counter(
                    "iotagent_v2k_dead_lettered_total",
                    "Payloads sent to the dead-letter topic",
                    &[("reason", r.as_str())],
                )
            }),
            in_flight: m.gauge("iotagent_v2k_in_flight", "Records waiting for Kafka's ack", &[]),
            latency: m.histogram(
                "iotagent_v2k_produce_duration_seconds",
                "Time from queueing a record to Kafka's ack",
                &[],
            ),
        }
    }

    fn dead_letter(&self, reason: Invalid) -> &Counter {
        let index = match reason {
            Invalid::NotJson => 0,
            Invalid::NotObject => 1,
            Invalid::TooLarge => 2,
            Invalid::BadEncoding => 3,
        };
        &self.dead_letter[index]
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
}

/// Forwards device publishes to Kafka.
pub struct V2k {
    producer: Producer,
    settings: V2kSettings,
    metrics: Arc<V2kMetrics>,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Pause between attempts when the producer's queue is full or a record expired.
const RETRY_PAUSE: Duration = Duration::from_millis(200);

impl V2k {
    pub fn new(producer: Producer, settings: V2kSettings, metrics: &Metrics) -> Self {
        if settings.mode == Mode::OnPublish {
            tracing::warn!(
                "V2K_MODE=on_publish: VerneMQ acknowledges device publishes whatever on_publish answers, so while this \
                 service is down or restarting acknowledged data is lost; V2K_MODE=auth_on_publish (strict) loses none"
            );
        }
        Self { producer, settings, metrics: Arc::new(V2kMetrics::new(metrics)) }
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
            return if self.accepting() { Admission::Admit } else { Admission::Unavailable(Unavailable::GateClosed) };
        }
        let Some(payload) = payload else { return Admission::NeedsPayload };
        // Strict: admitted only once Kafka holds the record; otherwise the device keeps it and sends it again.
        match self.forward(device, mqtt_topic, Payload::Base64(payload), qos).await {
            Ok(()) => Admission::Admit,
            Err(e) => Admission::Unavailable(Unavailable::NotAcknowledged(e)),
        }
    }

    /// on_publish of a device's data: forwards in on_publish mode, does nothing in the others.
    pub async fn notify(&self, device: DeviceId<'_>, mqtt_topic: &str, payload: Option<&str>, qos: u8) -> Notice {
        if self.settings.mode != Mode::OnPublish {
            return Notice::Done;
        }
        let Some(payload) = payload else { return Notice::NeedsPayload };
        // VerneMQ sends the device's PUBACK only after the reply: waiting for Kafka's ack makes the PUBACK mean "in
        // Kafka" whenever Kafka answers within the deadline.
        match self.forward(device, mqtt_topic, Payload::Base64(payload), qos).await {
            Ok(()) | Err(ProduceError::Pending(_)) => Notice::Done,
            Err(e) => Notice::NotDelivered(e),
        }
    }

    /// The gate: whether device publishes should be accepted now (always true without the gate).
    fn accepting(&self) -> bool {
        match self.settings.gate_max_queue {
            None => true,
            Some(bound) => self.producer.is_healthy() && self.producer.in_flight() < bound,
        }
    }

    /// Refreshes the in-flight gauge (called periodically).
    pub fn observe(&self) {
        self.metrics.in_flight.set(self.producer.in_flight() as f64);
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

    /// Queues the record and returns a receiver of its final delivery result; a watcher task counts the outcome
    /// even when the caller stops waiting (that is how expired records are counted).
    fn enqueue(&self, outcome: &Outcome) -> Result<oneshot::Receiver<Result<(), ProduceError>>, ProduceError> {
        let delivery = self.producer.send(outcome.record()).inspect_err(|e| {
            if matches!(e, ProduceError::QueueFull) {
                self.metrics.queue_full.increment(1);
            } else {
                self.metrics.failed.increment(1);
            }
        })?;
        let (tx, rx) = oneshot::channel();
        let metrics = self.metrics.clone();
        let dead_letter = match outcome {
            Outcome::DeadLetter { reason, .. } => Some(*reason),
            Outcome::Data(_) => None,
        };
        let started = Instant::now();
        tokio::spawn(async move {
            let result = delivery.wait(None).await;
            match &result {
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
                Err(ProduceError::Final(e)) => {
                    metrics.failed.increment(1);
                    tracing::error!(error = %e, "Kafka refused a device record for good");
                }
                Err(e) => {
                    metrics.expired.increment(1);
                    tracing::error!(error = %e, "device record expired before Kafka acknowledged it");
                }
            }
            let _ = tx.send(result);
        });
        Ok(rx)
    }

    /// Webhook modes: forwards one publish. QoS 0 returns once queued; QoS 1/2 waits for Kafka's ack up to the ack
    /// deadline. `Err(Pending)` means the record is still queued and will be retried by the producer.
    async fn forward(
        &self,
        device: DeviceId<'_>,
        mqtt_topic: &str,
        payload: Payload<'_>,
        qos: u8,
    ) -> Result<(), ProduceError> {
        let outcome = self.outcome(device, mqtt_topic, payload);
        let deadline = tokio::time::Instant::now() + self.settings.ack_timeout;
        let receiver = loop {
            match self.enqueue(&outcome) {
                Ok(receiver) => break receiver,
                Err(ProduceError::QueueFull) if tokio::time::Instant::now() + RETRY_PAUSE < deadline => {
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                Err(e) => return Err(e),
            }
        };
        if qos == 0 {
            return Ok(());
        }
        match tokio::time::timeout_at(deadline, receiver).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(ProduceError::Expired(rdkafka::error::KafkaError::Canceled)),
            Err(_) => {
                self.metrics.answered_before_ack.increment(1);
                Err(ProduceError::Pending(self.settings.ack_timeout))
            }
        }
    }

    /// Subscription mode: queues the record now (so records keep the order of the calls) and returns a future that
    /// keeps trying until Kafka acknowledged it, while the broker holds the MQTT message unacknowledged. The future
    /// completes only when acknowledging is safe: delivered, or refused for good (a poison record must not block the
    /// subscription forever; it is counted and logged).
    pub fn forward_until_delivered(
        self: &Arc<Self>,
        device: DeviceId<'_>,
        mqtt_topic: &str,
        payload: &[u8],
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let outcome = self.outcome(device, mqtt_topic, Payload::Raw(payload));
        let first = self.enqueue(&outcome);
        let this = self.clone();
        async move {
            let mut attempt = first;
            loop {
                let result = match attempt {
                    Ok(receiver) => receiver.await.unwrap_or(Err(ProduceError::QueueFull)),
                    Err(e) => Err(e),
                };
                match result {
                    Ok(()) | Err(ProduceError::Final(_)) => return,
                    Err(_) => tokio::time::sleep(RETRY_PAUSE).await,
                }
                attempt = this.enqueue(&outcome);
            }
        }
    }
}
