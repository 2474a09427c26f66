//! The service's own MQTT 5 connections to the broker (rumqttc's v5 client): connection options from configuration,
//! plain with a password or mutual TLS with the service's certificate (OpenSSL through native-tls).

mod book;
pub mod publisher;
mod reload;
pub mod subscriber;

// One backoff for every retry loop; `super::backoff` keeps the clients' paths.
use crate::backoff;
use std::path::PathBuf;
use std::time::Duration;

use rumqttc::Transport;
use rumqttc::tokio_native_tls::native_tls::{Certificate, Identity, TlsConnector};
use rumqttc::v5::MqttOptions;

use crate::secret::Secret;

/// Largest packet the service's clients accept or send, announced as their Maximum Packet Size. Device payloads over
/// the V2K limit still have to be read (to dead-letter them); an MQTT 5 broker discards a larger message unsent, lost
/// without a trace here, so configuration refuses a device MAX_MESSAGE_SIZE that does not fit under it.
pub const MAX_PACKET_BYTES: usize = 16 * 1024 * 1024;
/// Session Expiry Interval of the persistent sessions: "never", as a v3.1.1 persistent session (MQTT 5 ends a
/// session at the disconnect unless told otherwise, which would drop the V2K subscription's queued messages).
const SESSION_NEVER_EXPIRES: u32 = u32::MAX;

#[derive(Debug, thiserror::Error)]
pub enum MqttConfigError {
    #[error("MQTT_URL {0:?}: expected mqtt://host:port or mqtts://host:port")]
    Url(String),
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("TLS material: {0}")]
    Tls(String),
}

/// Where and as whom the service connects.
#[derive(Debug, Clone)]
pub struct MqttSettings {
    pub host: String,
    pub port: u16,
    pub tls: Option<TlsFiles>,
    pub username: String,
    pub password: Option<Secret>,
    /// Base of the client ids; each internal client appends its role so they never take each other's session.
    pub client_id: String,
    pub keep_alive: Duration,
}

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Fires when this instance's PKI upkeep renewed the service's certificate (what `pki::start_upkeep` returns): the
    /// clients reload the files at once instead of at their next poll.
    pub renewed: Option<tokio::sync::watch::Receiver<u64>>,
}

impl MqttSettings {
    /// Splits `mqtt://host:port` / `mqtts://host:port` (`tcp://` and `ssl://` are accepted too; IPv6 hosts in
    /// brackets, the port defaults to 1883 / 8883).
    ///
    /// # Errors
    /// Any other shape: another scheme, no host, a bad port, user information, a path, query or fragment.
    pub fn parse_url(url: &str) -> Result<(String, u16, bool), MqttConfigError> {
        let bad = || MqttConfigError::Url(url.to_string());
        let parsed = url::Url::parse(url).map_err(|_| bad())?;
        let tls = match parsed.scheme() {
            "mqtt" | "tcp" => false,
            "mqtts" | "ssl" => true,
            _ => return Err(bad()),
        };
        let only_an_address = parsed.username().is_empty()
            && parsed.password().is_none()
            && matches!(parsed.path(), "" | "/")
            && parsed.query().is_none()
            && parsed.fragment().is_none();
        let host = match parsed.host() {
            Some(url::Host::Domain(name)) if !name.is_empty() && only_an_address => name.to_string(),
            Some(url::Host::Ipv4(ip)) if only_an_address => ip.to_string(),
            Some(url::Host::Ipv6(ip)) if only_an_address => ip.to_string(),
            _ => return Err(bad()),
        };
        Ok((host, parsed.port().unwrap_or(if tls { 8883 } else { 1883 }), tls))
    }

    /// MQTT 5 options for one internal client. `role` makes the client id unique per client; `persistent` keeps
    /// the broker-side session (queued and unacknowledged messages) across reconnects and restarts. MQTT 5 because
    /// a broker refuses a v5 publish with a PUBACK reason code and keeps the connection, where VerneMQ closes a
    /// v3.1.1 connection (and the client would resend the same publish first after every reconnect).
    ///
    /// # Errors
    /// Unreadable or invalid TLS files.
    pub fn options(&self, role: &str, persistent: bool) -> Result<MqttOptions, MqttConfigError> {
        let mut options = MqttOptions::new(format!("{}-{role}", self.client_id), &self.host, self.port);
        options.set_keep_alive(self.keep_alive);
        options.set_clean_start(!persistent);
        if persistent {
            options.set_session_expiry_interval(Some(SESSION_NEVER_EXPIRES));
        }
        options.set_max_packet_size(Some(MAX_PACKET_BYTES as u32));
        // Nagle off: acks and publishes are tiny, and delaying them behind the peer's delayed ACK caps throughput
        // at a few hundred messages per second (and holds a lone configuration back).
        let mut network = options.network_options();
        network.set_tcp_nodelay(true);
        options.set_network_options(network);
        if let Some(password) = &self.password {
            options.set_credentials(&self.username, password.expose());
        } else {
            options.set_credentials(&self.username, "");
        }
        if let Some(tls) = &self.tls {
            options.set_transport(Transport::tls_with_config(tls.connector()?.into()));
        }
        Ok(options)
    }
}

