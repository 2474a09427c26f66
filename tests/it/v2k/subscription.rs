//! V2K subscription mode (through Mosquitto) and the service as a separate process: SIGKILL and SIGTERM mid-stream,
//! Kafka restarts, several instances sharing the group.

use super::*;

/// A device publishes `{"n": n}` for each n to its attrs topic at QoS 1, `pause` apart.
pub(super) async fn publish_numbered(device: &rumqttc::AsyncClient, numbers: std::ops::Range<u64>, pause: Duration) {
    for n in numbers {
        device
            .publish("admin:a1998e/attrs", rumqttc::QoS::AtLeastOnce, false, format!(r#"{{"n": {n}}}"#))
            .await
            .unwrap();
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
}

fn value_n(v: &Value) -> u64 {
    v["attrs"]["n"].as_u64().unwrap()
}

#[tokio::test]
async fn subscription_mode_forwards_device_publishes_through_the_shared_subscription() {
    let kafka = Tansu::start(Storage::Memory);
    create_topics(&kafka, &["admin"]).await;
    let mqtt = Mosquitto::start(&[("k2v-bridge", "svc-pass"), (DEV, "dev-pass")]);
    let app = v2k_app(
        &kafka,
        &[
            ("V2K_MODE", "subscription"),
            ("MQTT_URL", &mqtt.url()),
            ("MQTT_PASSWORD", "svc-pass"),
            ("MQTT_CLIENT_ID", "it-sub"),
            ("SERVICE_CLIENT_ID_PREFIX", "it-"),
        ],
    )
    .await;
    // The subscription runs on a thread of its own, not on the runtime K2V and the rest share (its CPU per message).
    // (Under `cargo test` another test's app could hold such a thread too; under nextest this process is this test's.)
    assert!(crate::common::threads_named("v2k-subscriber") >= 1, "no v2k-subscriber thread");
    let device = crate::common::mqtt_client(&mqtt, DEV, "dev-pass", "dev-1", true).await;
    publish_numbered(&device, 0..50, Duration::ZERO).await;
    let records = kafka.read("admin.device-data", 50, Duration::from_secs(20)).await;
    assert_eq!(records.iter().map(|r| value_n(&r.json())).collect::<Vec<_>>(), (0..50).collect::<Vec<_>>());
    assert_eq!(records[0].key.as_deref(), Some(DEV));
    drop(app);
}

/// The subscription's window in the fault tests (V2K_MAX_IN_FLIGHT, its Receive Maximum): the broker has at most this
/// many messages handed to the service and not acknowledged, so a connection lost sends at most this many again.
const FAULT_WINDOW: usize = 200;

/// A device publishes `total` QoS 1 messages while `fault` runs; checks that Kafka holds each, and no more than
/// `max_duplicates` twice.
async fn subscription_fault(
    total: u64,
    max_duplicates: usize,
    fault: impl AsyncFnOnce(&mut Tansu, ServiceProcess, &[(&str, String)]) -> ServiceProcess,
) {
    let mut kafka = Tansu::start(Storage::Sqlite);
    create_topics(&kafka, &["admin"]).await;
    let mqtt = Mosquitto::start(&[("k2v-bridge", "svc-pass")]);
    let mut env = subscription_env(&kafka, &mqtt, "it-fault");
    env.extend([
        // Longer than the outage: tansu does not support the idempotent producer's epoch bump (KIP-360) that
        // librdkafka needs after a delivery timeout, so expiring during the outage would wedge this producer.
        ("V2K_DELIVERY_TIMEOUT_MS", "60000".to_string()),
        // Records wait this long in the producer before they are sent: had a message been acknowledged to the broker
        // on receipt rather than after Kafka's ack, a kill would lose every one still lingering (about half a second
        // of the stream), not one or two.
        ("KAFKA_LINGER_MS", "500".to_string()),
        // Above what half a second of the stream holds (the device publishes about 250 a second), so the linger
        // does not throttle it; small enough to bound the duplicates well below what was published before a fault.
        ("V2K_MAX_IN_FLIGHT", FAULT_WINDOW.to_string()),
    ]);
    // The group's subscription must exist before the device publishes: the broker routes nothing to a group that
    // does not exist yet.
    let service = ServiceProcess::start(&env);
    service.wait_ready().await;
    let device = crate::common::mqtt_client(&mqtt, DEV, "", "dev-fault", true).await;
    let publisher = tokio::spawn(async move {
        publish_numbered(&device, 0..total, Duration::from_millis(3)).await;
        device
    });
    // The service that runs after the fault keeps running while Kafka is read back.
    let _service = fault(&mut kafka, service, &env).await;
    let _device = publisher.await.unwrap();
    let records = kafka.read("admin.device-data", total as usize, Duration::from_secs(60)).await;
    let all = kafka.read("admin.device-data", usize::MAX, Duration::from_secs(3)).await;
    let records = if all.len() > records.len() { all } else { records };
    let expected = BTreeMap::from([(DEV.to_string(), total)]);
    let (lost, duplicates) = lost_and_duplicates_unordered(&sequence_by_device(&records), &expected);
    println!("subscription fault: published {total}, in Kafka {}, lost {lost}, duplicates {duplicates}", records.len());
    assert_eq!(lost, 0, "a message the broker handed to the service is missing from Kafka");
    assert!(duplicates <= max_duplicates, "{duplicates} duplicates, at most {max_duplicates} expected");
}

/// Like `lost_and_duplicates`, for redeliveries that may come after newer messages (the broker resends unacked
/// messages on reconnect).
pub(super) fn lost_and_duplicates_unordered(
    seen: &BTreeMap<String, Vec<u64>>,
    expected: &BTreeMap<String, u64>,
) -> (usize, usize) {
    let (mut lost, mut duplicates) = (0, 0);
    for (device, n) in expected {
        let got = seen.get(device).cloned().unwrap_or_default();
        let set: std::collections::BTreeSet<u64> = got.iter().copied().collect();
        duplicates += got.len() - set.len();
        lost += (0..*n).filter(|i| !set.contains(i)).count();
    }
    (lost, duplicates)
}

/// Duplicates: the broker sends again what it handed to the killed service and had no acknowledgement for, at most
/// the window; the SIGTERMed one drains (acknowledges what Kafka took) and adds none. About 450 messages are published
/// before the kill (about 250 a second): resending everything since the start would exceed the window.
#[tokio::test]
async fn subscription_mode_loses_nothing_when_the_service_is_killed() {
    subscription_fault(1000, FAULT_WINDOW, async |_kafka, service, env| {
        tokio::time::sleep(Duration::from_millis(2000)).await;
        service.kill();
        tokio::time::sleep(Duration::from_millis(800)).await;
        let service = ServiceProcess::start(env);
        service.wait_ready().await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        // A clean stop at the end: SIGTERM drains and exits 0.
        assert!(service.terminate().success());
        let service = ServiceProcess::start(env);
        service.wait_ready().await;
        service
    })
    .await;
}

/// Duplicates: the connection to the broker stays up, so the broker sends nothing again; a record is queued a second
/// time only after a failed delivery report, and none comes within the 60 s delivery timeout; the idempotent
/// producer's own retries write nothing twice.
#[tokio::test]
async fn subscription_mode_loses_nothing_when_kafka_restarts() {
    subscription_fault(800, 0, async |kafka, service, _env| {
        tokio::time::sleep(Duration::from_millis(800)).await;
        kafka.stop();
        tokio::time::sleep(Duration::from_secs(3)).await;
        kafka.restart();
        service
    })
    .await;
}

#[tokio::test]
async fn sigterm_mid_stream_flushes_every_answered_publish() {
    let kafka = Tansu::start(Storage::Memory);
    create_topics(&kafka, &["admin"]).await;
    // A long linger keeps QoS 0 records (answered at once) in the producer until the flush at shutdown.
    let service = ServiceProcess::start(&[
        ("KAFKA_BROKERS", kafka.brokers()),
        ("KAFKA_LINGER_MS", "500".to_string()),
        // The linger holds far more QoS 0 records than a tenant's default bound, which would drop them.
        ("V2K_TENANT_MAX_IN_FLIGHT", "1000000".to_string()),
        ("MQTT_USERNAME", "k2v-bridge".to_string()),
        ("V2K_MODE", "on_publish".to_string()),
    ]);
    service.wait_ready().await;
    let url = format!("http://127.0.0.1:{}/vmq/on_publish", service.port);
    let mut tasks = Vec::new();
    for d in 0..4 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let device = format!("admin:sig{d}");
            let http = reqwest::Client::new();
            let mut answered = 0u64;
            loop {
                let body = publish_body(
                    &device,
                    &format!("{device}/attrs"),
                    format!(r#"{{"n": {answered}}}"#).as_bytes(),
                    d % 2,
                );
                match http.post(&url).header("vernemq-hook", "on_publish").body(body).send().await {
                    Ok(r) if r.status() == 200 => answered += 1,
                    _ => break,
                }
            }
            (device, answered)
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(service.terminate().success(), "SIGTERM ends the service cleanly");
    let mut expected = BTreeMap::new();
    for t in tasks {
        let (device, answered) = t.await.unwrap();
        assert!(answered > 0, "{device} streamed before the stop");
        expected.insert(device, answered);
    }
    let total: u64 = expected.values().sum();
    let records = kafka.read("admin.device-data", total as usize, Duration::from_secs(30)).await;
    let (lost, duplicates) = lost_and_duplicates(&sequence_by_device(&records), &expected);
    println!("SIGTERM mid-stream: answered {total}, in Kafka {}, lost {lost}, duplicates {duplicates}", records.len());
    // Each message is called once (a device stops at its first failed call) and queued once; the producer's retries
    // are idempotent: nothing can reach Kafka twice (and a duplicate would stop the read above short of the rest).
    assert_eq!(duplicates, 0, "a message called once reached Kafka twice");
    assert_eq!(lost, 0, "an answered publish was not flushed at shutdown");
}

#[tokio::test]
async fn subscription_mode_instances_share_the_group() {
    let kafka = Tansu::start(Storage::Memory);
    create_topics(&kafka, &["admin"]).await;
    let mqtt = Mosquitto::start(&[("k2v-bridge", "svc-pass")]);
    let env = |id: &str| {
        let mut env = subscription_env(&kafka, &mqtt, id);
        env.push(("K2V_ENABLED", "false".to_string()));
        env
    };
    let (one, two) = (ServiceProcess::start(&env("it-node-1")), ServiceProcess::start(&env("it-node-2")));
    one.wait_ready().await;
    two.wait_ready().await;
    let device = crate::common::mqtt_client(&mqtt, DEV, "", "dev-share", true).await;
    publish_numbered(&device, 0..600, Duration::ZERO).await;
    let records = kafka.read("admin.device-data", 600, Duration::from_secs(30)).await;
    let expected = BTreeMap::from([(DEV.to_string(), 600)]);
    let (lost, duplicates) = lost_and_duplicates_unordered(&sequence_by_device(&records), &expected);
    assert_eq!((lost, duplicates), (0, 0));
    for service in [&one, &two] {
        let metrics = crate::common::metrics_text(&service.url("")).await;
        let produced = crate::common::metric(&metrics, r#"iotagent_v2k_produced_total{kind="data"}"#).unwrap_or(0.0);
        assert!(produced > 0.0, "both members of the group take a share");
    }
}

/// The subscription's window is V2K_MAX_IN_FLIGHT even where the broker would send more: MQTT 5 brokers take it from
/// the CONNECT's Receive Maximum (VerneMQ's MQTT 5 session ignores the `max_inflight_messages` modifier and defaults to
/// 65 535, as this Mosquitto does). One message whose dead letter has nowhere to go holds its tenant's
/// acknowledgements, so the broker may send no more than the window minus that one.
#[tokio::test]
async fn the_window_is_v2k_max_in_flight_where_the_broker_would_send_more() {
    let (_kafka, _mqtt, _env, service, device) = held_lane("it-window", "50", "30000", "dev-window").await;
    publish_numbered(&device, 0..500, Duration::ZERO).await;
    let metrics = service.url("/metrics");
    let produced = async || super::tenants::metric(&metrics, r#"iotagent_v2k_produced_total{kind="data"}"#).await;
    let filled = crate::common::wait_until(Duration::from_secs(20), async || produced().await >= 49).await;
    assert!(filled, "the window's worth of messages reached Kafka");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(produced().await, 49, "the broker sent more than V2K_MAX_IN_FLIGHT unacknowledged messages");
}

/// One tenant's lane, held by one message whose dead letter has nowhere to go, releases more acknowledgements at once
/// than the client's request queue holds (10 000; the window may be up to 65 535): every one reaches the broker, so
/// after a restart the broker sends nothing again (an acknowledgement dropped would hold a place of the window until
/// the next connection and bring its message back as a duplicate).
#[tokio::test]
async fn acknowledgements_released_at_once_all_reach_the_broker() {
    let (kafka, _mqtt, env, service, device) = held_lane("it-acks", "65535", "8000", "dev-acks").await;
    let total = 14_000u64;
    publish_numbered(&device, 0..total, Duration::ZERO).await;
    let metrics = service.url("/metrics");
    let metric = async |line: &str| super::tenants::metric(&metrics, line).await;
    let produced = crate::common::wait_until(Duration::from_secs(60), async || {
        metric(r#"iotagent_v2k_produced_total{kind="data"}"#).await >= total
    })
    .await;
    assert!(produced, "every message reached Kafka");
    let released = crate::common::wait_until(Duration::from_secs(60), async || {
        metric(r#"iotagent_v2k_failed_total{class="lost"}"#).await >= 1
    })
    .await;
    assert!(released, "the held message was given up and its lane released");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(service.terminate().success());
    // The same persistent session again: the broker resends whatever was not acknowledged.
    let service = ServiceProcess::start(&env);
    service.wait_ready().await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let records = kafka.read("admin.device-data", usize::MAX, Duration::from_secs(5)).await;
    println!("{total} published, {} in Kafka after a restart", records.len());
    assert_eq!(
        records.len(),
        total as usize,
        "messages sent again after the restart: their acknowledgements were lost"
    );
    drop(service);
}

/// A subscription service (`group`, window `V2K_MAX_IN_FLIGHT`) on a Mosquitto offering a window of 65 535, and a
/// device whose first message is not JSON: the tenant has its data topic only, so that message's dead letter waits
/// for the delivery timeout, holding the tenant's lane (its acknowledgements) meanwhile.
async fn held_lane(
    group: &str,
    window: &str,
    delivery_timeout_ms: &str,
    client_id: &str,
) -> (Tansu, Mosquitto, Vec<(&'static str, String)>, ServiceProcess, rumqttc::AsyncClient) {
    let kafka = Tansu::start(Storage::Memory);
    kafka.create_topic("admin.device-data", 3).await;
    let mqtt = Mosquitto::start_with_receive_maximum(&[("k2v-bridge", "svc-pass")], 65535);
    let mut env = subscription_env(&kafka, &mqtt, group);
    env.extend([
        ("K2V_ENABLED", "false".to_string()),
        ("V2K_MAX_IN_FLIGHT", window.to_string()),
        ("V2K_DELIVERY_TIMEOUT_MS", delivery_timeout_ms.to_string()),
    ]);
    let service = ServiceProcess::start(&env);
    service.wait_ready().await;
    let device = crate::common::mqtt_client(&mqtt, DEV, "", client_id, true).await;
    device.publish("admin:a1998e/attrs", rumqttc::QoS::AtLeastOnce, false, "not json").await.unwrap();
    (kafka, mqtt, env, service, device)
}
