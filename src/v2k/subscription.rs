//! V2K subscription mode: the shared subscription `$share/<group>/+/<attrs>` feeds Kafka with no per-message
//! webhook; each MQTT message is acknowledged only after Kafka acknowledged its record (or, failing that, its dead
//! letter; failing both, it is counted lost), in arrival order within its tenant.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::tenants::Slot;
use super::{Failure, Outcome, Payload, RETRY_PAUSE, V2k, not_taken_letter};
use crate::kafka::producer::{Delivery, ProduceError};
use crate::mqtt::MqttSettings;
use crate::mqtt::subscriber::{self, Message, Subscription};
use crate::policy::{DeviceId, Policy};
use crate::readiness::ReadyFlag;

/// The internal client's shared subscription.
#[derive(Debug, Clone)]
pub struct SubscriptionSettings {
    pub mqtt: MqttSettings,
    /// `$share/<group>/+/<attrs>`, or `+/<attrs>` for the plain subscription.
    pub filter: String,
    /// Unacknowledged messages the broker may hand the service at once (V2K_MAX_IN_FLIGHT).
    pub window: u16,
}

type Work = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Runs until `shutdown`; messages being handled then get `drain` to be acknowledged by Kafka.
pub(crate) async fn run(
    settings: SubscriptionSettings,
    v2k: Arc<V2k>,
    policy: Arc<Policy>,
    probe: ReadyFlag,
    shutdown: CancellationToken,
    drain: Duration,
) {
    let handle = move |message: Message| -> (u64, Work) {
        match policy.attrs_topic_device(&message.topic) {
            Some(device) => {
                let lane = v2k.tenants.lane(device.tenant);
                if message.qos == 0 {
                    v2k.forward_at_most_once(device, &message.topic, &message.payload);
                    return (lane, Box::pin(std::future::ready(())));
                }
                (lane, Box::pin(v2k.forward_until_delivered(device, &message.topic, message.payload.clone())))
            }
            None => {
                // The broker's ACL lets only devices publish on attrs topics; anything else is not device data.
                tracing::warn!(topic = %message.topic, "message on the shared subscription is not device data; dropped");
                (0, Box::pin(async {}))
            }
        }
    };
    let subscription = Subscription { filter: settings.filter, window: settings.window };
    subscriber::run(settings.mqtt, "v2k", subscription, probe, handle, shutdown, drain).await;
}

/// A message's first record: queued at once, or waiting for room (its queueing is reported on the channel).
enum First {
    Queued(Result<Delivery, ProduceError>),
    Waiting(oneshot::Receiver<Result<Delivery, ProduceError>>),
}

/// Who a message came from, for the error line of a lost one.
struct Source {
    tenant: String,
    device: String,
    topic: String,
}

impl V2k {
    /// Subscription mode, QoS 0: nothing to acknowledge and nothing the broker keeps, so one attempt, as in the webhook
    /// modes. Queued only when the tenant has a slot free now (none of its messages waits): otherwise dropped and
    /// counted (`tenant_full`), so a flood holds at most the tenant's bound in memory. A record Kafka does not take
    /// is counted where that is seen (queue full here, expired or refused in its report).
    pub fn forward_at_most_once(&self, device: DeviceId<'_>, mqtt_topic: &str, payload: &[u8]) {
        let Some(slot) = self.tenants.try_acquire(device.tenant) else {
            self.metrics.failed(Failure::TenantFull).increment(1);
            return;
        };
        let outcome = self.outcome(device, mqtt_topic, Payload::Raw(payload));
        // Its report holds the slot; nobody waits for it.
        drop(self.enqueue(&outcome, slot));
    }

