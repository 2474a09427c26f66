//! Commands to devices (K2V): device-manager events consumed from Kafka, each device's configuration published to
//! `<tenant>:<device>/config` through the service's MQTT 5 client, offsets committed only after the broker's answer.

mod counters;
pub mod event;

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use counters::{DeadLetter, K2vMetrics};
pub use event::{Action, EventRules, SkipReason};

use crate::kafka::consumer::{
    ConsumeError, ConsumerSettings, K2vConsumer, OriginalHeaders, Position, Received, TopicChecker,
};
use crate::kafka::producer::{Producer, ProducerSettings};
use crate::metrics::Metrics;
use crate::mqtt::MqttSettings;
use crate::mqtt::publisher::{Ack, Outcome, PublishError, Publisher, Refusal};
use crate::readiness::ReadyFlag;
use crate::shutdown::{Budget, Critical};

/// Client id role of the K2V publisher and consumer (`<MQTT_CLIENT_ID>-k2v`).
pub const ROLE: &str = "k2v";
/// How often the in-flight gauge and the re-sent counter are refreshed.
const GAUGE_INTERVAL: Duration = Duration::from_secs(1);
/// Pause after a consumer error, so a broker outage does not spin.
const ERROR_PAUSE: Duration = Duration::from_millis(200);
/// A refused event goes to `<its topic>.dead-letter` (`<tenant>.dojot.device-manager.device.dead-letter`).
const DEAD_LETTER_SUFFIX: &str = ".dead-letter";
/// Bound on one dead letter (topic lookup, then Kafka's ack): the refused event's offset completes after it anyway.
const DEAD_LETTER_TIMEOUT: Duration = Duration::from_secs(10);
const TOPIC_LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);
/// Part of the shutdown budget kept for the final commit and the disconnects after waiting for PUBACKs.
const COMMIT_RESERVE: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct K2vSettings {
    pub rules: EventRules,
    pub retain: bool,
    pub max_in_flight: u16,
    /// How often the lag gauge is measured.
    pub lag_interval: Duration,
    pub consumer: ConsumerSettings,
    pub mqtt: MqttSettings,
}

#[derive(Debug, thiserror::Error)]
pub enum K2vError {
    #[error(transparent)]
    Kafka(#[from] ConsumeError),
    #[error("MQTT client: {0}")]
    Mqtt(#[from] crate::mqtt::MqttConfigError),
    #[error("dead-letter producer: {0}")]
    DeadLetterProducer(String),
}

/// The running bridge. Dropping it aborts everything at once: no drain, and no commit beyond the periodic ones and
/// librdkafka's own at close, which only ever cover acknowledged messages. [`K2v::shutdown`] stops in order.
pub struct K2v {
    stop: CancellationToken,
    task: AbortOnDropHandle<()>,
}

impl std::fmt::Debug for K2v {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("K2v")
    }
}

impl K2v {
    /// Connects to both brokers (in the background; the probes follow) and starts bridging.
    ///
    /// # Errors
    /// Invalid consumer settings or TLS files.
    pub fn start(
        settings: K2vSettings,
        metrics: &Metrics,
        kafka_probe: ReadyFlag,
        mqtt_probe: ReadyFlag,
        budget: Budget,
        critical: &Critical,
    ) -> Result<Self, K2vError> {
        let probes = [kafka_probe.clone(), mqtt_probe.clone()];
        let consumer = K2vConsumer::new(&settings.consumer, kafka_probe)?;
        // Dead letters are rare: no compression or batching to configure.
        let dead_letters = ProducerSettings {
            brokers: settings.consumer.brokers.clone(),
            compression: "none".into(),
            linger_ms: 0,
            delivery_timeout_ms: DEAD_LETTER_TIMEOUT.as_millis() as u64,
            client_id: format!("{}-dead-letter", settings.consumer.client_id),
        };
        let producer = Producer::new(&dead_letters).map_err(|e| K2vError::DeadLetterProducer(e.to_string()))?;
        let (publisher, acks) = Publisher::start(&settings.mqtt, ROLE, settings.max_in_flight, mqtt_probe)?;
        let stop = CancellationToken::new();
        let (dead_done, dead_rx) = mpsc::unbounded_channel();
        let bridge = Bridge {
            topics: consumer.topic_checker(),
            consumer,
            producer,
            dead_done,
            dead_pending: 0,
            publisher,
            rules: settings.rules,
            retain: settings.retain,
            max_in_flight: usize::from(settings.max_in_flight),
            lag_interval: settings.lag_interval,
            waiting: HashMap::new(),
            metrics: K2vMetrics::new(metrics),
        };
        tracing::info!(pattern = %settings.consumer.topic_pattern, group = %settings.consumer.group_id, "K2V started");
        let bridge = AbortOnDropHandle::new(tokio::spawn(bridge.run(acks, dead_rx, stop.clone(), budget)));
        let task = AbortOnDropHandle::new(tokio::spawn(supervise(bridge, probes, critical.clone())));
        Ok(Self { stop, task })
    }

