//! dojot's device-data message contract: what a device payload becomes in Kafka, or why it goes to the dead-letter
//! topic instead. Pure: no I/O, the receive time is an input.

use std::borrow::Cow;
use std::fmt;

use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::error::Category;
use serde_json::value::RawValue;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::kafka::producer::Record;
use crate::policy::DeviceId;

/// Why a payload cannot be device data. The reason travels in the dead letter's `reason` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("not_json")]
    NotJson,
    #[error("not_object")]
    NotObject,
    #[error("too_large")]
    TooLarge,
    #[error("bad_encoding")]
    BadEncoding,
    /// Valid, but Kafka did not take it within the delivery timeout (subscription mode dead-letters it then).
    #[error("undeliverable")]
    Undeliverable,
    /// Valid, but Kafka refused its record for good (a final error: too large for the topic, not authorised,
    /// invalid for the broker): dead-lettered in every mode, since sending it again can never succeed.
    #[error("refused")]
    Refused,
}

impl Invalid {
    pub const ALL: [Invalid; 6] = [
        Invalid::NotJson,
        Invalid::NotObject,
        Invalid::TooLarge,
        Invalid::BadEncoding,
        Invalid::Undeliverable,
        Invalid::Refused,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Invalid::NotJson => "not_json",
            Invalid::NotObject => "not_object",
            Invalid::TooLarge => "too_large",
            Invalid::BadEncoding => "bad_encoding",
            Invalid::Undeliverable => "undeliverable",
            Invalid::Refused => "refused",
        }
    }
}

/// Settings of the contract.
#[derive(Debug, Clone)]
pub struct Contract {
    pub topic_suffix: String,
    pub max_payload_bytes: usize,
    /// Dead-letter values are cut to this many bytes, so that Kafka (1 MiB per record by default) never refuses
    /// one for its size, which would lose it for good.
    pub max_dead_letter_bytes: usize,
}

/// What one device publish becomes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Data(Record),
    DeadLetter { record: Record, reason: Invalid },
}

impl Outcome {
    pub fn record(&self) -> &Record {
        match self {
            Outcome::Data(record) | Outcome::DeadLetter { record, .. } => record,
        }
    }
}

impl Contract {
    pub fn data_topic(&self, tenant: &str) -> String {
        [tenant, ".", &self.topic_suffix].concat()
    }

    pub fn dead_letter_topic(&self, tenant: &str) -> String {
        format!("{tenant}.{}.dead-letter", self.topic_suffix)
    }

    /// Builds the Kafka record for `payload` published by `device` on `mqtt_topic`, received at `received_ms`.
    pub fn build(&self, device: DeviceId<'_>, mqtt_topic: &str, payload: &[u8], received_ms: u64) -> Outcome {
        match self.data_value(device, payload, received_ms) {
            Ok(value) => Outcome::Data(Record {
                topic: self.data_topic(device.tenant),
                key: device.key(),
                value,
                headers: Vec::new(),
            }),
            Err(reason) => self.dead_letter(device, mqtt_topic, payload, received_ms, reason),
        }
    }

    /// The dead letter keeps the payload exactly as the device sent it, up to `max_dead_letter_bytes`; a longer one
    /// is cut there and says so in `original_size` and `sha256` (of the whole payload, lower-case hex).
    pub fn dead_letter(
        &self,
        device: DeviceId<'_>,
        mqtt_topic: &str,
        payload: &[u8],
        received_ms: u64,
        reason: Invalid,
    ) -> Outcome {
        let mut headers = vec![
            ("reason", reason.as_str().to_string()),
            ("mqtt_topic", mqtt_topic.to_string()),
            ("received_at", received_ms.to_string()),
        ];
        let kept = payload.len().min(self.max_dead_letter_bytes);
        if kept < payload.len() {
            let digest: String = openssl::sha::sha256(payload).iter().map(|b| format!("{b:02x}")).collect();
            headers.push(("original_size", payload.len().to_string()));
            headers.push(("sha256", digest));
        }
        let record = Record {
            topic: self.dead_letter_topic(device.tenant),
            key: device.key(),
            value: payload[..kept].to_vec(),
            headers,
        };
        Outcome::DeadLetter { record, reason }
    }

