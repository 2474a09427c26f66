//! Attacks 1 and 6, against real brokers: K2V across tenants, and dead letters too large for Kafka.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;

use crate::common::brokers::{Mosquitto, Storage, Tansu};
use crate::common::subscriber::Subscriber;
use crate::common::{K2V_PASSWORD, RawClient, k2v_env, start_app, wait_until};

const SUFFIX: &str = "dojot.device-manager.device";

/// Attack 1: an event on `evil.<suffix>` naming tenant `admin` is skipped and counted, never published to an admin
/// device; the same event on admin's own topic is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k2v_events_act_only_on_their_topics_tenant() {
    let kafka = Tansu::start(Storage::Memory);
    for tenant in ["evil", "admin"] {
        kafka.create_topic(&format!("{tenant}.{SUFFIX}"), 1).await;
    }
    let mqtt = Mosquitto::start(&[("k2v-bridge", K2V_PASSWORD)]);
    let spy = Subscriber::connect(mqtt.device_port, "spy", "spy", "#").await;
    let app = start_app(&k2v_env(&kafka, &mqtt.url(), "trust")).await;

    let producer: FutureProducer =
        ClientConfig::new().set("bootstrap.servers", kafka.brokers()).create().expect("producer");
    let send = async |tenant: &str, event: serde_json::Value| {
        let topic = format!("{tenant}.{SUFFIX}");
        let value = event.to_string();
        producer.send(FutureRecord::<str, str>::to(&topic).payload(&value), Duration::from_secs(10)).await.unwrap();
    };
    let attack = |from: &str| json!({"event": "configure", "meta": {"service": "admin"}, "data": {"id": "a1", "attrs": {"from": from}}});
    send("evil", attack("evil")).await;
    send("evil", json!({"event": "remove", "meta": {"service": "admin"}, "data": {"id": "a1"}})).await;
    send("admin", attack("admin")).await;
    let delivered = wait_until(Duration::from_secs(20), async || spy.count() > 0).await;
    assert!(delivered, "admin's own event published");
    let skipped = wait_until(Duration::from_secs(10), async || {
        app.metrics().await.contains(r#"iotagent_k2v_skipped_total{reason="tenant_mismatch"} 2"#)
    })
    .await;
    assert!(skipped, "both events from evil's topic skipped and counted as tenant_mismatch");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(spy.received(), vec![("admin:a1/config".to_string(), br#"{"from":"admin"}"#.to_vec())]);
    // Stopped while Kafka still runs: K2V's close would otherwise wait on a broker the test already removed.
    app.stop().await.expect("clean stop");
}

/// Attack 6: a payload far over V2K_MAX_PAYLOAD_BYTES is dead-lettered cut to V2K_DEAD_LETTER_MAX_BYTES (default
/// 256 KiB, under Kafka's 1 MiB record limit), with its original size and digest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_dead_letter_still_lands() {
    let kafka = Tansu::start(Storage::Memory);
    kafka.create_topic("admin.device-data", 1).await;
    kafka.create_topic("admin.device-data.dead-letter", 1).await;
    let brokers = kafka.brokers();
    let app = start_app(&[("KAFKA_BROKERS", brokers), ("WEBHOOK_MAX_BODY_BYTES", "8388608".into())]).await;
    // No two 256 KiB windows alike ("0,1,2,…"): only a cut keeping exactly the first bytes matches below.
    let payload: Vec<u8> = (0..).flat_map(|n: u32| format!("{n},").into_bytes()).take(3 * 1024 * 1024).collect();
    let body = crate::v2k::publish_body("admin:a1998e", "admin:a1998e/attrs", &payload, 1);
    let mut client: RawClient = app.client().await;
    let reply = client.hook("auth_on_publish", body.as_bytes()).await;
    assert_eq!(reply.json()["result"], "ok", "the device's publish is taken (as a dead letter)");
    let records = kafka.read("admin.device-data.dead-letter", 1, Duration::from_secs(20)).await;
    let [record] = records.as_slice() else { panic!("one dead letter, got {}", records.len()) };
    // V2K_DEAD_LETTER_MAX_BYTES' default: the payload's first 256 KiB, byte for byte.
    let kept = 256 * 1024;
    assert_eq!(record.value.len(), kept, "dead letter of {} bytes", record.value.len());
    assert!(record.value == payload[..kept], "the dead letter is not the payload's first {kept} bytes");
    assert_eq!(record.header("reason"), Some("too_large"));
    assert_eq!(record.header("original_size"), Some(payload.len().to_string().as_str()));
    let digest: String = openssl::sha::sha256(&payload).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(record.header("sha256"), Some(digest.as_str()));
}
