//! Device-manager `remove`/`create` events through tansu and the real reader (`kafka/removed.rs`): a connected removed
//! device is disconnected and refused, `create` lets it back, a foreign tenant's event and malformed ones change
//! nothing, and a fresh instance replays the history.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;

use super::*;
use crate::common::brokers::{Storage, Tansu};
use crate::common::process::ServiceProcess;
use crate::common::{flags, spawn_app, start_app};

const TOPIC: &str = "admin.dojot.device-manager.device";

async fn produce(kafka: &Tansu, topic: &str, value: &[u8]) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka.brokers())
        .set("message.timeout.ms", "10000")
        .create()
        .expect("producer");
    // Keyed by device, as the device manager does: a device's events stay in order on one partition. Unkeyed, a
    // `remove` and the `create` after it could land on different partitions and replay in either order.
    let device = serde_json::from_slice::<serde_json::Value>(value)
        .ok()
        .and_then(|v| v["data"]["id"].as_str().map(String::from));
    let mut record = FutureRecord::<str, [u8]>::to(topic).payload(value);
    if let Some(device) = &device {
        record = record.key(device.as_str());
    }
    producer.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e).expect("produced");
}

fn event(kind: &str, tenant: &str, device: &str) -> Vec<u8> {
    json!({"event": kind, "meta": {"service": tenant}, "data": {"id": device, "attrs": {}}}).to_string().into_bytes()
}

fn env(kafka: &Tansu, recorder: &Recorder) -> Vec<(&'static str, String)> {
    let mut env = session_env(recorder);
    // These tenants have device-manager topics but no data topic: V2K's tenant check is not what is tested here.
    env.extend([
        ("KAFKA_BROKERS", kafka.brokers()),
        ("K2V_METADATA_REFRESH_MS", "500".into()),
        ("V2K_REQUIRE_TENANT_TOPIC", "false".into()),
    ]);
    env
}

/// Registers `device` with its own name as client id; whether it was let in, and its session key.
async fn connect(client: &mut RawClient, device: &str) -> (bool, (String, String)) {
    let reply = register(client, device, "", device, None).await;
    let key = session_key(&reply, "", device);
    (allowed(&reply), key)
}