/// A client and its event loop.
pub fn client(options: MqttOptions, request_capacity: usize) -> (rumqttc::v5::AsyncClient, rumqttc::v5::EventLoop) {
    rumqttc::v5::AsyncClient::new(options, request_capacity)
}

fn read(path: &PathBuf) -> Result<Vec<u8>, MqttConfigError> {
    std::fs::read(path).map_err(|source| MqttConfigError::Read { path: path.clone(), source })
}

impl TlsFiles {
    fn connector(&self) -> Result<TlsConnector, MqttConfigError> {
        let tls = |e: &dyn std::fmt::Display| MqttConfigError::Tls(e.to_string());
        let mut builder = TlsConnector::builder();
        builder.add_root_certificate(Certificate::from_pem(&read(&self.ca)?).map_err(|e| tls(&e))?);
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                // native-tls wants PKCS#8; openssl-generated keys are often PKCS#1 or SEC1.
                let key = openssl::pkey::PKey::private_key_from_pem(&read(key)?).map_err(|e| tls(&e))?;
                let cert = read(cert)?;
                // A renewal replaces key and certificate one after the other: a pair caught in between is refused
                // here rather than failing the TLS handshake.
                let matches = openssl::x509::X509::from_pem(&cert)
                    .and_then(|c| c.public_key())
                    .is_ok_and(|public| public.public_eq(&key));
                if !matches {
                    return Err(MqttConfigError::Tls("MQTT_CERT_FILE does not belong to MQTT_KEY_FILE".into()));
                }
                let key = key.private_key_to_pem_pkcs8().map_err(|e| tls(&e))?;
                builder.identity(Identity::from_pkcs8(&cert, &key).map_err(|e| tls(&e))?);
            }
            (None, None) => {}
            _ => return Err(MqttConfigError::Tls("MQTT_CERT_FILE and MQTT_KEY_FILE go together".into())),
        }
        builder.build().map_err(|e| tls(&e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(MqttSettings::parse_url("mqtt://vernemq:1883").unwrap(), ("vernemq".into(), 1883, false));
        assert_eq!(MqttSettings::parse_url("mqtts://vernemq").unwrap(), ("vernemq".into(), 8883, true));
        assert_eq!(MqttSettings::parse_url("tcp://127.0.0.1:18831/").unwrap(), ("127.0.0.1".into(), 18831, false));
        assert_eq!(MqttSettings::parse_url("ssl://[::1]:8883").unwrap(), ("::1".into(), 8883, true));
        assert_eq!(MqttSettings::parse_url("mqtts://[::1]:8883").unwrap(), ("::1".into(), 8883, true));
        assert_eq!(MqttSettings::parse_url("mqtt://[fe80::1]/").unwrap(), ("fe80::1".into(), 1883, false));
        for bad in ["vernemq:1883", "http://x:1", "mqtt://:1883", "mqtt://x:port", "mqtt://u@x:1", "mqtt://x:70000"] {
            assert!(MqttSettings::parse_url(bad).is_err(), "{bad}");
        }
        for bad in
            ["mqtt://", "mqtt://x/topic", "mqtt://x?a=1", "mqtt://x#f", "mqtt://u:p@x", "mqtt://[::1", "mqtt://a b"]
        {
            assert!(MqttSettings::parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn client_ids_carry_the_role() {
        let settings = MqttSettings {
            host: "localhost".into(),
            port: 1883,
            tls: None,
            username: "k2v-bridge".into(),
            password: Some(Secret::new("pw")),
            client_id: "iotagent-mqtt-node1".into(),
            keep_alive: Duration::from_secs(30),
        };
        let options = settings.options("v2k", true).unwrap();
        assert_eq!(options.client_id(), "iotagent-mqtt-node1-v2k");
        assert!(!options.clean_start());
        assert_eq!(options.session_expiry_interval(), Some(u32::MAX), "a v5 session outlives the connection");
        assert!(settings.options("x", false).unwrap().clean_start());
    }

    #[test]
    fn missing_tls_files_are_reported() {
        let files = TlsFiles { ca: "/nonexistent/ca.pem".into(), cert: None, key: None, renewed: None };
        assert!(matches!(files.connector(), Err(MqttConfigError::Read { .. })));
    }
}
