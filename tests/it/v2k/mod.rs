//! Device data into Kafka against a real Kafka-protocol broker (tansu) and, in subscription mode, Mosquitto.
//! Subscription mode and the tests that run the service as a separate process are in `subscription.rs`.

mod plain;
mod refused;
mod strict;
mod subscription;
mod tenants;

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine as _;
use serde_json::{Value, json};

use crate::common::brokers::{Mosquitto, Storage, Tansu};
use crate::common::process::ServiceProcess;
use crate::common::{RawClient, TestApp, start_app};

const DEV: &str = "admin:a1998e";

pub fn b64(payload: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(payload)
}

pub fn publish_body(username: &str, topic: &str, payload: &[u8], qos: u8) -> String {
    json!({"username": username, "mountpoint": "", "client_id": username, "qos": qos, "topic": topic,
           "payload": b64(payload), "retain": false})
    .to_string()
}

/// Creates the data and dead-letter topics of `tenants` (tansu does not create topics by itself).
pub async fn create_topics(kafka: &Tansu, tenants: &[&str]) {
    for tenant in tenants {
        kafka.create_topic(&format!("{tenant}.device-data"), 3).await;
        kafka.create_topic(&format!("{tenant}.device-data.dead-letter"), 1).await;
    }
}

/// The service with Kafka, in `on_publish` mode unless `extra` names another `V2K_MODE` (the webhook-mode tests
/// here call `on_publish`; strict mode is the binary's default).
async fn v2k_app(kafka: &Tansu, extra: &[(&str, &str)]) -> TestApp {
    let mut env = vec![("KAFKA_BROKERS", kafka.brokers()), ("V2K_DELIVERY_TIMEOUT_MS", "60000".to_string())];
    if !extra.iter().any(|(k, _)| *k == "V2K_MODE") {
        env.push(("V2K_MODE", "on_publish".to_string()));
    }
    env.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
    start_app(&env).await
}

/// The service in subscription mode through `mqtt` (where the service user's password is `svc-pass`), as
/// `client_id`.
fn subscription_env(kafka: &Tansu, mqtt: &Mosquitto, client_id: &str) -> Vec<(&'static str, String)> {
    vec![
        ("KAFKA_BROKERS", kafka.brokers()),
        ("V2K_MODE", "subscription".to_string()),
        ("MQTT_URL", mqtt.url()),
        ("MQTT_PASSWORD", "svc-pass".to_string()),
        ("MQTT_CLIENT_ID", client_id.to_string()),
        ("SERVICE_CLIENT_ID_PREFIX", "it-".to_string()),
    ]
}

/// `n` from the attrs of each record, per device key, in topic order.
fn sequence_by_device(records: &[crate::common::brokers::Record]) -> BTreeMap<String, Vec<u64>> {
    let mut out: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for r in records {
        out.entry(r.key.clone().unwrap_or_default()).or_default().push(r.json()["attrs"]["n"].as_u64().unwrap());
    }
    out
}

/// Lost and duplicated counts of `expected` (0..n per device) in what Kafka holds, with per-device order checked
/// on first occurrences.
fn lost_and_duplicates(seen: &BTreeMap<String, Vec<u64>>, expected: &BTreeMap<String, u64>) -> (usize, usize) {
    let (mut lost, mut duplicates) = (0, 0);
    for (device, n) in expected {
        let got = seen.get(device).cloned().unwrap_or_default();
        let mut first_seen = Vec::new();
        let mut set = std::collections::BTreeSet::new();
        for v in &got {
            if !set.insert(*v) {
                duplicates += 1;
            } else {
                first_seen.push(*v);
            }
        }
        lost += (0..*n).filter(|i| !set.contains(i)).count();
        let mut sorted = first_seen.clone();
        sorted.sort_unstable();
        assert_eq!(first_seen, sorted, "{device}: first deliveries out of order");
    }
    (lost, duplicates)
}

