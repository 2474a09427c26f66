//! The K2V consumer: a regex subscription whose offsets advance only over messages the caller completed, in
//! partition order, so a commit never passes a message still waiting for its MQTT acknowledgement.

use std::future::Future as _;
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::{Mutex, RwLock};

use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedHeaders, Header, Message, OwnedHeaders};
use rdkafka::statistics::Statistics;

pub use super::offsets::Position;
use super::offsets::Tracker;
use crate::readiness::ReadyFlag;

#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    pub brokers: String,
    pub group_id: String,
    pub client_id: String,
    /// A regex (`^…`) or an exact topic name.
    pub topic_pattern: String,
    pub commit_interval: Duration,
    pub session_timeout: Duration,
    pub metadata_refresh: Duration,
    /// `earliest` or `latest`.
    pub auto_offset_reset: String,
    pub stats_interval: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ConsumeError {
    #[error("cannot create the Kafka consumer: {0}")]
    Create(KafkaError),
    #[error("cannot subscribe to {pattern}: {source}")]
    Subscribe { pattern: String, source: KafkaError },
    #[error("Kafka consumer: {0}")]
    Receive(KafkaError),
    #[error("commit failed: {0}")]
    Commit(KafkaError),
}

/// One consumed message, copied out of librdkafka's buffer.
#[derive(Debug, Clone)]
pub struct Received {
    pub position: Position,
    /// `None` for a tombstone (no value).
    pub payload: Option<Vec<u8>>,
    /// Kept for a dead letter, which carries the original key and headers.
    pub key: Option<Vec<u8>>,
    pub headers: OriginalHeaders,
}

/// A consumed message's headers as they came, only to be written again. Never read: rdkafka panics on a header name
/// that is not UTF-8, and any producer may send one.
#[derive(Debug, Clone, Default)]
pub struct OriginalHeaders(Option<OwnedHeaders>);

impl OriginalHeaders {
    /// These headers followed by `added`.
    pub(super) fn with(self, added: &[(&str, &str)]) -> OwnedHeaders {
        let headers = self.0.unwrap_or_else(|| OwnedHeaders::new_with_capacity(added.len()));
        added.iter().fold(headers, |all, (key, value)| all.insert(Header { key, value: Some(*value) }))
    }
}

/// Hands moved commit points to librdkafka (the next commit sends them).
fn store_moved<C: ConsumerContext>(consumer: &impl Consumer<C>, tracker: &Mutex<Tracker>) {
    let Some(tpl) = tracker.lock().take_moved() else { return };
    // Fails only for a partition revoked meanwhile; its new owner replays from the last commit.
    if let Err(error) = consumer.store_offsets(&tpl) {
        tracing::debug!(%error, "offsets not stored");
    }
}

/// librdkafka callbacks: assignment changes (run inside `recv`, so they are ordered with the messages), statistics
/// (broker state), errors.
struct Context {
    tracker: Arc<Mutex<Tracker>>,
    probe: ReadyFlag,
}

impl ClientContext for Context {
    fn stats(&self, statistics: Statistics) {
        let up = statistics.brokers.values().any(|b| b.state == "UP");
        self.probe.set(up);
    }

    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        forward_log!("librdkafka", level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            // librdkafka repeats this on every reconnect attempt: say it once per outage.
            let was_up = self.probe.is_up();
            self.probe.set(false);
            if !was_up {
                tracing::debug!(%error, reason, "Kafka consumer");
                return;
            }
        }
        tracing::warn!(%error, reason, "Kafka consumer");
    }
}

impl ConsumerContext for Context {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            store_moved(consumer, &self.tracker);
            // Commit what is acknowledged before another member takes the partitions over; the rest is replayed
            // there (at-least-once).
            if let Err(error) = consumer.commit_consumer_state(CommitMode::Async)
                && error.rdkafka_error_code() != Some(RDKafkaErrorCode::NoOffset)
            {
                tracing::warn!(%error, "commit before revocation failed");
            }
            let mut tracker = self.tracker.lock();
            for e in tpl.elements() {
                tracker.revoke(e.topic(), e.partition());
            }
            tracing::info!(partitions = tpl.count(), "K2V partitions revoked");
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let mut tracker = self.tracker.lock();
            for e in tpl.elements() {
                tracker.assign(e.topic(), e.partition());
            }
            drop(tracker);
            tracing::info!(partitions = tpl.count(), "K2V partitions assigned");
        }
    }
}