    /// The dojot message: `{"metadata":{"deviceid","tenant","timestamp"},"attrs":{…}}`. The attributes are checked
    /// and written back as the device sent each value (no tree is built and serialised again).
    fn data_value(&self, device: DeviceId<'_>, payload: &[u8], received_ms: u64) -> Result<Vec<u8>, Invalid> {
        if payload.len() > self.max_payload_bytes {
            return Err(Invalid::TooLarge);
        }
        // One UTF-8 check of the whole payload: parsing bytes checks every string on its own, at several times the
        // cost. JSON is UTF-8, so a payload that is not is not JSON.
        let text = std::str::from_utf8(payload).map_err(|_| Invalid::NotJson)?;
        let Attrs(mut attrs) = serde_json::from_str(text).map_err(|e| {
            // A well-formed value of another type (array, number, string, null) is not an object; anything else
            // is not JSON at all.
            let well_formed = e.classify() == Category::Data && serde_json::from_str::<IgnoredAny>(text).is_ok();
            if well_formed { Invalid::NotObject } else { Invalid::NotJson }
        })?;
        let timestamp = take_timestamp(&mut attrs).unwrap_or(received_ms);
        let mut value = Vec::with_capacity(payload.len() + 96);
        value.extend_from_slice(br#"{"metadata":{"deviceid":"#);
        write_string(&mut value, device.device);
        value.extend_from_slice(br#","tenant":"#);
        write_string(&mut value, device.tenant);
        value.extend_from_slice(br#","timestamp":"#);
        value.extend_from_slice(itoa::Buffer::new().format(timestamp).as_bytes());
        value.extend_from_slice(br#"},"attrs":{"#);
        for (n, (key, raw)) in attrs.iter().enumerate() {
            if n > 0 {
                value.push(b',');
            }
            write_string(&mut value, &key.0);
            value.push(b':');
            value.extend_from_slice(raw.get().as_bytes());
        }
        value.extend_from_slice(b"}}");
        Ok(value)
    }
}

/// An attribute name, borrowed from the payload unless it had escapes.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord, serde::Deserialize)]
struct Key<'a>(#[serde(borrow)] Cow<'a, str>);

/// A payload's attributes as the device wrote each value, sorted by name with the last of duplicates kept, as
/// serde_json's own map does (one vector per message, not a tree of nodes).
struct Attrs<'a>(Vec<(Key<'a>, &'a RawValue)>);

impl<'de> serde::Deserialize<'de> for Attrs<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Entries;
        impl<'de> Visitor<'de> for Entries {
            type Value = Attrs<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Attrs<'de>, M::Error> {
                let mut attrs = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(entry) = map.next_entry::<Key<'de>, &'de RawValue>()? {
                    attrs.push(entry);
                }
                // A stable sort keeps duplicates in arrival order; the swap leaves the later value in the one kept.
                attrs.sort_by(|a, b| a.0.cmp(&b.0));
                attrs.dedup_by(|later, kept| {
                    let duplicate = later.0 == kept.0;
                    if duplicate {
                        std::mem::swap(later, kept);
                    }
                    duplicate
                });
                Ok(Attrs(attrs))
            }
        }
        deserializer.deserialize_map(Entries)
    }
}

/// `text` as a JSON string, escaped where needed.
fn write_string(out: &mut Vec<u8>, text: &str) {
    // Writing a str into a Vec cannot fail.
    let _ = serde_json::to_writer(out, text);
}

