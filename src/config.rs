//! Configuration from command-line flags and environment variables, validated before anything starts.

use std::net::SocketAddr;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::{CommandFactory, Parser};

use crate::mqtt::{MqttSettings, TlsFiles};
use crate::policy::{ClientIdPolicy, IdCharset, Lifetime, PolicyConfig};
use crate::secret::Secret;
use crate::webhooks::CachePolicy;

/// iotagent-mqtt: the device gateway beside stock VerneMQ, called through vmq_webhooks.
///
/// Every option is also an environment variable. Parts whose broker is not configured stay off: without
/// KAFKA_BROKERS and MQTT_URL the service is an ACL and connection-lifetime webhook only.
#[derive(Debug, Clone, Parser)]
#[command(name = "iotagent-mqtt", version, about, long_about = None)]
pub struct Config {
    /// Address of the webhook, health and metrics listener.
    #[arg(long, env = "IOTAGENT_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    /// How device client ids relate to usernames: any | equal | prefix | scoped (rewrite to `<username>|<id>`).
    #[arg(long, env = "CLIENT_ID_POLICY", value_enum, default_value_t = ClientIdPolicy::Scoped)]
    pub client_id_policy: ClientIdPolicy,

    /// Maximum device connection lifetime in seconds (0 disables) [default: 1800].
    #[arg(long, env = "MAX_CONNECTION_LIFETIME", value_name = "SECONDS")]
    pub max_connection_lifetime: Option<u64>,

    /// dojot's name for the lifetime, in milliseconds; give this or MAX_CONNECTION_LIFETIME, not both.
    #[arg(long, env = "PLUGIN_DISC_LIFETIME_SESSION", value_name = "MILLISECONDS")]
    pub plugin_disc_lifetime_session: Option<u64>,

    /// Random spread of each lifetime around the base, in percent (0–50).
    #[arg(long, env = "MAX_CONNECTION_LIFETIME_JITTER", default_value_t = 10,
          value_parser = clap::value_parser!(u8).range(0..=50))]
    pub max_connection_lifetime_jitter: u8,

    /// Last topic level of device data (`<tenant>:<device>/<suffix>`).
    #[arg(long, env = "DEVICE_ATTRS_SUFFIX", default_value = "attrs")]
    pub attrs_suffix: String,

    /// Last topic level of device configuration (`<tenant>:<device>/<suffix>`).
    #[arg(long, env = "DEVICE_CONFIG_SUFFIX", default_value = "config")]
    pub config_suffix: String,

    /// Characters allowed in tenant and device ids [default: A-Z a-z 0-9 _ . -].
    #[arg(long, env = "DEVICE_ID_CHARS")]
    pub device_id_chars: Option<String>,

    /// Let devices publish retained messages on their attrs topic.
    #[arg(long, env = "DEVICE_ALLOW_RETAIN", default_value = "false", action = clap::ArgAction::Set, value_parser = BoolishValueParser::new())]
    pub device_allow_retain: bool,

    /// Refuse devices that connect without a client certificate forwarded by VerneMQ (`forward_connection_opts`).
    #[arg(long, env = "REQUIRE_CLIENT_CERT", default_value = "false", action = clap::ArgAction::Set, value_parser = BoolishValueParser::new())]
    pub require_client_cert: bool,

    /// `max_message_size` (bytes) set on device sessions; unset leaves VerneMQ's own limit.
    #[arg(long, env = "MAX_MESSAGE_SIZE", value_name = "BYTES")]
    pub max_message_size: Option<u32>,

    /// Username of the service's own MQTT identity (the internal publisher); also the only non-device identity the
    /// ACL accepts.
    #[arg(long, env = "MQTT_USERNAME", default_value = "k2v-bridge")]
    pub mqtt_username: String,

    /// Password of the service identity (without it, the identity is accepted only with a forwarded certificate).
    #[arg(long, env = "MQTT_PASSWORD", hide_env_values = true)]
    pub mqtt_password: Option<Secret>,

    /// `cache-control: max-age` (seconds) on allowed publish and subscribe decisions where caching is safe; 0 = off.
    #[arg(long, env = "WEBHOOK_CACHE_MAX_AGE", default_value_t = 300)]
    pub webhook_cache_max_age: u32,

    /// `cache-control: max-age` on accepted registrations; 0 (default) so a removed device cannot reconnect from
    /// VerneMQ's cache.
    #[arg(long, env = "REGISTER_CACHE_MAX_AGE", default_value_t = 0)]
    pub register_cache_max_age: u32,

    /// Largest webhook request body accepted (bytes); larger ones are refused with 400.
    #[arg(long, env = "WEBHOOK_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    pub webhook_max_body_bytes: usize,

    /// Log format: json or text.
    #[arg(long, env = "LOG_FORMAT", default_value = "json", value_parser = ["json", "text"])]
    pub log_format: String,

    /// Seconds allowed for a clean shutdown (in-flight hooks, producer flush, consumer commit).
    #[arg(long, env = "SHUTDOWN_TIMEOUT", default_value_t = 10, value_name = "SECONDS")]
    pub shutdown_timeout: u64,

    /// Kafka bootstrap servers (`host:port,…`). Unset: device data and commands stay off (ACL only).
    #[arg(long, env = "KAFKA_BROKERS")]
    pub kafka_brokers: Option<String>,

    #[command(flatten)]
    pub mqtt: MqttArgs,

    #[command(flatten)]
    pub v2k: V2kArgs,

    #[command(flatten)]
    pub k2v: crate::k2v::K2vArgs,

    #[command(flatten)]
    pub sessions: crate::config_sessions::SessionsArgs,
}

