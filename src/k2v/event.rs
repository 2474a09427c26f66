//! Device-manager events on `<tenant>.dojot.device-manager.device`, read as K2V actions: pure parsing, no I/O.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::policy::{IdCharset, IdentityError, parse_device, topic_tenant};

/// What one event asks of K2V.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// `configure`: publish `payload` (the JSON of `data.attrs`) to `topic` (`<tenant>:<device>/<config suffix>`).
    Publish { topic: String, payload: Vec<u8> },
    /// `remove`: the device is gone. K2V only counts it; live session control (`sessions/`) refuses and disconnects
    /// the device from its own reading of the same topics.
    Remove { tenant: String, device: String },
    /// Any other event (`create`, `update`, `template.update`, …): not for the device. dojot ≥ 0.5 published these
    /// too, by mistake.
    Ignore { event: String },
}

/// Why an event cannot be acted on. The message is skipped (and its offset completes): it would fail the same way
/// on every retry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("not a JSON object: {0}")]
    Json(String),
    #[error("missing or non-string field {0}")]
    Field(&'static str),
    #[error("data.attrs must be a JSON object")]
    Attrs,
    #[error("tenant {tenant:?} / device {device:?} is not a valid device identity: {reason}")]
    Identity { tenant: String, device: String, reason: IdentityError },
    /// Larger than the `max_message_size` device sessions get: the broker (or the device) would refuse it.
    #[error("configuration for {topic} is a {size}-byte PUBLISH, over the devices' max_message_size of {limit}")]
    TooLarge { topic: String, size: usize, limit: usize },
    /// The event names another tenant than the topic it was read from (`<tenant>.<suffix>`).
    #[error("event tenant {event:?} is not the topic's tenant {topic:?}")]
    TenantMismatch { event: String, topic: Option<String> },
}

impl EventError {
    /// What the skip is counted as.
    pub fn reason(&self) -> SkipReason {
        match self {
            Self::Json(_) | Self::Field(_) | Self::Attrs => SkipReason::Malformed,
            Self::Identity { .. } => SkipReason::InvalidDevice,
            Self::TooLarge { .. } => SkipReason::TooLarge,
            Self::TenantMismatch { .. } => SkipReason::TenantMismatch,
        }
    }
}

/// Why a message is completed without a publish: the `reason` label of `iotagent_k2v_skipped_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// Not a `configure` event ([`Action::Ignore`]).
    NotConfigure,
    /// [`Action::Remove`].
    Remove,
    /// No value, not JSON, or a field missing or mistyped.
    Malformed,
    /// An identity the ACL would refuse, or no valid topic.
    InvalidDevice,
    /// Larger than the devices' `max_message_size` or than an MQTT packet may be.
    TooLarge,
    /// The broker refused the publish for good (PUBACK reason code ≥ 0x80 other than quota exceeded).
    Refused,
    /// The event's tenant is not its topic's: one tenant's topic cannot command another tenant's devices.
    TenantMismatch,
}

impl SkipReason {
    /// Every variant, in declaration order (so `reason as usize` indexes it).
    pub const ALL: [SkipReason; 7] = [
        SkipReason::NotConfigure,
        SkipReason::Remove,
        SkipReason::Malformed,
        SkipReason::InvalidDevice,
        SkipReason::TooLarge,
        SkipReason::Refused,
        SkipReason::TenantMismatch,
    ];

    pub fn name(self) -> &'static str {
        match self {
            SkipReason::NotConfigure => "not_configure",
            SkipReason::Remove => "remove",
            SkipReason::Malformed => "malformed",
            SkipReason::InvalidDevice => "invalid_device",
            SkipReason::TooLarge => "too_large",
            SkipReason::Refused => "refused",
            SkipReason::TenantMismatch => "tenant_mismatch",
        }
    }
}

/// The event envelope, borrowed from the message: fields stay raw until needed, so that a missing or mistyped one
/// is reported by name and `attrs` is never parsed into a tree only to be written out again.
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    event: Option<&'a RawValue>,
    #[serde(borrow)]
    meta: Option<Meta<'a>>,
    #[serde(borrow)]
    data: Option<Data<'a>>,
}

