//! Access-rule options, validated into [`PolicyConfig`].

use std::time::Duration;

use clap::builder::BoolishValueParser;

use super::{ConfigError, invalid};
use crate::policy::{ClientIdPolicy, Fingerprint, IdCharset, Lifetime, PolicyConfig};
use crate::secret::Secret;

/// Device identities, topics and session limits; the service's own identity.
#[derive(Debug, Clone, clap::Args)]
pub struct PolicyArgs {
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

    /// Characters allowed in device ids, ranges such as `a-z` allowed [default: A-Za-z0-9_.-].
    #[arg(long, env = "DEVICE_ID_CHARS")]
    pub device_id_chars: Option<String>,

    /// Characters allowed in tenant ids, never `.` (tenants prefix Kafka topic names) [default: A-Za-z0-9_-].
    #[arg(long, env = "TENANT_ID_CHARS")]
    pub tenant_id_chars: Option<String>,

    /// Let devices publish retained messages on their attrs topic.
    #[arg(long, env = "DEVICE_ALLOW_RETAIN", default_value = "false", action = clap::ArgAction::Set, value_parser = BoolishValueParser::new())]
    pub device_allow_retain: bool,

    /// Refuse devices that connect without a client certificate forwarded by VerneMQ (`forward_connection_opts`).
    #[arg(long, env = "REQUIRE_CLIENT_CERT", default_value = "false", action = clap::ArgAction::Set, value_parser = BoolishValueParser::new())]
    pub require_client_cert: bool,

    /// `max_message_size` (bytes) set on device sessions, so that no device publishes more than the service can
    /// receive (webhook body, internal client); 0 leaves VerneMQ's own limit (unlimited by default).
    #[arg(long, env = "MAX_MESSAGE_SIZE", value_name = "BYTES", default_value_t = DEFAULT_MAX_MESSAGE_SIZE)]
    pub max_message_size: u32,

    /// Username of the service's own MQTT identity (the internal publisher); also the only non-device identity the
    /// ACL accepts.
    #[arg(long, env = "MQTT_USERNAME", default_value = "k2v-bridge")]
    pub mqtt_username: String,

    /// Password of the service identity (without it, the identity is accepted only with a forwarded certificate).
    #[arg(long, env = "MQTT_PASSWORD", hide_env_values = true)]
    pub mqtt_password: Option<Secret>,

    /// SHA-256 fingerprints (comma separated, hex with or without ':') of further certificates accepted as the
    /// service's, besides the one in MQTT_CERT_FILE: other instances', or one about to be rotated in.
    #[arg(long, env = "SERVICE_CERT_FINGERPRINTS", value_delimiter = ',')]
    pub service_cert_fingerprints: Vec<String>,
}

const DEFAULT_LIFETIME: Duration = Duration::from_secs(1800);

/// 512 KiB: twice V2K_MAX_PAYLOAD_BYTES' default, so a payload over the data limit still reaches the dead-letter
/// topic; base64-encoded (~683 KiB) it fits the 1 MiB WEBHOOK_MAX_BODY_BYTES, and it stays under Kafka's default
/// 1 MiB record limit (message.max.bytes).
pub(super) const DEFAULT_MAX_MESSAGE_SIZE: u32 = 512 * 1024;

impl PolicyArgs {
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

    /// Tenant and device id characters (DEVICE_ID_CHARS, TENANT_ID_CHARS).
    ///
    /// # Errors
    /// A set with a forbidden character, or a tenant set with a dot.
    pub fn id_charset(&self) -> Result<IdCharset, ConfigError> {
        let charset = match &self.device_id_chars {
            Some(chars) => IdCharset::from_chars(chars).map_err(|e| invalid("DEVICE_ID_CHARS", e))?,
            None => IdCharset::default(),
        };
        match &self.tenant_id_chars {
            Some(chars) => charset.with_tenant_chars(chars).map_err(|e| invalid("TENANT_ID_CHARS", e)),
            None => Ok(charset),
        }
    }