/// The service's own MQTT client (K2V publisher, V2K subscription mode). It connects as MQTT_USERNAME.
#[derive(Debug, Clone, clap::Args)]
pub struct MqttArgs {
    /// Broker for the internal client: mqtt://host:port or mqtts://host:port. Unset: no internal client.
    #[arg(long, env = "MQTT_URL")]
    pub mqtt_url: Option<String>,

    /// Base of the internal client ids (`-k2v`, `-v2k` appended); keep it stable per instance, since the broker keeps
    /// its sessions (default: `iotagent-mqtt-<hostname>`).
    #[arg(long, env = "MQTT_CLIENT_ID")]
    pub mqtt_client_id: Option<String>,

    /// CA certificate (PEM) that signed the broker's certificate, for mqtts://.
    #[arg(long, env = "MQTT_CA_FILE")]
    pub mqtt_ca_file: Option<std::path::PathBuf>,

    /// The service's client certificate (PEM), for mutual TLS.
    #[arg(long, env = "MQTT_CERT_FILE")]
    pub mqtt_cert_file: Option<std::path::PathBuf>,

    /// The key of that certificate (PEM).
    #[arg(long, env = "MQTT_KEY_FILE")]
    pub mqtt_key_file: Option<std::path::PathBuf>,

    /// MQTT keep-alive of the internal clients, in seconds.
    #[arg(long, env = "MQTT_KEEP_ALIVE", default_value_t = 30, value_parser = clap::value_parser!(u64).range(5..=3600))]
    pub mqtt_keep_alive: u64,
}

/// How device publishes reach Kafka (ARCHITECTURE.md §3, §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum V2kMode {
    /// Produce from the on_publish webhook; the device's PUBACK waits for Kafka's ack (up to V2K_ACK_TIMEOUT_MS).
    #[value(name = "on_publish")]
    OnPublish,
    /// Produce inside auth_on_publish and refuse the publish when Kafka does not ack: end-to-end at-least-once.
    #[value(name = "auth_on_publish")]
    AuthOnPublish,
    /// Shared subscription `$share/<group>/+/attrs` with manual acks: no per-message webhook.
    #[value(name = "subscription")]
    Subscription,
}

/// Device data into Kafka.
#[derive(Debug, Clone, clap::Args)]
pub struct V2kArgs {
    /// on_publish | auth_on_publish (strict) | subscription.
    #[arg(long, env = "V2K_MODE", value_enum, default_value_t = V2kMode::OnPublish)]
    pub v2k_mode: V2kMode,

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