#[derive(Deserialize)]
struct Meta<'a> {
    #[serde(borrow)]
    service: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Data<'a> {
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    attrs: Option<&'a RawValue>,
}

/// How events become actions: the device id rules and the configuration topic level, from the ACL's configuration
/// so that K2V never publishes where the ACL would refuse the service.
#[derive(Debug, Clone)]
pub struct EventRules {
    pub id_charset: IdCharset,
    pub config_suffix: String,
    /// The device-manager topics are `<tenant>.<topic_suffix>`.
    pub topic_suffix: String,
    /// The `max_message_size` the service hands device sessions (`MAX_MESSAGE_SIZE`): a configuration the device
    /// could not take is refused here, so the broker never has to.
    pub max_message_size: Option<u32>,
}

/// The PUBLISH packet's size after the fixed header (what a broker compares with `max_message_size`): topic with
/// its length, packet id, an empty MQTT 5 property list, payload.
fn publish_size(topic: &str, payload: &[u8]) -> usize {
    2 + topic.len() + 2 + 1 + payload.len()
}

fn string<'a>(value: Option<&'a RawValue>, field: &'static str) -> Result<Cow<'a, str>, EventError> {
    value.and_then(|raw| serde_json::from_str::<Cow<'a, str>>(raw.get()).ok()).ok_or(EventError::Field(field))
}

/// Valid JSON without the whitespace between tokens (what JSON.stringify wrote for dojot), keys in their order.
fn compact(json: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(json.len());
    let (mut in_string, mut escaped) = (false, false);
    for &b in json.as_bytes() {
        if in_string {
            out.push(b);
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
        } else if !matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            in_string = b == b'"';
            out.push(b);
        }
    }
    out
}

impl EventRules {
    /// Reads one Kafka message value, read from `topic`.
    ///
    /// # Errors
    /// Not JSON, a missing field, `attrs` not an object, an identity the ACL would refuse, or a tenant that is not
    /// the topic's.
    pub fn interpret(&self, topic: &str, value: &[u8]) -> Result<Action, EventError> {
        let envelope: Envelope<'_> = serde_json::from_slice(value).map_err(|e| EventError::Json(e.to_string()))?;
        let event = string(envelope.event, "event")?;
        if event != "configure" && event != "remove" {
            return Ok(Action::Ignore { event: event.into_owned() });
        }
        let tenant = string(envelope.meta.ok_or(EventError::Field("meta.service"))?.service, "meta.service")?;
        let data = envelope.data.ok_or(EventError::Field("data.id"))?;
        let device = string(data.id, "data.id")?;
        let username = format!("{tenant}:{device}");
        if let Err(reason) = parse_device(&username, &self.id_charset) {
            return Err(EventError::Identity { tenant: tenant.into_owned(), device: device.into_owned(), reason });
        }
        let from = topic_tenant(topic, &self.topic_suffix);
        if from != Some(&*tenant) {
            return Err(EventError::TenantMismatch { event: tenant.into_owned(), topic: from.map(String::from) });
        }
        if event == "remove" {
            return Ok(Action::Remove { tenant: tenant.into_owned(), device: device.into_owned() });
        }
        // RawValue holds exactly one valid JSON value, so an opening brace means an object.
        let attrs = data.attrs.map(RawValue::get).filter(|a| a.starts_with('{')).ok_or(EventError::Attrs)?;
        let payload = compact(attrs);
        let topic = format!("{username}/{}", self.config_suffix);
        let size = publish_size(&topic, &payload);
        if let Some(limit) = self.max_message_size.and_then(|l| usize::try_from(l).ok())
            && size > limit
        {
            return Err(EventError::TooLarge { topic, size, limit });
        }
        Ok(Action::Publish { topic, payload })
    }
}

#[cfg(test)]
#[path = "event_tests.rs"]
mod tests;
