//! V2K subscription mode: the shared subscription `$share/<group>/+/<attrs>` feeds Kafka with no per-message
//! webhook; each MQTT message is acknowledged only after Kafka acknowledged its record.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::V2k;
use crate::health::Probe;
use crate::mqtt::MqttSettings;
use crate::mqtt::subscriber::{self, Message};
use crate::policy::Policy;

/// The internal client's shared subscription.
#[derive(Debug, Clone)]
pub struct SubscriptionSettings {
    pub mqtt: MqttSettings,
    /// `$share/<group>/+/<attrs>`.
    pub filter: String,
}

/// Runs until `shutdown`; messages being handled then get `drain` to be acknowledged by Kafka.
pub async fn run(
    settings: SubscriptionSettings,
    v2k: Arc<V2k>,
    policy: Arc<Policy>,
    probe: Probe,
    shutdown: CancellationToken,
    drain: Duration,
) {
    let handle = move |message: Message| -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        match policy.attrs_topic_device(&message.topic) {
            Some(device) => Box::pin(v2k.forward_until_delivered(device, &message.topic, &message.payload)),
            None => {
                // The broker's ACL lets only devices publish on attrs topics; anything else is not device data.
                tracing::warn!(topic = %message.topic, "message on the shared subscription is not device data; dropped");
                Box::pin(async {})
            }
        }
    };
    subscriber::run(settings.mqtt, "v2k", settings.filter, probe, handle, shutdown, drain).await;
}