    /// Webhook modes: how long a QoS 1/2 publish waits for Kafka's ack (below VerneMQ's 5 s webhook timeout).
    #[arg(long, env = "V2K_ACK_TIMEOUT_MS", default_value_t = 4000, value_parser = clap::value_parser!(u64).range(1..=4900))]
    pub v2k_ack_timeout_ms: u64,

    /// How long the producer retries a message before it counts as expired (librdkafka message.timeout.ms).
    #[arg(long, env = "V2K_DELIVERY_TIMEOUT_MS", default_value_t = 300_000)]
    pub v2k_delivery_timeout_ms: u64,

    /// Subscription mode: unacknowledged messages VerneMQ may hand the service at once (`max_inflight_messages`
    /// modifier on the service's session).
    #[arg(long, env = "V2K_MAX_IN_FLIGHT", default_value_t = 1000)]
    pub v2k_max_in_flight: u32,

    /// Subscription mode: shared subscription group.
    #[arg(long, env = "V2K_SHARE_GROUP", default_value = "v2k")]
    pub v2k_share_group: String,

    /// Producer compression: none, gzip, snappy, lz4, zstd.
    #[arg(long, env = "KAFKA_COMPRESSION", default_value = "lz4", value_parser = ["none", "gzip", "snappy", "lz4", "zstd"])]
    pub kafka_compression: String,

    /// Producer linger (ms): how long a message may wait to share a batch.
    #[arg(long, env = "KAFKA_LINGER_MS", default_value_t = 5)]
    pub kafka_linger_ms: u64,
}

/// A configuration value that cannot work, naming the variable to fix.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {variable}: {problem}")]
pub struct ConfigError {
    pub variable: &'static str,
    pub problem: String,
}

fn invalid(variable: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError { variable, problem: problem.into() }
}

const DEFAULT_LIFETIME: Duration = Duration::from_secs(1800);

