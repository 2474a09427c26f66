//! Configuration from command-line flags and environment variables, validated before anything starts.
//!
//! The top layer: each part (`policy`, `webhooks`, `mqtt`, `v2k`, `k2v`, `pki`, `sessions`) is a clap `Args` struct with the function
//! that validates it into the owning module's settings type. Nothing below `app` imports this module.

mod k2v;
mod mqtt;
pub mod pki;
mod policy;
mod sessions;
mod v2k;
mod webhooks;

use std::net::SocketAddr;
use std::time::Duration;

use clap::{CommandFactory, Parser};

pub use self::k2v::K2vArgs;
pub use self::mqtt::MqttArgs;
pub use self::pki::{PkiArgs, PkiParts};
pub use self::policy::PolicyArgs;
pub use self::sessions::SessionsArgs;
pub use self::v2k::{V2kArgs, V2kParts};
pub use self::webhooks::WebhookArgs;
use crate::k2v::K2vSettings;
use crate::mqtt::MqttSettings;
use crate::policy::PolicyConfig;
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

    #[command(flatten)]
    pub policy: PolicyArgs,

    #[command(flatten)]
    pub webhooks: WebhookArgs,

    /// Log format: json or text.
    #[arg(long, env = "LOG_FORMAT", default_value = "json", value_parser = ["json", "text"])]
    pub log_format: String,

    /// Seconds allowed for the whole clean shutdown (in-flight hooks, V2K drain and producer flush, K2V drain and
    /// commit): one budget shared by every step.
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
    pub k2v: K2vArgs,

    #[command(flatten)]
    pub pki: PkiArgs,

    #[command(flatten)]
    pub sessions: SessionsArgs,
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

/// A Kafka topic part (`<tenant>.<suffix>`): non-empty, `[A-Za-z0-9._-]` only.
fn kafka_topic_part(variable: &'static str, value: &str) -> Result<(), ConfigError> {
    if value.is_empty() || value.contains(|c: char| !(c.is_ascii_alphanumeric() || "._-".contains(c))) {
        return Err(invalid(variable, format!("{value:?} must be a non-empty Kafka topic part ([A-Za-z0-9._-])")));
    }
    Ok(())
}

/// Room for a publish webhook's fields besides the payload (username, client id, mountpoint, topic, JSON).
const WEBHOOK_ENVELOPE_BYTES: usize = 4096;

/// What VerneMQ may add to a device's packet when it forwards it (packet id, MQTT 5 properties).
const MQTT_PACKET_OVERHEAD: usize = 64 * 1024;

