//! K2V options (flags and environment variables, dojot's names where dojot had one), validated into [`K2vSettings`].

use std::time::Duration;

use clap::builder::BoolishValueParser;

use super::{ConfigError, kafka_topic_part};
use crate::k2v::{EventRules, K2vSettings, ROLE};
use crate::kafka::consumer::ConsumerSettings;
use crate::mqtt::MqttSettings;
use crate::policy::PolicyConfig;

/// Commands to devices: Kafka device-manager events → the service's MQTT client → `<tenant>:<device>/config`.
#[derive(Debug, Clone, clap::Args)]
pub struct K2vArgs {
    /// Run K2V when KAFKA_BROKERS and MQTT_URL are both set.
    #[arg(long, env = "K2V_ENABLED", default_value = "true", action = clap::ArgAction::Set, value_parser = BoolishValueParser::new())]
    pub k2v_enabled: bool,

    /// Consume every topic `<tenant>.<suffix>` (regex `^.+\.<suffix>$`; new tenants' topics are picked up).
    #[arg(long, env = "K2V_MESSENGER_CONSUME_TOPIC_SUFFIX", default_value = "dojot.device-manager.device")]
    pub k2v_topic_suffix: String,

    /// Kafka consumer group; instances sharing it share the partitions.
    #[arg(long, env = "K2V_KAFKA_GROUP_ID", default_value = "k2v-bridge-group-id")]
    pub k2v_consumer_group: String,

    /// Publish configurations retained, so a device that connects later still gets its last one.
    #[arg(long, env = "K2V_RETAIN", default_value = "false", action = clap::ArgAction::Set, value_parser = BoolishValueParser::new())]
    pub k2v_retain: bool,

    /// Publishes awaiting the broker's PUBACK at most; consumption waits beyond that.
    #[arg(long, env = "K2V_MAX_IN_FLIGHT", default_value_t = 500, value_parser = clap::value_parser!(u16).range(1..=10_000))]
    pub k2v_max_in_flight: u16,

    /// How often the topic list is re-read, i.e. how soon a new tenant's topic is consumed (ms).
    #[arg(long, env = "K2V_METADATA_REFRESH_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(100..))]
    pub k2v_metadata_refresh_ms: u64,

    /// How often acknowledged offsets are committed (ms); a crash replays at most this much.
    #[arg(long, env = "K2V_SDK_COMMIT_INTERVAL_MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(10..))]
    pub k2v_commit_interval_ms: u64,

    /// Kafka group session timeout (ms): how long a crashed instance keeps its partitions.
    #[arg(long, env = "K2V_SESSION_TIMEOUT_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1000..))]
    pub k2v_session_timeout_ms: u64,

    /// Where a group without committed offsets starts: earliest (dojot's `beginning`) or latest.
    #[arg(long, env = "K2V_AUTO_OFFSET_RESET", default_value = "earliest", value_parser = ["earliest", "latest"])]
    pub k2v_auto_offset_reset: String,

    /// How often the lag gauge is measured (ms): one watermark request per consumed partition.
    #[arg(long, env = "K2V_LAG_INTERVAL_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(100..))]
    pub k2v_lag_interval_ms: u64,

    /// Interval of the consumer statistics that feed the Kafka readiness probe (ms).
    #[arg(long, env = "K2V_STATS_INTERVAL_MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(100..))]
    pub k2v_stats_interval_ms: u64,
}

impl K2vArgs {
    /// The regex subscription for the suffix.
    ///
    /// # Errors
    /// A suffix that is not a plain Kafka topic part.
    pub fn topic_pattern(&self) -> Result<String, ConfigError> {
        kafka_topic_part("K2V_MESSENGER_CONSUME_TOPIC_SUFFIX", &self.k2v_topic_suffix)?;
        Ok(format!("^.+\\.{}$", self.k2v_topic_suffix.replace('.', "\\.")))
    }

