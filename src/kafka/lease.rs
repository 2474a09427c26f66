//! A cluster-wide lease as Kafka group membership: the member assigned the one partition of the lease topic holds
//! it. Exposed as a "held / not held" watch; a revocation waits until the holder says it stopped using the lease.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::topic_partition_list::TopicPartitionList;
use tokio::sync::watch;

use crate::readiness::ReadyFlag;

/// The partition whose assignment is the lease.
const LEASE_PARTITION: i32 = 0;
/// How long one poll of the lease consumer blocks; also how soon a stop request is seen.
const POLL: Duration = Duration::from_millis(100);

#[derive(Debug, Clone)]
pub struct LeaseSettings {
    pub brokers: String,
    /// One group per cluster: every instance that may hold the lease joins it.
    pub group_id: String,
    pub client_id: String,
    /// One partition; it must exist (the consumer does not create it).
    pub topic: String,
    /// How long a crashed holder keeps the lease.
    pub session_timeout: Duration,
    /// How long a revocation waits for the holder to stop using the lease before it lets it go anyway.
    pub release_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("cannot create the lease consumer: {0}")]
    Create(KafkaError),
    #[error("cannot subscribe to the lease topic {topic}: {source}")]
    Subscribe { topic: String, source: KafkaError },
    #[error("cannot start the lease thread: {0}")]
    Thread(std::io::Error),
}

/// Whether the holder still uses the lease (for example: still connected); a revocation waits for `false`.
#[derive(Debug, Default)]
struct InUse {
    flag: Mutex<bool>,
    changed: Condvar,
}

impl InUse {
    fn set(&self, in_use: bool) {
        *self.flag.lock() = in_use;
        self.changed.notify_all();
    }

    /// Waits until not in use; false when `timeout` passed first.
    fn wait_released(&self, timeout: Duration) -> bool {
        let mut flag = self.flag.lock();
        !self.changed.wait_while_for(&mut flag, |in_use| *in_use, timeout).timed_out()
    }
}

struct Context {
    topic: String,
    held: watch::Sender<bool>,
    in_use: Arc<InUse>,
    release_timeout: Duration,
    probe: ReadyFlag,
}

impl Context {
    fn covers(&self, tpl: &TopicPartitionList) -> bool {
        tpl.elements().iter().any(|e| e.topic() == self.topic && e.partition() == LEASE_PARTITION)
    }
}

impl ClientContext for Context {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        forward_log!("librdkafka (lease)", level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(%error, reason, "Kafka lease consumer");
    }
}

impl ConsumerContext for Context {
    // Runs inside `poll` on the lease thread, before librdkafka gives the partition up: the holder must have
    // stopped (disconnected) before another member can be assigned the lease.
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance
            && self.covers(tpl)
        {
            tracing::info!(topic = %self.topic, "lease revoked; waiting for the holder to let go");
            self.held.send_replace(false);
            if !self.in_use.wait_released(self.release_timeout) {
                tracing::error!(
                    timeout = ?self.release_timeout,
                    "the holder did not let go of the lease in time; releasing it anyway"
                );
            }
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) if self.covers(tpl) => {
                tracing::info!(topic = %self.topic, "lease acquired");
                self.held.send_replace(true);
            }
            Rebalance::Error(error) => tracing::warn!(%error, "lease rebalance failed"),
            _ => {}
        }
        self.probe.set(true);
    }
}

/// The lease; leaves the group (releasing the lease if held) when closed or dropped.
pub struct Lease {
    held: watch::Receiver<bool>,
    in_use: Arc<InUse>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").field("held", &*self.held.borrow()).finish_non_exhaustive()
    }
}

