//! Request bodies as VerneMQ sends them. Fields we rely on are required and typed: a body with a missing field or a
//! wrong type is rejected (400), never guessed at. Fields we do not use are ignored, so newer VerneMQ versions that add
//! fields (2.2's `listener_*`) keep working.

use std::borrow::Cow;

use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};

use super::Reply;

/// Parses a hook body, or the 400 reply that explains why it could not be.
pub(super) fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, Reply> {
    // One UTF-8 check of the whole body: parsing bytes checks every string on its own, at several times the cost.
    let text = std::str::from_utf8(body).map_err(|e| Reply::BadRequest(format!("invalid request body: {e}")))?;
    serde_json::from_str(text).map_err(|e| Reply::BadRequest(format!("invalid request body: {e}")))
}

/// A key that must be present but may be `null` (VerneMQ sends `"username":null` for an anonymous CONNECT).
fn nullable<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    Option::<T>::deserialize(d)
}

fn qos<'de, D: Deserializer<'de>>(d: D) -> Result<u8, D::Error> {
    let value = u8::deserialize(d)?;
    if value > 2 {
        return Err(serde::de::Error::custom(format!("qos {value} is not 0, 1 or 2")));
    }
    Ok(value)
}

/// `auth_on_register` and `auth_on_register_m5`.
#[derive(Debug, serde::Deserialize)]
pub(super) struct Register {
    pub mountpoint: String,
    pub client_id: String,
    #[serde(deserialize_with = "nullable")]
    pub username: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub password: Option<String>,
    /// Base64 DER, present with `forward_connection_opts = on` on a TLS listener.
    #[serde(default)]
    pub client_cert: Option<String>,
}

/// `auth_on_publish(_m5)` and `on_publish(_m5)`: the hot path, so the strings are borrowed from the body unless
/// they hold escapes.
#[derive(Debug, serde::Deserialize)]
pub(super) struct Publish<'a> {
    #[serde(borrow, deserialize_with = "nullable")]
    pub username: Option<Text<'a>>,
    #[serde(borrow)]
    pub client_id: Cow<'a, str>,
    #[serde(deserialize_with = "qos")]
    pub qos: u8,
    #[serde(borrow)]
    pub topic: Cow<'a, str>,
    pub retain: bool,
    /// Base64; absent when the endpoint is registered with `no_payload = on`.
    #[serde(borrow, default)]
    pub payload: Option<Text<'a>>,
    #[serde(default)]
    pub properties: Properties,
}

/// A request's MQTT 5 properties, read only for whether there are any. VerneMQ's webhook cache keys a reply by the
/// whole request (payload and port aside), properties included, and VerneMQ 2.1 removes an expired row only when the
/// same key is looked up again: a reply cached for properties the client chose per message (a correlation id, a user
/// property) would leave one row per message in the broker for good.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Properties {
    any: bool,
}

impl Properties {
    /// No properties, or none sent (MQTT 3.1.1 hooks).
    pub(super) fn is_empty(self) -> bool {
        !self.any
    }
}

impl<'de> Deserialize<'de> for Properties {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Entries;
        impl<'de> Visitor<'de> for Entries {
            type Value = Properties;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object of MQTT 5 properties")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Properties, A::Error> {
                let mut any = false;
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {
                    any = true;
                }
                Ok(Properties { any })
            }

            fn visit_unit<E: serde::de::Error>(self) -> Result<Properties, E> {
                Ok(Properties { any: false })
            }
        }
        d.deserialize_any(Entries)
    }
}

/// A string borrowed from the body unless it holds escapes. (serde borrows a `Cow` field only when it is not wrapped,
/// so an optional one needs this.)
#[derive(Debug, serde::Deserialize)]
#[serde(transparent)]
pub(super) struct Text<'a>(#[serde(borrow)] Cow<'a, str>);

impl std::ops::Deref for Text<'_> {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

#[derive(Debug, serde::Deserialize)]
pub(super) struct Subscription {
    pub topic: String,
    #[serde(deserialize_with = "qos")]
    pub qos: u8,
}

/// `auth_on_subscribe(_m5)`.
#[derive(Debug, serde::Deserialize)]
pub(super) struct Subscribe {
    #[serde(deserialize_with = "nullable")]
    pub username: Option<String>,
    pub client_id: String,
    pub topics: Vec<Subscription>,
    #[serde(default)]
    pub properties: Properties,
}

/// `on_register(_m5)`.
#[derive(Debug, serde::Deserialize)]
pub(super) struct Registered {
    pub mountpoint: String,
    pub client_id: String,
}

/// `on_client_offline`, `on_client_gone`.
#[derive(Debug, serde::Deserialize)]
pub(super) struct Gone {
    pub mountpoint: String,
    pub client_id: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bad<'a, T: Deserialize<'a> + std::fmt::Debug>(body: &'a str) -> String {
        match parse::<T>(body.as_bytes()) {
            Err(Reply::BadRequest(m)) => m,
            other => panic!("expected a bad request for {body}, got {other:?}"),
        }
    }