/// The validated configuration, each part in the terms of the module that owns it.
#[derive(Debug)]
pub struct Settings {
    /// Complete: in subscription mode it names the service's shared subscription.
    pub policy: PolicyConfig,
    pub cache: CachePolicy,
    pub max_body_bytes: usize,
    /// Idle (or unfinished request head) time after which a webhook connection is closed.
    pub webhook_idle_timeout: std::time::Duration,
    /// Worker threads of the webhooks' runtime.
    pub webhook_threads: usize,
    /// V2K, when KAFKA_BROKERS is set.
    pub v2k: Option<V2kParts>,
    /// K2V, when KAFKA_BROKERS and MQTT_URL are set and K2V_ENABLED is on.
    pub k2v: Option<K2vSettings>,
    /// Live session control (removed devices, revoked certificates, forced disconnects).
    pub sessions: crate::sessions::Settings,
    /// The removed-device reader (live session control), when KAFKA_BROKERS is set.
    pub removed_reader: Option<crate::kafka::removed::RemovedReaderSettings>,
    /// The PKI's API and upkeep, when PKI_LISTEN is set.
    pub pki: Option<PkiParts>,
    /// The whole shutdown's budget.
    pub shutdown_timeout: Duration,
    /// The HTTPS webhook listener, when its files are set.
    pub tls: Option<crate::http_tls::TlsSettings>,
    /// The certificates that make a connection the service (MQTT_CERT_FILE, SERVICE_CERT_FINGERPRINTS).
    pub service_certificates: crate::service_certs::Settings,
}

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

    /// Checks what clap's types cannot and translates every part into its module's settings.
    ///
    /// # Errors
    /// The first invalid value, naming its environment variable.
    pub fn settings(&self) -> Result<Settings, ConfigError> {
        let mut policy = self.policy.policy_config()?;
        // Every internal client's id starts with this base (`<base>-k2v`, `<base>-v2k`): never a device's.
        policy.service_client_id = Some(self.mqtt.client_id());
        self.service_ids_are_reserved()?;
        policy.reserved_client_id_prefix = Some(self.mqtt.service_client_id_prefix.clone());
        let mqtt = self.mqtt_settings()?;
        self.message_size_fits()?;
        let v2k = match &self.kafka_brokers {
            Some(brokers) => Some(self.v2k.parts(brokers, &self.policy.attrs_suffix, &self.mqtt, mqtt.as_ref())?),
            None => None,
        };
        if let Some(subscription) = v2k.as_ref().and_then(|v| v.subscription.as_ref()) {
            policy.service_subscription = Some(subscription.filter.clone());
            policy.service_max_inflight = Some(u32::from(self.v2k.v2k_max_in_flight));
        }
        if let Some(plain) = v2k.as_ref().and_then(|v| v.plain.as_ref()) {
            self.plain_session_is_reserved()?;
            policy.service_max_queued = Some(plain.max_queued);
            policy.service_plain_client_id = Some(format!("{}-v2k", self.v2k.v2k_lease_group));
        }
        let k2v = match (&self.kafka_brokers, mqtt) {
            (Some(brokers), Some(mqtt)) => self.k2v.settings(brokers, mqtt, &policy)?,
            _ => None,
        };
        let pki = self.pki.parts(&self.policy.mqtt_username, policy.id_charset.clone())?;
        let sessions = self.sessions.settings(
            policy.id_charset.clone(),
            &self.k2v.k2v_topic_suffix,
            self.k2v.topic_pattern()?,
            self.pki.upkeep()?.crl_update,
            !policy.lifetime.base.is_zero(),
        )?;
        // The same topics as K2V, with K2V's metadata refresh: how soon a new tenant's topic is read.
        let removed_reader = self.kafka_brokers.as_ref().map(|brokers| crate::kafka::removed::RemovedReaderSettings {
            brokers: brokers.clone(),
            topic_pattern: sessions.topic_pattern.clone(),
            topic_suffix: sessions.topic_suffix.clone(),
            client_id: self.mqtt.mqtt_client_id.clone().unwrap_or_else(|| "iotagent-mqtt".into()),
            metadata_refresh: Duration::from_millis(self.k2v.k2v_metadata_refresh_ms),
        });
        Ok(Settings {
            sessions,
            removed_reader,
            cache: self.webhooks.cache(),
            pki,
            max_body_bytes: self.webhooks.webhook_max_body_bytes,
            webhook_idle_timeout: std::time::Duration::from_secs(u64::from(self.webhooks.webhook_idle_timeout)),
            webhook_threads: usize::from(self.webhooks.webhook_threads),
            policy,
            v2k,
            k2v,
            shutdown_timeout: Duration::from_secs(self.shutdown_timeout),
            tls: self.webhooks.tls()?,
            service_certificates: crate::service_certs::Settings {
                pinned: self.policy.service_fingerprints()?,
                file: self.mqtt.mqtt_cert_file.clone(),
            },
        })
    }

    /// An instance refuses devices the ids of its own sessions only; the ids of the others' are refused because every
    /// instance's start with the one prefix that all refuse.
    fn service_ids_are_reserved(&self) -> Result<(), ConfigError> {
        let reason = "a device could take over this instance's sessions through another instance";
        self.starts_with_reserved_prefix("MQTT_CLIENT_ID", &self.mqtt.client_id(), reason)
    }

    fn plain_session_is_reserved(&self) -> Result<(), ConfigError> {
        let reason = "it is the client id of the plain subscription's one session, which no device may take";
        self.starts_with_reserved_prefix("V2K_LEASE_GROUP", &self.v2k.v2k_lease_group, reason)
    }

    fn starts_with_reserved_prefix(
        &self,
        variable: &'static str,
        value: &str,
        reason: &str,
    ) -> Result<(), ConfigError> {
        let prefix = &self.mqtt.service_client_id_prefix;
        if value.starts_with(prefix.as_str()) {
            return Ok(());
        }
        Err(invalid(variable, format!("{value:?} does not start with SERVICE_CLIENT_ID_PREFIX ({prefix:?}): {reason}")))
    }

    /// A device may not publish more than the service can receive: the payload travels base64-encoded in the
    /// publish webhooks' body, and as an MQTT packet to the internal client in subscription mode.
    ///
    /// # Errors
    /// MAX_MESSAGE_SIZE too large for WEBHOOK_MAX_BODY_BYTES or for the internal client.
    fn message_size_fits(&self) -> Result<(), ConfigError> {
        let size = self.policy.max_message_size as usize;
        if size == 0 {
            return Ok(());
        }
        let body = size.div_ceil(3) * 4 + WEBHOOK_ENVELOPE_BYTES;
        if body > self.webhooks.webhook_max_body_bytes {
            return Err(invalid(
                "MAX_MESSAGE_SIZE",
                format!(
                    "{size} bytes need a webhook body of up to {body} bytes (base64 payload and request fields), more \
                     than WEBHOOK_MAX_BODY_BYTES ({}): lower MAX_MESSAGE_SIZE or raise WEBHOOK_MAX_BODY_BYTES",
                    self.webhooks.webhook_max_body_bytes
                ),
            ));
        }
        if size + MQTT_PACKET_OVERHEAD > crate::mqtt::MAX_PACKET_BYTES {
            return Err(invalid(
                "MAX_MESSAGE_SIZE",
                format!(
                    "{size} bytes is more than the internal MQTT client accepts ({})",
                    crate::mqtt::MAX_PACKET_BYTES
                ),
            ));
        }
        Ok(())
    }

    /// The internal MQTT client's settings, when MQTT_URL is set.
    ///
    /// # Errors
    /// A malformed MQTT_URL, TLS files given for a plain URL or missing for mqtts://.
    pub fn mqtt_settings(&self) -> Result<Option<MqttSettings>, ConfigError> {
        self.mqtt.settings(&self.policy.mqtt_username, self.policy.mqtt_password.as_ref())
    }
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
pub(crate) fn parse(args: &[&str]) -> Result<Config, clap::Error> {
    Config::from_env_and_args(std::iter::once("iotagent-mqtt").chain(args.iter().copied()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.listen.to_string(), "0.0.0.0:8080");
        let s = c.settings().unwrap();
        assert!(s.v2k.is_none() && s.k2v.is_none(), "no brokers, ACL only");
        assert_eq!(s.shutdown_timeout, Duration::from_secs(10));
        assert_eq!((s.cache.register, s.cache.publish, s.cache.subscribe), (None, Some(300), Some(300)));
    }

    #[test]
    fn invalid_values_name_their_variable() {
        let err = parse(&["--max-connection-lifetime", "soon"]).unwrap_err().to_string();
        assert!(err.contains("MAX_CONNECTION_LIFETIME"), "{err}");
        let err = parse(&["--max-connection-lifetime-jitter", "80"]).unwrap_err().to_string();
        assert!(err.contains("MAX_CONNECTION_LIFETIME_JITTER"), "{err}");
        let err = parse(&["--client-id-policy", "free"]).unwrap_err().to_string();
        assert!(err.contains("CLIENT_ID_POLICY"), "{err}");
    }

    #[test]
    fn device_messages_fit_what_the_service_receives() {
        let s = parse(&[]).unwrap().settings().unwrap();
        assert_eq!(s.policy.max_message_size, Some(512 * 1024), "bounded by default");
        assert_eq!(parse(&["--max-message-size", "0"]).unwrap().settings().unwrap().policy.max_message_size, None);
        let err = parse(&["--max-message-size", "800000"]).unwrap().settings().unwrap_err();
        assert_eq!(err.variable, "MAX_MESSAGE_SIZE");
        assert!(err.to_string().contains("WEBHOOK_MAX_BODY_BYTES"), "{err}");
        let raised = ["--max-message-size", "800000", "--webhook-max-body-bytes", "2000000"];
        assert!(parse(&raised).unwrap().settings().is_ok());
        let huge = ["--max-message-size", "20000000", "--webhook-max-body-bytes", "40000000"];
        let err = parse(&huge).unwrap().settings().unwrap_err().to_string();
        assert!(err.contains("MAX_MESSAGE_SIZE") && err.contains("internal MQTT client"), "{err}");
    }

    #[test]
    fn kafka_topic_parts() {
        assert!(kafka_topic_part("X", "device-data.v1_a").is_ok());
        for bad in ["", "a*b", "a b", "x$", "(a)", "a/b"] {
            assert_eq!(kafka_topic_part("X", bad).unwrap_err().variable, "X", "{bad:?}");
        }
    }

    #[test]
    fn every_service_client_id_starts_with_the_reserved_prefix() {
        let s = parse(&[]).unwrap().settings().unwrap();
        assert_eq!(s.policy.reserved_client_id_prefix.as_deref(), Some("iotagent-mqtt"));
        assert!(s.policy.service_client_id.is_some_and(|id| id.starts_with("iotagent-mqtt-")), "the default id");
        let err = parse(&["--mqtt-client-id", "gw1"]).unwrap().settings().unwrap_err();
        assert_eq!(err.variable, "MQTT_CLIENT_ID");
        assert!(err.to_string().contains("SERVICE_CLIENT_ID_PREFIX"), "{err}");
        let own = ["--mqtt-client-id", "gw1", "--service-client-id-prefix", "gw"];
        assert_eq!(parse(&own).unwrap().settings().unwrap().policy.reserved_client_id_prefix.as_deref(), Some("gw"));
        assert!(
            parse(&["--service-client-id-prefix", ""]).unwrap_err().to_string().contains("SERVICE_CLIENT_ID_PREFIX")
        );
        let plain = ["--kafka-brokers", "k:9092", "--mqtt-url", "mqtt://v:1883", "--v2k-mode", "subscription"];
        let plain = [&plain[..], &["--v2k-subscription", "plain", "--v2k-lease-group", "cluster"]].concat();
        let err = parse(&plain).unwrap().settings().unwrap_err();
        assert_eq!(err.variable, "V2K_LEASE_GROUP");
        assert!(err.to_string().contains("SERVICE_CLIENT_ID_PREFIX"), "{err}");
    }

    #[test]
    fn subscription_mode_completes_the_policy() {
        let both = ["--kafka-brokers", "k:9092", "--mqtt-url", "mqtt://v:1883", "--v2k-mode", "subscription"];
        let s = parse(&both).unwrap().settings().unwrap();
        assert_eq!(s.policy.service_subscription.as_deref(), Some("$share/v2k/+/attrs"));
        assert_eq!(s.policy.service_max_inflight, Some(1000));
        assert_eq!(s.policy.service_max_queued, None, "VerneMQ's queue sizes for the shared subscription");
        let plain = parse(&[&both[..], &["--v2k-subscription", "plain"]].concat()).unwrap().settings().unwrap();
        assert_eq!(plain.policy.service_subscription.as_deref(), Some("+/attrs"));
        assert_eq!(plain.policy.service_max_queued, Some(1_000_000));
        assert_eq!(plain.policy.service_plain_client_id.as_deref(), Some("iotagent-mqtt-plain-v2k"));
        let err = parse(&[&both[..2], &both[4..]].concat()).unwrap().settings().unwrap_err();
        assert_eq!(err.variable, "MQTT_URL");
        let on_publish = parse(&both[..4]).unwrap().settings().unwrap();
        assert_eq!(on_publish.policy.service_subscription, None);
    }
}