#[tokio::test]
async fn on_publish_produces_the_dojot_message_in_order() {
    let kafka = Tansu::start(Storage::Memory);
    create_topics(&kafka, &["admin", "acme"]).await;
    let app = v2k_app(&kafka, &[]).await;
    let mut client = app.client().await;

    let first = client
        .hook("on_publish", publish_body(DEV, "admin:a1998e/attrs", br#"{"attr_example": 10}"#, 1).as_bytes())
        .await;
    assert_eq!((first.status, first.json()), (200, json!({})));
    let stamped = br#"{"temperature": 21.5, "timestamp": "2026-11-25T10:00:00Z"}"#;
    client.hook("on_publish_m5", publish_body(DEV, "admin:a1998e/attrs", stamped, 1).as_bytes()).await;
    for n in 0..20 {
        let device = if n % 2 == 0 { "admin:a1998e" } else { "acme:x-1" };
        let body = publish_body(device, &format!("{device}/attrs"), format!(r#"{{"n": {n}}}"#).as_bytes(), n % 2);
        assert_eq!(client.hook("on_publish", body.as_bytes()).await.status, 200);
    }
    // Not device data: the service's own config publish, and a device publishing elsewhere.
    client.hook("on_publish", publish_body("k2v-bridge", "admin:a1998e/config", b"{\"c\":1}", 1).as_bytes()).await;
    client.hook("on_publish", publish_body(DEV, "admin:zzz/attrs", b"{\"x\":1}", 1).as_bytes()).await;

    let admin = kafka.read("admin.device-data", 12, Duration::from_secs(20)).await;
    assert_eq!(admin.len(), 12);
    assert_eq!(admin[0].key.as_deref(), Some(DEV));
    let v = admin[0].json();
    assert_eq!(v["metadata"]["deviceid"], "a1998e");
    assert_eq!(v["metadata"]["tenant"], "admin");
    assert!(v["metadata"]["timestamp"].as_u64().unwrap() > 1_700_000_000_000);
    assert_eq!(v["attrs"], json!({"attr_example": 10}));
    assert_eq!(admin[1].json()["metadata"]["timestamp"], 1_795_600_800_000u64);
    assert_eq!(admin[1].json()["attrs"], json!({"temperature": 21.5}));
    let partitions: std::collections::BTreeSet<i32> = admin.iter().map(|r| r.partition).collect();
    assert_eq!(partitions.len(), 1, "one key, one partition");
    let acme = kafka.read("acme.device-data", 10, Duration::from_secs(20)).await;
    let seen = sequence_by_device(&[&admin[2..], &acme[..]].concat());
    assert_eq!(seen[DEV], vec![0, 2, 4, 6, 8, 10, 12, 14, 16, 18]);
    assert_eq!(seen["acme:x-1"], vec![1, 3, 5, 7, 9, 11, 13, 15, 17, 19]);
    // Nothing more: the service's config publish and the foreign topic were not forwarded.
    assert!(kafka.read("admin.device-data", 13, Duration::from_secs(2)).await.len() == 12);
}

#[tokio::test]
async fn invalid_payloads_go_to_the_dead_letter_topic_with_their_reason() {
    let kafka = Tansu::start(Storage::Memory);
    create_topics(&kafka, &["admin"]).await;
    let app = v2k_app(&kafka, &[("V2K_MAX_PAYLOAD_BYTES", "100")]).await;
    let mut client = app.client().await;
    let cases: [(&[u8], &str); 4] =
        [(b"not json", "not_json"), (b"[1,2,3]", "not_object"), (b"42", "not_object"), (&[b'{'; 150], "too_large")];
    for (payload, _) in &cases {
        let reply = client.hook("on_publish", publish_body(DEV, "admin:a1998e/attrs", payload, 1).as_bytes()).await;
        assert_eq!(reply.status, 200, "the device is not punished for a bad payload");
    }
    let bad_base64 = json!({"username": DEV, "mountpoint": "", "client_id": DEV, "qos": 1,
        "topic": "admin:a1998e/attrs", "payload": "***", "retain": false});
    client.hook("on_publish", bad_base64.to_string().as_bytes()).await;

    let letters = kafka.read("admin.device-data.dead-letter", 5, Duration::from_secs(20)).await;
    assert_eq!(letters.len(), 5);
    for (letter, (payload, reason)) in letters.iter().zip(cases.iter()) {
        assert_eq!(letter.header("reason"), Some(*reason));
        assert_eq!(letter.header("mqtt_topic"), Some("admin:a1998e/attrs"));
        assert_eq!(letter.value, *payload, "payload kept as sent");
        assert_eq!(letter.key.as_deref(), Some(DEV));
    }
    assert_eq!(letters[4].header("reason"), Some("bad_encoding"));
    assert!(kafka.read("admin.device-data", 1, Duration::from_secs(1)).await.is_empty());

    let metrics = reqwest::get(app.url("/metrics")).await.unwrap().text().await.unwrap();
    assert!(metrics.contains(r#"iotagent_v2k_dead_lettered_total{reason="not_object"} 2"#), "{metrics}");
}

#[tokio::test]
async fn strict_mode_answers_ok_only_after_the_ack_and_error_while_kafka_is_down() {
    let mut kafka = Tansu::start(Storage::Memory);
    create_topics(&kafka, &["admin"]).await;
    let app = v2k_app(&kafka, &[("V2K_MODE", "auth_on_publish"), ("V2K_ACK_TIMEOUT_MS", "1000")]).await;
    let mut client = app.client().await;
    let body = publish_body(DEV, "admin:a1998e/attrs", br#"{"n": 0}"#, 1);
    let reply = client.hook("auth_on_publish", body.as_bytes()).await;
    assert_eq!(reply.json(), json!({"result": "ok"}));
    assert_eq!(reply.header("cache-control"), None, "strict mode must see every message");
    assert_eq!(kafka.read("admin.device-data", 1, Duration::from_secs(10)).await.len(), 1);

    kafka.stop();
    let reply = client.hook("auth_on_publish", body.as_bytes()).await;
    assert_eq!(reply.json(), json!({"result": {"error": "unavailable"}}), "no ack, no PUBACK");
    // Denials by the rules are still plain denials.
    let other = publish_body(DEV, "admin:b/attrs", b"{}", 1);
    assert_eq!(client.hook("auth_on_publish", other.as_bytes()).await.json()["result"]["error"], "not_allowed");
}

#[tokio::test]
async fn gate_refuses_device_publishes_while_kafka_is_down() {
    let mut kafka = Tansu::start(Storage::Memory);
    create_topics(&kafka, &["admin"]).await;
    let app = v2k_app(&kafka, &[("V2K_GATE", "on")]).await;
    let mut client = app.client().await;
    let body = publish_body(DEV, "admin:a1998e/attrs", b"{}", 1);
    let reply = client.hook("auth_on_publish", body.as_bytes()).await;
    assert_eq!(reply.json(), json!({"result": "ok"}));
    assert_eq!(reply.header("cache-control"), None, "the gate must see every message");
    kafka.stop();
    let closed = crate::common::wait_until(Duration::from_secs(15), async || {
        client.hook("auth_on_publish", body.as_bytes()).await.json()["result"] != "ok"
    })
    .await;
    assert!(closed, "the gate closes when Kafka is unreachable");
    let ready = reqwest::get(app.url("/health/ready")).await.unwrap();
    assert_eq!(ready.status(), 503);
    kafka.restart();
    let open = crate::common::wait_until(Duration::from_secs(20), async || {
        client.hook("auth_on_publish", body.as_bytes()).await.json()["result"] == "ok"
    })
    .await;
    assert!(open, "the gate opens again");
}

/// V2K_GATE_MAX_QUEUE: the gate also closes while more records than the bound wait for Kafka, whichever tenant they
/// belong to (here another tenant's, far below its own bound), and opens again once Kafka took them. A 2 s linger
/// holds the records in the producer; QoS 0 on_publish calls queue them without waiting.
#[tokio::test]
async fn the_gate_closes_while_more_than_v2k_gate_max_queue_records_wait_then_opens() {
    let kafka = Tansu::start(Storage::Memory);
    create_topics(&kafka, &["admin", "acme"]).await;
    let app = v2k_app(&kafka, &[("V2K_GATE", "on"), ("V2K_GATE_MAX_QUEUE", "10"), ("KAFKA_LINGER_MS", "2000")]).await;
    let mut client = app.client().await;
    let probe = publish_body(DEV, "admin:a1998e/attrs", b"{}", 1);
    assert_eq!(client.hook("auth_on_publish", probe.as_bytes()).await.json()["result"], "ok", "open at start");
    for n in 0..15 {
        let body = publish_body("acme:x-1", "acme:x-1/attrs", format!(r#"{{"n": {n}}}"#).as_bytes(), 0);
        assert_eq!(client.hook("on_publish", body.as_bytes()).await.status, 200);
    }
    let reply = client.hook("auth_on_publish", probe.as_bytes()).await;
    assert_eq!(reply.json(), json!({"result": {"error": "unavailable"}}), "15 records wait, the bound is 10");
    let open = crate::common::wait_until(Duration::from_secs(20), async || {
        client.hook("auth_on_publish", probe.as_bytes()).await.json()["result"] == "ok"
    })
    .await;
    assert!(open, "the gate opens again once Kafka took the records");
    assert_eq!(kafka.read("acme.device-data", 15, Duration::from_secs(10)).await.len(), 15);
}

/// Publishes `per_device` messages for each device, sequentially per device like a VerneMQ session, devices in
/// parallel; returns how many messages were answered ok (with `retry`, a refused one is sent again 100 ms later until
/// it is, as a device does). `hook` is the webhook called, or `gate`: auth_on_publish until it allows the message,
/// then on_publish once, whatever that answers (VerneMQ acknowledges the device either way).
async fn stream(app: &TestApp, hook: &'static str, devices: &[String], per_device: u64, retry: bool) -> u64 {
    let mut tasks = Vec::new();
    for device in devices {
        let device = device.clone();
        let addr = app.addr;
        tasks.push(tokio::spawn(async move {
            let mut client = RawClient::connect(addr).await;
            let mut answered = 0;
            for n in 0..per_device {
                let body = publish_body(&device, &format!("{device}/attrs"), format!(r#"{{"n": {n}}}"#).as_bytes(), 1);
                loop {
                    let ok = match hook {
                        "on_publish" => client.hook(hook, body.as_bytes()).await.status == 200,
                        "gate" => {
                            let allowed =
                                client.hook("auth_on_publish", body.as_bytes()).await.json()["result"] == "ok";
                            if allowed {
                                client.hook("on_publish", body.as_bytes()).await;
                            }
                            allowed
                        }
                        _ => {
                            let reply = client.hook(hook, body.as_bytes()).await;
                            reply.status == 200 && reply.json()["result"] == "ok"
                        }
                    };
                    if ok {
                        answered += 1;
                        break;
                    }
                    if !retry {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            answered
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    total
}

/// Four devices stream `per_device` QoS 1 messages each while Kafka (SQLite storage) is killed 0.7 s in and
/// restarted 3 s later. Checks that the outage hit calls in flight (by the mode's own counters of what it did about
/// them), that nothing answered is missing from Kafka, and bounds the duplicates by what the mode can write twice.
async fn fault_run(hook: &'static str, extra: &[(&str, &str)], retry: bool, per_device: u64) {
    let mut kafka = Tansu::start(Storage::Sqlite);
    create_topics(&kafka, &["admin"]).await;
    let app = v2k_app(&kafka, extra).await;
    let devices: Vec<String> = (0..4).map(|i| format!("admin:dev{i}")).collect();
    let streaming = {
        let devices = devices.clone();
        let app_ref = &app;
        async move { stream(app_ref, hook, &devices, per_device, retry).await }
    };
    let fault = async {
        tokio::time::sleep(Duration::from_millis(700)).await;
        kafka.stop();
        tokio::time::sleep(Duration::from_secs(3)).await;
        kafka.restart();
    };
    let (answered, ()) = tokio::join!(streaming, fault);
    let expected: BTreeMap<String, u64> = devices.iter().map(|d| (d.clone(), per_device)).collect();
    let total = (devices.len() as u64 * per_device) as usize;
    let mut records = kafka.read("admin.device-data", total, Duration::from_secs(60)).await;
    // Keep reading a little longer: duplicates arrive after the count is reached.
    let all = kafka.read("admin.device-data", usize::MAX, Duration::from_secs(3)).await;
    if all.len() > records.len() {
        records = all;
    }
    let (lost, duplicates) = lost_and_duplicates(&sequence_by_device(&records), &expected);
    let text = crate::common::metrics_text(&app.url("")).await;
    let count = |series: &str| crate::common::metric(&text, series).unwrap_or(0.0) as usize;
    let refused = count(r#"iotagent_webhook_requests_total{hook="auth_on_publish",outcome="unavailable"}"#);
    let before_ack = count("iotagent_v2k_answered_before_ack_total");
    println!(
        "{hook} {extra:?}: answered {answered}, in Kafka {}, lost {lost}, duplicates {duplicates}, refused {refused}, \
         answered before the ack {before_ack}",
        records.len()
    );
    assert_eq!(answered, total as u64, "every publish was answered (after retries where the mode refuses)");
    assert_eq!(lost, 0, "an answered publish is missing from Kafka");
    match hook {
        // Strict: a call not answered ok within the ack deadline is refused and its record may still reach Kafka
        // later (it stays queued), while the device sends the message again: each refusal adds one record at most.
        "auth_on_publish" => {
            assert!(refused > 0, "no call was refused: the outage hit nothing in flight");
            assert!(duplicates <= refused, "{duplicates} duplicates for {refused} refused calls");
        }
        // on_publish: every message is called once and queued once; a call that Kafka did not ack within the deadline
        // is answered anyway and its record kept queued. Only the producer could write a record twice, and its
        // idempotence (sequence numbers, kept by tansu across the restart) prevents that.
        "on_publish" => {
            assert!(before_ack > 0, "no call was answered before its ack: the outage hit nothing in flight");
            assert_eq!(duplicates, 0, "a message called once reached Kafka twice");
        }
        // The gate: a refused message is sent again but was never queued; an allowed one is queued once by
        // on_publish. As in on_publish mode, nothing can be written twice.
        "gate" => {
            assert!(refused > 0, "the gate never closed during the outage");
            assert!(before_ack > 0, "no on_publish was answered before its ack: the outage hit nothing in flight");
            assert_eq!(duplicates, 0, "a message queued once reached Kafka twice");
        }
        other => panic!("no such hook {other}"),
    }
}

#[tokio::test]
async fn on_publish_mode_loses_nothing_when_kafka_restarts_mid_stream() {
    fault_run("on_publish", &[("V2K_ACK_TIMEOUT_MS", "500")], false, 300).await;
}

#[tokio::test]
async fn strict_mode_loses_nothing_when_kafka_restarts_mid_stream() {
    fault_run("auth_on_publish", &[("V2K_MODE", "auth_on_publish"), ("V2K_ACK_TIMEOUT_MS", "500")], true, 300).await;
}

/// The gate (on_publish mode, V2K_GATE=on) with devices that send a refused publish again, as VerneMQ's do: README
/// says 0 lost for a Kafka outage. The gate closes when a health check fails (every 2 s, each up to 2 s) or when
/// V2K_GATE_MAX_QUEUE records wait: the small bound makes it close within the 3 s outage whichever comes first.
#[tokio::test]
async fn gate_mode_loses_nothing_when_kafka_restarts_mid_stream() {
    // Two calls per message: fewer messages keep the run short; the stream still outlasts the outage.
    let gate = [("V2K_GATE", "on"), ("V2K_GATE_MAX_QUEUE", "10"), ("V2K_ACK_TIMEOUT_MS", "500")];
    fault_run("gate", &gate, true, 100).await;
}

#[tokio::test]
async fn shutdown_flushes_what_was_answered() {
    let kafka = Tansu::start(Storage::Memory);
    create_topics(&kafka, &["admin"]).await;
    let app = v2k_app(&kafka, &[("KAFKA_LINGER_MS", "2000")]).await;
    let mut client = app.client().await;
    // QoS 0 is answered at once, long before the 2 s linger sends it: only the flush at shutdown delivers it.
    for n in 0..200 {
        let body = publish_body(DEV, "admin:a1998e/attrs", format!(r#"{{"n": {n}}}"#).as_bytes(), 0);
        assert_eq!(client.hook("on_publish", body.as_bytes()).await.status, 200);
    }
    drop(client);
    app.stop().await.unwrap();
    let records = kafka.read("admin.device-data", 200, Duration::from_secs(20)).await;
    let seen = sequence_by_device(&records);
    assert_eq!(seen[DEV], (0..200).collect::<Vec<_>>());
}