    /// Stops consuming, waits for in-flight publishes, commits what was acknowledged, then disconnects from the
    /// broker, all within the shutdown budget given at start.
    pub async fn shutdown(self) {
        self.stop.cancel();
        // The supervisor reports a failed bridge itself.
        let _ = self.task.await;
    }
}

/// Waits for the bridge. One that failed (a panic: it only ends otherwise when asked) takes K2V's probes down with
/// the reason and stops the service (`Critical`).
async fn supervise(bridge: AbortOnDropHandle<()>, probes: [ReadyFlag; 2], critical: Critical) {
    if let Err(error) = bridge.await {
        for probe in &probes {
            probe.down(format!("K2V stopped: {error}"));
        }
        critical.failed(format!("K2V failed: {error}"));
    }
}

/// A published event, kept until the broker answers: where it came from, and what a dead letter would carry.
struct Waiting {
    position: Position,
    mqtt_topic: String,
    value: Vec<u8>,
    key: Option<Vec<u8>>,
    headers: OriginalHeaders,
}

struct Bridge {
    consumer: K2vConsumer,
    topics: TopicChecker,
    producer: Producer,
    /// Refused events whose dead letter is done (written or not): their offsets complete then.
    dead_done: mpsc::UnboundedSender<Position>,
    dead_pending: usize,
    publisher: Publisher,
    rules: EventRules,
    retain: bool,
    max_in_flight: usize,
    lag_interval: Duration,
    /// Publishes awaiting the broker's answer, by publisher sequence number.
    waiting: HashMap<u64, Waiting>,
    metrics: K2vMetrics,
}

impl Bridge {
    async fn run(
        mut self,
        mut acks: mpsc::UnboundedReceiver<Ack>,
        mut dead: mpsc::UnboundedReceiver<Position>,
        stop: CancellationToken,
        budget: Budget,
    ) {
        // Consumption stops by itself while the broker is unreachable: no acks come back, so the in-flight bound is
        // reached after at most K2V_MAX_IN_FLIGHT messages, which the publisher holds and re-sends after the
        // reconnect. (librdkafka's pause/resume is not used: resuming could skip a message that had been fetched
        // but not yet returned, as the fault tests showed.)
        let mut connected = self.publisher.connected();
        let mut gauges = tokio::time::interval(GAUGE_INTERVAL);
        // Off the bridge's loop: reading watermarks is a broker round trip per partition.
        let lag = AbortOnDropHandle::new(tokio::spawn({
            let probe = self.consumer.lag_meter();
            let gauge = self.metrics.lag.clone();
            let interval = self.lag_interval;
            async move {
                let mut tick = tokio::time::interval(interval);
                loop {
                    tick.tick().await;
                    if let Some(lag) = probe.measure(Duration::from_secs(1)).await {
                        gauge.set(lag as f64);
                    }
                }
            }
        }));
        loop {
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                Some(ack) = acks.recv() => {
                    self.answered(ack);
                    // Acks come in bursts (several PUBACKs per read): take them all, store offsets once.
                    while let Ok(ack) = acks.try_recv() {
                        self.answered(ack);
                    }
                    self.consumer.store();
                }
                Some(position) = dead.recv() => {
                    self.dead_lettered(&position);
                    self.consumer.store();
                }
                changed = connected.changed() => {
                    if changed.is_err() {
                        tracing::error!("MQTT publisher stopped");
                        break;
                    }
                }
                _ = gauges.tick() => {
                    self.metrics.in_flight.set(self.waiting.len() as f64);
                    self.metrics.resent.absolute(self.publisher.resent());
                }
                received = self.consumer.recv(), if self.waiting.len() < self.max_in_flight => match received {
                    Ok(message) => {
                        // Take what else is already fetched, up to the in-flight bound, before looking at acks again.
                        let mut open = self.handle(message, &stop).await;
                        while open && self.waiting.len() < self.max_in_flight {
                            match self.consumer.try_recv() {
                                Some(Ok(message)) => open = self.handle(message, &stop).await,
                                Some(Err(error)) => {
                                    tracing::warn!(%error, "K2V consume");
                                    break;
                                }
                                None => break,
                            }
                        }
                        self.consumer.store();
                        if !open {
                            break;
                        }
                    }
                    Err(error) => {
                        tracing::warn!(%error, "K2V consume");
                        tokio::time::sleep(ERROR_PAUSE).await;
                    }
                },
            }
        }
        // The lag task borrows the consumer, whose close waits for every call in progress.
        drop(lag);
        self.stop(acks, dead, budget).await;
    }

