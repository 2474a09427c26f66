//! The one shared Kafka producer: idempotent, `acks=all`, compressed, with delivery reports awaited and their errors
//! sorted into "retry it" and "it will never go".

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer as _, ProducerContext, ThreadedProducer};
use tokio::sync::oneshot;

use super::consumer::OriginalHeaders;

/// A record ready for the producer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub topic: String,
    pub key: String,
    pub value: Vec<u8>,
    pub headers: Vec<(&'static str, String)>,
}

#[derive(Debug, Clone)]
pub struct ProducerSettings {
    pub brokers: String,
    pub compression: String,
    pub linger_ms: u64,
    /// librdkafka retries a message this long before reporting it expired.
    pub delivery_timeout_ms: u64,
    pub client_id: String,
}

/// Why a record was not (yet) acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    /// The producer's local queue is full: back-pressure, try again later.
    #[error("producer queue is full")]
    QueueFull,
    /// No ack within the caller's deadline; the record is still queued and retried by the producer.
    #[error("no ack within {0:?}; the record stays queued")]
    Pending(Duration),
    /// Not delivered (the producer's delivery timeout passed, or an error that may clear); sending again may succeed.
    #[error("not delivered: {0}")]
    Expired(KafkaError),
    /// Kafka refused the record for good (too large, invalid, not authorised).
    #[error("delivery failed for good: {0}")]
    Final(KafkaError),
}

impl ProduceError {
    /// A record whose report will never come (dropped with the producer, or before it was queued): as if expired.
    pub fn unreported() -> Self {
        ProduceError::Expired(KafkaError::Canceled)
    }

    /// The error's name, as a dead letter's `kafka_error` header gives it: librdkafka's code for a Kafka error
    /// (`MessageSizeTooLarge`, `TopicAuthorizationFailed`, `MessageTimedOut`, …), else the local condition.
    pub fn name(&self) -> String {
        match self {
            ProduceError::QueueFull => "QueueFull".into(),
            ProduceError::Pending(_) => "Pending".into(),
            // The one local error a record's report can carry: the producer went away before it was sent.
            ProduceError::Expired(KafkaError::Canceled) | ProduceError::Final(KafkaError::Canceled) => {
                "Canceled".into()
            }
            ProduceError::Expired(e) | ProduceError::Final(e) => {
                e.rdkafka_error_code().map_or_else(|| e.to_string(), |code| format!("{code:?}"))
            }
        }
    }
}

/// Only errors that sending the same record again can never fix are final; everything else (including errors
/// this code does not know, such as a broker's "unknown error" after a restart) is worth another attempt, because
/// treating it as final would drop the record.
fn classify(error: KafkaError) -> ProduceError {
    use RDKafkaErrorCode as C;
    match error.rdkafka_error_code() {
        Some(C::QueueFull) => ProduceError::QueueFull,
        Some(
            C::InvalidMessage
            | C::InvalidMessageSize
            | C::MessageSizeTooLarge
            | C::InvalidRecord
            | C::InvalidTopic
            | C::TopicAuthorizationFailed
            | C::ClusterAuthorizationFailed
            | C::UnsupportedForMessageFormat,
        ) => ProduceError::Final(error),
        _ => ProduceError::Expired(error),
    }
}

/// What to do with a record's delivery report. It runs on the producer's polling thread, so it must not block; it
/// is how a caller learns the outcome without a task per record waiting for it.
pub type OnDelivery = Box<dyn FnOnce(Result<(), ProduceError>) + Send + Sync>;

/// Notices from librdkafka about the cluster as a whole, and every record's delivery report.
pub struct ReportContext {
    all_brokers_down: Arc<AtomicBool>,
}

impl ClientContext for ReportContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.all_brokers_down.store(true, Ordering::Relaxed);
        }
        tracing::warn!(%error, reason, "kafka client error");
    }
}

impl ProducerContext for ReportContext {
    type DeliveryOpaque = Box<OnDelivery>;

