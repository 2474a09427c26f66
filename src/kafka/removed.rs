//! The removed-device reader: every instance reads every partition of the device-manager topics on its own, from the
//! beginning of what Kafka retains, and follows them; nothing is ever committed.

use std::time::Duration;

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
    pub client_id: String,
    pub metadata_refresh: Duration,
}

/// A group of its own per process: with no other member, this instance is assigned every partition (no sharing with
/// other instances, unlike K2V's group), and with no committed offset `earliest` replays all that Kafka retains on
/// every start. Offsets are never committed, so the group leaves nothing behind to resume from.
fn group_id(client_id: &str) -> String {
    format!("{client_id}-removed-{}-{:016x}", std::process::id(), rand::random::<u64>())
}

/// Reads until `shutdown`, handing each message (`topic`, value) to `sink`. Kafka errors are logged, handed to
/// `on_error` (counted by the caller) and retried: a broker outage delays removals, it never stops the service.
///
/// # Errors
/// The consumer cannot be created or subscribed (bad settings).
pub fn spawn(
    settings: &RemovedReaderSettings,
    mut sink: impl FnMut(&str, Option<&[u8]>) + Send + 'static,
    on_error: impl Fn() + Send + 'static,
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
    Ok(tokio::spawn(async move {
        loop {
            let received = tokio::select! {
                () = shutdown.cancelled() => break,
                received = consumer.recv() => received,
            };
            match received {
                Ok(message) => sink(message.topic(), message.payload()),
                Err(e) => {
                    on_error();
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

#[cfg(test)]
mod tests {
    #[test]
    fn every_process_gets_its_own_group() {
        let a = super::group_id("gw");
        assert!(a.starts_with(&format!("gw-removed-{}-", std::process::id())));
        assert_ne!(a, super::group_id("gw"));
    }
}