    /// K2V's settings for these brokers, or `None` when K2V_ENABLED is off. Devices' ids and their configuration
    /// topic follow the policy.
    ///
    /// # Errors
    /// An invalid K2V option.
    pub fn settings(
        &self,
        brokers: &str,
        mqtt: MqttSettings,
        policy: &PolicyConfig,
    ) -> Result<Option<K2vSettings>, ConfigError> {
        if !self.k2v_enabled {
            return Ok(None);
        }
        let consumer = ConsumerSettings {
            brokers: brokers.to_string(),
            group_id: self.k2v_consumer_group.clone(),
            client_id: format!("{}-{ROLE}", mqtt.client_id),
            topic_pattern: self.topic_pattern()?,
            commit_interval: Duration::from_millis(self.k2v_commit_interval_ms),
            session_timeout: Duration::from_millis(self.k2v_session_timeout_ms),
            metadata_refresh: Duration::from_millis(self.k2v_metadata_refresh_ms),
            auto_offset_reset: self.k2v_auto_offset_reset.clone(),
            stats_interval: Duration::from_millis(self.k2v_stats_interval_ms),
        };
        Ok(Some(K2vSettings {
            rules: EventRules {
                id_charset: policy.id_charset.clone(),
                config_suffix: policy.config_suffix.clone(),
                topic_suffix: self.k2v_topic_suffix.clone(),
                // K2V refuses what the devices' sessions could not take (MAX_MESSAGE_SIZE).
                max_message_size: policy.max_message_size,
            },
            retain: self.k2v_retain,
            max_in_flight: self.k2v_max_in_flight,
            lag_interval: Duration::from_millis(self.k2v_lag_interval_ms),
            consumer,
            mqtt,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::super::parse;

    fn settings(args: &[&str]) -> Result<Option<super::K2vSettings>, super::ConfigError> {
        parse(args).unwrap().settings().map(|s| s.k2v)
    }

    #[test]
    fn defaults_are_dojots() {
        let k = parse(&[]).unwrap().k2v;
        assert!(k.k2v_enabled);
        assert_eq!(k.k2v_consumer_group, "k2v-bridge-group-id");
        assert!(!k.k2v_retain);
        assert_eq!(k.topic_pattern().unwrap(), r"^.+\.dojot\.device-manager\.device$");
    }

    #[test]
    fn suffix_is_checked_and_escaped() {
        let pattern = |suffix| parse(&["--k2v-topic-suffix", suffix]).unwrap().k2v.topic_pattern();
        assert_eq!(pattern("cmd").unwrap(), r"^.+\.cmd$");
        for bad in ["", "a*b", "a b", "x$", "(a)"] {
            assert_eq!(pattern(bad).unwrap_err().variable, "K2V_MESSENGER_CONSUME_TOPIC_SUFFIX");
        }
    }

    #[test]
    fn runs_only_with_both_brokers_and_not_disabled() {
        let both =
            ["--kafka-brokers", "k:9092", "--mqtt-url", "mqtt://v:1883", "--mqtt-client-id", "iotagent-mqtt-gw1"];
        let on = settings(&both).unwrap().expect("K2V on");
        assert_eq!(on.consumer.topic_pattern, r"^.+\.dojot\.device-manager\.device$");
        assert_eq!(on.consumer.group_id, "k2v-bridge-group-id");
        assert_eq!(on.consumer.client_id, "iotagent-mqtt-gw1-k2v");
        assert_eq!(on.rules.config_suffix, "config");
        assert!(!on.retain);
        assert_eq!(on.rules.max_message_size, Some(512 * 1024), "device sessions are bounded by default");
        let unlimited = [&both[..], &["--max-message-size", "0"]].concat();
        assert_eq!(settings(&unlimited).unwrap().unwrap().rules.max_message_size, None);
        let limited = [&both[..], &["--max-message-size", "4096"]].concat();
        assert_eq!(settings(&limited).unwrap().unwrap().rules.max_message_size, Some(4096));
        assert!(settings(&both[..2]).unwrap().is_none(), "no MQTT_URL");
        assert!(settings(&both[2..]).unwrap().is_none(), "no KAFKA_BROKERS");
        let off = [&both[..], &["--k2v-enabled", "off"]].concat();
        assert!(settings(&off).unwrap().is_none(), "K2V_ENABLED=off");
        let bad = [&both[..], &["--k2v-topic-suffix", "a b"]].concat();
        assert_eq!(settings(&bad).unwrap_err().variable, "K2V_MESSENGER_CONSUME_TOPIC_SUFFIX");
        let suffix = [&both[..], &["--config-suffix", "cmd"]].concat();
        assert_eq!(settings(&suffix).unwrap().unwrap().rules.config_suffix, "cmd");
    }
}