    fn answered(&mut self, ack: Ack) {
        let Some(waiting) = self.waiting.remove(&ack.seq) else { return };
        match ack.outcome {
            Outcome::Delivered => {
                self.metrics.acked.increment(1);
                self.consumer.complete(&waiting.position);
            }
            Outcome::Refused(refusal) => self.refused(waiting, refusal),
        }
    }

    /// A refused event is skipped: counted, logged, dead-lettered (off the bridge's loop), then its offset
    /// completes in place.
    fn refused(&mut self, waiting: Waiting, refusal: Refusal) {
        self.metrics.skip(SkipReason::Refused);
        let (tenant, device) = tenant_device(&waiting.mqtt_topic);
        tracing::warn!(
            tenant,
            device,
            topic = %waiting.mqtt_topic,
            partition = waiting.position.partition,
            offset = waiting.position.offset,
            reason_code = refusal.code(),
            reason = refusal.name(),
            "K2V configuration refused by the broker; skipped and dead-lettered"
        );
        self.dead_pending += 1;
        let producer = self.producer.clone();
        let topics = self.topics.clone();
        let counters = self.metrics.dead_letters.clone();
        let done = self.dead_done.clone();
        tokio::spawn(async move {
            let position = waiting.position.clone();
            let outcome =
                tokio::time::timeout(DEAD_LETTER_TIMEOUT, dead_letter(&producer, &topics, waiting, refusal)).await;
            let outcome = outcome.unwrap_or(DeadLetter::Failed);
            counters[outcome as usize].increment(1);
            let _ = done.send(position);
        });
    }

    fn dead_lettered(&mut self, position: &Position) {
        self.dead_pending = self.dead_pending.saturating_sub(1);
        self.consumer.complete(position);
    }

    /// Publishes or skips one message. False when the publisher is gone.
    async fn handle(&mut self, message: Received, stop: &CancellationToken) -> bool {
        self.metrics.consumed.increment(1);
        let Received { position, payload, key, headers } = message;
        let action = match payload.as_deref().map(|p| self.rules.interpret(&position.topic, p)) {
            Some(Ok(action)) => action,
            Some(Err(error)) => {
                // The event's fields are whatever a producer wrote: clipped.
                let message = crate::log_guard::clip(&error.to_string()).to_string();
                tracing::warn!(error = %message, topic = %position.topic, partition = position.partition,
                               offset = position.offset, "K2V event skipped");
                return self.skip(&position, error.reason());
            }
            None => {
                tracing::warn!(topic = %position.topic, offset = position.offset, "K2V event without value skipped");
                return self.skip(&position, SkipReason::Malformed);
            }
        };
        let (topic, config) = match action {
            Action::Publish { topic, payload: config } => (topic, Bytes::from(config)),
            Action::Ignore { event } => {
                tracing::debug!(event, "K2V event is not a configuration");
                return self.skip(&position, SkipReason::NotConfigure);
            }
            Action::Remove { tenant, device } => {
                // Live session control (sessions/) reads remove events with a consumer of its own: nothing to do here.
                tracing::info!(tenant, device, "device removed");
                return self.skip(&position, SkipReason::Remove);
            }
        };
        loop {
            match self.publisher.publish(&topic, config.clone(), self.retain) {
                Ok(seq) => {
                    self.metrics.published.increment(1);
                    let value = payload.unwrap_or_default();
                    self.waiting.insert(seq, Waiting { position, mqtt_topic: topic, value, key, headers });
                    return true;
                }
                Err(PublishError::TooLarge(size)) => {
                    tracing::warn!(topic, size, "K2V configuration too large for MQTT; skipped");
                    return self.skip(&position, SkipReason::TooLarge);
                }
                Err(error @ PublishError::InvalidTopic(_)) => {
                    // Device ids exclude topic syntax, so only a misconfiguration gets here.
                    tracing::warn!(%error, "K2V configuration skipped");
                    return self.skip(&position, SkipReason::InvalidDevice);
                }
                Err(PublishError::Busy) => {
                    // The request queue is sized above the in-flight bound, so this is brief.
                    tokio::select! {
                        () = stop.cancelled() => return true,
                        () = tokio::time::sleep(Duration::from_millis(5)) => {}
                    }
                }
                Err(PublishError::Closed) => return false,
            }
        }
    }

    fn skip(&self, position: &Position, reason: SkipReason) -> bool {
        self.metrics.skip(reason);
        self.consumer.complete(position);
        true
    }

