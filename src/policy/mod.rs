//! The access rules: who may connect, publish and subscribe, and with which session modifiers.
//! Pure functions of their inputs — no I/O, no clock, no randomness — so every rule is unit-tested here.

mod client_id;
mod deny;
mod identity;
mod service;

use std::time::Duration;

pub use client_id::is_disconnect_safe;
pub use deny::DenyReason;
pub use identity::{DeviceId, IdCharset, IdentityError, parse_device};
pub use service::{Fingerprint, topic_tenant};

use crate::secret::Secret;

/// How a device's MQTT client id relates to its username (a client id is a session key: a new connection with an
/// existing id takes the old session over).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ClientIdPolicy {
    /// Any client id (dojot's behaviour): any device can take over another device's session.
    Any,
    /// The client id must equal the username.
    Equal,
    /// The client id must be the username, or start with it followed by a character that is not part of device ids
    /// (`admin:a1998e@sensor-1`).
    Prefix,
    /// Any client id, rewritten by VerneMQ to `<username>|<client id>` so ids of different devices never collide.
    Scoped,
}

/// Connection lifetime handed to VerneMQ for device sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetime {
    /// Zero disables the limit.
    pub base: Duration,
    /// Spread around `base`, in percent, so that devices connected together do not all reconnect together.
    pub jitter_percent: u8,
}

impl Lifetime {
    /// Seconds for one session; `unit` is a uniform sample in `[0, 1)` chosen by the caller.
    /// `None` when lifetimes are disabled.
    pub fn seconds(&self, unit: f64) -> Option<u64> {
        if self.base.is_zero() {
            return None;
        }
        let base = self.base.as_secs_f64();
        let spread = base * f64::from(self.jitter_percent) / 100.0;
        let value = base - spread + 2.0 * spread * unit.clamp(0.0, 1.0);
        // VerneMQ takes whole seconds and treats 0 as "no limit": never round a short lifetime down to that.
        Some((value.round() as u64).max(1))
    }
}

/// Everything the rules depend on, fixed at start.
#[derive(Debug, Clone)]
pub struct PolicyConfig {
    pub id_charset: IdCharset,
    pub attrs_suffix: String,
    pub config_suffix: String,
    pub device_retain_allowed: bool,
    pub require_client_cert: bool,
    pub client_id_policy: ClientIdPolicy,
    pub lifetime: Lifetime,
    /// `max_message_size` modifier for device sessions (bytes); `None` leaves VerneMQ's setting.
    pub max_message_size: Option<u32>,
    pub service_username: String,
    pub service_password: Option<Secret>,
    /// Base of the service's own MQTT client ids (`<base>-k2v`, `<base>-v2k`): no device may use an id starting
    /// with it, or it would take over the service's sessions.
    pub service_client_id: Option<String>,
    /// The plain V2K subscription's session id (`<V2K_LEASE_GROUP>-v2k`, the same on every instance), reserved
    /// like the base: it carries every device's data.
    pub service_plain_client_id: Option<String>,
    /// Reserved on every instance (`SERVICE_CLIENT_ID_PREFIX`): every instance's ids start with it, so that a device
    /// cannot take over the sessions of an instance other than the one that answers its CONNECT.
    pub reserved_client_id_prefix: Option<String>,
    /// The shared subscription the service holds in subscription mode (`$share/<group>/+/<attrs>`), if any.
    pub service_subscription: Option<String>,
    /// In subscription mode: the window of unacknowledged messages VerneMQ may hand the service, for an MQTT 3.1.1
    /// session (its default, 20, would cap V2K at 20 messages per Kafka round trip). The service's own clients speak
    /// MQTT 5, whose session VerneMQ sizes by the CONNECT's Receive Maximum alone (`mqtt::subscriber`).
    pub service_max_inflight: Option<u32>,
    /// With the plain V2K subscription: how many messages VerneMQ queues for the service's one session, online and
    /// offline (its defaults, 1000 each, would drop device data within a handover).
    pub service_max_queued: Option<u32>,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            id_charset: IdCharset::default(),
            attrs_suffix: "attrs".into(),
            config_suffix: "config".into(),
            device_retain_allowed: false,
            require_client_cert: false,
            client_id_policy: ClientIdPolicy::Scoped,
            lifetime: Lifetime { base: Duration::from_secs(1800), jitter_percent: 10 },
            max_message_size: None,
            service_username: "k2v-bridge".into(),
            service_password: None,
            service_client_id: None,
            service_plain_client_id: None,
            reserved_client_id_prefix: None,
            service_subscription: None,
            service_max_inflight: None,
            service_max_queued: None,
        }
    }
}

