//! Unit tests of `k2v/event.rs`: event parsing, the tenant rule, sizes.
use serde_json::{Value, json};

use super::*;

fn rules() -> EventRules {
    EventRules {
        id_charset: IdCharset::default(),
        config_suffix: "config".into(),
        topic_suffix: "dojot.device-manager.device".into(),
        max_message_size: None,
    }
}

const ADMIN_TOPIC: &str = "admin.dojot.device-manager.device";
const T_TOPIC: &str = "t.dojot.device-manager.device";

/// Reads `value` from its own tenant's topic.
fn interpret(value: &Value) -> Result<Action, EventError> {
    let tenant = value["meta"]["service"].as_str().unwrap_or("admin");
    rules().interpret(&format!("{tenant}.dojot.device-manager.device"), value.to_string().as_bytes())
}

fn publish(topic: &str, payload: &Value) -> Action {
    Action::Publish { topic: topic.into(), payload: serde_json::to_vec(payload).unwrap() }
}

#[test]
fn skip_reasons_are_listed_in_declaration_order() {
    crate::metrics::assert_declaration_order(&SkipReason::ALL, |r| r as usize, SkipReason::name);
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
    let Action::Publish { payload, .. } = rules().interpret(ADMIN_TOPIC, raw).unwrap() else { panic!("not a publish") };
    // Whitespace between tokens goes, strings (escapes included) and key order stay.
    assert_eq!(std::str::from_utf8(&payload).unwrap(), r#"{"z":[1,2,{"b":null}],"s":"x y \" } {\\","a":"\u00e9\t"}"#);
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
    let Action::Publish { topic, .. } =
        rules.interpret("t.dojot.device-manager.device", event.to_string().as_bytes()).unwrap()
    else {
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
    assert_eq!(
        rules.interpret(T_TOPIC, fits.to_string().as_bytes()).unwrap(),
        publish("t:d/config", &json!({"a": 123}))
    );
    let over = json!({"event": "configure", "meta": {"service": "t"}, "data": {"id": "d", "attrs": {"a": 1234}}});
    let err = rules.interpret(T_TOPIC, over.to_string().as_bytes()).unwrap_err();
    assert_eq!(err, EventError::TooLarge { topic: "t:d/config".into(), size: 25, limit: 24 });
    assert_eq!(err.reason(), SkipReason::TooLarge);
    // Only configurations are measured.
    let remove = json!({"event": "remove", "meta": {"service": "t"}, "data": {"id": "d", "attrs": {"a": 1234}}});
    assert!(rules.interpret(T_TOPIC, remove.to_string().as_bytes()).is_ok());
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
        let err = rules().interpret(ADMIN_TOPIC, raw).unwrap_err();
        assert!(matches!(err, EventError::Json(_)), "{raw:?}: {err:?}");
        assert_eq!(err.reason().name(), "malformed");
    }
    let cases = [
        (json!({"meta": {"service": "t"}, "data": {"id": "d", "attrs": {}}}), EventError::Field("event")),
        (json!({"event": 1, "meta": {"service": "t"}}), EventError::Field("event")),
        (json!({"event": "configure", "data": {"id": "d", "attrs": {}}}), EventError::Field("meta.service")),
        (json!({"event": "configure", "meta": {}, "data": {"id": "d"}}), EventError::Field("meta.service")),
        (json!({"event": "configure", "meta": {"service": 7}, "data": {"id": "d"}}), EventError::Field("meta.service")),
        (json!({"event": "configure", "meta": {"service": "t"}}), EventError::Field("data.id")),
        (json!({"event": "configure", "meta": {"service": "t"}, "data": {"id": 12}}), EventError::Field("data.id")),
        (json!({"event": "configure", "meta": {"service": "t"}, "data": {"id": "d"}}), EventError::Attrs),
        (json!({"event": "configure", "meta": {"service": "t"}, "data": {"id": "d", "attrs": [1]}}), EventError::Attrs),
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
    assert!(rules.interpret("ab.dojot.device-manager.device", ok.to_string().as_bytes()).is_ok());
    let bad = json!({"event": "configure", "meta": {"service": "ab"}, "data": {"id": "d", "attrs": {}}});
    assert!(matches!(
        rules.interpret("ab.dojot.device-manager.device", bad.to_string().as_bytes()),
        Err(EventError::Identity { .. })
    ));
}

#[test]
fn an_event_acts_only_on_its_topics_tenant() {
    let attack = json!({"event": "configure", "meta": {"service": "admin"}, "data": {"id": "a1", "attrs": {}}});
    let remove = json!({"event": "remove", "meta": {"service": "admin"}, "data": {"id": "a1"}});
    for (topic, event) in [
        ("evil.dojot.device-manager.device", &attack),
        ("evil.dojot.device-manager.device", &remove),
        ("x.admin.dojot.device-manager.device", &attack),
        ("dmin.dojot.device-manager.device", &attack),
        ("admin.other", &attack),
        (".dojot.device-manager.device", &attack),
    ] {
        let err = rules().interpret(topic, event.to_string().as_bytes()).unwrap_err();
        assert_eq!(err.reason(), SkipReason::TenantMismatch, "{topic}: {err}");
        assert!(err.to_string().contains("\"admin\""), "both tenants in the log line: {err}");
    }
    assert!(rules().interpret(ADMIN_TOPIC, attack.to_string().as_bytes()).is_ok());
    assert!(rules().interpret(ADMIN_TOPIC, remove.to_string().as_bytes()).is_ok());
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
            let event = json!({"event": "configure", "meta": {"service": tenant}, "data": {"id": device, "attrs": {}}});
            if let Ok(Action::Publish { topic, .. }) = interpret(&event) {
                assert_eq!(policy.publish(Some("k2v-bridge"), &topic, false), Ok(()), "{topic}");
                assert_eq!(policy.config_topic_device(&topic).map(|d| (d.tenant, d.device)), Some((tenant, device)));
            } else {
                assert!(policy.publish(Some("k2v-bridge"), &format!("{tenant}:{device}/config"), false).is_err());
            }
        }
    }
}
