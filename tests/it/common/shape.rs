//! What VerneMQ 2.1 accepts as a webhook reply, written from the contract (ARCHITECTURE.md §2.3), independent of
//! the service's code. A reply that breaks one of these rules crashes the MQTT session or is silently misread.

use serde_json::{Map, Value};

use super::RawResponse;

pub const AUTH_HOOKS: &[&str] = &[
    "auth_on_register",
    "auth_on_register_m5",
    "auth_on_publish",
    "auth_on_publish_m5",
    "auth_on_subscribe",
    "auth_on_subscribe_m5",
];

/// Modifier keys VerneMQ validates for each hook (`vmq_plugin_util:modifiers/1`).
fn allowed_modifiers(hook: &str) -> &'static [&'static str] {
    const REGISTER: &[&str] = &[
        "allow_register",
        "allow_publish",
        "allow_subscribe",
        "allow_unsubscribe",
        "max_message_size",
        "max_connection_lifetime",
        "max_message_rate",
        "max_inflight_messages",
        "retry_interval",
        "max_online_messages",
        "max_offline_messages",
        "max_drain_time",
        "max_msgs_per_drain_step",
        "username",
        "clean_session",
        "upgrade_qos",
        "shared_subscription_policy",
        "queue_type",
        "mountpoint",
        "client_id",
    ];
    match hook {
        "auth_on_register" | "auth_on_register_m5" => REGISTER,
        "auth_on_publish" | "auth_on_publish_m5" => &["topic", "payload", "qos", "retain", "mountpoint", "throttle"],
        "auth_on_subscribe_m5" => &["topics"],
        _ => &[],
    }
}

/// Checks one reply to `hook` for `request` against VerneMQ's rules.
///
/// # Errors
/// The rule the reply breaks.
pub fn check(hook: &str, request: &Value, response: &RawResponse) -> Result<(), String> {
    if response.status != 200 {
        // Non-200 is a denial for VerneMQ (and only logged for notifications): allowed, but it must carry a JSON
        // error so operators can read why.
        let body = response.json();
        return match body.get("error") {
            Some(Value::String(_)) => Ok(()),
            _ => Err(format!("non-200 reply without a JSON error: {body}")),
        };
    }
    let body: Value = serde_json::from_slice(&response.body).map_err(|e| format!("reply is not JSON: {e}"))?;
    if !AUTH_HOOKS.contains(&hook) {
        return Ok(());
    }
    let object = body.as_object().ok_or_else(|| format!("auth reply is not an object: {body}"))?;
    match object.get("result") {
        Some(Value::String(s)) if s == "ok" || s == "next" => {}
        Some(Value::Object(error)) => match error.get("error") {
            Some(Value::String(_)) if error.len() == 1 => {
                if object.len() != 1 {
                    return Err(format!("error reply with extra keys: {body}"));
                }
                if response.header("cache-control").is_some() {
                    return Err("a denial must not carry cache-control".into());
                }
                return Ok(());
            }
            _ => return Err(format!("result object must be {{\"error\": string}}: {body}")),
        },
        other => return Err(format!("missing or unknown result {other:?} crashes the session")),
    }
    if let Some(modifiers) = object.get("modifiers") {
        let modifiers = modifiers.as_object().ok_or_else(|| format!("modifiers is not an object: {body}"))?;
        check_modifiers(hook, request, modifiers)?;
    }
    match hook {
        "auth_on_subscribe" => check_v3_topics(request, object.get("topics"))?,
        "auth_on_subscribe_m5" if object.contains_key("topics") => {
            return Err("top-level topics is ignored for v5: everything would be granted".into());
        }
        _ if object.contains_key("topics") => return Err("topics is only read for auth_on_subscribe".into()),
        _ => {}
    }
    Ok(())
}

fn check_modifiers(hook: &str, request: &Value, modifiers: &Map<String, Value>) -> Result<(), String> {
    if modifiers.is_empty() {
        return Err("\"modifiers\":{} crashes the session".into());
    }
    for (key, value) in modifiers {
        // v5 hooks also take `properties` (auth_on_subscribe_m5 excepted).
        let v5_properties = key == "properties" && hook.ends_with("_m5") && hook != "auth_on_subscribe_m5";
        if !allowed_modifiers(hook).contains(&key.as_str()) && !v5_properties {
            return Err(format!("modifier {key} is not allowed for {hook}"));
        }
        let ok = match key.as_str() {
            "max_connection_lifetime" | "max_message_size" => value.as_u64().is_some_and(|n| n > 0),
            "mountpoint" | "client_id" => value.is_string(),
            "topics" => check_v5_topics(request, value).map(|()| true)?,
            _ => true,
        };
        if !ok {
            return Err(format!("modifier {key} has an invalid value {value}"));
        }
    }
    if modifiers.contains_key("mountpoint") != modifiers.contains_key("client_id") {
        return Err("mountpoint and client_id are only accepted together".into());
    }
    Ok(())
}

fn requested_topics(request: &Value) -> Vec<String> {
    request["topics"]
        .as_array()
        .map(|ts| ts.iter().map(|t| t["topic"].as_str().unwrap_or_default().to_string()).collect())
        .unwrap_or_default()
}

fn check_v3_topics(request: &Value, topics: Option<&Value>) -> Result<(), String> {
    let Some(topics) = topics else { return Ok(()) };
    let topics = topics.as_array().ok_or("topics must be a list")?;
    let requested = requested_topics(request);
    if topics.len() != requested.len() {
        return Err(format!("{} topics for {} filters: the SUBACK would be wrong", topics.len(), requested.len()));
    }
    for (entry, asked) in topics.iter().zip(&requested) {
        if entry["topic"].as_str() != Some(asked.as_str()) {
            return Err(format!("entry {entry} is out of request order (expected {asked})"));
        }
        match entry["qos"].as_u64() {
            Some(0..=2 | 128) => {}
            _ => return Err(format!("v3 qos must be 0..2 or 128: {entry}")),
        }
    }
    Ok(())
}

fn check_v5_topics(request: &Value, topics: &Value) -> Result<(), String> {
    let topics = topics.as_array().ok_or("modifiers.topics must be a list")?;
    if topics.len() != requested_topics(request).len() {
        return Err("v5 topics must answer every filter".into());
    }
    for entry in topics {
        match entry["qos"].as_u64() {
            Some(0..=2) => {}
            // 2.1 still subscribes a 135 entry and crashes on 128 (tests/data/vernemq-2.1.2/README.md, scenario 2d).
            _ => return Err(format!("v5 modifier qos must be 0..2 on VerneMQ 2.1: {entry}")),
        }
    }
    Ok(())
}