#[tokio::test]
async fn remove_disconnects_and_refuses_create_restores_and_a_fresh_instance_replays() {
    let kafka = Tansu::start(Storage::Memory);
    kafka.create_topic(TOPIC, 2).await;
    kafka.create_topic("other.dojot.device-manager.device", 1).await;
    // History from before the service started: replayed at start.
    produce(&kafka, TOPIC, &event("remove", "admin", "old1")).await;

    let recorder = Recorder::start().await;
    let env = env(&kafka, &recorder);
    let app = start_app(&env).await;
    let report: serde_json::Value = reqwest::get(app.url("/health/ready")).await.unwrap().json().await.unwrap();
    assert!(report["checks"].as_array().unwrap().contains(&json!({"name": "removed_devices", "up": true})));
    let base = app.url("");
    let mut client = app.client().await;
    assert!(!connect(&mut client, "admin:old1").await.0, "removed before the start: refused once ready");

    let (ok, key) = connect(&mut client, DEVICE).await;
    assert!(ok);
    let (ok, other) = connect(&mut client, "other:dev2").await;
    assert!(ok);

    produce(&kafka, TOPIC, &event("remove", "admin", "a1998e")).await;
    let calls = recorder.wait_for(1, Duration::from_secs(15)).await;
    assert_eq!(calls.len(), 1, "{calls:?}");
    calls[0].assert_disconnect(&key.0, &key.1);
    assert!(!connect(&mut client, DEVICE).await.0, "removed: refused");
    let text = metrics_text(&base).await;
    assert_eq!(metric(&text, r#"iotagent_register_refused_total{reason="removed"}"#), 2.0, "{text}");

    // An event on admin's topic naming another tenant: whoever writes one tenant's topic cannot touch another's.
    produce(&kafka, TOPIC, &event("remove", "other", "dev2")).await;
    // Malformed events of every kind: counted and skipped.
    for bad in [&b"not json"[..], b"", br#"{"event":"remove"}"#, br#"{"event":"remove","meta":{"service":"admin"}}"#] {
        produce(&kafka, TOPIC, bad).await;
    }
    produce(&kafka, TOPIC, &event("remove", "admin", "a:b")).await;
    let counted = crate::common::wait_until(Duration::from_secs(15), async || {
        let text = metrics_text(&base).await;
        metric(&text, r#"iotagent_removed_events_skipped_total{reason="tenant_mismatch"}"#) == 1.0
            && metric(&text, r#"iotagent_removed_events_skipped_total{reason="malformed"}"#) == 4.0
            && metric(&text, r#"iotagent_removed_events_skipped_total{reason="invalid_device"}"#) == 1.0
    })
    .await;
    assert!(counted, "{}", metrics_text(&base).await);
    assert!(connect(&mut client, "other:dev2").await.0, "the mismatched event changed nothing");
    assert_eq!(listed(&app, "other:dev2").await, vec![other]);

    produce(&kafka, TOPIC, &event("create", "admin", "a1998e")).await;
    let back = crate::common::wait_until(Duration::from_secs(15), async || connect(&mut client, DEVICE).await.0).await;
    assert!(back, "create lets the device in again");
    assert_eq!(recorder.settled(Duration::from_millis(500)).await.len(), 1, "one disconnect in all");
    assert_eq!(reqwest::get(app.url("/health/live")).await.unwrap().status(), 200);

    // A fresh process reads the whole history from the beginning: old1 stays removed, a1998e was re-created.
    let mut process_env = env.clone();
    process_env.push(("MQTT_CLIENT_ID", "iotagent-mqtt-it-second".into()));
    let second = ServiceProcess::start(&process_env);
    second.wait_ready().await;
    let mut second_client = RawClient::connect(([127, 0, 0, 1], second.port).into()).await;
    assert!(!connect(&mut second_client, "admin:old1").await.0);
    assert!(connect(&mut second_client, DEVICE).await.0);
    assert!(connect(&mut second_client, "other:dev2").await.0);
    let text = metrics_text(&second.url("")).await;
    assert_eq!(metric(&text, r#"iotagent_removed_events_skipped_total{reason="tenant_mismatch"}"#), 1.0, "{text}");
}

/// Kafka unreachable at start: the history cannot be replayed, so the instance reports `removed_devices` not ready,
/// and devices are let through meanwhile (README: a removed device admitted then is disconnected as soon as its
/// `remove` event is read).
#[tokio::test]
async fn until_the_history_is_read_the_instance_is_not_ready_and_devices_are_let_through() {
    let closed = format!("127.0.0.1:{}", crate::common::brokers::free_port());
    let recorder = Recorder::start().await;
    let mut env = session_env(&recorder);
    env.push(("KAFKA_BROKERS", closed));
    let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let app = spawn_app(&flags(&pairs)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let response = reqwest::get(app.url("/health/ready")).await.unwrap();
    assert_eq!(response.status(), 503);
    let report: serde_json::Value = response.json().await.unwrap();
    let check = report["checks"].as_array().unwrap().iter().find(|c| c["name"] == "removed_devices").cloned().unwrap();
    assert_eq!(check["up"], false, "{report}");
    let reason = check["reason"].as_str().unwrap_or_default();
    assert!(reason.starts_with("reading the device-manager events Kafka held at start"), "{report}");
    let mut client = app.client().await;
    assert!(connect(&mut client, DEVICE).await.0);
    assert_eq!(reqwest::get(app.url("/health/live")).await.unwrap().status(), 200);
}

/// The README's promise for the start-up replay: a device removed before the start, let through while Kafka cannot
/// be read yet, is recorded like any other and closed as soon as the reader reads its `remove` event; a device let
/// through alongside it that was not removed stays.
#[tokio::test]
async fn a_removed_device_let_in_during_the_replay_is_closed_once_its_remove_is_read() {
    // The history (the removal) is in Kafka before the start, which then goes away (SQLite: it keeps the history).
    let mut kafka = Tansu::start(Storage::Sqlite);
    kafka.create_topic(TOPIC, 1).await;
    produce(&kafka, TOPIC, &event("remove", "admin", "a1998e")).await;
    kafka.stop();

    let recorder = Recorder::start().await;
    let env = env(&kafka, &recorder);
    let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let app = spawn_app(&flags(&pairs)).await;
    let removed_devices_up = async || {
        let report: serde_json::Value = reqwest::get(app.url("/health/ready")).await.unwrap().json().await.unwrap();
        report["checks"].as_array().unwrap().iter().any(|c| c["name"] == "removed_devices" && c["up"] == true)
    };
    assert!(!removed_devices_up().await, "the history cannot have been read: Kafka is down");
    let mut client = app.client().await;
    let (ok, key) = connect(&mut client, DEVICE).await;
    assert!(ok, "let through during the replay");
    let (ok, bystander) = connect(&mut client, "admin:b2c3d4").await;
    assert!(ok);
    assert_eq!(listed(&app, DEVICE).await, vec![key.clone()], "recorded like any other");
    assert!(recorder.calls().is_empty(), "nothing is known to be removed yet");

    kafka.restart();
    assert!(
        wait_until(Duration::from_secs(40), removed_devices_up).await,
        "removed_devices ready once the history is read"
    );
    let calls = recorder.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(calls.len(), 1, "{calls:?}");
    calls[0].assert_disconnect(&key.0, &key.1);
    assert!(!connect(&mut client, DEVICE).await.0, "removed: refused now");
    let forgotten = wait_until(Duration::from_secs(5), async || listed(&app, DEVICE).await.is_empty()).await;
    assert!(forgotten, "the closed session is dropped from the registry");
    assert_eq!(recorder.settled(Duration::from_millis(500)).await.len(), 1, "one disconnect, none for the bystander");
    assert_eq!(listed(&app, "admin:b2c3d4").await, vec![bystander]);
}
