//! V2K options, validated into the producer's settings, [`V2kSettings`] and the subscription's settings.

use std::time::Duration;

use clap::builder::BoolishValueParser;

use super::{ConfigError, MqttArgs, invalid, kafka_topic_part};
use crate::kafka::lease::LeaseSettings;
use crate::kafka::producer::ProducerSettings;
use crate::mqtt::MqttSettings;
use crate::v2k::plain::{self, PlainSettings};
use crate::v2k::subscription::SubscriptionSettings;
use crate::v2k::{Contract, Mode, V2kSettings};

/// Which subscription the service holds in subscription mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SubscriptionKind {
    /// `$share/<V2K_SHARE_GROUP>/+/attrs`, held by every instance; VerneMQ caps its delivery near 0.1× of the node.
    Shared,
    /// `+/attrs` on one persistent session that only the holder of a Kafka lease connects; 0.76× on VerneMQ.
    Plain,
}

/// Device data into Kafka.
#[derive(Debug, Clone, clap::Args)]
pub struct V2kArgs {
    /// auth_on_publish (strict: nothing acknowledged is lost) | on_publish (loses acknowledged data while the
    /// service is down) | subscription.
    #[arg(long, env = "V2K_MODE", value_enum, default_value_t = Mode::AuthOnPublish)]
    pub v2k_mode: Mode,

    /// on_publish mode: refuse device publishes in auth_on_publish while Kafka is unhealthy (no cache header then).
    #[arg(long, env = "V2K_GATE", default_value = "false", action = clap::ArgAction::Set, value_parser = BoolishValueParser::new())]
    pub v2k_gate: bool,

    /// The gate closes when more messages than this wait for Kafka.
    #[arg(long, env = "V2K_GATE_MAX_QUEUE", default_value_t = 10_000)]
    pub v2k_gate_max_queue: usize,

    /// Kafka topic of device data is `<tenant>.<suffix>`; dead letters go to `<tenant>.<suffix>.dead-letter`.
    #[arg(long, env = "V2K_MESSENGER_PRODUCE_TOPIC_SUFFIX", default_value = "device-data")]
    pub v2k_topic_suffix: String,

    /// Larger payloads are dead-lettered.
    #[arg(long, env = "V2K_MAX_PAYLOAD_BYTES", default_value_t = 256 * 1024)]
    pub v2k_max_payload_bytes: usize,

