//! The K2V consumer: a regex subscription whose offsets advance only over messages the caller completed, in
//! partition order, so a commit never passes a message still waiting for its MQTT acknowledgement.

use std::collections::{HashMap, VecDeque};
use std::future::Future as _;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::statistics::Statistics;
use rdkafka::{Offset, TopicPartitionList};

use crate::health::Probe;

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

/// Where a message came from, to complete it later. `generation` tells apart the same offset consumed again after
/// the partition was revoked and re-assigned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    generation: u64,
}

/// One consumed message, copied out of librdkafka's buffer.
#[derive(Debug, Clone)]
pub struct Received {
    pub position: Position,
    /// `None` for a tombstone (no value).
    pub payload: Option<Vec<u8>>,
}

/// Per-partition completion: offsets in consumption order with a done flag. The commit point is the end of the
/// done prefix, so completions out of order (a skipped message before a publish still awaiting its ack) are fine.
#[derive(Debug, Default)]
struct Tracker {
    partitions: HashMap<(Arc<str>, i32), Track>,
    next_generation: u64,
    /// Commit points that moved since they were last handed to librdkafka (stored in batches: one store per ack).
    moved: HashMap<(Arc<str>, i32), i64>,
}

#[derive(Debug)]
struct Track {
    generation: u64,
    pending: VecDeque<(i64, bool)>,
    /// Last offset consumed, to log jumps.
    last: Option<i64>,
}

impl Tracker {
    fn fresh(&mut self) -> Track {
        self.next_generation += 1;
        Track { generation: self.next_generation, pending: VecDeque::new(), last: None }
    }

    /// A partition was (re-)assigned: anything still in flight from before is stale.
    fn assign(&mut self, topic: &str, partition: i32) {
        let track = self.fresh();
        self.partitions.insert((Arc::from(topic), partition), track);
    }

    fn revoke(&mut self, topic: &str, partition: i32) {
        let key = (Arc::from(topic), partition);
        self.partitions.remove(&key);
        self.moved.remove(&key);
    }

    /// Registers a consumed offset. An offset not after the last one means the consumer went back (offset reset,
    /// re-assignment we did not see): start over, so acks of the earlier pass cannot complete the new one.
    fn begin(&mut self, topic: &str, partition: i32, offset: i64) -> Position {
        // Reuse the tracked topic name: one allocation per partition, not per message.
        let name = match self.partitions.keys().find(|(t, _)| &**t == topic) {
            Some((t, _)) => t.clone(),
            None => Arc::from(topic),
        };
        let key = (name, partition);
        let start_over =
            self.partitions.get(&key).is_none_or(|t| t.pending.back().is_some_and(|(last, _)| *last >= offset));
        if start_over {
            let track = self.fresh();
            self.partitions.insert(key.clone(), track);
        }
        let generation = self.partitions.get_mut(&key).map_or(0, |t| {
            if let Some(last) = t.last
                && offset != last + 1
            {
                tracing::debug!(topic, partition, last, offset, "offsets skipped (compaction or transaction markers)");
            }
            t.last = Some(offset);
            t.pending.push_back((offset, false));
            t.generation
        });
        Position { topic: key.0, partition, offset, generation }
    }

    /// Marks a message done; returns the new commit point (next offset to consume) if the done prefix grew, and
    /// remembers it for the next [`Tracker::take_moved`].
    fn complete(&mut self, position: &Position) -> Option<i64> {
        let key = (position.topic.clone(), position.partition);
        let track = self.partitions.get_mut(&key)?;
        if track.generation != position.generation {
            return None;
        }
        let index = track.pending.binary_search_by_key(&position.offset, |(o, _)| *o).ok()?;
        track.pending[index].1 = true;
        let mut advanced = None;
        while let Some((offset, true)) = track.pending.front().copied() {
            track.pending.pop_front();
            advanced = Some(offset + 1);
        }
        if let Some(next) = advanced {
            self.moved.insert(key, next);
        }
        advanced
    }

    /// The commit points that moved, as a list to store.
    fn take_moved(&mut self) -> Option<TopicPartitionList> {
        if self.moved.is_empty() {
            return None;
        }
        let mut tpl = TopicPartitionList::with_capacity(self.moved.len());
        for ((topic, partition), next) in self.moved.drain() {
            if let Err(error) = tpl.add_partition_offset(&topic, partition, Offset::Offset(next)) {
                tracing::warn!(%error, "cannot store offset");
            }
        }
        Some(tpl)
    }
}