    /// Subscription mode, QoS 1: queues the record now when its tenant has room (so records keep the order of the calls),
    /// otherwise waits behind the tenant's earlier messages; returns a future that completes when acknowledging is
    /// safe: Kafka took the record or its dead letter, or the message is counted lost. While Kafka as a whole is
    /// unreachable nothing is given up: the broker keeps the message and every tenant waits alike.
    pub fn forward_until_delivered(
        self: &Arc<Self>,
        device: DeviceId<'_>,
        mqtt_topic: &str,
        payload: Bytes,
    ) -> impl Future<Output = ()> + Send + 'static {
        let source =
            Source { tenant: device.tenant.to_owned(), device: device.device.to_owned(), topic: mqtt_topic.to_owned() };
        let this = self.clone();
        let outcome = Arc::new(self.outcome(device, mqtt_topic, Payload::Raw(&payload)));
        // Queued here, synchronously, when there is room: the order of calls is the order in Kafka. Otherwise queued
        // behind the tenant's waiting messages, in that order, by whoever gives room back. The tenant check is not
        // applied here: a message the broker already acknowledged is only given up after the delivery timeout, never
        // on one metadata answer (a restarting Kafka may list no topics for a moment).
        let first = match self.tenants.try_acquire(device.tenant) {
            Some(slot) => First::Queued(self.enqueue(&outcome, slot)),
            None => {
                let (report, queued) = oneshot::channel();
                // Weak: the forwarder holds the tenants, which hold this closure; a strong reference would be a cycle.
                let (forwarder, record) = (Arc::downgrade(self), outcome.clone());
                self.tenants.when_room(
                    device.tenant,
                    Box::new(move |slot| {
                        // A message whose future is gone (a shutdown past its budget) was not acknowledged: the broker
                        // sends it again, so its record is not queued now.
                        if report.is_closed() {
                            return;
                        }
                        let Some(forwarder) = forwarder.upgrade() else { return };
                        drop(report.send(forwarder.enqueue(&record, slot)));
                        // This runs on librdkafka's polling thread, which the producer joins when the forwarder is
                        // dropped: if this was the last reference (the future went meanwhile), drop it elsewhere.
                        if let Some(last) = Arc::into_inner(forwarder) {
                            std::thread::spawn(move || drop(last));
                        }
                    }),
                );
                First::Waiting(queued)
            }
        };
        async move {
            let first = match first {
                First::Queued(attempt) => attempt,
                // Always sent while this future waits (it holds the forwarder); if not, as a record dropped unreported.
                First::Waiting(queued) => queued.await.unwrap_or(Err(ProduceError::unreported())),
            };
            let error = match this.until_acknowledged(&source.tenant, &outcome, first).await {
                Ok(()) => return,
                Err(e) => e,
            };
            // Already a dead letter: another one would go to the same topic, and hold the tenant's acknowledgements
            // for a second delivery timeout only to fail the same way.
            if matches!(*outcome, Outcome::DeadLetter { .. }) {
                this.lost(device_of(&source), &format!("dead letter: {error}"));
                return;
            }
            let letter = not_taken_letter(&this.settings.contract, device_of(&source), &source.topic, &payload, &error);
            let slot = this.slot(&source.tenant).await;
            let queued = this.enqueue(&letter, slot);
            if let Err(second) = this.until_acknowledged(&source.tenant, &letter, queued).await {
                this.lost(device_of(&source), &format!("{error}; dead letter: {second}"));
            }
        }
    }

    /// Waits for the record's report, sending it again while Kafka as a whole is away or the local queue is full.
    /// Gives up when Kafka is reachable and the record still expired or was refused for good.
    async fn until_acknowledged(
        &self,
        tenant: &str,
        outcome: &Outcome,
        mut attempt: Result<Delivery, ProduceError>,
    ) -> Result<(), ProduceError> {
        loop {
            let result = match attempt {
                Ok(delivery) => delivery.wait(None).await,
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => return Ok(()),
                Err(ProduceError::QueueFull) => {}
                Err(e @ ProduceError::Final(_)) => return Err(e),
                Err(e) if self.producer.is_healthy() => return Err(e),
                Err(_) => {}
            }
            tokio::time::sleep(RETRY_PAUSE).await;
            let slot = self.slot(tenant).await;
            attempt = self.enqueue(outcome, slot);
        }
    }

    /// A slot of the tenant, behind its waiting messages.
    async fn slot(&self, tenant: &str) -> Slot {
        loop {
            if let Some(slot) = self.tenants.try_acquire(tenant) {
                return slot;
            }
            let (give, slot) = oneshot::channel();
            // A waiter gone by then gives the slot straight back (the failed send drops it).
            self.tenants.when_room(tenant, Box::new(move |slot| drop(give.send(slot))));
            // Always sent: the tenant's outstanding slots keep its state, and this closure, until room is given back.
            if let Ok(slot) = slot.await {
                return slot;
            }
        }
    }
}

fn device_of(source: &Source) -> DeviceId<'_> {
    DeviceId { tenant: &source.tenant, device: &source.device }
}