    /// SERVICE_CERT_FINGERPRINTS, parsed.
    ///
    /// # Errors
    /// An entry that is not a SHA-256 fingerprint.
    pub fn service_fingerprints(&self) -> Result<Vec<Fingerprint>, ConfigError> {
        self.service_cert_fingerprints
            .iter()
            .filter(|f| !f.trim().is_empty())
            .map(|f| f.parse().map_err(|e| invalid("SERVICE_CERT_FINGERPRINTS", format!("{f:?}: {e}"))))
            .collect()
    }

    /// The policy's configuration, without the service subscription (V2K's part adds it).
    ///
    /// # Errors
    /// The first invalid value, naming its environment variable.
    pub fn policy_config(&self) -> Result<PolicyConfig, ConfigError> {
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
        let id_charset = self.id_charset()?;
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
            max_message_size: (self.max_message_size > 0).then_some(self.max_message_size),
            service_username: self.mqtt_username.clone(),
            service_password: self.mqtt_password.clone(),
            service_client_id: None,
            service_plain_client_id: None,
            reserved_client_id_prefix: None,
            service_subscription: None,
            service_max_inflight: None,
            service_max_queued: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::parse;
    use super::*;

    fn policy(args: &[&str]) -> Result<PolicyConfig, ConfigError> {
        parse(args).unwrap().policy.policy_config()
    }

    #[test]
    fn defaults() {
        let p = policy(&[]).unwrap();
        assert_eq!(p.lifetime, Lifetime { base: Duration::from_secs(1800), jitter_percent: 10 });
        assert_eq!(p.client_id_policy, ClientIdPolicy::Scoped);
        assert_eq!(p.service_username, "k2v-bridge");
    }

    #[test]
    fn dojot_lifetime_in_milliseconds() {
        let p = policy(&["--plugin-disc-lifetime-session", "60000"]).unwrap();
        assert_eq!(p.lifetime.base, Duration::from_secs(60));
        let both = policy(&["--plugin-disc-lifetime-session", "1", "--max-connection-lifetime", "2"]);
        assert_eq!(both.unwrap_err().variable, "PLUGIN_DISC_LIFETIME_SESSION");
    }

    #[test]
    fn invalid_values_name_their_variable() {
        assert_eq!(policy(&["--attrs-suffix", "a/b"]).unwrap_err().variable, "DEVICE_ATTRS_SUFFIX");
        assert_eq!(policy(&["--config-suffix", "attrs"]).unwrap_err().variable, "DEVICE_CONFIG_SUFFIX");
        assert_eq!(policy(&["--device-id-chars", "ab/"]).unwrap_err().variable, "DEVICE_ID_CHARS");
        assert_eq!(policy(&["--mqtt-username", "admin:x"]).unwrap_err().variable, "MQTT_USERNAME");
        assert_eq!(policy(&["--tenant-id-chars", "a-z."]).unwrap_err().variable, "TENANT_ID_CHARS");
        let bad = parse(&["--service-cert-fingerprints", "AB:CD"]).unwrap().policy.service_fingerprints();
        assert_eq!(bad.unwrap_err().variable, "SERVICE_CERT_FINGERPRINTS");
    }

    #[test]
    fn service_fingerprints_are_a_list() {
        let one = "0".repeat(64);
        let two = "AB:".repeat(31) + "CD";
        let c = parse(&["--service-cert-fingerprints", &format!("{one}, {two},")]).unwrap();
        assert_eq!(c.policy.service_fingerprints().unwrap().len(), 2);
        assert!(parse(&[]).unwrap().policy.service_fingerprints().unwrap().is_empty());
    }

    #[test]
    fn password_never_printed() {
        let c = parse(&["--mqtt-password", "s3cr3t"]).unwrap();
        assert!(!format!("{c:?}").contains("s3cr3t"));
        assert!(!format!("{:?}", c.policy.policy_config().unwrap()).contains("s3cr3t"));
    }

    #[test]
    fn booleans_accept_operator_spellings() {
        for on in ["true", "on", "yes", "1"] {
            assert!(parse(&["--device-allow-retain", on]).unwrap().policy.device_allow_retain, "{on}");
        }
        assert!(!parse(&["--require-client-cert", "off"]).unwrap().policy.require_client_cert);
    }
}