/// Hands moved commit points to librdkafka (the next commit sends them).
fn store_moved<C: ConsumerContext>(consumer: &impl Consumer<C>, tracker: &Mutex<Tracker>) {
    let Some(tpl) = lock(tracker).take_moved() else { return };
    // Fails only for a partition revoked meanwhile; its new owner replays from the last commit.
    if let Err(error) = consumer.store_offsets(&tpl) {
        tracing::debug!(%error, "offsets not stored");
    }
}

/// librdkafka callbacks: assignment changes (run inside `recv`, so they are ordered with the messages), statistics
/// (broker state), errors.
struct Context {
    tracker: Arc<Mutex<Tracker>>,
    probe: Probe,
}

fn lock(tracker: &Mutex<Tracker>) -> MutexGuard<'_, Tracker> {
    tracker.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl ClientContext for Context {
    fn stats(&self, statistics: Statistics) {
        let up = statistics.brokers.values().any(|b| b.state == "UP");
        self.probe.set(up);
    }

    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical | RDKafkaLogLevel::Error => {
                tracing::error!(facility = fac, "librdkafka: {message}");
            }
            RDKafkaLogLevel::Warning => tracing::warn!(facility = fac, "librdkafka: {message}"),
            _ => tracing::debug!(facility = fac, "librdkafka: {message}"),
        }
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
            let mut tracker = lock(&self.tracker);
            for e in tpl.elements() {
                tracker.revoke(e.topic(), e.partition());
            }
            tracing::info!(partitions = tpl.count(), "K2V partitions revoked");
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let mut tracker = lock(&self.tracker);
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
    consumer: Arc<StreamConsumer<Context>>,
    tracker: Arc<Mutex<Tracker>>,
    /// Declared last, so it is dropped after `consumer` and holds the last reference.
    owner: Owner,
}