/// What the client presented at CONNECT, as far as the rules care.
#[derive(Debug, Clone, Copy)]
pub struct RegisterRequest<'a> {
    pub username: Option<&'a str>,
    pub password: Option<&'a str>,
    pub mountpoint: &'a str,
    pub client_id: &'a str,
    /// The forwarded client certificate, already parsed by the caller; `Some(None)` when it was forwarded but has
    /// no usable common name.
    pub certificate_cn: Option<Option<&'a str>>,
    /// SHA-256 of the forwarded certificate's DER, when one was forwarded.
    pub certificate_fingerprint: Option<Fingerprint>,
    /// The service's own certificates at the time of the request (they change when the PKI renews them): the only
    /// certificates that make a connection the service.
    pub service_certificates: &'a [Fingerprint],
}

/// Session modifiers for an accepted device.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RegisterModifiers {
    pub max_connection_lifetime: Option<u64>,
    pub max_message_size: Option<u32>,
    /// How many QoS 1/2 messages VerneMQ sends the session before waiting for acks (MQTT 3.1.1 sessions).
    pub max_inflight_messages: Option<u32>,
    /// Messages VerneMQ queues for the session while connected and while not.
    pub max_online_messages: Option<u32>,
    pub max_offline_messages: Option<u32>,
    /// `(mountpoint, client_id)`: VerneMQ only accepts the two together.
    pub subscriber_id: Option<(String, String)>,
}

impl RegisterModifiers {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// Who an accepted connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Principal<'a> {
    Device(DeviceId<'a>),
    Service,
}

impl Principal<'_> {
    /// Whether VerneMQ may cache an allowed publish of this identity. The service publishes to one topic per device,
    /// and VerneMQ never evicts expired cache entries that are not looked up again: caching those would grow the
    /// broker's memory with the device count for no gain (K2V traffic is low).
    pub fn publish_cacheable(self) -> bool {
        matches!(self, Principal::Device(_))
    }
}

/// The outcome of an `auth_on_register`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegisterDecision<'a> {
    Allow { principal: Principal<'a>, modifiers: RegisterModifiers },
    Deny(DenyReason),
}

/// One requested subscription's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterDecision {
    Grant(u8),
    Deny(DenyReason),
}

/// The rules, with their configuration.
#[derive(Debug, Clone)]
pub struct Policy {
    config: PolicyConfig,
}

impl Policy {
    pub fn new(config: PolicyConfig) -> Self {
        Self { config }
    }