    /// Shutdown order: no more consuming (the loop has ended) → acks of in-flight publishes until the deadline →
    /// commit of what is acknowledged → MQTT disconnect → leave the consumer group, all before the budget's deadline.
    /// Refused events whose dead letter is under way count as in flight.
    async fn stop(
        mut self,
        mut acks: mpsc::UnboundedReceiver<Ack>,
        mut dead: mpsc::UnboundedReceiver<Position>,
        budget: Budget,
    ) {
        let deadline = budget.deadline();
        let acks_until = budget.before(COMMIT_RESERVE);
        while !self.waiting.is_empty() || self.dead_pending > 0 {
            tokio::select! {
                () = tokio::time::sleep_until(acks_until) => break,
                ack = acks.recv(), if !self.waiting.is_empty() => match ack {
                    Some(ack) => self.answered(ack),
                    None => break,
                },
                Some(position) = dead.recv() => self.dead_lettered(&position),
            }
        }
        if !self.waiting.is_empty() {
            tracing::warn!(
                left = self.waiting.len(),
                "K2V publishes not acknowledged at shutdown; replayed next start"
            );
        }
        // Bounded: a synchronous commit waits for the group coordinator, which may be unreachable.
        match tokio::time::timeout_at(deadline, self.consumer.commit()).await {
            Ok(Ok(())) => tracing::info!("K2V offsets committed"),
            Ok(Err(error)) => tracing::error!(%error, "K2V final commit"),
            Err(_) => tracing::error!("K2V final commit timed out; the periodic commits stand"),
        }
        self.publisher.close(budget.remaining()).await;
        self.metrics.in_flight.set(0.0);
        // Leaving the group lets another instance take the partitions over at once; with Kafka away it cannot.
        self.consumer.close(budget.remaining()).await;
        tracing::info!("K2V stopped");
    }
}

/// `<tenant>:<device>/<suffix>` → (tenant, device), for the logs.
fn tenant_device(topic: &str) -> (&str, &str) {
    let username = topic.split_once('/').map_or(topic, |(username, _)| username);
    username.split_once(':').unwrap_or((username, ""))
}

/// Writes a refused event to `<its topic>.dead-letter` when that topic exists: the original key, value and headers,
/// plus `reason` (the refusal's name) and `mqtt_reason_code` (decimal).
async fn dead_letter(producer: &Producer, topics: &TopicChecker, waiting: Waiting, refusal: Refusal) -> DeadLetter {
    let topic = format!("{}{DEAD_LETTER_SUFFIX}", waiting.position.topic);
    match topics.exists(topic.clone(), TOPIC_LOOKUP_TIMEOUT).await {
        Some(true) => {}
        Some(false) => {
            tracing::warn!(topic, "no dead-letter topic; the refused event is only logged and counted");
            return DeadLetter::NoTopic;
        }
        None => {
            tracing::warn!(topic, "dead-letter topic lookup failed; the refused event is only logged and counted");
            return DeadLetter::Failed;
        }
    }
    let added = [("reason", refusal.name()), ("mqtt_reason_code", &refusal.code().to_string())];
    let sent = producer.send_bytes(&topic, waiting.key.as_deref(), Some(&waiting.value), waiting.headers, &added);
    match sent {
        Ok(delivery) => match delivery.wait(None).await {
            Ok(()) => DeadLetter::Written,
            Err(error) => {
                tracing::warn!(topic, %error, "dead letter not written");
                DeadLetter::Failed
            }
        },
        Err(error) => {
            tracing::warn!(topic, %error, "dead letter not written");
            DeadLetter::Failed
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_and_device_of_a_config_topic() {
        assert_eq!(tenant_device("admin:a1998e/config"), ("admin", "a1998e"));
        assert_eq!(tenant_device("odd"), ("odd", ""));
    }

    #[tokio::test]
    async fn a_failed_bridge_takes_the_probes_down_and_says_so() {
        let probes = [ReadyFlag::default(), ReadyFlag::default()];
        probes.iter().for_each(|p| p.set(true));
        let failed = CancellationToken::new();
        let bridge = AbortOnDropHandle::new(tokio::spawn(async { panic!("a bug") }));
        supervise(bridge, probes.clone(), Critical::new(failed.clone())).await;
        assert!(failed.is_cancelled());
        for probe in &probes {
            assert!(!probe.is_up());
            assert!(
                probe.reason().is_some_and(|r| r.contains("K2V stopped") && r.contains("a bug")),
                "{:?}",
                probe.reason()
            );
        }
    }

    #[tokio::test]
    async fn a_bridge_that_stopped_when_asked_leaves_the_probes_alone() {
        let probes = [ReadyFlag::default(), ReadyFlag::default()];
        probes.iter().for_each(|p| p.set(true));
        let failed = CancellationToken::new();
        let critical = Critical::new(failed.clone());
        supervise(AbortOnDropHandle::new(tokio::spawn(async {})), probes.clone(), critical).await;
        assert!(!failed.is_cancelled());
        assert!(probes.iter().all(ReadyFlag::is_up));
    }
}