/// Drops the librdkafka consumer on a thread of its own: its close (leave the group, last commit) blocks, and
/// without bound while the brokers are unreachable — it must hold up neither the async runtime nor shutdown.
struct Owner {
    consumer: Option<Arc<StreamConsumer<Context>>>,
    closed: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Owner {
    fn drop(&mut self) {
        let Some(mut consumer) = self.consumer.take() else { return };
        let closed = self.closed.take();
        let spawned = std::thread::Builder::new().name("k2v-consumer-close".into()).spawn(move || {
            // Wait for borrowed references (a commit in flight) so that the close runs here.
            loop {
                match Arc::try_unwrap(consumer) {
                    Ok(last) => break drop(last),
                    Err(shared) => consumer = shared,
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            if let Some(closed) = closed {
                let _ = closed.send(());
            }
        });
        if let Err(error) = spawned {
            tracing::error!(%error, "cannot start the consumer close thread; the consumer is leaked");
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
    pub fn new(settings: &ConsumerSettings, probe: Probe) -> Result<Self, ConsumeError> {
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
        let consumer = Arc::new(consumer);
        let owner = Owner { consumer: Some(consumer.clone()), closed: None };
        Ok(Self { consumer, tracker, owner })
    }

    /// The next message (cancellation-safe). Errors are transient (broker unreachable, topic vanished): log them
    /// and call again.
    ///
    /// # Errors
    /// What librdkafka reported instead of a message.
    pub async fn recv(&self) -> Result<Received, ConsumeError> {
        let message = self.consumer.recv().await.map_err(ConsumeError::Receive)?;
        let position = lock(&self.tracker).begin(message.topic(), message.partition(), message.offset());
        self.consumer.context().probe.set(true);
        Ok(Received { position, payload: message.payload().map(<[u8]>::to_vec) })
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
        lock(&self.tracker).complete(position);
    }

    /// Stores the commit points moved by [`Self::complete`] since the last call, for the next (auto-)commit.
    pub fn store(&self) {
        store_moved(self.consumer.as_ref(), &self.tracker);
    }

    /// A handle that measures the lag from another task.
    pub fn lag_probe(&self) -> LagProbe {
        LagProbe { consumer: self.consumer.clone(), tracker: self.tracker.clone() }
    }

    /// Commits the stored offsets now and waits for the broker's answer.
    ///
    /// # Errors
    /// The commit failed (nothing stored is not an error).
    pub async fn commit(&self) -> Result<(), ConsumeError> {
        self.store();
        let consumer = self.consumer.clone();
        let result = tokio::task::spawn_blocking(move || consumer.commit_consumer_state(CommitMode::Sync))
            .await
            .unwrap_or(Err(KafkaError::Canceled));
        match result {
            Err(e) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::NoOffset) => Ok(()),
            other => other.map_err(ConsumeError::Commit),
        }
    }

    /// Leaves the group, waiting at most `deadline` (the close goes on in the background after that).
    pub async fn close(mut self, deadline: Duration) {
        let (closed, done) = tokio::sync::oneshot::channel();
        self.owner.closed = Some(closed);
        drop(self);
        if tokio::time::timeout(deadline, done).await.is_err() {
            tracing::warn!("Kafka consumer did not close in time (brokers unreachable?)");
        }
    }
}

/// Measures how far behind the bridge is: per partition consumed so far, the high watermark minus the first offset
/// not yet completed. The watermarks are asked from the brokers (librdkafka's statistics arrive only while messages
/// are being received, so they would freeze exactly when the bridge is stuck).
pub struct LagProbe {
    consumer: Arc<StreamConsumer<Context>>,
    tracker: Arc<Mutex<Tracker>>,
}

impl LagProbe {
    /// `None` when no watermark could be read within `timeout` per partition.
    pub async fn measure(&self, timeout: Duration) -> Option<i64> {
        let positions: Vec<(Arc<str>, i32, i64)> = lock(&self.tracker)
            .partitions
            .iter()
            .filter_map(|((topic, partition), t)| {
                let next = t.pending.front().map(|(offset, _)| *offset).or(t.last.map(|last| last + 1))?;
                Some((topic.clone(), *partition, next))
            })
            .collect();
        let consumer = self.consumer.clone();
        tokio::task::spawn_blocking(move || {
            let mut lag = 0;
            for (topic, partition, next) in positions {
                let (_, high) = consumer.fetch_watermarks(&topic, partition, timeout).ok()?;
                lag += (high - next).max(0);
            }
            Some(lag)
        })
        .await
        .ok()
        .flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_point_is_the_end_of_the_done_prefix() {
        let mut t = Tracker::default();
        t.assign("a.dojot.device-manager.device", 0);
        let p: Vec<Position> = (10..15).map(|o| t.begin("a.dojot.device-manager.device", 0, o)).collect();
        assert_eq!(t.complete(&p[1]), None, "10 still open");
        assert_eq!(t.complete(&p[2]), None);
        assert_eq!(t.complete(&p[0]), Some(13), "10, 11, 12 done");
        assert_eq!(t.complete(&p[4]), None);
        assert_eq!(t.complete(&p[3]), Some(15));
        assert_eq!(t.complete(&p[3]), None, "completing twice changes nothing");
    }

    #[test]
    fn partitions_are_independent() {
        let mut t = Tracker::default();
        let a = t.begin("t", 0, 5);
        let b = t.begin("t", 1, 7);
        let a2 = t.begin("t", 0, 6);
        assert_eq!(t.complete(&b), Some(8));
        assert_eq!(t.complete(&a2), None);
        assert_eq!(t.complete(&a), Some(7));
    }

    #[test]
    fn acks_from_before_a_reassignment_are_ignored() {
        let mut t = Tracker::default();
        t.assign("t", 0);
        let old = t.begin("t", 0, 3);
        t.revoke("t", 0);
        assert_eq!(t.complete(&old), None, "revoked");
        t.assign("t", 0);
        let new = t.begin("t", 0, 3);
        assert_eq!(t.complete(&old), None, "stale generation");
        assert_eq!(t.complete(&new), Some(4));
    }

    #[test]
    fn consuming_backwards_starts_over() {
        let mut t = Tracker::default();
        let first = t.begin("t", 0, 8);
        let rewound = t.begin("t", 0, 4);
        assert_eq!(t.complete(&first), None);
        assert_eq!(t.complete(&rewound), Some(5));
    }

    #[test]
    fn gaps_in_offsets_are_fine() {
        // Compacted topics and transaction markers leave holes; only consumed offsets count.
        let mut t = Tracker::default();
        let a = t.begin("t", 0, 1);
        let b = t.begin("t", 0, 9);
        assert_eq!(t.complete(&b), None);
        assert_eq!(t.complete(&a), Some(10));
    }
}