    #[test]
    fn register_requires_username_key_but_accepts_null() {
        let r: Register =
            parse(br#"{"mountpoint":"","client_id":"c","username":null,"password":null,"clean_session":true}"#)
                .unwrap();
        assert_eq!(r.username, None);
        assert!(bad::<Register>(r#"{"mountpoint":"","client_id":"c"}"#).contains("username"));
        assert!(bad::<Register>(r#"{"mountpoint":"","username":"a:b"}"#).contains("client_id"));
    }

    #[test]
    fn bodies_that_are_not_utf8_are_rejected_wherever_the_bad_byte_is() {
        let body = |client_id: &[u8]| {
            [
                br#"{"username":"a:b","mountpoint":"","client_id":""#,
                client_id,
                br#"","qos":1,"topic":"t","retain":false}"#,
            ]
            .concat()
        };
        assert!(parse::<Publish>(&body(b"c")).is_ok());
        for client_id in [&b"\xff"[..], b"c\xc3", b"\xed\xa0\x80"] {
            let body = body(client_id);
            match parse::<Publish>(&body) {
                Err(Reply::BadRequest(m)) => assert!(m.contains("utf-8"), "{m}"),
                other => panic!("expected a bad request for {client_id:?}, got {other:?}"),
            }
        }
    }

    #[test]
    fn wrong_types_are_rejected() {
        assert!(bad::<Register>(r#"{"mountpoint":"","client_id":7,"username":"a:b"}"#).contains("invalid type"));
        bad::<Publish>(r#"{"username":"a:b","mountpoint":"","client_id":"c","qos":"1","topic":"t","retain":false}"#);
        bad::<Publish>(r#"{"username":"a:b","mountpoint":"","client_id":"c","qos":1,"topic":"t","retain":"no"}"#);
        bad::<Publish>(r#"{"username":"a:b","mountpoint":"","client_id":"c","qos":3,"topic":"t","retain":false}"#);
        bad::<Publish>(r#"{"username":"a:b","mountpoint":"","client_id":"c","qos":-1,"topic":"t","retain":false}"#);
        bad::<Subscribe>(r#"{"username":"a:b","mountpoint":"","client_id":"c","topics":{"topic":"t","qos":1}}"#);
        bad::<Subscribe>(r#"{"username":"a:b","mountpoint":"","client_id":"c","topics":[{"topic":1,"qos":1}]}"#);
        bad::<Gone>(r#"[]"#);
        bad::<Gone>(r#""#);
        bad::<Gone>(r#"{"mountpoint":"","client_id":"c""#);
    }

    #[test]
    fn publish_strings_are_borrowed_unless_escaped() {
        let body =
            r#"{"username":"a:b","client_id":"c\u0031","qos":1,"topic":"a:b/attrs","retain":false,"payload":"eyJ9"}"#;
        let p: Publish = parse(body.as_bytes()).unwrap();
        let borrowed = |text: &str| body.as_bytes().as_ptr_range().contains(&text.as_ptr());
        assert!(
            borrowed(&p.topic) && borrowed(p.username.as_deref().unwrap()) && borrowed(p.payload.as_deref().unwrap())
        );
        assert_eq!(&*p.client_id, "c1", "an escaped string is decoded into its own copy");
        assert!(!borrowed(&p.client_id));
    }

    #[test]
    fn publish_accepts_a_null_username_and_requires_the_key() {
        let p: Publish =
            parse(br#"{"username":null,"client_id":"c","qos":0,"topic":"t","retain":false,"payload":null}"#).unwrap();
        assert!(p.username.is_none() && p.payload.is_none());
        bad::<Publish>(r#"{"client_id":"c","qos":0,"topic":"t","retain":false}"#);
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let p: Publish = parse(
            br#"{"username":"a:b","mountpoint":"","client_id":"c","qos":1,"topic":"t","payload":"e30=","retain":false,"properties":{"p_user_property":[]},"listener_port":8883}"#,
        )
        .unwrap();
        assert_eq!(p.payload.as_deref(), Some("e30="));
    }

    #[test]
    fn properties_tell_only_whether_there_are_any() {
        let publish = |properties: &str| {
            let body =
                format!(r#"{{"username":"a:b","client_id":"c","qos":1,"topic":"t","retain":false{properties}}}"#);
            parse::<Publish>(body.as_bytes()).map(|p| p.properties.is_empty())
        };
        assert_eq!(publish("").ok(), Some(true), "MQTT 3.1.1: none sent");
        assert_eq!(publish(r#","properties":{}"#).ok(), Some(true));
        assert_eq!(publish(r#","properties":null"#).ok(), Some(true));
        assert_eq!(publish(r#","properties":{"p_correlation_data":"aWQ="}"#).ok(), Some(false));
        assert_eq!(
            publish(r#","properties":{"p_user_property":[{"key":"dA==","val":"MQ=="}],"p_message_expiry_interval":9}"#)
                .ok(),
            Some(false)
        );
        for not_properties in [r#","properties":[]"#, r#","properties":"x""#, r#","properties":1"#] {
            assert!(publish(not_properties).is_err(), "{not_properties}");
        }
    }
}
