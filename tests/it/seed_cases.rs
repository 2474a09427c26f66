//! The seed's cases: `admin:a1998e` may publish its attrs and subscribe its config, nothing else; malformed requests
//! are refused with a clear error; the operational endpoints tell the truth.

use serde_json::{Value, json};

use crate::common::{RawClient, flags, shape, spawn_app};

const DEV: &str = "admin:a1998e";
const DENY: &str = r#"{"result":{"error":"not_allowed"}}"#;

fn publish(username: Value, topic: &str, retain: bool) -> Value {
    json!({"username": username, "mountpoint": "", "client_id": "c1", "qos": 1, "topic": topic,
           "payload": "eyJhdHRyX2V4YW1wbGUiOjEwfQ==", "retain": retain})
}

fn subscribe(username: &str, filters: &[&str]) -> Value {
    let topics: Vec<Value> = filters.iter().map(|f| json!({"topic": f, "qos": 1})).collect();
    json!({"username": username, "mountpoint": "", "client_id": "c1", "topics": topics})
}

fn register(username: Value) -> Value {
    json!({"peer_addr": "127.0.0.1", "peer_port": 40000, "mountpoint": "", "client_id": "c1",
           "username": username, "password": null, "clean_session": true})
}

async fn call(client: &mut RawClient, hook: &str, body: &Value) -> Value {
    let response = client.hook(hook, body.to_string().as_bytes()).await;
    shape::check(hook, body, &response).unwrap_or_else(|e| panic!("{hook} {body}: {e}"));
    assert_eq!(response.status, 200);
    response.json()
}

#[tokio::test]
async fn device_may_publish_attrs_and_subscribe_config_only() {
    let app = spawn_app(&[]).await;
    let mut c = app.client().await;
    let deny: Value = serde_json::from_str(DENY).unwrap();
    for hook in ["auth_on_publish", "auth_on_publish_m5"] {
        assert_eq!(
            call(&mut c, hook, &publish(DEV.into(), "admin:a1998e/attrs", false)).await,
            json!({"result": "ok"})
        );
        for topic in [
            "admin:b2c3d4/attrs",
            "admin:a1998e/config",
            "admin:a1998e/+",
            "admin:a1998e/#",
            "+/attrs",
            "#",
            "$share/g/admin:a1998e/attrs",
            "$SYS/broker/uptime",
            "admin:a1998e/attrs/x",
            "admin:a1998e//attrs",
            "admin:a1998e/attrs/",
            "/admin:a1998e/attrs",
            "",
        ] {
            assert_eq!(call(&mut c, hook, &publish(DEV.into(), topic, false)).await, deny, "{hook} {topic:?}");
        }
        assert_eq!(call(&mut c, hook, &publish(DEV.into(), "admin:a1998e/attrs", true)).await, deny, "retained");
    }
    for hook in ["auth_on_subscribe", "auth_on_subscribe_m5"] {
        assert_eq!(call(&mut c, hook, &subscribe(DEV, &["admin:a1998e/config"])).await, json!({"result": "ok"}));
    }
    for filter in [
        "admin:b2c3d4/config",
        "admin:a1998e/attrs",
        "admin:a1998e/+",
        "admin:a1998e/#",
        "+/config",
        "#",
        "$share/g/admin:a1998e/config",
        "$SYS/#",
        "admin:a1998e/config/x",
        "admin:a1998e//config",
    ] {
        let v3 = call(&mut c, "auth_on_subscribe", &subscribe(DEV, &[filter])).await;
        assert_eq!(v3, json!({"result": "ok", "topics": [{"topic": filter, "qos": 128}]}), "{filter}");
        assert_eq!(call(&mut c, "auth_on_subscribe_m5", &subscribe(DEV, &[filter])).await, deny, "{filter}");
    }
}

#[tokio::test]
async fn mixed_v3_subscribe_keeps_request_order() {
    let app = spawn_app(&[]).await;
    let mut c = app.client().await;
    let body = subscribe(DEV, &["other/#", "admin:a1998e/config", "admin:a1998e/attrs"]);
    let reply = call(&mut c, "auth_on_subscribe", &body).await;
    assert_eq!(
        reply,
        json!({"result": "ok", "topics": [
            {"topic": "other/#", "qos": 128}, {"topic": "admin:a1998e/config", "qos": 1}, {"topic": "admin:a1998e/attrs", "qos": 128}
        ]})
    );
    // v5 cannot reject one filter safely on VerneMQ 2.1: the whole SUBSCRIBE is refused.
    let reply = call(&mut c, "auth_on_subscribe_m5", &body).await;
    assert_eq!(reply, serde_json::from_str::<Value>(DENY).unwrap());
}

