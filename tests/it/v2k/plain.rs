//! V2K plain subscription (`+/attrs` on one session for the cluster, held by the lease holder): two service
//! processes, Mosquitto and tansu; steady state forwards each message once, a SIGKILLed holder is replaced and the
//! persistent session drained.

use super::subscription::{lost_and_duplicates_unordered, publish_numbered};
use super::*;

const LEASE_TOPIC: &str = "iotagent.v2k-lease";
/// The one client id of the plain session (`<V2K_LEASE_GROUP>-v2k`).
const SESSION: &str = "it-plain-v2k";

fn env(kafka: &Tansu, mqtt: &Mosquitto, node: &str) -> Vec<(&'static str, String)> {
    let mut env = subscription_env(kafka, mqtt, node);
    env.extend([
        ("V2K_SUBSCRIPTION", "plain".into()),
        ("V2K_LEASE_GROUP", "it-plain".into()),
        // Short, so that the test sees the handover soon after the kill.
        ("V2K_LEASE_SESSION_TIMEOUT_MS", "2000".into()),
        ("K2V_ENABLED", "false".into()),
        ("V2K_DELIVERY_TIMEOUT_MS", "60000".into()),
        // The session's window (its Receive Maximum): what a lost connection can have the broker send again.
        ("V2K_MAX_IN_FLIGHT", WINDOW.to_string()),
    ]);
    env
}

/// V2K_MAX_IN_FLIGHT here: far above what the stream keeps in flight (a few hundred messages a second, a 5 ms linger),
/// below what is published before each fault.
const WINDOW: usize = 100;

/// The role `/health/ready` reports for the lease (`held` or `standby`), once the plain subscription of a holder
/// is subscribed.
async fn role(service: &ServiceProcess) -> Option<&'static str> {
    let report: Value = reqwest::get(service.url("/health/ready")).await.ok()?.json().await.ok()?;
    let check = |name: &str| report["checks"].as_array()?.iter().find(|c| c["name"] == name).cloned();
    let (lease, mqtt) = (check("v2k_lease")?, check("v2k_mqtt")?);
    let note = lease["note"].as_str().unwrap_or_default();
    match (note.split(':').next(), mqtt["up"].as_bool(), mqtt["note"].as_str()) {
        (Some("held"), Some(true), None) => Some("held"),
        (Some("standby"), Some(true), Some(_)) => Some("standby"),
        _ => None,
    }
}