impl Lease {
    /// Joins the group. `probe` is down while the lease topic is missing (then no instance can ever hold it).
    ///
    /// # Errors
    /// Invalid settings, or no thread for the consumer.
    pub fn start(settings: &LeaseSettings, probe: ReadyFlag) -> Result<Self, LeaseError> {
        // Up until the lease topic is found missing: a standby is ready.
        probe.set(true);
        let (held_tx, held) = watch::channel(false);
        let in_use = Arc::new(InUse::default());
        let context = Context {
            topic: settings.topic.clone(),
            held: held_tx,
            in_use: in_use.clone(),
            release_timeout: settings.release_timeout,
            probe: probe.clone(),
        };
        let ms = |d: Duration| d.as_millis().to_string();
        let consumer: BaseConsumer<Context> = ClientConfig::new()
            .set("bootstrap.servers", &settings.brokers)
            .set("group.id", &settings.group_id)
            .set("client.id", &settings.client_id)
            .set("session.timeout.ms", ms(settings.session_timeout))
            .set("heartbeat.interval.ms", ms((settings.session_timeout / 4).max(Duration::from_millis(100))))
            // Cooperative: a member joining does not take the lease from its holder (an eager rebalance would
            // revoke it from everybody first, a needless handover).
            .set("partition.assignment.strategy", "cooperative-sticky")
            // Nothing is read from the topic; membership is all that counts.
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "latest")
            // A lease topic created after the start is found within this (librdkafka's default is 5 minutes).
            .set("topic.metadata.refresh.interval.ms", "30000")
            .create_with_context(context)
            .map_err(LeaseError::Create)?;
        consumer
            .subscribe(&[&settings.topic])
            .map_err(|source| LeaseError::Subscribe { topic: settings.topic.clone(), source })?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("v2k-lease".into())
            .spawn({
                let stop = stop.clone();
                let topic = settings.topic.clone();
                move || poll_until_stopped(&consumer, &stop, &topic, &probe)
            })
            .map_err(LeaseError::Thread)?;
        Ok(Self { held, in_use, stop, thread: Some(thread) })
    }

    /// Follows whether this instance holds the lease.
    pub fn held(&self) -> watch::Receiver<bool> {
        self.held.clone()
    }

    /// The holder says whether it still uses the lease; a revocation waits until it does not.
    pub fn set_in_use(&self, in_use: bool) {
        self.in_use.set(in_use);
    }

    /// Leaves the group (off the async runtime: the close blocks while the brokers are unreachable).
    pub async fn close(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.in_use.set(false);
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // The thread closes the consumer on its own; nobody waits for it here.
        self.stop.store(true, Ordering::Relaxed);
        self.in_use.set(false);
    }
}

/// Polls (which serves the rebalance callbacks) until stopped, then closes the consumer, leaving the group.
fn poll_until_stopped(consumer: &BaseConsumer<Context>, stop: &AtomicBool, topic: &str, probe: &ReadyFlag) {
    while !stop.load(Ordering::Relaxed) {
        // Messages on the lease topic mean nothing; membership is the lease.
        if let Some(Err(error)) = consumer.poll(POLL) {
            match error.rdkafka_error_code() {
                Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic) => {
                    probe.down(format!("lease topic {topic} does not exist: no instance can hold the lease"));
                }
                _ => tracing::warn!(%error, "Kafka lease consumer"),
            }
        }
    }
    consumer.unsubscribe();
    // Serve the revocation the unsubscribe triggers, so the lease is handed over now rather than after the
    // session timeout.
    for _ in 0..10 {
        if consumer.poll(POLL).is_none() && consumer.assignment().is_ok_and(|a| a.count() == 0) {
            break;
        }
    }
    consumer.context().held.send_replace(false);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_waits_for_the_holder() {
        let in_use = Arc::new(InUse::default());
        assert!(in_use.wait_released(Duration::ZERO), "not in use: released at once");
        in_use.set(true);
        assert!(!in_use.wait_released(Duration::from_millis(20)), "still in use");
        let other = in_use.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            other.set(false);
        });
        assert!(in_use.wait_released(Duration::from_secs(5)));
        t.join().unwrap();
    }
}