#[tokio::test]
async fn strange_usernames_are_denied_everywhere() {
    let app = spawn_app(&[]).await;
    let mut c = app.client().await;
    let deny: Value = serde_json::from_str(DENY).unwrap();
    for username in [
        json!(null),
        json!(""),
        json!("admin"),
        json!("admin:a1998e:x"),
        json!("admin::a1998e"),
        json!("admin:a1998e\u{0000}"),
        json!("admin\u{0000}:a1998e"),
        json!("admin:a1998\u{fffd}"),
        json!("admin:a1998e "),
        json!("admin:a1998e\n"),
        json!("аdmin:a1998e"), // Cyrillic а
        json!(format!("admin:{}", "a".repeat(65))),
    ] {
        for hook in ["auth_on_register", "auth_on_register_m5"] {
            assert_eq!(call(&mut c, hook, &register(username.clone())).await, deny, "{hook} {username}");
        }
        let topic = format!("{}/attrs", username.as_str().unwrap_or_default());
        assert_eq!(call(&mut c, "auth_on_publish", &publish(username.clone(), &topic, false)).await, deny);
    }
}

#[tokio::test]
async fn malformed_requests_get_400_with_a_json_error() {
    let app = spawn_app(&[]).await;
    let mut c = app.client().await;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("auth_on_register", b"".to_vec()),
        ("auth_on_register", b"{not json".to_vec()),
        ("auth_on_register", b"[]".to_vec()),
        ("auth_on_register", b"null".to_vec()),
        ("auth_on_register", br#"{"mountpoint":"","client_id":"c"}"#.to_vec()),
        ("auth_on_register", br#"{"mountpoint":"","client_id":1,"username":"admin:a1998e"}"#.to_vec()),
        ("auth_on_register", br#"{"mountpoint":"","client_id":"c","username":["admin:a1998e"]}"#.to_vec()),
        ("auth_on_register", register(DEV.into()).to_string().replace("\"c1\"", "\"c1\\ud800\"").into_bytes()),
        ("auth_on_register", {
            let mut r = register(DEV.into());
            r["client_cert"] = json!("bm90IGEgY2VydGlmaWNhdGU=");
            r.to_string().into_bytes()
        }),
        ("auth_on_publish", br#"{"username":"admin:a1998e","mountpoint":"","client_id":"c","topic":"admin:a1998e/attrs","retain":false}"#.to_vec()),
        ("auth_on_publish", publish(DEV.into(), "admin:a1998e/attrs", false).to_string().replace("\"qos\":1", "\"qos\":\"1\"").into_bytes()),
        ("auth_on_publish", publish(DEV.into(), "admin:a1998e/attrs", false).to_string().replace("\"qos\":1", "\"qos\":7").into_bytes()),
        ("auth_on_publish", publish(DEV.into(), "admin:a1998e/attrs", false).to_string().replace("false", "0").into_bytes()),
        ("auth_on_subscribe", br#"{"username":"admin:a1998e","mountpoint":"","client_id":"c","topics":[]}"#.to_vec()),
        ("auth_on_subscribe", br#"{"username":"admin:a1998e","mountpoint":"","client_id":"c","topics":"admin:a1998e/config"}"#.to_vec()),
        ("auth_on_subscribe_m5", br#"{"username":"admin:a1998e","mountpoint":"","client_id":"c","topics":[{"topic":"admin:a1998e/config"}]}"#.to_vec()),
        ("on_register", br#"{"client_id":"c"}"#.to_vec()),
        ("on_client_gone", b"\xff\xfe".to_vec()),
    ];
    for (hook, body) in cases {
        let response = c.hook(hook, &body).await;
        assert_eq!(response.status, 400, "{hook} {:?}", String::from_utf8_lossy(&body));
        let error = response.json();
        assert_eq!(error["error"], "bad_request");
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()), "{error}");
    }
    // The connection survived every error.
    assert_eq!(
        call(&mut c, "auth_on_publish", &publish(DEV.into(), "admin:a1998e/attrs", false)).await["result"],
        "ok"
    );
}

#[tokio::test]
async fn oversized_bodies_are_refused_without_reading_them_whole() {
    let app = spawn_app(&[]).await;
    let mut c = app.client().await;
    let mut huge = publish(DEV.into(), "admin:a1998e/attrs", false);
    huge["payload"] = Value::String("A".repeat(10 * 1024 * 1024));
    let body = huge.to_string();
    let headers = vec![
        ("vernemq-hook".to_string(), "auth_on_publish".to_string()),
        ("Content-Type".into(), "application/json".into()),
        ("Content-Length".into(), body.len().to_string()),
    ];
    // Only 64 KiB of the 10 MB are sent: the refusal must not wait for the rest.
    let response = c.send_prefix("POST", "/vmq/auth_on_publish", &headers, body.as_bytes(), 64 * 1024).await;
    assert_eq!(response.status, 400);
    assert_eq!(response.json()["error"], "bad_request");

    // A body just under the limit is fine.
    // A device message must fit the body base64-encoded: the start refuses MAX_MESSAGE_SIZE over what 4 KiB holds.
    let app = spawn_app(&flags(&[("WEBHOOK_MAX_BODY_BYTES", "4096"), ("MAX_MESSAGE_SIZE", "0")])).await;
    let mut c = app.client().await;
    let mut fits = publish(DEV.into(), "admin:a1998e/attrs", false);
    fits["payload"] = Value::String("A".repeat(3000));
    assert_eq!(c.hook("auth_on_publish", fits.to_string().as_bytes()).await.status, 200);
    fits["payload"] = Value::String("A".repeat(5000));
    let fresh = &mut app.client().await;
    assert_eq!(fresh.hook("auth_on_publish", fits.to_string().as_bytes()).await.status, 400);
}

#[tokio::test]
async fn hook_header_must_match_the_endpoint() {
    let app = spawn_app(&[]).await;
    let mut c = app.client().await;
    let body = publish(DEV.into(), "admin:a1998e/attrs", false).to_string();
    let headers = vec![
        ("vernemq-hook".to_string(), "auth_on_publish".to_string()),
        ("Content-Type".into(), "application/json".into()),
        ("Content-Length".into(), body.len().to_string()),
    ];
    // auth_on_publish registered at the on_publish URL would get `{}`, which crashes VerneMQ's session.
    let response = c.send("POST", "/vmq/on_publish", &headers, body.as_bytes()).await;
    assert_eq!(response.status, 400);
    assert!(response.json()["message"].as_str().unwrap().contains("vernemq.conf"));
    let response = c.send("POST", "/vmq/on_deliver", &headers, body.as_bytes()).await;
    assert_eq!(response.status, 404, "hooks we do not serve are not answered");
}

#[tokio::test]
async fn lifetime_and_client_id_policy_follow_configuration() {
    let app =
        spawn_app(&flags(&[("PLUGIN_DISC_LIFETIME_SESSION", "60000"), ("MAX_CONNECTION_LIFETIME_JITTER", "0")])).await;
    let mut c = app.client().await;
    let reply = call(&mut c, "auth_on_register", &register(DEV.into())).await;
    assert_eq!(reply["modifiers"]["max_connection_lifetime"], 60);

    let app =
        spawn_app(&flags(&[("MAX_CONNECTION_LIFETIME", "0"), ("CLIENT_ID_POLICY", "any"), ("MAX_MESSAGE_SIZE", "0")]))
            .await;
    let mut c = app.client().await;
    assert_eq!(call(&mut c, "auth_on_register_m5", &register(DEV.into())).await, json!({"result": "ok"}));

    let app = spawn_app(&flags(&[("CLIENT_ID_POLICY", "equal")])).await;
    let mut c = app.client().await;
    let deny: Value = serde_json::from_str(DENY).unwrap();
    assert_eq!(call(&mut c, "auth_on_register", &register(DEV.into())).await, deny, "client id c1 ≠ username");
    let mut same = register(DEV.into());
    same["client_id"] = DEV.into();
    let reply = call(&mut c, "auth_on_register", &same).await;
    assert_eq!(reply["result"], "ok");
    assert_eq!(reply["modifiers"].get("client_id"), None);

    // Lifetimes spread between 90 % and 110 %, and actually vary.
    let app = spawn_app(&[]).await;
    let mut c = app.client().await;
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..50 {
        let reply = call(&mut c, "auth_on_register", &register(DEV.into())).await;
        let lifetime = reply["modifiers"]["max_connection_lifetime"].as_u64().unwrap();
        assert!((1620..=1980).contains(&lifetime), "{lifetime}");
        seen.insert(lifetime);
    }
    assert!(seen.len() > 10, "jitter spreads lifetimes: {seen:?}");
}

#[tokio::test]
async fn service_identity_by_password() {
    let app = spawn_app(&flags(&[("MQTT_PASSWORD", "k2v-secret")])).await;
    let mut c = app.client().await;
    let mut req = register("k2v-bridge".into());
    req["password"] = "k2v-secret".into();
    assert_eq!(call(&mut c, "auth_on_register", &req).await, json!({"result": "ok"}));
    req["password"] = "wrong".into();
    assert_eq!(call(&mut c, "auth_on_register", &req).await["result"]["error"], "not_allowed");
    let service_publish = publish("k2v-bridge".into(), "admin:a1998e/config", false);
    assert_eq!(call(&mut c, "auth_on_publish", &service_publish).await["result"], "ok");
    let bad = publish("k2v-bridge".into(), "admin:a1998e/attrs", false);
    assert_eq!(call(&mut c, "auth_on_publish", &bad).await["result"]["error"], "not_allowed");
    assert_eq!(
        call(&mut c, "auth_on_subscribe", &subscribe("k2v-bridge", &["admin:a1998e/config"])).await["topics"][0]["qos"],
        128
    );
}

#[tokio::test]
async fn health_metrics_and_session_registry() {
    // The admin token only opens the listing through which the session registry is checked below.
    let app = spawn_app(&flags(&[("ADMIN_TOKEN", crate::sessions::ADMIN_TOKEN)])).await;
    let http = reqwest::Client::new();
    let live = http.get(app.url("/health/live")).send().await.unwrap();
    assert_eq!(live.status(), 200);
    let ready = http.get(app.url("/health/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 200, "ACL-only mode has no dependency to wait for");
    assert_eq!(ready.json::<Value>().await.unwrap()["ready"], true);

    let mut c = app.client().await;
    call(&mut c, "auth_on_publish", &publish(DEV.into(), "admin:a1998e/attrs", false)).await;
    call(&mut c, "auth_on_publish", &publish(DEV.into(), "admin:b/attrs", false)).await;
    call(&mut c, "auth_on_register", &register("admin:a1998e:x".into())).await;
    call(&mut c, "auth_on_register", &register("admin:a1998e:y".into())).await;
    c.hook("auth_on_publish", b"{").await;
    // The session registry: the admitted device is recorded under the session key its reply rewrote (`scoped`:
    // `<username>|<client id>`), on_register confirms that entry and on_client_gone drops it.
    let admitted = call(&mut c, "auth_on_register", &register(DEV.into())).await;
    assert_eq!(admitted["result"], "ok", "{admitted}");
    let key = ("".to_string(), "admin:a1998e|c1".to_string());
    let modifiers = &admitted["modifiers"];
    assert_eq!((modifiers["mountpoint"].as_str(), modifiers["client_id"].as_str()), (Some(""), Some(key.1.as_str())));
    assert_eq!(crate::sessions::listed(&app, DEV).await, vec![key.clone()], "recorded at auth_on_register");
    let on_register = json!({"peer_addr": "127.0.0.1", "peer_port": 1, "mountpoint": "", "client_id": "admin:a1998e|c1", "username": DEV});
    assert_eq!(call(&mut c, "on_register", &on_register).await, json!({}));
    assert_eq!(crate::sessions::listed(&app, DEV).await, vec![key], "still there once registered");

    let text = http.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    for line in [
        r#"iotagent_webhook_requests_total{hook="auth_on_publish",outcome="allow"} 1"#,
        r#"iotagent_webhook_requests_total{hook="auth_on_publish",outcome="deny"} 1"#,
        r#"iotagent_webhook_requests_total{hook="auth_on_publish",outcome="bad_request"} 1"#,
        r#"iotagent_webhook_requests_total{hook="on_register",outcome="notified"} 1"#,
        // Denials by reason, whatever the hook: VerneMQ only ever sees not_allowed.
        r#"iotagent_webhook_denied_total{reason="topic"} 1"#,
        r#"iotagent_webhook_denied_total{reason="invalid_identity"} 2"#,
        r#"iotagent_webhook_denied_total{reason="revoked"} 0"#,
    ] {
        assert!(text.contains(line), "missing {line} in\n{text}");
    }
    assert!(text.contains("iotagent_webhook_duration_seconds_bucket{hook=\"auth_on_publish\""), "{text}");
    let gone = json!({"mountpoint": "", "client_id": "admin:a1998e|c1"});
    assert_eq!(call(&mut c, "on_client_gone", &gone).await, json!({}));
    // Dropped only because on_register made it the registered connection (an admitted one is not a gone's to drop).
    assert_eq!(crate::sessions::listed(&app, DEV).await, vec![], "dropped at on_client_gone");
}

#[tokio::test]
async fn shutdown_returns_cleanly() {
    // The default (one thread, a current-thread runtime) and a multi-thread webhooks runtime.
    for threads in ["1", "3"] {
        let before = crate::common::threads_named("webhooks");
        let app = spawn_app(&flags(&[("WEBHOOK_THREADS", threads)])).await;
        let mut clients = Vec::new();
        for _ in 0..4 {
            let mut c = app.client().await;
            assert_eq!(call(&mut c, "auth_on_register", &register(DEV.into())).await["result"], "ok");
            clients.push(c);
        }
        // The webhooks run on threads of their own, as many as asked for: counted as the threads this app added (the
        // previous round's are gone once it stopped; under `cargo test` other tests' apps could add more, never fewer).
        let added = crate::common::threads_named("webhooks").saturating_sub(before);
        assert!(added >= threads.parse().unwrap(), "{added} webhooks threads for {threads}");
        drop(clients);
        app.stop().await.expect("clean stop");
    }
}