impl Config {
    /// Parses flags and environment. Errors name the environment variable as well as the flag.
    ///
    /// # Errors
    /// clap's error, ready to print (`--help` and `--version` come back as errors too, as clap does).
    pub fn from_env_and_args<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        Self::try_parse_from(args).map_err(name_env_variable)
    }

    fn lifetime(&self) -> Result<Lifetime, ConfigError> {
        let base = match (self.max_connection_lifetime, self.plugin_disc_lifetime_session) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "PLUGIN_DISC_LIFETIME_SESSION",
                    "set either MAX_CONNECTION_LIFETIME (seconds) or PLUGIN_DISC_LIFETIME_SESSION (milliseconds), not both",
                ));
            }
            (Some(seconds), None) => Duration::from_secs(seconds),
            (None, Some(millis)) => Duration::from_millis(millis),
            (None, None) => DEFAULT_LIFETIME,
        };
        Ok(Lifetime { base, jitter_percent: self.max_connection_lifetime_jitter })
    }

    /// Checks what clap's types cannot and builds the policy's configuration.
    ///
    /// # Errors
    /// The first invalid value, naming its environment variable.
    pub fn policy(&self) -> Result<PolicyConfig, ConfigError> {
        for (variable, suffix) in
            [("DEVICE_ATTRS_SUFFIX", &self.attrs_suffix), ("DEVICE_CONFIG_SUFFIX", &self.config_suffix)]
        {
            if suffix.is_empty() || suffix.contains(['/', '+', '#', '\0']) || suffix.starts_with('$') {
                return Err(invalid(
                    variable,
                    format!("{suffix:?} must be one non-empty topic level without wildcards"),
                ));
            }
        }
        if self.attrs_suffix == self.config_suffix {
            return Err(invalid("DEVICE_CONFIG_SUFFIX", "must differ from DEVICE_ATTRS_SUFFIX"));
        }
        let id_charset = match &self.device_id_chars {
            Some(chars) => IdCharset::from_chars(chars).map_err(|e| invalid("DEVICE_ID_CHARS", e))?,
            None => IdCharset::default(),
        };
        if self.mqtt_username.is_empty() || self.mqtt_username.contains(':') {
            return Err(invalid(
                "MQTT_USERNAME",
                "must be non-empty and contain no ':' (that would be a device identity)",
            ));
        }
        if self.mqtt_password.as_ref().is_some_and(|p| p.expose().is_empty()) {
            return Err(invalid(
                "MQTT_PASSWORD",
                "is empty; unset it to accept the service identity by certificate only",
            ));
        }
        Ok(PolicyConfig {
            id_charset,
            attrs_suffix: self.attrs_suffix.clone(),
            config_suffix: self.config_suffix.clone(),
            device_retain_allowed: self.device_allow_retain,
            require_client_cert: self.require_client_cert,
            client_id_policy: self.client_id_policy,
            lifetime: self.lifetime()?,
            max_message_size: self.max_message_size,
            service_username: self.mqtt_username.clone(),
            service_password: self.mqtt_password.clone(),
            service_subscription: None,
            service_max_inflight: None,
        })
    }

    /// Which decisions VerneMQ may cache, and for how long.
    pub fn cache(&self) -> CachePolicy {
        let max_age = |seconds: u32| (seconds > 0).then_some(seconds);
        CachePolicy {
            register: max_age(self.register_cache_max_age),
            publish: max_age(self.webhook_cache_max_age),
            subscribe: max_age(self.webhook_cache_max_age),
        }
    }

    /// The internal MQTT client's settings, when MQTT_URL is set.
    ///
    /// # Errors
    /// A malformed MQTT_URL, TLS files given for a plain URL or missing for mqtts://.
    pub fn mqtt_settings(&self) -> Result<Option<MqttSettings>, ConfigError> {
        let Some(url) = &self.mqtt.mqtt_url else { return Ok(None) };
        let (host, port, tls) = MqttSettings::parse_url(url).map_err(|e| invalid("MQTT_URL", e.to_string()))?;
        let tls = match (tls, &self.mqtt.mqtt_ca_file) {
            (true, Some(ca)) => Some(TlsFiles {
                ca: ca.clone(),
                cert: self.mqtt.mqtt_cert_file.clone(),
                key: self.mqtt.mqtt_key_file.clone(),
            }),
            (true, None) => return Err(invalid("MQTT_CA_FILE", "required for an mqtts:// MQTT_URL")),
            (false, _) if self.mqtt.mqtt_cert_file.is_some() => {
                return Err(invalid("MQTT_CERT_FILE", "set, but MQTT_URL is not mqtts://"));
            }
            (false, _) => None,
        };
        if tls.as_ref().is_some_and(|t| t.cert.is_some() != t.key.is_some()) {
            return Err(invalid("MQTT_KEY_FILE", "MQTT_CERT_FILE and MQTT_KEY_FILE go together"));
        }
        let client_id = self.mqtt.mqtt_client_id.clone().unwrap_or_else(default_client_id);
        Ok(Some(MqttSettings {
            host,
            port,
            tls,
            username: self.mqtt_username.clone(),
            password: self.mqtt_password.clone(),
            client_id,
            keep_alive: Duration::from_secs(self.mqtt.mqtt_keep_alive),
        }))
    }

    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_secs(self.shutdown_timeout)
    }
}

fn default_client_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "local".into());
    format!("iotagent-mqtt-{host}")
}