    fn delivery(&self, report: &DeliveryResult<'_>, on_delivery: Box<OnDelivery>) {
        on_delivery(report.as_ref().map(|_| ()).map_err(|(error, _)| classify(error.clone())));
    }
}

/// A queued record's delivery report.
pub struct Delivery(oneshot::Receiver<Result<(), ProduceError>>);

impl Delivery {
    /// A delivery and what completes it, for callbacks built elsewhere in this module tree (the relay).
    pub(super) fn waiter() -> (oneshot::Sender<Result<(), ProduceError>>, Self) {
        let (tx, rx) = oneshot::channel();
        (tx, Self(rx))
    }

    fn channel() -> (OnDelivery, Self) {
        let (tx, delivery) = Self::waiter();
        (Box::new(move |report| drop(tx.send(report))), delivery)
    }

    /// Waits for the report; `timeout` None waits as long as the producer retries.
    ///
    /// # Errors
    /// See [`ProduceError`].
    pub async fn wait(self, timeout: Option<Duration>) -> Result<(), ProduceError> {
        let report = match timeout {
            None => self.0.await,
            Some(limit) => match tokio::time::timeout(limit, self.0).await {
                Ok(report) => report,
                Err(_) => return Err(ProduceError::Pending(limit)),
            },
        };
        // Err: the producer was dropped with the record still queued.
        report.unwrap_or(Err(ProduceError::unreported()))
    }
}

#[derive(Clone)]
pub struct Producer {
    inner: ThreadedProducer<ReportContext>,
    healthy: Arc<AtomicBool>,
    all_brokers_down: Arc<AtomicBool>,
}

impl Producer {
    /// # Errors
    /// librdkafka refused the configuration.
    pub fn new(settings: &ProducerSettings) -> Result<Self, KafkaError> {
        let all_brokers_down = Arc::new(AtomicBool::new(false));
        let inner = ClientConfig::new()
            .set("bootstrap.servers", &settings.brokers)
            .set("client.id", &settings.client_id)
            // Idempotence implies acks=all, bounded in-flight requests and ordered retries: no duplicates or
            // reordering from the producer's own retries.
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("compression.type", &settings.compression)
            .set("linger.ms", settings.linger_ms.to_string())
            .set("message.timeout.ms", settings.delivery_timeout_ms.to_string())
            .set("queue.buffering.max.messages", "1000000")
            .set("queue.buffering.max.kbytes", "1048576")
            .set("message.max.bytes", "4194304")
            .create_with_context(ReportContext { all_brokers_down: all_brokers_down.clone() })?;
        Ok(Self { inner, healthy: Arc::new(AtomicBool::new(false)), all_brokers_down })
    }

    /// Queues a record without waiting; order of calls is the order on each partition.
    ///
    /// # Errors
    /// Queue full, or a record Kafka can never take.
    pub fn send(&self, record: &Record) -> Result<Delivery, ProduceError> {
        let (on_delivery, delivery) = Delivery::channel();
        self.send_then(record, on_delivery)?;
        Ok(delivery)
    }

    /// Queues a record without waiting and calls `on_delivery` with its report (on the producer's polling thread).
    ///
    /// # Errors
    /// Queue full, or a record Kafka can never take (`on_delivery` is then dropped uncalled).
    pub fn send_then(&self, record: &Record, on_delivery: OnDelivery) -> Result<(), ProduceError> {
        let mut base = BaseRecord::with_opaque_to(&record.topic, Box::new(on_delivery))
            .key(record.key.as_bytes())
            .payload(record.value.as_slice());
        // librdkafka allocates a header list even when it stays empty: only records with headers get one.
        if !record.headers.is_empty() {
            let headers = record
                .headers
                .iter()
                .fold(OwnedHeaders::new_with_capacity(record.headers.len()), |all, (key, value)| {
                    all.insert(Header { key, value: Some(value.as_bytes()) })
                });
            base = base.headers(headers);
        }
        self.queue(base)
    }