    /// Dead-letter values are cut to this size (headers `original_size`, `sha256`), well under Kafka's 1 MiB record
    /// limit, so a dead letter always lands.
    #[arg(long, env = "V2K_DEAD_LETTER_MAX_BYTES", default_value_t = 256 * 1024,
          value_parser = clap::value_parser!(u32).range(1024..=900_000))]
    pub v2k_dead_letter_max_bytes: u32,

    /// Webhook modes: how long a QoS 1/2 publish waits for Kafka's ack (below VerneMQ's 5 s webhook timeout).
    #[arg(long, env = "V2K_ACK_TIMEOUT_MS", default_value_t = 4000, value_parser = clap::value_parser!(u64).range(1..=4900))]
    pub v2k_ack_timeout_ms: u64,

    /// How long the producer retries a message before it counts as expired (librdkafka message.timeout.ms, where 0
    /// would mean never: nothing retried forever). At least 1 s and more than KAFKA_LINGER_MS.
    #[arg(long, env = "V2K_DELIVERY_TIMEOUT_MS", default_value_t = 300_000,
          value_parser = clap::value_parser!(u64).range(1000..=i32::MAX as u64))]
    pub v2k_delivery_timeout_ms: u64,

    /// Subscription mode: unacknowledged messages the broker may hand the service at once (the Receive Maximum of
    /// the subscription's MQTT 5 CONNECT, 1 to 65535).
    #[arg(long, env = "V2K_MAX_IN_FLIGHT", default_value_t = 1000, value_parser = clap::value_parser!(u16).range(1..))]
    pub v2k_max_in_flight: u16,

    /// Records of one tenant that may wait for Kafka at once. Beyond it the tenant's QoS 1/2 publishes are refused
    /// (strict mode, gate) or wait (subscription mode: only that tenant's), and its QoS 0 publishes are dropped.
    #[arg(long, env = "V2K_TENANT_MAX_IN_FLIGHT", default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..))]
    pub v2k_tenant_max_in_flight: u32,

    /// Refuse devices of tenants whose `<tenant>.<suffix>` topic does not exist in Kafka (off where Kafka creates
    /// topics on first use).
    #[arg(long, env = "V2K_REQUIRE_TENANT_TOPIC", default_value = "true", action = clap::ArgAction::Set, value_parser = BoolishValueParser::new())]
    pub v2k_require_tenant_topic: bool,

    /// How often the tenants' topics are read from Kafka's metadata: a new tenant is accepted within this.
    #[arg(long, env = "V2K_TENANT_REFRESH_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(100..))]
    pub v2k_tenant_refresh_ms: u64,

    /// Subscription mode: shared subscription group.
    #[arg(long, env = "V2K_SHARE_GROUP", default_value = "v2k")]
    pub v2k_share_group: String,

    /// Subscription mode: shared (`$share/<group>/+/attrs` on every instance) or plain (`+/attrs`, one instance at a
    /// time, chosen by a Kafka lease).
    #[arg(long, env = "V2K_SUBSCRIPTION", value_enum, default_value_t = SubscriptionKind::Shared)]
    pub v2k_subscription: SubscriptionKind,

    /// Plain subscription: the cluster's name for it — the lease's Kafka consumer group, and the MQTT client id
    /// `<group>-v2k` every instance uses for the one session.
    #[arg(long, env = "V2K_LEASE_GROUP", default_value = "iotagent-mqtt-plain")]
    pub v2k_lease_group: String,

    /// Plain subscription: the lease topic (one partition; it must exist).
    #[arg(long, env = "V2K_LEASE_TOPIC", default_value = "iotagent.v2k-lease")]
    pub v2k_lease_topic: String,

    /// Plain subscription: the lease's Kafka session timeout (ms), how long a crashed holder keeps the lease (Kafka
    /// brokers accept 6000 to 1800000 by default).
    #[arg(long, env = "V2K_LEASE_SESSION_TIMEOUT_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    pub v2k_lease_session_timeout_ms: u64,

    /// Plain subscription: messages VerneMQ keeps for the session, connected (`max_online_messages`) and during a
    /// handover (`max_offline_messages`): at least the device message rate × the handover time.
    #[arg(long, env = "V2K_PLAIN_MAX_QUEUED", default_value_t = 1_000_000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub v2k_plain_max_queued: u32,

    /// Producer compression: none, gzip, snappy, lz4, zstd.
    #[arg(long, env = "KAFKA_COMPRESSION", default_value = "none", value_parser = ["none", "gzip", "snappy", "lz4", "zstd"])]
    pub kafka_compression: String,

    /// Producer linger (ms): how long a message may wait to share a batch.
    #[arg(long, env = "KAFKA_LINGER_MS", default_value_t = 5)]
    pub kafka_linger_ms: u64,
}

/// Everything V2K needs to start.
#[derive(Debug, Clone)]
pub struct V2kParts {
    pub producer: ProducerSettings,
    pub settings: V2kSettings,
    /// Subscription mode: the internal client's subscription.
    pub subscription: Option<SubscriptionSettings>,
    /// Plain subscription: the lease that picks the one instance holding it.
    pub plain: Option<PlainSettings>,
}