/// Moves a valid `timestamp` out of the attributes: epoch milliseconds (a non-negative integer) or an RFC 3339 string.
/// An invalid one stays where it is (nothing the device sent is dropped) and the receive time is used.
fn take_timestamp(attrs: &mut Vec<(Key<'_>, &RawValue)>) -> Option<u64> {
    let at = attrs.binary_search_by(|(key, _)| key.0.as_ref().cmp("timestamp")).ok()?;
    let raw = attrs[at].1.get();
    let parsed = serde_json::from_str::<u64>(raw).ok().or_else(|| {
        let text = serde_json::from_str::<Cow<'_, str>>(raw).ok()?;
        let time = OffsetDateTime::parse(&text, &Rfc3339).ok()?;
        u64::try_from(time.unix_timestamp_nanos() / 1_000_000).ok()
    })?;
    attrs.remove(at);
    Some(parsed)
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    const DEV: DeviceId<'static> = DeviceId { tenant: "admin", device: "a1998e" };
    const NOW: u64 = 1_732_540_000_000;

    fn contract() -> Contract {
        Contract { topic_suffix: "device-data".into(), max_payload_bytes: 64, max_dead_letter_bytes: 100 }
    }

    fn data(payload: &[u8]) -> (Record, Value) {
        match contract().build(DEV, "admin:a1998e/attrs", payload, NOW) {
            Outcome::Data(record) => {
                let value = serde_json::from_slice(&record.value).unwrap();
                (record, value)
            }
            other => panic!("dead-lettered: {other:?}"),
        }
    }

    fn reason(payload: &[u8]) -> Invalid {
        match contract().build(DEV, "admin:a1998e/attrs", payload, NOW) {
            Outcome::DeadLetter { record, reason } => {
                assert_eq!(record.topic, "admin.device-data.dead-letter");
                assert_eq!(record.key, "admin:a1998e");
                assert_eq!(record.value, payload, "the dead letter keeps the payload as sent");
                assert_eq!(record.headers[0], ("reason", reason.as_str().to_string()));
                assert_eq!(record.headers[1], ("mqtt_topic", "admin:a1998e/attrs".to_string()));
                reason
            }
            other => panic!("accepted: {other:?}"),
        }
    }

    #[test]
    fn dojot_message_with_receive_time() {
        let (record, value) = data(br#"{"attr_example": 10}"#);
        assert_eq!(record.topic, "admin.device-data");
        assert_eq!(record.key, "admin:a1998e");
        assert_eq!(
            value,
            json!({"metadata": {"deviceid": "a1998e", "tenant": "admin", "timestamp": NOW}, "attrs": {"attr_example": 10}})
        );
    }

    #[test]
    fn timestamp_is_moved_into_metadata() {
        let (_, value) = data(br#"{"t": 1, "timestamp": 1700000000123}"#);
        assert_eq!(value["metadata"]["timestamp"], 1_700_000_000_123u64);
        assert_eq!(value["attrs"], json!({"t": 1}));
        let (_, value) = data(br#"{"timestamp": "2024-11-25T13:06:40.5+01:00"}"#);
        assert_eq!(value["metadata"]["timestamp"], 1_732_536_400_500u64);
        assert_eq!(value["attrs"], json!({}));
    }

    #[test]
    fn invalid_timestamp_stays_in_attrs() {
        for payload in [
            &br#"{"timestamp": "yesterday"}"#[..],
            br#"{"timestamp": -5}"#,
            br#"{"timestamp": 1.5}"#,
            br#"{"timestamp": null}"#,
        ] {
            let (_, value) = data(payload);
            assert_eq!(value["metadata"]["timestamp"], NOW, "{}", String::from_utf8_lossy(payload));
            assert!(value["attrs"].get("timestamp").is_some());
        }
    }

    #[test]
    fn invalid_payloads_are_dead_lettered_with_their_reason() {
        assert_eq!(reason(b"not json"), Invalid::NotJson);
        assert_eq!(reason(b""), Invalid::NotJson);
        assert_eq!(reason(b"\xff\xfe"), Invalid::NotJson);
        assert_eq!(reason(b"{\"a\":\"\xff\"}"), Invalid::NotJson, "a string that is not UTF-8");
        assert_eq!(reason(b"{\"\xc3\":1}"), Invalid::NotJson, "a name cut inside a UTF-8 sequence");
        assert_eq!(reason(b"{\"a\":1} trailing"), Invalid::NotJson);
        assert_eq!(reason(b"[1,2]"), Invalid::NotObject);
        assert_eq!(reason(b"42"), Invalid::NotObject);
        assert_eq!(reason(b"\"text\""), Invalid::NotObject);
        assert_eq!(reason(b"null"), Invalid::NotObject);
        assert_eq!(reason(format!("{{\"a\":\"{}\"}}", "x".repeat(64)).as_bytes()), Invalid::TooLarge);
    }

    /// The attributes are written back from the payload's own text: the result must be the JSON serde_json reads
    /// from the payload (minus a valid timestamp), whatever escapes, duplicates or spacing the device used.
    #[test]
    fn attrs_written_back_equal_what_serde_json_reads() {
        for payload in [
            &br#"{"a\"b": 1, "\u00e9": "x\ny", "n": 1.50}"#[..],
            br#"{"z": [ 1 , {"k" : null} ], "y":{}}"#,
            br#"{"dup": 1, "dup": 2}"#,
            br#"{"dup": 1, "a": 0, "dup": 2, "b": [], "dup": 3, "a": "last"}"#,
            br#"{"timestamp": "not a time", "x": 1, "timestamp": 1700000000123}"#,
            br#" { "timestamp" : 1700000000123 , "t" : -0.0 } "#,
            br#"{"\ud83d\ude00": 1, "timestamp": "2024-11-25T13:06:41Z"}"#,
            br#"{}"#,
        ] {
            let (_, value) = data(payload);
            let mut expected: Value = serde_json::from_slice(payload).unwrap();
            let moved = expected.as_object_mut().unwrap().remove("timestamp");
            assert_eq!(value["attrs"], expected, "{}", String::from_utf8_lossy(payload));
            assert_eq!(value["metadata"]["timestamp"] != NOW, moved.is_some(), "{value}");
        }
        let (record, _) = data(br#"{"n": 1.50}"#);
        assert!(String::from_utf8_lossy(&record.value).contains(r#""n":1.50"#), "the device's own number text");
    }

    #[test]
    fn malformed_arrays_are_not_json_rather_than_not_object() {
        assert_eq!(reason(b"[1, x"), Invalid::NotJson);
        assert_eq!(reason(b"{\"a\": [1, x]}"), Invalid::NotJson);
        assert_eq!(reason(b"{\"a\": 1,}"), Invalid::NotJson);
    }

    #[test]
    fn attrs_keep_nested_values_and_unicode() {
        let (_, value) = data("{\"a\":{\"b\":[1,true]},\"é\":\"ü\"}".as_bytes());
        assert_eq!(value["attrs"], json!({"a": {"b": [1, true]}, "é": "ü"}));
    }

    #[test]
    fn dead_letters_are_capped_so_kafka_takes_them() {
        let device = DeviceId { tenant: "admin", device: "a1998e" };
        // No two 100-byte windows alike: only the first 100 bytes pass (not the last, nor any other cut).
        let huge: Vec<u8> = (0..).flat_map(|n: u32| format!("{n},").into_bytes()).take(5000).collect();
        let outcome = contract().build(device, "admin:a1998e/attrs", &huge, 7);
        let Outcome::DeadLetter { record, reason: Invalid::TooLarge } = outcome else { panic!("{outcome:?}") };
        assert_eq!(record.value, huge[..100]);
        let header = |name: &str| record.headers.iter().find(|(k, _)| *k == name).map(|(_, v)| v.clone());
        assert_eq!(header("original_size").as_deref(), Some("5000"));
        let digest: String = openssl::sha::sha256(&huge).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(header("sha256"), Some(digest));
        assert_eq!(header("reason").as_deref(), Some("too_large"));
        // At the cap or below: byte for byte, no extra headers.
        let outcome = contract().build(device, "admin:a1998e/attrs", &huge[..100], 7);
        assert_eq!(outcome.record().value, huge[..100]);
        assert!(outcome.record().headers.iter().all(|(k, _)| *k != "original_size" && *k != "sha256"));
    }
}
