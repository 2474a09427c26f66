//! Every request recorded from a real VerneMQ 2.1.2 (`tests/data/vernemq-2.1.2/`), replayed byte for byte over a
//! keep-alive connection with hackney's headers, and the decision checked against the rules of ARCHITECTURE.md
//! ("Identities and decisions") as restated here independently of the service's code.

use std::collections::BTreeMap;

use iotagent_mqtt::webhooks::Hook;
use serde_json::Value;

use crate::common::captures::{self, Captured};
use crate::common::{RawClient, shape, spawn_app};

/// Hooks the service serves; VerneMQ must not be configured with the others (they answer 404 = denial/log line).
fn served() -> Vec<&'static str> {
    Hook::ALL.iter().map(|h| h.name()).collect()
}

/// `tenant:device_id`, each part 1–64 of `[A-Za-z0-9_.-]`.
fn is_device(username: &Value) -> bool {
    let Some(u) = username.as_str() else { return false };
    let parts: Vec<&str> = u.split(':').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty() && p.len() <= 64 && p.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
        })
}

/// No MQTT 5 properties in the request (none sent, or an empty object).
fn no_properties(request: &Value) -> bool {
    request.get("properties").is_none_or(|p| p.is_null() || p.as_object().is_some_and(|o| o.is_empty()))
}

#[derive(Debug, Default)]
struct Tally {
    allowed: usize,
    denied: usize,
    /// Allowed replies VerneMQ may cache.
    cached: usize,
}