/// clap reports a bad value by its flag; operators set environment variables, so name that too.
fn name_env_variable(error: clap::Error) -> clap::Error {
    use clap::error::{ContextKind, ContextValue};
    let Some(ContextValue::String(arg)) = error.get(ContextKind::InvalidArg) else { return error };
    let command = Config::command();
    let Some(env) = command
        .get_arguments()
        .find(|a| {
            a.get_long().is_some_and(|long| arg.starts_with(&format!("--{long} ")) || *arg == format!("--{long}"))
        })
        .and_then(|a| a.get_env())
    else {
        return error;
    };
    let rendered = error.render().to_string();
    let rendered = rendered.strip_prefix("error: ").unwrap_or(&rendered).trim_end();
    let message = format!("{rendered}\n(set by flag or by the environment variable {})\n", env.to_string_lossy());
    clap::Error::raw(error.kind(), message).with_cmd(&command)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        Config::from_env_and_args(std::iter::once("iotagent-mqtt").chain(args.iter().copied()))
    }

    #[test]
    fn defaults() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.listen.to_string(), "0.0.0.0:8080");
        let p = c.policy().unwrap();
        assert_eq!(p.lifetime, Lifetime { base: Duration::from_secs(1800), jitter_percent: 10 });
        assert_eq!(p.client_id_policy, ClientIdPolicy::Scoped);
        assert_eq!(p.service_username, "k2v-bridge");
        let cache = c.cache();
        assert_eq!((cache.register, cache.publish, cache.subscribe), (None, Some(300), Some(300)));
    }

    #[test]
    fn dojot_lifetime_in_milliseconds() {
        let p = parse(&["--plugin-disc-lifetime-session", "60000"]).unwrap().policy().unwrap();
        assert_eq!(p.lifetime.base, Duration::from_secs(60));
        let both = parse(&["--plugin-disc-lifetime-session", "1", "--max-connection-lifetime", "2"]).unwrap();
        assert_eq!(both.policy().unwrap_err().variable, "PLUGIN_DISC_LIFETIME_SESSION");
    }

    #[test]
    fn invalid_values_name_their_variable() {
        let bad_suffix = parse(&["--attrs-suffix", "a/b"]).unwrap();
        assert_eq!(bad_suffix.policy().unwrap_err().variable, "DEVICE_ATTRS_SUFFIX");
        let same = parse(&["--config-suffix", "attrs"]).unwrap();
        assert_eq!(same.policy().unwrap_err().variable, "DEVICE_CONFIG_SUFFIX");
        let chars = parse(&["--device-id-chars", "ab/"]).unwrap();
        assert_eq!(chars.policy().unwrap_err().variable, "DEVICE_ID_CHARS");
        let user = parse(&["--mqtt-username", "admin:x"]).unwrap();
        assert_eq!(user.policy().unwrap_err().variable, "MQTT_USERNAME");

        let err = parse(&["--max-connection-lifetime", "soon"]).unwrap_err().to_string();
        assert!(err.contains("MAX_CONNECTION_LIFETIME"), "{err}");
        let err = parse(&["--max-connection-lifetime-jitter", "80"]).unwrap_err().to_string();
        assert!(err.contains("MAX_CONNECTION_LIFETIME_JITTER"), "{err}");
        let err = parse(&["--client-id-policy", "free"]).unwrap_err().to_string();
        assert!(err.contains("CLIENT_ID_POLICY"), "{err}");
    }

    #[test]
    fn mqtt_settings() {
        assert!(parse(&[]).unwrap().mqtt_settings().unwrap().is_none());
        let c = parse(&["--mqtt-url", "mqtt://vernemq:1883", "--mqtt-client-id", "gw1"]).unwrap();
        let s = c.mqtt_settings().unwrap().unwrap();
        assert_eq!((s.host.as_str(), s.port, s.client_id.as_str(), s.tls.is_none()), ("vernemq", 1883, "gw1", true));
        let err = parse(&["--mqtt-url", "vernemq"]).unwrap().mqtt_settings().unwrap_err();
        assert_eq!(err.variable, "MQTT_URL");
        let err = parse(&["--mqtt-url", "mqtts://vernemq"]).unwrap().mqtt_settings().unwrap_err();
        assert_eq!(err.variable, "MQTT_CA_FILE");
        let err = parse(&["--mqtt-url", "mqtt://v", "--mqtt-cert-file", "c.pem"]).unwrap().mqtt_settings().unwrap_err();
        assert_eq!(err.variable, "MQTT_CERT_FILE");
    }

    #[test]
    fn password_never_printed() {
        let c = parse(&["--mqtt-password", "s3cr3t"]).unwrap();
        assert!(!format!("{c:?}").contains("s3cr3t"));
        assert!(!format!("{:?}", c.policy().unwrap()).contains("s3cr3t"));
    }

    #[test]
    fn booleans_accept_operator_spellings() {
        for on in ["true", "on", "yes", "1"] {
            assert!(parse(&["--device-allow-retain", on]).unwrap().device_allow_retain, "{on}");
        }
        assert!(!parse(&["--require-client-cert", "off"]).unwrap().require_client_cert);
    }
}
