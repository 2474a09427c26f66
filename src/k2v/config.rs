//! K2V options (flags and environment variables, dojot's names where dojot had one).

use std::time::Duration;

use clap::builder::BoolishValueParser;

use crate::config::ConfigError;

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
        let suffix = &self.k2v_topic_suffix;
        if suffix.is_empty() || suffix.contains(|c: char| !(c.is_ascii_alphanumeric() || "._-".contains(c))) {
            return Err(ConfigError {
                variable: "K2V_MESSENGER_CONSUME_TOPIC_SUFFIX",
                problem: format!("{suffix:?} must be a non-empty Kafka topic part ([A-Za-z0-9._-])"),
            });
        }
        Ok(format!("^.+\\.{}$", suffix.replace('.', "\\.")))
    }

    pub fn metadata_refresh(&self) -> Duration {
        Duration::from_millis(self.k2v_metadata_refresh_ms)
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        k2v: K2vArgs,
    }

    fn parse(args: &[&str]) -> K2vArgs {
        Cli::try_parse_from(std::iter::once("t").chain(args.iter().copied())).unwrap().k2v
    }

    #[test]
    fn defaults_are_dojots() {
        let k = parse(&[]);
        assert!(k.k2v_enabled);
        assert_eq!(k.k2v_consumer_group, "k2v-bridge-group-id");
        assert!(!k.k2v_retain);
        assert_eq!(k.topic_pattern().unwrap(), r"^.+\.dojot\.device-manager\.device$");
    }

    #[test]
    fn suffix_is_checked_and_escaped() {
        assert_eq!(parse(&["--k2v-topic-suffix", "cmd"]).topic_pattern().unwrap(), r"^.+\.cmd$");
        for bad in ["", "a*b", "a b", "x$", "(a)"] {
            let err = parse(&["--k2v-topic-suffix", bad]).topic_pattern().unwrap_err();
            assert_eq!(err.variable, "K2V_MESSENGER_CONSUME_TOPIC_SUFFIX");
        }
    }
}