#[tokio::test]
async fn every_captured_request_gets_the_designed_decision() {
    let captures = captures::load();
    assert!(captures.len() > 1500, "expected the full capture set, found {}", captures.len());
    let app = spawn_app(&[]).await;
    let mut client = RawClient::connect(app.addr).await;
    let mut tally: BTreeMap<String, Tally> = BTreeMap::new();

    for c in &captures {
        let context = format!("{} seq {} {}", c.file, c.seq, c.hook);
        let mut headers = c.headers.clone();
        for (k, v) in &mut headers {
            if k.eq_ignore_ascii_case("content-length") {
                assert_eq!(v.parse::<usize>().unwrap(), c.body_raw.len(), "{context}: capture is self-consistent");
            }
        }
        let response = client.send("POST", &format!("/vmq/{}", c.hook), &headers, c.body_raw.as_bytes()).await;
        if !served().contains(&c.hook.as_str()) {
            assert_eq!(response.status, 404, "{context}: hooks we do not implement must not be answered");
            continue;
        }
        let request: Value = serde_json::from_str(&c.body_raw).unwrap();
        shape::check(&c.hook, &request, &response).unwrap_or_else(|e| panic!("{context}: {e}"));
        assert_eq!(response.status, 200, "{context}: {:?}", String::from_utf8_lossy(&response.body));
        let reply = response.json();
        let allowed = reply["result"] == "ok";
        let entry = tally.entry(c.hook.clone()).or_default();
        let user = &request["username"];
        match c.hook.as_str() {
            "auth_on_register" | "auth_on_register_m5" => {
                assert_eq!(allowed, is_device(user), "{context}: {reply}");
                if allowed {
                    let m = &reply["modifiers"];
                    let lifetime = m["max_connection_lifetime"].as_u64().expect("lifetime modifier");
                    assert!((1620..=1980).contains(&lifetime), "{context}: lifetime {lifetime}");
                    assert_eq!(m["mountpoint"], request["mountpoint"], "{context}");
                    let scoped = format!("{}|{}", user.as_str().unwrap(), request["client_id"].as_str().unwrap());
                    assert_eq!(m["client_id"], Value::String(scoped), "{context}");
                    assert!(response.header("cache-control").is_none(), "{context}: registrations are not cached");
                }
            }
            "auth_on_publish" | "auth_on_publish_m5" => {
                let own_attrs = is_device(user)
                    && request["topic"].as_str() == Some(&format!("{}/attrs", user.as_str().unwrap()))
                    && request["retain"] == false;
                assert_eq!(allowed, own_attrs, "{context}: {reply}");
                if allowed {
                    // VerneMQ keys its cache by the request, properties included, and keeps a row until the same key
                    // comes again: only property-free publishes may be cached.
                    let cache = no_properties(&request).then_some("max-age=300");
                    assert_eq!(response.header("cache-control"), cache, "{context}");
                    entry.cached += usize::from(cache.is_some());
                }
            }
            "auth_on_subscribe" | "auth_on_subscribe_m5" => {
                let wanted: Vec<bool> = request["topics"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|t| {
                        is_device(user) && t["topic"].as_str() == Some(&format!("{}/config", user.as_str().unwrap()))
                    })
                    .collect();
                let all = wanted.iter().all(|w| *w);
                let cacheable = all && wanted.len() == 1 && no_properties(&request);
                let cache = cacheable.then_some("max-age=300");
                assert_eq!(response.header("cache-control"), cache, "{context}: {reply}");
                entry.cached += usize::from(cacheable);
                if c.hook == "auth_on_subscribe" && !all {
                    let got: Vec<bool> = reply["topics"]
                        .as_array()
                        .unwrap_or_else(|| panic!("{context}: per-filter topics expected: {reply}"))
                        .iter()
                        .map(|t| t["qos"] != 128)
                        .collect();
                    assert_eq!(got, wanted, "{context}: {reply}");
                } else {
                    assert_eq!(allowed, all, "{context}: {reply}");
                    assert_eq!(reply.get("topics"), None, "{context}");
                }
                entry.allowed += usize::from(wanted.iter().any(|w| *w));
                entry.denied += usize::from(!all);
                continue;
            }
            _ => {
                assert_eq!(reply, serde_json::json!({}), "{context}: notifications answer {{}}");
                entry.allowed += 1;
                continue;
            }
        }
        if allowed {
            entry.allowed += 1;
        } else {
            entry.denied += 1;
        }
    }

    // The captures must exercise both outcomes of every auth hook, or this test proves little.
    for hook in shape::AUTH_HOOKS {
        let t = tally.get(*hook).unwrap_or_else(|| panic!("no capture for {hook}"));
        assert!(t.allowed > 0 && t.denied > 0, "{hook}: {t:?}");
    }
    // Both sides of the caching rule are exercised: cached allows, and allows with properties that are not cached.
    for hook in ["auth_on_publish", "auth_on_publish_m5", "auth_on_subscribe", "auth_on_subscribe_m5"] {
        assert!(tally[hook].cached > 0, "{hook}: {:?}", tally[hook]);
    }
    let m5 = &tally["auth_on_publish_m5"];
    assert!(m5.cached < m5.allowed, "a captured v5 publish with properties: {m5:?}");
    drop(client);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn captured_client_certificate_is_checked_against_the_username() {
    let captures = captures::load();
    let with_cert: Vec<&Captured> = captures.iter().filter(|c| c.body_raw.contains("\"client_cert\"")).collect();
    assert!(!with_cert.is_empty(), "5-tls.jsonl carries client_cert");
    let app = spawn_app(&[]).await;
    let mut client = app.client().await;
    for c in with_cert {
        let mut request: Value = serde_json::from_str(&c.body_raw).unwrap();
        let ok = client.hook(&c.hook, c.body_raw.as_bytes()).await;
        assert_eq!(ok.json()["result"], "ok", "{} seq {}: CN equals username", c.file, c.seq);
        // The same certificate presented under another device's name is refused.
        request["username"] = Value::String("admin:b2c3d4".into());
        let mismatch = client.hook(&c.hook, request.to_string().as_bytes()).await;
        assert_eq!(mismatch.json(), serde_json::json!({"result": {"error": "not_allowed"}}));
    }
}
