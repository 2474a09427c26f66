//! K2V against real brokers: tansu (Kafka) and Mosquitto; devices are rumqttc clients with persistent sessions.
//! Fault tests are in `faults.rs`.

mod faults;
mod refusals;
mod renewal;
mod shutdown;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{Value, json};

use crate::common::brokers::{Mosquitto, Storage, Tansu, free_port};
use crate::common::process::ServiceProcess;
use crate::common::subscriber::Subscriber;
use crate::common::{K2V_PASSWORD, k2v_env, pki, start_app, wait_until};

const TOPIC_SUFFIX: &str = "dojot.device-manager.device";

fn topic(tenant: &str) -> String {
    format!("{tenant}.{TOPIC_SUFFIX}")
}

/// Mosquitto with the service user, and the port of its anonymous listener for devices (Mosquitto's password file
/// cannot hold `tenant:device` names).
fn mosquitto(extra: &str) -> (Mosquitto, u16) {
    let mqtt = Mosquitto::start_with(&[("k2v-bridge", K2V_PASSWORD)], extra);
    let device_port = mqtt.device_port;
    (mqtt, device_port)
}

fn producer(kafka: &Tansu) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", kafka.brokers())
        .set("linger.ms", "2")
        // Per-device order in a partition must survive producer retries.
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", "10000")
        .create()
        .expect("producer")
}

/// Produces one event keyed by device; returns (partition, offset).
async fn produce(producer: &FutureProducer, topic: &str, key: &str, value: &[u8]) -> (i32, i64) {
    let record = FutureRecord::to(topic).key(key).payload(value);
    let delivery = producer.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e).expect("produced");
    (delivery.partition, delivery.offset)
}

fn configure(tenant: &str, device: &str, attrs: Value) -> Vec<u8> {
    json!({"event": "configure", "meta": {"service": tenant, "timestamp": 1}, "data": {"id": device, "attrs": attrs}})
        .to_string()
        .into_bytes()
}

fn event(kind: &str, tenant: &str, device: &str) -> Vec<u8> {
    json!({"event": kind, "meta": {"service": tenant}, "data": {"id": device, "attrs": {"from": kind}}})
        .to_string()
        .into_bytes()
}