/// The consumer. Messages must be completed ([`K2vConsumer::complete`]) in any order; offsets are stored (and
/// auto-committed every `commit_interval`) only up to the first message not yet completed in each partition.
pub struct K2vConsumer {
    /// The only lasting reference; `None` once closed (by [`K2vConsumer::close`] or the drop).
    consumer: Option<Arc<StreamConsumer<Context>>>,
    tracker: Arc<Mutex<Tracker>>,
    /// See [`Lender`].
    gate: Arc<RwLock<()>>,
}

/// The consumer as lent to blocking calls off the runtime (commit, watermarks): for the length of one call and under
/// a shared lease, which the close takes exclusively. So the close knows when it holds the consumer alone, and no
/// call can start after it.
#[derive(Clone)]
struct Lender {
    consumer: Weak<StreamConsumer<Context>>,
    gate: Arc<RwLock<()>>,
}

impl Lender {
    /// Runs a blocking call on the consumer; `None` once it is closing.
    fn with<T>(&self, call: impl FnOnce(&StreamConsumer<Context>) -> T) -> Option<T> {
        let _lease = self.gate.read();
        let consumer = self.consumer.upgrade()?;
        Some(call(&consumer))
    }
}

/// Closes the librdkafka consumer on a thread of its own: the close (leave the group, last commit) blocks, and
/// without bound while the brokers are unreachable — it must hold up neither the async runtime nor shutdown. It
/// first waits for the blocking calls in progress (see [`Lender`]). The receiver hears when the close is done.
fn close_in_background(
    consumer: Arc<StreamConsumer<Context>>,
    gate: Arc<RwLock<()>>,
) -> tokio::sync::oneshot::Receiver<()> {
    let (closed, done) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new().name("k2v-consumer-close".into()).spawn(move || {
        let exclusive = gate.write();
        let consumer = Arc::into_inner(consumer);
        drop(exclusive);
        match consumer {
            Some(consumer) => drop(consumer),
            None => tracing::error!("Kafka consumer still shared at close; it closes with its last user"),
        }
        let _ = closed.send(());
    });
    if let Err(error) = spawned {
        tracing::error!(%error, "cannot start the consumer close thread; the consumer closes where it is dropped");
    }
    done
}

impl Drop for K2vConsumer {
    fn drop(&mut self) {
        if let Some(consumer) = self.consumer.take() {
            close_in_background(consumer, self.gate.clone());
        }
    }
}

impl std::fmt::Debug for K2vConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("K2vConsumer")
    }
}

impl K2vConsumer {
    /// Creates the consumer and subscribes. `probe` follows whether a broker is reachable.
    ///
    /// # Errors
    /// Invalid settings or subscription.
    pub fn new(settings: &ConsumerSettings, probe: ReadyFlag) -> Result<Self, ConsumeError> {
        let tracker = Arc::new(Mutex::new(Tracker::default()));
        let context = Context { tracker: tracker.clone(), probe };
        let ms = |d: Duration| d.as_millis().to_string();
        let consumer: StreamConsumer<Context> = ClientConfig::new()
            .set("bootstrap.servers", &settings.brokers)
            .set("group.id", &settings.group_id)
            .set("client.id", &settings.client_id)
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", ms(settings.commit_interval))
            // Offsets are stored by hand, only over completed messages.
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", &settings.auto_offset_reset)
            .set("session.timeout.ms", ms(settings.session_timeout))
            .set("heartbeat.interval.ms", ms(settings.session_timeout / 4))
            // Regex subscriptions re-match only when metadata is refreshed (librdkafka's default is 5 minutes).
            .set("topic.metadata.refresh.interval.ms", ms(settings.metadata_refresh))
            .set("statistics.interval.ms", ms(settings.stats_interval))
            .create_with_context(context)
            .map_err(ConsumeError::Create)?;
        consumer
            .subscribe(&[&settings.topic_pattern])
            .map_err(|source| ConsumeError::Subscribe { pattern: settings.topic_pattern.clone(), source })?;
        Ok(Self { consumer: Some(Arc::new(consumer)), tracker, gate: Arc::default() })
    }

    fn consumer(&self) -> &StreamConsumer<Context> {
        // Taken only by `close` and the drop, which end the borrows.
        self.consumer.as_deref().expect("the consumer is open until closed")
    }

    fn lender(&self) -> Lender {
        Lender { consumer: self.consumer.as_ref().map(Arc::downgrade).unwrap_or_default(), gate: self.gate.clone() }
    }