    fn principal<'a>(&self, username: Option<&'a str>) -> Result<Principal<'a>, DenyReason> {
        let username = username.ok_or(DenyReason::Anonymous)?;
        if username == self.config.service_username {
            return Ok(Principal::Service);
        }
        parse_device(username, &self.config.id_charset).map(Principal::Device).map_err(DenyReason::InvalidIdentity)
    }

    /// Decides a CONNECT. `jitter_unit` is a uniform sample in `[0, 1)` for the lifetime spread.
    pub fn register<'a>(&self, req: &RegisterRequest<'a>, jitter_unit: f64) -> RegisterDecision<'a> {
        match self.register_checked(req, jitter_unit) {
            Ok((principal, modifiers)) => RegisterDecision::Allow { principal, modifiers },
            Err(reason) => RegisterDecision::Deny(reason),
        }
    }

    fn register_checked<'a>(
        &self,
        req: &RegisterRequest<'a>,
        jitter_unit: f64,
    ) -> Result<(Principal<'a>, RegisterModifiers), DenyReason> {
        let principal = self.principal(req.username)?;
        let username = req.username.unwrap_or_default();
        if let Some(cn) = req.certificate_cn
            && cn != Some(username)
        {
            return Err(DenyReason::CertificateMismatch);
        }
        let device = match principal {
            Principal::Service => {
                // A certificate with the service's CN proves nothing by itself (the device CA signs any CN): it must
                // be one of the service's own.
                let by_certificate = req.certificate_fingerprint.is_some_and(|f| req.service_certificates.contains(&f));
                let by_password = match (&self.config.service_password, req.password) {
                    (Some(expected), Some(given)) => expected.matches(given),
                    _ => false,
                };
                let modifiers = RegisterModifiers {
                    max_inflight_messages: self.config.service_max_inflight,
                    max_online_messages: self.config.service_max_queued,
                    max_offline_messages: self.config.service_max_queued,
                    ..Default::default()
                };
                return match (by_certificate || by_password, req.certificate_cn.is_some()) {
                    (true, _) => Ok((principal, modifiers)),
                    (false, true) => Err(DenyReason::ServiceCertificate),
                    (false, false) => Err(DenyReason::ServiceCredentials),
                };
            }
            Principal::Device(device) => device,
        };
        // In every client-id policy: a forced disconnect names the session by its client id (policy/client_id.rs).
        if !is_disconnect_safe(req.client_id) {
            return Err(DenyReason::UnsafeClientId);
        }
        if self.is_service_client_id(req.client_id) {
            return Err(DenyReason::ServiceClientId);
        }
        if self.config.require_client_cert && req.certificate_cn.is_none() {
            return Err(DenyReason::CertificateRequired);
        }
        let subscriber_id = match self.config.client_id_policy {
            ClientIdPolicy::Any => None,
            ClientIdPolicy::Equal if req.client_id == username => None,
            ClientIdPolicy::Prefix if self.is_own_prefix(username, req.client_id) => None,
            ClientIdPolicy::Equal | ClientIdPolicy::Prefix => return Err(DenyReason::ClientId),
            ClientIdPolicy::Scoped => Some((req.mountpoint.to_owned(), format!("{username}|{}", req.client_id))),
        };
        // The rewritten session key must not be one of the service's either (a base id may contain `:` and `|`).
        if subscriber_id.as_ref().is_some_and(|(_, id)| self.is_service_client_id(id)) {
            return Err(DenyReason::ServiceClientId);
        }
        let modifiers = RegisterModifiers {
            max_connection_lifetime: self.config.lifetime.seconds(jitter_unit),
            max_message_size: self.config.max_message_size,
            max_inflight_messages: None,
            max_online_messages: None,
            max_offline_messages: None,
            subscriber_id,
        };
        Ok((Principal::Device(device), modifiers))
    }

    /// Whether `client_id` is the service's base id, with any suffix: the ids of its internal clients.
    fn is_service_client_id(&self, client_id: &str) -> bool {
        [&self.config.service_client_id, &self.config.service_plain_client_id, &self.config.reserved_client_id_prefix]
            .into_iter()
            .flatten()
            .any(|base| !base.is_empty() && client_id.starts_with(base.as_str()))
    }

    /// `client_id` is `username` itself or `username` followed by a character no device id can contain, so that
    /// `admin:a1` cannot use `admin:a1998e…` and take that device's sessions over.
    fn is_own_prefix(&self, username: &str, client_id: &str) -> bool {
        client_id
            .strip_prefix(username)
            .is_some_and(|rest| rest.chars().next().is_none_or(|c| !self.config.id_charset.accepts_char(c)))
    }

    /// Decides a PUBLISH; the tests' shorthand for [`Policy::authorize_publish`].
    #[cfg(test)]
    pub fn publish(&self, username: Option<&str>, topic: &str, retain: bool) -> Result<(), DenyReason> {
        self.authorize_publish(username, topic, retain).map(|_| ())
    }

    /// Decides a PUBLISH (also the last will, which VerneMQ authorises the same way at CONNECT) and says who the
    /// allowed publisher is, so callers need not parse the username again: a device allowed to publish is publishing
    /// its own data.
    pub fn authorize_publish<'a>(
        &self,
        username: Option<&'a str>,
        topic: &str,
        retain: bool,
    ) -> Result<Principal<'a>, DenyReason> {
        let principal = self.principal(username)?;
        match principal {
            Principal::Device(device) => {
                if !self.is_device_topic(device, topic, &self.config.attrs_suffix) {
                    return Err(DenyReason::Topic);
                }
                if retain && !self.config.device_retain_allowed {
                    return Err(DenyReason::Retain);
                }
            }
            Principal::Service => {
                self.config_topic_device(topic).ok_or(DenyReason::Topic)?;
            }
        }
        Ok(principal)
    }

    /// Decides each filter of a SUBSCRIBE, in the order given.
    pub fn subscribe<'t>(
        &self,
        username: Option<&str>,
        filters: impl IntoIterator<Item = (&'t str, u8)>,
    ) -> Vec<FilterDecision> {
        let principal = self.principal(username);
        filters
            .into_iter()
            .map(|(filter, qos)| {
                let allowed = match principal {
                    Err(reason) => return FilterDecision::Deny(reason),
                    Ok(Principal::Device(device)) => self.is_device_topic(device, filter, &self.config.config_suffix),
                    Ok(Principal::Service) => self.config.service_subscription.as_deref() == Some(filter),
                };
                if allowed && qos <= 2 { FilterDecision::Grant(qos) } else { FilterDecision::Deny(DenyReason::Topic) }
            })
            .collect()
    }

    /// The device a `<tenant>:<device>/<config suffix>` topic addresses, if the topic is exactly that.
    pub fn config_topic_device<'t>(&self, topic: &'t str) -> Option<DeviceId<'t>> {
        self.topic_device(topic, &self.config.config_suffix)
    }

    /// The device whose data topic `<tenant>:<device>/<attrs suffix>` this is, if it is exactly that.
    pub fn attrs_topic_device<'t>(&self, topic: &'t str) -> Option<DeviceId<'t>> {
        self.topic_device(topic, &self.config.attrs_suffix)
    }

    /// The device whose data a publish by `username` on `topic` is: the username is a device and the topic its own
    /// attrs topic. Anything else (the service's config publishes, for one) is not device data.
    pub fn device_data_source<'a>(&self, username: Option<&'a str>, topic: &str) -> Option<DeviceId<'a>> {
        match self.principal(username) {
            Ok(Principal::Device(device)) if self.is_device_topic(device, topic, &self.config.attrs_suffix) => {
                Some(device)
            }
            _ => None,
        }
    }

    fn topic_device<'t>(&self, topic: &'t str, suffix: &str) -> Option<DeviceId<'t>> {
        let (identity, rest) = topic.split_once('/')?;
        if rest != suffix {
            return None;
        }
        parse_device(identity, &self.config.id_charset).ok()
    }

    /// Topic exactly `<tenant>:<device>/<suffix>` for this device: no wildcard or extra level can match because the
    /// identity's characters exclude them and the comparison is literal.
    fn is_device_topic(&self, device: DeviceId<'_>, topic: &str, suffix: &str) -> bool {
        let Some(rest) = topic.strip_prefix(device.tenant) else { return false };
        let Some(rest) = rest.strip_prefix(':') else { return false };
        let Some(rest) = rest.strip_prefix(device.device) else { return false };
        rest.strip_prefix('/') == Some(suffix)
    }
}

#[cfg(test)]
mod tests;