impl V2kArgs {
    /// V2K's settings for these brokers; `attrs_suffix` is the device data topic level the subscription covers.
    ///
    /// # Errors
    /// An invalid topic suffix, or subscription mode without the internal MQTT client.
    pub fn parts(
        &self,
        brokers: &str,
        attrs_suffix: &str,
        mqtt_args: &MqttArgs,
        mqtt: Option<&MqttSettings>,
    ) -> Result<V2kParts, ConfigError> {
        kafka_topic_part("V2K_MESSENGER_PRODUCE_TOPIC_SUFFIX", &self.v2k_topic_suffix)?;
        // librdkafka refuses the producer otherwise, and a record must get the chance to leave its batch.
        if self.v2k_delivery_timeout_ms <= self.kafka_linger_ms {
            return Err(invalid(
                "V2K_DELIVERY_TIMEOUT_MS",
                format!(
                    "{} ms must be more than KAFKA_LINGER_MS ({} ms)",
                    self.v2k_delivery_timeout_ms, self.kafka_linger_ms
                ),
            ));
        }
        let subscription = match (self.v2k_mode, mqtt) {
            (Mode::Subscription, None) => {
                return Err(invalid("MQTT_URL", "V2K_MODE=subscription needs the internal MQTT client"));
            }
            (Mode::Subscription, Some(mqtt)) => Some(match self.v2k_subscription {
                SubscriptionKind::Shared => SubscriptionSettings {
                    mqtt: mqtt.clone(),
                    filter: format!("$share/{}/+/{attrs_suffix}", self.v2k_share_group),
                    window: self.v2k_max_in_flight,
                },
                // One session for the cluster: the same client id on every instance (`<group>-v2k`).
                SubscriptionKind::Plain => SubscriptionSettings {
                    mqtt: MqttSettings { client_id: self.v2k_lease_group.clone(), ..mqtt.clone() },
                    filter: format!("+/{attrs_suffix}"),
                    window: self.v2k_max_in_flight,
                },
            }),
            _ => None,
        };
        let plain = match (&subscription, self.v2k_subscription) {
            (Some(_), SubscriptionKind::Plain) => Some(self.plain(brokers, mqtt_args)?),
            _ => None,
        };
        let producer = ProducerSettings {
            brokers: brokers.to_string(),
            compression: self.kafka_compression.clone(),
            linger_ms: self.kafka_linger_ms,
            delivery_timeout_ms: self.v2k_delivery_timeout_ms,
            client_id: mqtt_args.mqtt_client_id.clone().unwrap_or_else(|| "iotagent-mqtt".into()),
        };
        let settings = V2kSettings {
            mode: self.v2k_mode,
            contract: Contract {
                topic_suffix: self.v2k_topic_suffix.clone(),
                max_payload_bytes: self.v2k_max_payload_bytes,
                max_dead_letter_bytes: self.v2k_dead_letter_max_bytes as usize,
            },
            ack_timeout: Duration::from_millis(self.v2k_ack_timeout_ms),
            gate_max_queue: self.v2k_gate.then_some(self.v2k_gate_max_queue),
            tenant_max_in_flight: self.v2k_tenant_max_in_flight as usize,
            tenant_refresh: self.v2k_require_tenant_topic.then(|| Duration::from_millis(self.v2k_tenant_refresh_ms)),
        };
        Ok(V2kParts { producer, settings, subscription, plain })
    }

