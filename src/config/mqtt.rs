//! The internal MQTT client's options, validated into [`MqttSettings`].

use std::time::Duration;

use super::{ConfigError, invalid};
use crate::mqtt::{MqttSettings, TlsFiles};
use crate::secret::Secret;

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

    /// Client ids no device may use, on every instance: the same value cluster-wide, and every instance's
    /// MQTT_CLIENT_ID (and V2K_LEASE_GROUP) starts with it, so that no device takes over another instance's sessions.
    #[arg(long, env = "SERVICE_CLIENT_ID_PREFIX", default_value = "iotagent-mqtt",
          value_parser = clap::builder::NonEmptyStringValueParser::new())]
    pub service_client_id_prefix: String,

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

impl MqttArgs {
    /// The internal client's settings, when MQTT_URL is set; it connects with the service identity.
    ///
    /// # Errors
    /// A malformed MQTT_URL, TLS files given for a plain URL or missing for mqtts://.
    pub fn settings(&self, username: &str, password: Option<&Secret>) -> Result<Option<MqttSettings>, ConfigError> {
        let Some(url) = &self.mqtt_url else { return Ok(None) };
        let (host, port, tls) = MqttSettings::parse_url(url).map_err(|e| invalid("MQTT_URL", e.to_string()))?;
        let tls = match (tls, &self.mqtt_ca_file) {
            (true, Some(ca)) => {
                let (cert, key) = (self.mqtt_cert_file.clone(), self.mqtt_key_file.clone());
                Some(TlsFiles { ca: ca.clone(), cert, key, renewed: None })
            }
            (true, None) => return Err(invalid("MQTT_CA_FILE", "required for an mqtts:// MQTT_URL")),
            (false, _) if self.mqtt_cert_file.is_some() => {
                return Err(invalid("MQTT_CERT_FILE", "set, but MQTT_URL is not mqtts://"));
            }
            (false, _) => None,
        };
        if tls.as_ref().is_some_and(|t| t.cert.is_some() != t.key.is_some()) {
            return Err(invalid("MQTT_KEY_FILE", "MQTT_CERT_FILE and MQTT_KEY_FILE go together"));
        }
        Ok(Some(MqttSettings {
            host,
            port,
            tls,
            username: username.to_string(),
            password: password.cloned(),
            client_id: self.client_id(),
            keep_alive: Duration::from_secs(self.mqtt_keep_alive),
        }))
    }

    /// MQTT_CLIENT_ID, or `iotagent-mqtt-<hostname>`.
    pub fn client_id(&self) -> String {
        self.mqtt_client_id.clone().unwrap_or_else(default_client_id)
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

#[cfg(test)]
mod tests {
    use super::super::parse;

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
}