    /// The next message (cancellation-safe). Errors are transient (broker unreachable, topic vanished): log them
    /// and call again.
    ///
    /// # Errors
    /// What librdkafka reported instead of a message.
    pub async fn recv(&self) -> Result<Received, ConsumeError> {
        let message = self.consumer().recv().await.map_err(ConsumeError::Receive)?;
        let position = self.tracker.lock().begin(message.topic(), message.partition(), message.offset());
        self.consumer().context().probe.set(true);
        let headers = OriginalHeaders(message.headers().map(BorrowedHeaders::detach));
        Ok(Received {
            position,
            payload: message.payload().map(<[u8]>::to_vec),
            key: message.key().map(<[u8]>::to_vec),
            headers,
        })
    }

    /// A message if one is ready now, without waiting: lets the caller take a burst in one go.
    pub fn try_recv(&self) -> Option<Result<Received, ConsumeError>> {
        let mut next = std::pin::pin!(self.recv());
        match next.as_mut().poll(&mut std::task::Context::from_waker(std::task::Waker::noop())) {
            std::task::Poll::Ready(result) => Some(result),
            std::task::Poll::Pending => None,
        }
    }

    /// Marks a message done (acknowledged by the broker, or skipped). The commit point moves over the done prefix
    /// of its partition; [`Self::store`] hands it to librdkafka.
    pub fn complete(&self, position: &Position) {
        self.tracker.lock().complete(position);
    }

    /// Stores the commit points moved by [`Self::complete`] since the last call, for the next (auto-)commit.
    pub fn store(&self) {
        store_moved(self.consumer(), &self.tracker);
    }

    /// A handle that asks the brokers whether a topic exists, from another task.
    pub fn topic_checker(&self) -> TopicChecker {
        TopicChecker { consumer: self.lender() }
    }

    /// A handle that measures the lag from another task.
    pub fn lag_meter(&self) -> LagMeter {
        LagMeter { consumer: self.lender(), tracker: self.tracker.clone() }
    }

    /// Commits the stored offsets now and waits for the broker's answer.
    ///
    /// # Errors
    /// The commit failed (nothing stored is not an error).
    pub async fn commit(&self) -> Result<(), ConsumeError> {
        self.store();
        let lender = self.lender();
        let result = tokio::task::spawn_blocking(move || {
            lender
                .with(|consumer| consumer.commit_consumer_state(CommitMode::Sync))
                .unwrap_or(Err(KafkaError::Canceled))
        })
        .await
        .unwrap_or(Err(KafkaError::Canceled));
        match result {
            Err(e) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::NoOffset) => Ok(()),
            other => other.map_err(ConsumeError::Commit),
        }
    }

    /// Leaves the group, waiting at most `deadline` (the close goes on in the background after that).
    pub async fn close(mut self, deadline: Duration) {
        let Some(consumer) = self.consumer.take() else { return };
        let done = close_in_background(consumer, self.gate.clone());
        if tokio::time::timeout(deadline, done).await.is_err() {
            tracing::warn!("Kafka consumer did not close in time (brokers unreachable?)");
        }
    }
}

/// Whether a topic exists, asked through the consumer: its metadata requests never create topics (librdkafka's
/// `allow.auto.create.topics` is off for consumers), where a producer's could on a broker that auto-creates.
#[derive(Clone)]
pub struct TopicChecker {
    consumer: Lender,
}

impl TopicChecker {
    /// `None` when the brokers did not answer within `timeout`, or the consumer is closing.
    pub async fn exists(&self, topic: String, timeout: Duration) -> Option<bool> {
        let lender = self.consumer.clone();
        tokio::task::spawn_blocking(move || {
            lender.with(|consumer| {
                let metadata = consumer.fetch_metadata(Some(&topic), timeout).ok()?;
                Some(
                    metadata
                        .topics()
                        .iter()
                        .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty()),
                )
            })
        })
        .await
        .ok()
        .flatten()
        .flatten()
    }
}

/// Measures how far behind the bridge is: per partition consumed so far, the high watermark minus the first offset
/// not yet completed. The watermarks are asked from the brokers (librdkafka's statistics arrive only while messages
/// are being received, so they would freeze exactly when the bridge is stuck).
pub struct LagMeter {
    consumer: Lender,
    tracker: Arc<Mutex<Tracker>>,
}

impl LagMeter {
    /// `None` when no watermark could be read within `timeout` per partition.
    pub async fn measure(&self, timeout: Duration) -> Option<i64> {
        let positions = self.tracker.lock().first_open();
        let lender = self.consumer.clone();
        tokio::task::spawn_blocking(move || {
            lender.with(|consumer| {
                let mut lag = 0;
                for (topic, partition, next) in positions {
                    let (_, high) = consumer.fetch_watermarks(&topic, partition, timeout).ok()?;
                    lag += (high - next).max(0);
                }
                Some(lag)
            })
        })
        .await
        .ok()
        .flatten()
        .flatten()
    }
}
