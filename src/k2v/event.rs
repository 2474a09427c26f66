//! Device-manager events on `<tenant>.dojot.device-manager.device`, read as K2V actions: pure parsing, no I/O.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::policy::{IdCharset, IdentityError, parse_device};

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
}

impl EventError {
    /// What the skip is counted as.
    pub fn reason(&self) -> SkipReason {
        match self {
            Self::Json(_) | Self::Field(_) | Self::Attrs => SkipReason::Malformed,
            Self::Identity { .. } => SkipReason::InvalidDevice,
            Self::TooLarge { .. } => SkipReason::TooLarge,
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
}

impl SkipReason {
    /// Every variant, in declaration order (so `reason as usize` indexes it).
    pub const ALL: [SkipReason; 6] = [
        SkipReason::NotConfigure,
        SkipReason::Remove,
        SkipReason::Malformed,
        SkipReason::InvalidDevice,
        SkipReason::TooLarge,
        SkipReason::Refused,
    ];

    pub fn name(self) -> &'static str {
        match self {
            SkipReason::NotConfigure => "not_configure",
            SkipReason::Remove => "remove",
            SkipReason::Malformed => "malformed",
            SkipReason::InvalidDevice => "invalid_device",
            SkipReason::TooLarge => "too_large",
            SkipReason::Refused => "refused",
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
    /// Reads one Kafka message value.
    ///
    /// # Errors
    /// Not JSON, a missing field, `attrs` not an object, or an identity the ACL would refuse.
    pub fn interpret(&self, value: &[u8]) -> Result<Action, EventError> {
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
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn rules() -> EventRules {
        EventRules { id_charset: IdCharset::default(), config_suffix: "config".into(), max_message_size: None }
    }

    fn interpret(value: &Value) -> Result<Action, EventError> {
        rules().interpret(value.to_string().as_bytes())
    }

    fn publish(topic: &str, payload: &Value) -> Action {
        Action::Publish { topic: topic.into(), payload: serde_json::to_vec(payload).unwrap() }
    }

    #[test]
    fn skip_reasons_are_listed_in_declaration_order() {
        for (index, reason) in SkipReason::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, index, "{}", reason.name());
        }
    }

    #[test]
    fn configure_publishes_the_attrs_to_the_config_topic() {
        let event = json!({
            "event": "configure",
            "meta": {"service": "admin", "timestamp": 1_732_540_000_000_u64},
            "data": {"id": "a1998e", "attrs": {"target_temperature": 23.5, "mode": "eco"}}
        });
        assert_eq!(
            interpret(&event).unwrap(),
            publish("admin:a1998e/config", &json!({"target_temperature": 23.5, "mode": "eco"}))
        );
    }

    #[test]
    fn payload_is_only_the_attrs_as_compact_json() {
        let raw = br#"{ "event" : "configure", "meta":{"service":"admin"},
                       "data":{"id":"a1998e","attrs":{ "z" : [1, 2, {"b": null}] ,
                        "s":"x y \" } {\\", "a": "\u00e9\t"}} }"#;
        let Action::Publish { payload, .. } = rules().interpret(raw).unwrap() else { panic!("not a publish") };
        // Whitespace between tokens goes, strings (escapes included) and key order stay.
        assert_eq!(
            std::str::from_utf8(&payload).unwrap(),
            r#"{"z":[1,2,{"b":null}],"s":"x y \" } {\\","a":"\u00e9\t"}"#
        );
        let value: Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(value["s"], "x y \" } {\\");
    }

    #[test]
    fn empty_attrs_are_still_a_configuration() {
        let event = json!({"event": "configure", "meta": {"service": "t"}, "data": {"id": "d", "attrs": {}}});
        assert_eq!(interpret(&event).unwrap(), publish("t:d/config", &json!({})));
    }

    #[test]
    fn the_configured_suffix_is_used() {
        let rules = EventRules { config_suffix: "cmd".into(), ..rules() };
        let event = json!({"event": "configure", "meta": {"service": "t"}, "data": {"id": "d", "attrs": {"x": 1}}});
        let Action::Publish { topic, .. } = rules.interpret(event.to_string().as_bytes()).unwrap() else {
            panic!("not a publish")
        };
        assert_eq!(topic, "t:d/cmd");
    }

    #[test]
    fn other_events_are_ignored_without_validation() {
        for event in ["create", "update", "template.update", "Configure", ""] {
            let value = json!({"event": event, "data": {"attrs": "anything"}});
            assert_eq!(interpret(&value).unwrap(), Action::Ignore { event: event.into() }, "{event}");
        }
    }

    #[test]
    fn configurations_over_the_devices_max_message_size_are_refused() {
        // Topic "t:d/config" (10) + 2 + packet id 2 + properties 1 + payload: 15 + payload bytes.
        let rules = EventRules { max_message_size: Some(15 + 9), ..rules() };
        let fits = json!({"event": "configure", "meta": {"service": "t"}, "data": {"id": "d", "attrs": {"a": 123}}});
        assert_eq!(rules.interpret(fits.to_string().as_bytes()).unwrap(), publish("t:d/config", &json!({"a": 123})));
        let over = json!({"event": "configure", "meta": {"service": "t"}, "data": {"id": "d", "attrs": {"a": 1234}}});
        let err = rules.interpret(over.to_string().as_bytes()).unwrap_err();
        assert_eq!(err, EventError::TooLarge { topic: "t:d/config".into(), size: 25, limit: 24 });
        assert_eq!(err.reason(), SkipReason::TooLarge);
        // Only configurations are measured.
        let remove = json!({"event": "remove", "meta": {"service": "t"}, "data": {"id": "d", "attrs": {"a": 1234}}});
        assert!(rules.interpret(remove.to_string().as_bytes()).is_ok());
    }

    #[test]
    fn remove_is_a_distinct_outcome() {
        let event = json!({"event": "remove", "meta": {"service": "admin"}, "data": {"id": "a1998e"}});
        assert_eq!(interpret(&event).unwrap(), Action::Remove { tenant: "admin".into(), device: "a1998e".into() });
        let bad = json!({"event": "remove", "meta": {"service": "admin"}, "data": {"id": "a/b"}});
        assert!(matches!(interpret(&bad), Err(EventError::Identity { .. })));
    }

    #[test]
    fn malformed_events_are_typed_errors() {
        for raw in [&b"not json"[..], b"", b"[1,2]", b"\"configure\"", b"null", b"{\"event\":", b"\xff\xfe"] {
            let err = rules().interpret(raw).unwrap_err();
            assert!(matches!(err, EventError::Json(_)), "{raw:?}: {err:?}");
            assert_eq!(err.reason().name(), "malformed");
        }
        let cases = [
            (json!({"meta": {"service": "t"}, "data": {"id": "d", "attrs": {}}}), EventError::Field("event")),
            (json!({"event": 1, "meta": {"service": "t"}}), EventError::Field("event")),
            (json!({"event": "configure", "data": {"id": "d", "attrs": {}}}), EventError::Field("meta.service")),
            (json!({"event": "configure", "meta": {}, "data": {"id": "d"}}), EventError::Field("meta.service")),
            (
                json!({"event": "configure", "meta": {"service": 7}, "data": {"id": "d"}}),
                EventError::Field("meta.service"),
            ),
            (json!({"event": "configure", "meta": {"service": "t"}}), EventError::Field("data.id")),
            (json!({"event": "configure", "meta": {"service": "t"}, "data": {"id": 12}}), EventError::Field("data.id")),
            (json!({"event": "configure", "meta": {"service": "t"}, "data": {"id": "d"}}), EventError::Attrs),
            (
                json!({"event": "configure", "meta": {"service": "t"}, "data": {"id": "d", "attrs": [1]}}),
                EventError::Attrs,
            ),
            (
                json!({"event": "configure", "meta": {"service": "t"}, "data": {"id": "d", "attrs": "{}"}}),
                EventError::Attrs,
            ),
            (
                json!({"event": "configure", "meta": {"service": "t"}, "data": {"id": "d", "attrs": null}}),
                EventError::Attrs,
            ),
        ];
        for (event, expected) in cases {
            let err = interpret(&event).unwrap_err();
            assert_eq!(err, expected, "{event}");
            assert_eq!(err.reason().name(), "malformed");
        }
    }

    #[test]
    fn identities_follow_the_acl_rules() {
        let long = "x".repeat(65);
        let bad = [
            ("", "d", IdentityError::EmptyTenant),
            ("t", "", IdentityError::EmptyDevice),
            ("a:b", "d", IdentityError::ColonCount),
            ("t", "d:e", IdentityError::ColonCount),
            ("t", "a/b", IdentityError::BadCharacter),
            ("t", "+", IdentityError::BadCharacter),
            ("t", "#", IdentityError::BadCharacter),
            ("$SYS", "d", IdentityError::BadCharacter),
            ("t", "d e", IdentityError::BadCharacter),
            ("t", "dé", IdentityError::BadCharacter),
            ("t", "d\0", IdentityError::BadCharacter),
            (long.as_str(), "d", IdentityError::TooLong),
        ];
        for (tenant, device, reason) in bad {
            let event = json!({"event": "configure", "meta": {"service": tenant}, "data": {"id": device, "attrs": {}}});
            let err = interpret(&event).unwrap_err();
            assert_eq!(err, EventError::Identity { tenant: tenant.into(), device: device.into(), reason }, "{event}");
            assert_eq!(err.reason().name(), "invalid_device");
        }
    }

    #[test]
    fn the_configured_charset_applies() {
        let rules = EventRules { id_charset: IdCharset::from_chars("abc").unwrap(), ..rules() };
        let ok = json!({"event": "configure", "meta": {"service": "ab"}, "data": {"id": "cab", "attrs": {}}});
        assert!(rules.interpret(ok.to_string().as_bytes()).is_ok());
        let bad = json!({"event": "configure", "meta": {"service": "ab"}, "data": {"id": "d", "attrs": {}}});
        assert!(matches!(rules.interpret(bad.to_string().as_bytes()), Err(EventError::Identity { .. })));
    }

    #[test]
    fn extra_fields_are_tolerated() {
        let event = json!({
            "event": "configure", "extra": true,
            "meta": {"service": "admin", "timestamp": "now"},
            "data": {"id": "a1998e", "label": "x", "attrs": {"k": "v"}, "templates": [1]}
        });
        assert_eq!(interpret(&event).unwrap(), publish("admin:a1998e/config", &json!({"k": "v"})));
    }

    #[test]
    fn every_topic_k2v_publishes_is_one_the_acl_lets_the_service_publish() {
        use crate::policy::{Policy, PolicyConfig};
        let policy = Policy::new(PolicyConfig::default());
        let ids = [
            "admin",
            "a1998e",
            "T_1.x-y",
            "a/b",
            "+",
            "#",
            "$SYS",
            "a:b",
            "",
            "é",
            "a b",
            &"x".repeat(64),
            &"x".repeat(65),
        ];
        for tenant in ids {
            for device in ids {
                let event =
                    json!({"event": "configure", "meta": {"service": tenant}, "data": {"id": device, "attrs": {}}});
                if let Ok(Action::Publish { topic, .. }) = interpret(&event) {
                    assert_eq!(policy.publish(Some("k2v-bridge"), &topic, false), Ok(()), "{topic}");
                    assert_eq!(
                        policy.config_topic_device(&topic).map(|d| (d.tenant, d.device)),
                        Some((tenant, device))
                    );
                } else {
                    assert!(policy.publish(Some("k2v-bridge"), &format!("{tenant}:{device}/config"), false).is_err());
                }
            }
        }
    }
}