/// Waits until exactly one of `services` holds the lease (subscribed) and the others stand by; returns the holder.
async fn holder(services: &[&ServiceProcess]) -> usize {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut roles = Vec::new();
        for s in services {
            roles.push(role(s).await);
        }
        let held: Vec<usize> = (0..roles.len()).filter(|&i| roles[i] == Some("held")).collect();
        let standby = roles.iter().filter(|r| **r == Some("standby")).count();
        if held.len() == 1 && standby == services.len() - 1 {
            return held[0];
        }
        assert!(tokio::time::Instant::now() < deadline, "no single holder within 30 s: {roles:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Device records this instance got acknowledged by Kafka.
async fn produced(node: &ServiceProcess) -> f64 {
    let metrics = crate::common::metrics_text(&node.url("")).await;
    crate::common::metric(&metrics, r#"iotagent_v2k_produced_total{kind="data"}"#).unwrap_or(0.0)
}

#[tokio::test]
async fn plain_subscription_is_held_by_one_instance_and_handed_over_when_it_dies() {
    let kafka = Tansu::start(Storage::Memory);
    create_topics(&kafka, &["admin"]).await;
    kafka.create_topic(LEASE_TOPIC, 1).await;
    let mqtt = Mosquitto::start(&[("k2v-bridge", "svc-pass")]);
    let nodes = [
        ServiceProcess::start(&env(&kafka, &mqtt, "it-node-1")),
        ServiceProcess::start(&env(&kafka, &mqtt, "it-node-2")),
    ];
    for node in &nodes {
        node.wait_ready().await;
    }
    let first = holder(&[&nodes[0], &nodes[1]]).await;
    let device = crate::common::mqtt_client(&mqtt, DEV, "", "dev-plain", true).await;

    // Steady state: both up, one consumes; every message reaches Kafka exactly once.
    let steady = 400;
    publish_numbered(&device, 0..steady, Duration::from_millis(1)).await;
    let records = kafka.read("admin.device-data", steady as usize, Duration::from_secs(30)).await;
    let expected = BTreeMap::from([(DEV.to_string(), steady)]);
    let (lost, duplicates) = lost_and_duplicates_unordered(&sequence_by_device(&records), &expected);
    println!(
        "plain steady state: published {steady}, in Kafka {}, lost {lost}, duplicates {duplicates}",
        records.len()
    );
    assert_eq!((lost, duplicates), (0, 0), "with both instances up each message reaches Kafka exactly once");
    let mut by_node = Vec::new();
    for node in &nodes {
        by_node.push(produced(node).await);
    }
    assert_eq!(by_node[1 - first], 0.0, "the standby consumed nothing: {by_node:?}");

    // Kill the holder mid-stream: the standby takes the lease after the session timeout and drains the session.
    let total = 1600;
    let publisher = tokio::spawn(async move {
        publish_numbered(&device, steady..total, Duration::from_millis(3)).await;
        device
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let [one, two] = nodes;
    let (killed, survivor) = if first == 0 { (one, two) } else { (two, one) };
    killed.kill();
    let killed_at = std::time::Instant::now();
    assert_eq!(holder(&[&survivor]).await, 0);
    println!("plain handover: the survivor subscribed {:?} after the kill", killed_at.elapsed());
    let _device = publisher.await.unwrap();
    let records = kafka.read("admin.device-data", total as usize, Duration::from_secs(60)).await;
    let all = kafka.read("admin.device-data", usize::MAX, Duration::from_secs(3)).await;
    let records = if all.len() > records.len() { all } else { records };
    let seen = sequence_by_device(&records);
    let expected = BTreeMap::from([(DEV.to_string(), total)]);
    let (lost, duplicates) = lost_and_duplicates_unordered(&seen, &expected);
    let twice: Vec<u64> = counts(&seen).iter().filter(|(_, c)| **c > 1).map(|(n, _)| *n).collect();
    println!(
        "plain holder SIGKILL: published {total}, in Kafka {}, lost {lost}, duplicates {duplicates}: {twice:?}",
        records.len()
    );
    assert_eq!(lost, 0, "a message was lost in the handover");

    // Mosquitto, like VerneMQ, lets a second connection with the same client id take the session over: the
    // standby must never have connected while the holder was.
    let log = std::fs::read_to_string(mqtt.dir().join("mosquitto.log")).unwrap_or_default();
    assert!(!log.contains("already connected, closing old connection"), "the session was taken over:\n{log}");
    let connects = session_connects(&mqtt);
    assert!(connects >= 2, "the holder and then the survivor connected the one session ({connects} connects)");
    // Each time the session is connected again, the broker sends what the last connection had not acknowledged: the
    // window at most. About 350 messages of this stream (750 since the start) were published before the kill.
    let bound = WINDOW * (connects - 1);
    assert!(duplicates <= bound, "{duplicates} duplicates, {connects} connections of a window of {WINDOW}");
}

/// How many times the plain session was connected (Mosquitto's log).
fn session_connects(mqtt: &Mosquitto) -> usize {
    let log = std::fs::read_to_string(mqtt.dir().join("mosquitto.log")).unwrap_or_default();
    log.lines().filter(|l| l.contains("New client connected") && l.contains(SESSION)).count()
}

/// Kafka killed and restarted under the holder mid-stream: records wait in the producer meanwhile, and the lease's
/// Kafka session (2 s) runs out, so the holder gives the session up (acknowledging what Kafka took, nothing here) and
/// takes it again once Kafka is back; the broker keeps what comes meanwhile. Nothing is lost.
#[tokio::test]
async fn plain_subscription_loses_nothing_when_kafka_restarts_under_the_holder() {
    let mut kafka = Tansu::start(Storage::Sqlite);
    create_topics(&kafka, &["admin"]).await;
    kafka.create_topic(LEASE_TOPIC, 1).await;
    let mqtt = Mosquitto::start(&[("k2v-bridge", "svc-pass")]);
    let node = ServiceProcess::start(&env(&kafka, &mqtt, "it-node-1"));
    node.wait_ready().await;
    holder(&[&node]).await;
    let device = crate::common::mqtt_client(&mqtt, DEV, "", "dev-plain-k", true).await;
    let total = 800;
    let publisher = tokio::spawn(async move {
        publish_numbered(&device, 0..total, Duration::from_millis(3)).await;
        device
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    kafka.stop();
    tokio::time::sleep(Duration::from_secs(3)).await;
    kafka.restart();
    let _device = publisher.await.unwrap();
    let records = kafka.read("admin.device-data", total as usize, Duration::from_secs(60)).await;
    let all = kafka.read("admin.device-data", usize::MAX, Duration::from_secs(3)).await;
    let records = if all.len() > records.len() { all } else { records };
    let seen = sequence_by_device(&records);
    let (lost, duplicates) = lost_and_duplicates_unordered(&seen, &BTreeMap::from([(DEV.to_string(), total)]));
    println!(
        "plain, Kafka restarted: published {total}, in Kafka {}, lost {lost}, duplicates {duplicates}",
        records.len()
    );
    assert_eq!(lost, 0, "a message was lost while Kafka restarted");
    let connects = session_connects(&mqtt);
    assert!(connects >= 2, "the holder gave the session up with its lease and connected it again ({connects})");
    // Each time the session is connected again, the broker sends what the last connection had not acknowledged: the
    // window at most (here the whole window, held while Kafka was away). Everything since the start would be 800.
    let bound = WINDOW * (connects - 1);
    assert!(duplicates <= bound, "{duplicates} duplicates, {connects} connections of a window of {WINDOW}");
}

/// How many times each number arrived.
fn counts(seen: &BTreeMap<String, Vec<u64>>) -> BTreeMap<u64, usize> {
    let mut counts = BTreeMap::<u64, usize>::new();
    for n in seen.get(DEV).into_iter().flatten() {
        *counts.entry(*n).or_default() += 1;
    }
    counts
}

#[tokio::test]
async fn a_missing_lease_topic_is_reported_not_ready() {
    let kafka = Tansu::start(Storage::Memory);
    create_topics(&kafka, &["admin"]).await;
    let mqtt = Mosquitto::start(&[("k2v-bridge", "svc-pass")]);
    let node = ServiceProcess::start(&env(&kafka, &mqtt, "it-node-1"));
    let reported = crate::common::wait_until(Duration::from_secs(20), async || {
        let Ok(response) = reqwest::get(node.url("/health/ready")).await else { return false };
        let text = response.text().await.unwrap_or_default();
        text.contains(&format!("lease topic {LEASE_TOPIC} does not exist"))
    })
    .await;
    assert!(reported, "readiness names the missing lease topic");
}

/// The service subscribes again at every connection (a restart, a reconnect, a handover): the broker must not send the
/// devices' retained attrs messages then (DEVICE_ALLOW_RETAIN=true), or each would reach Kafka again as new data.
#[tokio::test]
async fn retained_messages_are_not_forwarded_again_after_a_restart() {
    let kafka = Tansu::start(Storage::Memory);
    create_topics(&kafka, &["admin"]).await;
    kafka.create_topic(LEASE_TOPIC, 1).await;
    let mqtt = Mosquitto::start(&[("k2v-bridge", "svc-pass")]);
    let mut env = env(&kafka, &mqtt, "it-node-1");
    env.push(("DEVICE_ALLOW_RETAIN", "true".to_string()));
    let service = ServiceProcess::start(&env);
    service.wait_ready().await;
    holder(&[&service]).await;
    let device = crate::common::mqtt_client(&mqtt, DEV, "", "dev-retained", true).await;
    device.publish("admin:a1998e/attrs", rumqttc::QoS::AtLeastOnce, true, r#"{"n": 0}"#).await.unwrap();
    assert_eq!(kafka.read("admin.device-data", 1, Duration::from_secs(20)).await.len(), 1);
    assert!(service.terminate().success());
    let service = ServiceProcess::start(&env);
    service.wait_ready().await;
    holder(&[&service]).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let records = kafka.read("admin.device-data", usize::MAX, Duration::from_secs(3)).await;
    assert_eq!(records.len(), 1, "the retained message was forwarded again after the restart");
}