    fn plain(&self, brokers: &str, mqtt_args: &MqttArgs) -> Result<PlainSettings, ConfigError> {
        kafka_topic_part("V2K_LEASE_TOPIC", &self.v2k_lease_topic)?;
        // The group also names the MQTT session: the same safe characters as a topic part (no quote, which would
        // break VerneMQ's disconnect-by-client-id query).
        kafka_topic_part("V2K_LEASE_GROUP", &self.v2k_lease_group)?;
        Ok(PlainSettings {
            lease: LeaseSettings {
                brokers: brokers.to_string(),
                group_id: self.v2k_lease_group.clone(),
                client_id: format!(
                    "{}-v2k-lease",
                    mqtt_args.mqtt_client_id.clone().unwrap_or_else(|| "iotagent-mqtt".into())
                ),
                topic: self.v2k_lease_topic.clone(),
                session_timeout: Duration::from_millis(self.v2k_lease_session_timeout_ms),
                release_timeout: plain::RELEASE_TIMEOUT,
            },
            max_queued: self.v2k_plain_max_queued,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::parse;
    use super::*;

    fn parts(args: &[&str]) -> Result<V2kParts, ConfigError> {
        let c = parse(args).unwrap();
        c.v2k.parts("k:9092", "attrs", &c.mqtt, c.mqtt_settings().unwrap().as_ref())
    }

    #[test]
    fn defaults() {
        let p = parts(&[]).unwrap();
        assert_eq!(p.settings.mode, Mode::AuthOnPublish); // strict: nothing acknowledged is lost
        assert_eq!(p.settings.contract.topic_suffix, "device-data");
        assert_eq!(p.settings.gate_max_queue, None);
        assert_eq!(p.producer.client_id, "iotagent-mqtt");
        assert!(p.subscription.is_none());
        assert_eq!(p.settings.tenant_max_in_flight, 500);
        assert_eq!(p.settings.tenant_refresh, Some(Duration::from_secs(10)), "unknown tenants refused by default");
        let off = parts(&["--v2k-require-tenant-topic", "false"]).unwrap();
        assert_eq!(off.settings.tenant_refresh, None);
    }

    #[test]
    fn the_delivery_timeout_is_bounded_and_longer_than_the_linger() {
        assert_eq!(parts(&[]).unwrap().producer.delivery_timeout_ms, 300_000);
        for never in ["0", "999"] {
            let err = parse(&["--v2k-delivery-timeout-ms", never]).unwrap_err().to_string();
            assert!(err.contains("V2K_DELIVERY_TIMEOUT_MS"), "{never}: {err}");
        }
        let err = parts(&["--v2k-delivery-timeout-ms", "2000", "--kafka-linger-ms", "2000"]).unwrap_err();
        assert_eq!(err.variable, "V2K_DELIVERY_TIMEOUT_MS");
        assert!(err.to_string().contains("KAFKA_LINGER_MS"), "{err}");
        assert!(parts(&["--v2k-delivery-timeout-ms", "2000", "--kafka-linger-ms", "1999"]).is_ok());
    }

    #[test]
    fn compression_is_off_by_default_and_one_of_librdkafkas() {
        assert_eq!(parts(&[]).unwrap().producer.compression, "none");
        assert_eq!(parts(&["--kafka-compression", "lz4"]).unwrap().producer.compression, "lz4");
        assert!(parse(&["--kafka-compression", "brotli"]).is_err());
    }

    #[test]
    fn suffix_and_subscription_are_checked() {
        let err = parts(&["--v2k-topic-suffix", "a b"]).unwrap_err();
        assert_eq!(err.variable, "V2K_MESSENGER_PRODUCE_TOPIC_SUFFIX");
        assert_eq!(parts(&["--v2k-mode", "subscription"]).unwrap_err().variable, "MQTT_URL");
        let p = parts(&["--v2k-mode", "subscription", "--mqtt-url", "mqtt://v", "--v2k-share-group", "g"]).unwrap();
        assert_eq!(p.subscription.unwrap().filter, "$share/g/+/attrs");
        assert_eq!(parts(&["--v2k-gate", "on"]).unwrap().settings.gate_max_queue, Some(10_000));
    }

    #[test]
    fn the_subscription_window_fits_a_receive_maximum() {
        let sub = ["--v2k-mode", "subscription", "--mqtt-url", "mqtt://v"];
        assert_eq!(parts(&sub).unwrap().subscription.unwrap().window, 1000);
        let widest = parts(&[&sub[..], &["--v2k-max-in-flight", "65535"]].concat()).unwrap();
        assert_eq!(widest.subscription.unwrap().window, 65535);
        for bad in ["0", "65536"] {
            let err = parse(&[&sub[..], &["--v2k-max-in-flight", bad]].concat()).unwrap_err().to_string();
            assert!(err.contains("V2K_MAX_IN_FLIGHT"), "{bad}: {err}");
        }
    }

    #[test]
    fn plain_subscription_is_one_session_for_the_cluster() {
        let sub = ["--v2k-mode", "subscription", "--mqtt-url", "mqtt://v", "--mqtt-client-id", "node-1"];
        let shared = parts(&sub).unwrap();
        assert!(shared.plain.is_none(), "shared is the default");
        let p = parts(&[&sub[..], &["--v2k-subscription", "plain"]].concat()).unwrap();
        let subscription = p.subscription.unwrap();
        assert_eq!(subscription.filter, "+/attrs");
        assert_eq!(subscription.mqtt.options("v2k", true).unwrap().client_id(), "iotagent-mqtt-plain-v2k");
        let plain = p.plain.unwrap();
        assert_eq!(plain.lease.group_id, "iotagent-mqtt-plain");
        assert_eq!(plain.lease.topic, "iotagent.v2k-lease");
        assert_eq!(plain.lease.client_id, "node-1-v2k-lease");
        assert_eq!(plain.max_queued, 1_000_000);
        let bad = parts(&[&sub[..], &["--v2k-subscription", "plain", "--v2k-lease-group", "a\"b"]].concat());
        assert_eq!(bad.unwrap_err().variable, "V2K_LEASE_GROUP");
        assert!(parts(&["--v2k-subscription", "plain"]).unwrap().plain.is_none(), "only in subscription mode");
    }
}