    /// Queues a record given as bytes (a copy of a consumed message: key, value and headers as they were), with
    /// `added` headers after the original ones.
    ///
    /// # Errors
    /// Queue full, or a record Kafka can never take.
    pub fn send_bytes(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        original: OriginalHeaders,
        added: &[(&str, &str)],
    ) -> Result<Delivery, ProduceError> {
        let (on_delivery, delivery) = Delivery::channel();
        let mut base =
            BaseRecord::<[u8], [u8], _>::with_opaque_to(topic, Box::new(on_delivery)).headers(original.with(added));
        if let Some(key) = key {
            base = base.key(key);
        }
        if let Some(value) = value {
            base = base.payload(value);
        }
        self.queue(base)?;
        Ok(delivery)
    }

    fn queue(&self, base: BaseRecord<'_, [u8], [u8], Box<OnDelivery>>) -> Result<(), ProduceError> {
        self.inner.send(base).map_err(|(error, _)| classify(error))
    }

    /// Records waiting for an ack (queued or in flight to Kafka).
    pub fn in_flight(&self) -> usize {
        usize::try_from(self.inner.in_flight_count()).unwrap_or_default()
    }

    /// Whether the cluster answered the last health check.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Asks the cluster for metadata (blocking, so on a blocking thread) and remembers the answer.
    pub async fn check_health(&self) -> bool {
        let inner = self.inner.clone();
        let down = self.all_brokers_down.clone();
        let ok = tokio::task::spawn_blocking(move || {
            let ok = inner.client().fetch_metadata(None, Duration::from_secs(2)).is_ok_and(|m| !m.brokers().is_empty());
            // A metadata answer means a broker is back, whatever librdkafka said earlier.
            if ok {
                down.store(false, Ordering::Relaxed);
            }
            ok
        })
        .await
        .unwrap_or(false);
        self.healthy.store(ok, Ordering::Relaxed);
        ok
    }

    /// The names of every topic in the cluster (one metadata request, on a blocking thread, 5 s at most).
    ///
    /// # Errors
    /// Kafka did not answer.
    pub async fn topic_names(&self) -> Result<Vec<String>, KafkaError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let metadata = inner.client().fetch_metadata(None, Duration::from_secs(5))?;
            Ok(metadata.topics().iter().filter(|t| t.error().is_none()).map(|t| t.name().to_string()).collect())
        })
        .await
        .unwrap_or(Err(KafkaError::Canceled))
    }

    /// Waits until every queued record is acknowledged or `timeout` passes.
    ///
    /// # Errors
    /// Records were still unacknowledged at the deadline (their number is in the error).
    pub async fn flush(&self, timeout: Duration) -> Result<(), usize> {
        let inner = self.inner.clone();
        let flushed = tokio::task::spawn_blocking(move || inner.flush(timeout)).await;
        match flushed {
            Ok(Ok(())) => Ok(()),
            _ => Err(self.in_flight()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_classes() {
        use RDKafkaErrorCode as C;
        let produce = |c| KafkaError::MessageProduction(c);
        assert!(matches!(classify(produce(C::QueueFull)), ProduceError::QueueFull));
        assert!(matches!(classify(produce(C::MessageTimedOut)), ProduceError::Expired(_)));
        assert!(matches!(classify(produce(C::AllBrokersDown)), ProduceError::Expired(_)));
        assert!(matches!(classify(produce(C::MessageSizeTooLarge)), ProduceError::Final(_)));
        assert!(matches!(classify(produce(C::TopicAuthorizationFailed)), ProduceError::Final(_)));
        assert!(matches!(classify(produce(C::UnknownTopicOrPartition)), ProduceError::Expired(_)));
        assert!(matches!(classify(produce(C::Unknown)), ProduceError::Expired(_)), "unknown is not final");
        let pending = ProduceError::Pending(Duration::from_secs(1)).to_string();
        assert!(pending.contains("stays queued"), "{pending}");
        assert_eq!(classify(produce(C::TopicAuthorizationFailed)).name(), "TopicAuthorizationFailed");
        assert_eq!(classify(produce(C::MessageTimedOut)).name(), "MessageTimedOut");
        assert_eq!(ProduceError::unreported().name(), "Canceled");
    }
}
