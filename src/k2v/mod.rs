//! Commands to devices (K2V): device-manager events consumed from Kafka, each device's configuration published to
//! `<tenant>:<device>/config` through the service's MQTT client, offsets committed only after the broker's PUBACK.

pub mod event;

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use metrics::{Counter, Gauge};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

pub use event::{Action, EventError, EventRules, SkipReason};

use crate::health::Probe;
use crate::kafka::consumer::{ConsumeError, ConsumerSettings, K2vConsumer, Position, Received};
use crate::metrics::Metrics;
use crate::mqtt::MqttSettings;
use crate::mqtt::publisher::{PublishError, Publisher};
use crate::shutdown::Budget;

/// Client id role of the K2V publisher and consumer (`<MQTT_CLIENT_ID>-k2v`).
pub const ROLE: &str = "k2v";
/// How often the in-flight gauge and the re-sent counter are refreshed.
const GAUGE_INTERVAL: Duration = Duration::from_secs(1);
/// Pause after a consumer error, so a broker outage does not spin.
const ERROR_PAUSE: Duration = Duration::from_millis(200);
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
}

struct K2vMetrics {
    consumed: Counter,
    published: Counter,
    acked: Counter,
    resent: Counter,
    /// Indexed by [`SkipReason`].
    skipped: [Counter; SkipReason::ALL.len()],
    in_flight: Gauge,
    lag: Gauge,
}

impl K2vMetrics {
    fn new(metrics: &Metrics) -> Self {
        let skipped = SkipReason::ALL.map(|reason| {
            metrics.counter(
                "iotagent_k2v_skipped_total",
                "Kafka messages completed without a publish, by reason",
                &[("reason", reason.name())],
            )
        });
        Self {
            consumed: metrics.counter("iotagent_k2v_consumed_total", "Device-manager events consumed from Kafka", &[]),
            published: metrics.counter("iotagent_k2v_published_total", "Configurations published to devices", &[]),
            acked: metrics.counter("iotagent_k2v_acked_total", "Publishes acknowledged by the broker (PUBACK)", &[]),
            resent: metrics.counter(
                "iotagent_k2v_resent_total",
                "Publishes sent again because the connection was lost before their PUBACK",
                &[],
            ),
            skipped,
            in_flight: metrics.gauge("iotagent_k2v_in_flight", "Publishes awaiting the broker's PUBACK", &[]),
            lag: metrics.gauge(
                "iotagent_k2v_lag",
                "Events not yet acknowledged in the partitions consumed so far (high watermark minus commit point)",
                &[],
            ),
        }
    }

    fn skip(&self, reason: SkipReason) {
        // `SkipReason::ALL` lists the variants in declaration order.
        self.skipped[reason as usize].increment(1);
    }
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
        kafka_probe: Probe,
        mqtt_probe: Probe,
        budget: Budget,
    ) -> Result<Self, K2vError> {
        let consumer = K2vConsumer::new(&settings.consumer, kafka_probe)?;
        let (publisher, acks) = Publisher::start(&settings.mqtt, ROLE, settings.max_in_flight, mqtt_probe)?;
        let stop = CancellationToken::new();
        let bridge = Bridge {
            consumer,
            publisher,
            rules: settings.rules,
            retain: settings.retain,
            max_in_flight: usize::from(settings.max_in_flight),
            lag_interval: settings.lag_interval,
            waiting: HashMap::new(),
            metrics: K2vMetrics::new(metrics),
        };
        tracing::info!(pattern = %settings.consumer.topic_pattern, group = %settings.consumer.group_id, "K2V started");
        let task = AbortOnDropHandle::new(tokio::spawn(bridge.run(acks, stop.clone(), budget)));
        Ok(Self { stop, task })
    }

    /// Stops consuming, waits for in-flight publishes, commits what was acknowledged, then disconnects from the
    /// broker, all within the shutdown budget given at start.
    pub async fn shutdown(self) {
        self.stop.cancel();
        if let Err(error) = self.task.await {
            tracing::error!(%error, "K2V task failed");
        }
    }
}

struct Bridge {
    consumer: K2vConsumer,
    publisher: Publisher,
    rules: EventRules,
    retain: bool,
    max_in_flight: usize,
    lag_interval: Duration,
    /// Publishes awaiting PUBACK: publisher sequence number → Kafka position.
    waiting: HashMap<u64, Position>,
    metrics: K2vMetrics,
}

impl Bridge {
    async fn run(mut self, mut acks: mpsc::UnboundedReceiver<u64>, stop: CancellationToken, budget: Budget) {
        // Consumption stops by itself while the broker is unreachable: no acks come back, so the in-flight bound is
        // reached after at most K2V_MAX_IN_FLIGHT messages, which the publisher holds and re-sends after the
        // reconnect. (librdkafka's pause/resume is not used: resuming could skip a message that had been fetched
        // but not yet returned, as the fault tests showed.)
        let mut connected = self.publisher.connected();
        let mut gauges = tokio::time::interval(GAUGE_INTERVAL);
        // Off the bridge's loop: reading watermarks is a broker round trip per partition.
        let lag = AbortOnDropHandle::new(tokio::spawn({
            let probe = self.consumer.lag_probe();
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
                Some(seq) = acks.recv() => {
                    self.acked(seq);
                    // Acks come in bursts (several PUBACKs per read): take them all, store offsets once.
                    while let Ok(seq) = acks.try_recv() {
                        self.acked(seq);
                    }
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
        self.stop(acks, budget).await;
    }

    fn acked(&mut self, seq: u64) {
        if let Some(position) = self.waiting.remove(&seq) {
            self.metrics.acked.increment(1);
            self.consumer.complete(&position);
        }
    }

    /// Publishes or skips one message. False when the publisher is gone.
    async fn handle(&mut self, message: Received, stop: &CancellationToken) -> bool {
        self.metrics.consumed.increment(1);
        let Received { position, payload } = message;
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
        let (topic, payload) = match action {
            Action::Publish { topic, payload } => (topic, Bytes::from(payload)),
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
            match self.publisher.publish(&topic, payload.clone(), self.retain) {
                Ok(seq) => {
                    self.metrics.published.increment(1);
                    self.waiting.insert(seq, position);
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
    async fn stop(mut self, mut acks: mpsc::UnboundedReceiver<u64>, budget: Budget) {
        let deadline = budget.deadline();
        let acks_until = budget.before(COMMIT_RESERVE);
        while !self.waiting.is_empty() {
            match tokio::time::timeout_at(acks_until, acks.recv()).await {
                Ok(Some(seq)) => self.acked(seq),
                Ok(None) | Err(_) => break,
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
