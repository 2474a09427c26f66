//! The removed-device reader: every instance reads every partition of the device-manager topics on its own, from the
//! beginning of what Kafka retains, and follows them; nothing is ever committed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::Offset;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{Consumer, StreamConsumer};
pub use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
pub struct RemovedReaderSettings {
    pub brokers: String,
    /// A regex (`^…`) or an exact topic name.
    pub topic_pattern: String,
    /// The topics `topic_pattern` matches are `<tenant>.<suffix>`: how the end offsets at start are found.
    pub topic_suffix: String,
    pub client_id: String,
    pub metadata_refresh: Duration,
}

/// What the reader reports besides the messages.
pub trait ReaderEvents: Send + 'static {
    fn message(&mut self, topic: &str, value: Option<&[u8]>);
    /// A Kafka error (logged by the reader; retried).
    fn error(&mut self, error: &KafkaError);
    /// Every message that was in the topics when the reader started has been read.
    fn caught_up(&mut self);
}

/// A group of its own per process: with no other member, this instance is assigned every partition (no sharing with
/// other instances, unlike K2V's group), and with no committed offset `earliest` replays all that Kafka retains on
/// every start. Offsets are never committed, so the group leaves nothing behind to resume from.
fn group_id(client_id: &str) -> String {
    format!("{client_id}-removed-{}-{:016x}", std::process::id(), rand::random::<u64>())
}

/// The partitions still to read up to the end offset they had when the reader started. Pure.
#[derive(Debug, Default)]
struct CatchUp {
    /// (topic, partition) → the high watermark at start: caught up once the next offset to read reaches it.
    remaining: HashMap<(String, i32), i64>,
}

impl CatchUp {
    /// From (topic, partition, low, high) watermarks; empty partitions have nothing to catch up.
    fn new(watermarks: impl IntoIterator<Item = (String, i32, i64, i64)>) -> Self {
        let remaining = watermarks.into_iter().filter(|(_, _, low, high)| high > low).map(|(t, p, _, h)| ((t, p), h));
        Self { remaining: remaining.collect() }
    }

    /// The next offset to read in a partition is `next`; whether every partition has now caught up.
    fn advance(&mut self, topic: &str, partition: i32, next: i64) -> bool {
        let key = (topic.to_string(), partition);
        if self.remaining.get(&key).is_some_and(|end| next >= *end) {
            self.remaining.remove(&key);
        }
        self.remaining.is_empty()
    }

    fn done(&self) -> bool {
        self.remaining.is_empty()
    }
}

/// Reads until `shutdown`, handing each message to `events`. Kafka errors are logged, reported and retried: a broker
/// outage delays removals, it never stops the service.
///
/// # Errors
/// The consumer cannot be created or subscribed (bad settings).
pub fn spawn(
    settings: &RemovedReaderSettings,
    mut events: impl ReaderEvents,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, KafkaError> {
    let ms = |d: Duration| d.as_millis().to_string();
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &settings.brokers)
        .set("group.id", group_id(&settings.client_id))
        .set("client.id", format!("{}-removed", settings.client_id))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        // Regex subscriptions re-match only when metadata is refreshed: how soon a new tenant's topic is read.
        .set("topic.metadata.refresh.interval.ms", ms(settings.metadata_refresh))
        .set_log_level(RDKafkaLogLevel::Warning)
        .create()?;
    consumer.subscribe(&[&settings.topic_pattern])?;
    let consumer = Arc::new(consumer);
    let suffix = format!(".{}", settings.topic_suffix);
    Ok(tokio::spawn(async move {
        let Some(mut catch_up) = end_offsets(&consumer, &suffix, &mut events, &shutdown).await else { return };
        if catch_up.done() {
            events.caught_up();
        }
        // Positions are also polled: the last offset of a partition may be one no message is delivered for.
        let mut check = tokio::time::interval(Duration::from_secs(1));
        loop {
            let received = tokio::select! {
                () = shutdown.cancelled() => break,
                _ = check.tick(), if !catch_up.done() => {
                    if positions_reached(&consumer, &mut catch_up) {
                        events.caught_up();
                    }
                    continue;
                }
                received = consumer.recv() => received,
            };
            match received {
                Ok(message) => {
                    events.message(message.topic(), message.payload());
                    if !catch_up.done() && catch_up.advance(message.topic(), message.partition(), message.offset() + 1)
                    {
                        events.caught_up();
                    }
                }
                Err(e) => {
                    events.error(&e);
                    tracing::warn!(error = %e, "removed-device reader: Kafka error; retrying");
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
        consumer.unsubscribe();
    }))
}

/// The high watermarks of every `<tenant><suffix>` partition, asked until Kafka answers; `None` on shutdown.
async fn end_offsets(
    consumer: &Arc<StreamConsumer>,
    suffix: &str,
    events: &mut impl ReaderEvents,
    shutdown: &CancellationToken,
) -> Option<CatchUp> {
    loop {
        let (c, suffix_owned) = (consumer.clone(), suffix.to_string());
        // Blocking broker round trips: off the runtime.
        let asked = tokio::task::spawn_blocking(move || -> Result<CatchUp, KafkaError> {
            let timeout = Duration::from_secs(5);
            let metadata = c.fetch_metadata(None, timeout)?;
            let mut marks = Vec::new();
            for topic in metadata.topics().iter().filter(|t| t.name().len() > suffix_owned.len()) {
                if !topic.name().ends_with(&suffix_owned) {
                    continue;
                }
                for partition in topic.partitions() {
                    let (low, high) = c.fetch_watermarks(topic.name(), partition.id(), timeout)?;
                    marks.push((topic.name().to_string(), partition.id(), low, high));
                }
            }
            Ok(CatchUp::new(marks))
        })
        .await;
        match asked {
            Ok(Ok(catch_up)) => return Some(catch_up),
            Ok(Err(e)) => {
                events.error(&e);
                tracing::warn!(error = %e, "removed-device reader: cannot read the end offsets; retrying");
            }
            Err(e) => tracing::error!(error = %e, "removed-device reader: end offsets task failed; retrying"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return None,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Advances `catch_up` with the consumer's positions; whether it is done now.
fn positions_reached(consumer: &StreamConsumer, catch_up: &mut CatchUp) -> bool {
    let Ok(positions) = consumer.position() else { return false };
    let mut done = catch_up.done();
    for element in positions.elements() {
        if let Offset::Offset(next) = element.offset() {
            done = catch_up.advance(element.topic(), element.partition(), next);
        }
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_process_gets_its_own_group() {
        let a = group_id("gw");
        assert!(a.starts_with(&format!("gw-removed-{}-", std::process::id())));
        assert_ne!(a, group_id("gw"));
    }

    #[test]
    fn caught_up_once_every_non_empty_partition_reached_its_end_at_start() {
        let t = |p, low, high| ("a.dm".to_string(), p, low, high);
        assert!(CatchUp::new([t(0, 0, 0), t(1, 5, 5)]).done(), "empty partitions: nothing to read");
        let mut c = CatchUp::new([t(0, 0, 3), t(1, 10, 12), t(2, 0, 0)]);
        assert!(!c.done());
        assert!(!c.advance("a.dm", 0, 2));
        assert!(!c.advance("a.dm", 0, 3), "partition 1 still behind");
        assert!(!c.advance("other", 1, 99), "another topic's offsets count for nothing");
        assert!(c.advance("a.dm", 1, 12));
        assert!(c.advance("a.dm", 1, 13), "stays done");
    }
}