/// One series of the Prometheus text, which must be there.
fn metric(text: &str, series: &str) -> f64 {
    crate::common::metric(text, series).unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configure_events_reach_the_device_and_nothing_else_is_published() {
    let kafka = Tansu::start(Storage::Memory);
    kafka.create_topic(&topic("admin"), 1).await;
    let (mqtt, device_port) = mosquitto("");
    let device = Subscriber::connect(device_port, "admin:a1998e", "admin:a1998e", "admin:a1998e/config").await;
    let spy = Subscriber::connect(device_port, "spy", "spy", "#").await;
    let app = start_app(&k2v_env(&kafka, &mqtt.url(), "basic")).await;

    let p = producer(&kafka);
    let t = topic("admin");
    for value in [
        event("create", "admin", "a1998e"),
        event("update", "admin", "a1998e"),
        b"{not json".to_vec(),
        configure("admin", "a1998e", json!({"target": 21.5, "mode": "eco"})),
        event("remove", "admin", "other"),
        configure("admin", "bad/device", json!({"x": 1})),
        json!({"event": "configure", "meta": {"service": "admin"}, "data": {"id": "a1998e"}}).to_string().into_bytes(),
        configure("admin", "a1998e", json!({"target": 19})),
    ] {
        produce(&p, &t, "a1998e", &value).await;
    }

    assert!(wait_until(Duration::from_secs(15), async || device.count() >= 2).await, "device got both configurations");
    // Give anything wrongly published time to show up at the spy.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let expected = vec![
        ("admin:a1998e/config".to_string(), br#"{"mode":"eco","target":21.5}"#.to_vec()),
        ("admin:a1998e/config".to_string(), br#"{"target":19}"#.to_vec()),
    ];
    assert_eq!(device.received(), expected);
    assert_eq!(spy.received(), expected, "nothing else was published");

    let text = app.metrics().await;
    assert_eq!(metric(&text, "iotagent_k2v_consumed_total"), 8.0);
    assert_eq!(metric(&text, "iotagent_k2v_published_total"), 2.0);
    assert!(
        wait_until(Duration::from_secs(5), async || {
            metric(&app.metrics().await, "iotagent_k2v_acked_total") == 2.0
        })
        .await
    );
    assert!(
        wait_until(Duration::from_secs(5), async || { metric(&app.metrics().await, "iotagent_k2v_lag") == 0.0 }).await,
        "lag back to 0 once everything is acknowledged"
    );
    for (reason, n) in [("not_configure", 2.0), ("remove", 1.0), ("malformed", 2.0), ("invalid_device", 1.0)] {
        assert_eq!(metric(&text, &format!("iotagent_k2v_skipped_total{{reason=\"{reason}\"}}")), n, "{reason}");
    }
    let ready: Value = reqwest::get(app.url("/health/ready")).await.unwrap().json().await.unwrap();
    for probe in ["k2v_kafka", "k2v_mqtt"] {
        assert!(ready["checks"].as_array().unwrap().iter().any(|c| c["name"] == probe && c["up"] == true), "{ready}");
    }
    app.stop().await.expect("clean stop");
    // The offsets of all eight events were committed: skipped ones complete in order with the published ones.
    assert_eq!(committed(&kafka, "basic", &t, 1), vec![8]);
    device.stop().await;
    spy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_of_a_tenant_created_after_start_are_consumed() {
    let kafka = Tansu::start(Storage::Memory);
    kafka.create_topic(&topic("admin"), 1).await;
    let (mqtt, device_port) = mosquitto("");
    let device = Subscriber::connect(device_port, "acme:d1", "acme:d1", "acme:d1/config").await;
    let app = start_app(&k2v_env(&kafka, &mqtt.url(), "tenants")).await;

    kafka.create_topic(&topic("acme"), 2).await;
    let p = producer(&kafka);
    produce(&p, &topic("acme"), "d1", &configure("acme", "d1", json!({"on": true}))).await;
    assert!(wait_until(Duration::from_secs(20), async || device.count() >= 1).await, "new tenant's topic consumed");
    assert_eq!(device.received(), vec![("acme:d1/config".to_string(), br#"{"on":true}"#.to_vec())]);
    app.stop().await.expect("clean stop");
    device.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_publishes_over_mutual_tls() {
    let pki_dir = tempfile::tempdir().unwrap();
    let d = pki_dir.path();
    pki::write(d);
    let tls_port = free_port();
    let extra = format!(
        "listener {tls_port} 127.0.0.1\nallow_anonymous false\ncafile {d}/ca.pem\ncertfile {d}/server.pem\n\
         keyfile {d}/server.key\nrequire_certificate true\nuse_identity_as_username true\n",
        d = d.display()
    );
    let kafka = Tansu::start(Storage::Memory);
    kafka.create_topic(&topic("admin"), 1).await;
    let (_mqtt, device_port) = mosquitto(&extra);
    let device = Subscriber::connect(device_port, "admin:a1998e", "admin:a1998e", "admin:a1998e/config").await;
    let mut env = k2v_env(&kafka, &format!("mqtts://localhost:{tls_port}"), "tls");
    env.retain(|(k, _)| *k != "MQTT_PASSWORD");
    env.extend([
        ("MQTT_CA_FILE", d.join("ca.pem").display().to_string()),
        ("MQTT_CERT_FILE", d.join("k2v.pem").display().to_string()),
        ("MQTT_KEY_FILE", d.join("k2v.key").display().to_string()),
    ]);
    let app = start_app(&env).await;
    produce(&producer(&kafka), &topic("admin"), "a1998e", &configure("admin", "a1998e", json!({"tls": 1}))).await;
    assert!(wait_until(Duration::from_secs(15), async || device.count() >= 1).await, "configuration over TLS");
    assert_eq!(device.received(), vec![("admin:a1998e/config".to_string(), br#"{"tls":1}"#.to_vec())]);
    app.stop().await.expect("clean stop");
    device.stop().await;
}

/// The group's committed offsets of `partitions` partitions of `topic` (-1 when none).
fn committed(kafka: &Tansu, group: &str, topic: &str, partitions: i32) -> Vec<i64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka.brokers())
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("offset reader");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let offsets = consumer.committed_offsets(tpl, Duration::from_secs(10)).expect("committed offsets");
    (0..partitions)
        .map(|p| match offsets.find_partition(topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => o,
            _ => -1,
        })
        .collect()
}
