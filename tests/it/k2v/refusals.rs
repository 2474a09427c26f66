//! Publishes the broker refuses (Mosquitto ACL → MQTT 5 PUBACK 0x87): skipped in place, counted, dead-lettered,
//! and no reconnect storm; the allowed devices get everything in order.

use rdkafka::message::{Header, OwnedHeaders};

use crate::common::brokers::raw_headers;

use super::*;

const TENANT: &str = "acme";
const ALLOWED: [&str; 2] = ["good1", "good2"];
const REFUSED: &str = "denied";

fn dead_letter_topic() -> String {
    format!("{}.dead-letter", topic(TENANT))
}

/// Mosquitto whose ACL lets the service publish to the allowed devices' config topics only, logging every packet.
fn acl_mosquitto() -> (Mosquitto, u16) {
    let acl: String = ALLOWED
        .iter()
        .map(|d| format!("topic write {TENANT}:{d}/config\n"))
        .fold("user k2v-bridge\n".into(), |a, l| a + &l);
    let mqtt = Mosquitto::start_with_acl(&[("k2v-bridge", K2V_PASSWORD)], Some(&acl), "log_type all\n");
    let port = mqtt.device_port;
    (mqtt, port)
}

fn mosquitto_log(mqtt: &Mosquitto) -> String {
    std::fs::read_to_string(mqtt.dir().join("mosquitto.log")).unwrap_or_default()
}

/// CONNECTs of the K2V publisher seen by the broker.
fn publisher_connects(mqtt: &Mosquitto, group: &str) -> usize {
    let id = format!("it-{group}-k2v");
    mosquitto_log(mqtt).lines().filter(|l| l.contains("New client connected") && l.contains(&id)).count()
}

/// A header name that is not UTF-8: Kafka takes any bytes, and rdkafka panics reading one.
const RAW_NAME: &[u8] = b"\xff";

/// Produces `rounds` × (allowed 1, refused, allowed 2) to the tenant's single partition; the refused events carry
/// headers the dead letter must keep, one of them named by bytes that are not UTF-8. `pause` between rounds.
async fn produce_rounds(p: &FutureProducer, rounds: usize, pause: Duration) {
    let t = topic(TENANT);
    for n in 0..rounds {
        produce(p, &t, ALLOWED[0], &configure(TENANT, ALLOWED[0], json!({"n": n}))).await;
        let value = configure(TENANT, REFUSED, json!({"n": n}));
        let headers = OwnedHeaders::new().insert(Header { key: "trace", value: Some(&format!("t-{n}")) });
        let record = FutureRecord::to(&t).key(REFUSED).payload(&value).headers(raw_headers::add(
            headers,
            RAW_NAME,
            format!("raw-{n}").as_bytes(),
        ));
        p.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e).expect("produced");
        produce(p, &t, ALLOWED[1], &configure(TENANT, ALLOWED[1], json!({"n": n}))).await;
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
}

/// The `n` of each configuration a device received, first occurrences only (duplicates are at-least-once).
fn firsts(device: &Subscriber) -> Vec<u64> {
    let mut seen = BTreeSet::new();
    device
        .received()
        .iter()
        .filter_map(|(_, payload)| serde_json::from_slice::<Value>(payload).ok()?["n"].as_u64())
        .filter(|n| seen.insert(*n))
        .collect()
}

async fn devices(port: u16) -> (Vec<Subscriber>, Subscriber) {
    let mut allowed = Vec::new();
    for d in ALLOWED {
        let name = format!("{TENANT}:{d}");
        allowed.push(Subscriber::connect(port, &name, &name, &format!("{name}/config")).await);
    }
    let name = format!("{TENANT}:{REFUSED}");
    let refused = Subscriber::connect(port, &name, &name, &format!("{name}/config")).await;
    (allowed, refused)
}

/// Kafka with the tenant's topic (and its dead-letter topic when asked), the ACL Mosquitto, and the devices on it.
async fn setup(with_dead_letter_topic: bool) -> (Tansu, Mosquitto, Vec<Subscriber>, Subscriber) {
    let kafka = Tansu::start(Storage::Memory);
    kafka.create_topic(&topic(TENANT), 1).await;
    if with_dead_letter_topic {
        kafka.create_topic(&dead_letter_topic(), 1).await;
    }
    let (mqtt, device_port) = acl_mosquitto();
    let (allowed, refused) = devices(device_port).await;
    (kafka, mqtt, allowed, refused)
}

async fn stop_devices(allowed: Vec<Subscriber>, refused: Subscriber) {
    for d in allowed.into_iter().chain([refused]) {
        d.stop().await;
    }
}

async fn check_dead_letters(kafka: &Tansu, rounds: usize) {
    let letters = kafka.read(&dead_letter_topic(), rounds, Duration::from_secs(20)).await;
    let mut seen = BTreeSet::new();
    for letter in &letters {
        assert_eq!(letter.header("reason"), Some("not_authorized"));
        assert_eq!(letter.header("mqtt_reason_code"), Some("135"));
        assert_eq!(letter.key.as_deref(), Some(REFUSED));
        let n = letter.json()["data"]["attrs"]["n"].as_u64().expect("the original event");
        assert_eq!(letter.value, configure(TENANT, REFUSED, json!({"n": n})), "original bytes");
        assert_eq!(letter.header("trace"), Some(format!("t-{n}").as_str()), "original headers kept");
        let raw = String::from_utf8_lossy(RAW_NAME);
        assert_eq!(letter.header(&raw), Some(format!("raw-{n}").as_str()), "a header name that is not UTF-8 kept");
        seen.insert(n);
    }
    assert_eq!(seen, (0..rounds as u64).collect(), "every refused event dead-lettered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_device_is_skipped_and_dead_lettered_between_allowed_ones() {
    let (kafka, mqtt, allowed, refused) = setup(true).await;
    let group = "refusal";
    let rounds = 20;
    produce_rounds(&producer(&kafka), rounds, Duration::ZERO).await;
    let app = start_app(&k2v_env(&kafka, &mqtt.url(), group)).await;

    let all = async || allowed.iter().all(|d| firsts(d).len() >= rounds);
    assert!(wait_until(Duration::from_secs(20), all).await, "allowed devices got everything");
    for device in &allowed {
        assert_eq!(firsts(device), (0..rounds as u64).collect::<Vec<_>>(), "in order");
    }
    let skipped = "iotagent_k2v_skipped_total{reason=\"refused\"}";
    assert!(
        wait_until(Duration::from_secs(10), async || metric(&app.metrics().await, skipped) == rounds as f64).await,
        "every refusal counted"
    );
    let written = "iotagent_k2v_dead_letters_total{outcome=\"written\"}";
    assert!(
        wait_until(Duration::from_secs(15), async || metric(&app.metrics().await, written) == rounds as f64).await,
        "every dead letter written"
    );
    let text = app.metrics().await;
    assert_eq!(metric(&text, "iotagent_k2v_acked_total"), 2.0 * rounds as f64);
    assert_eq!(metric(&text, "iotagent_k2v_resent_total"), 0.0, "nothing resent: the connection stayed up");
    check_dead_letters(&kafka, rounds).await;
    app.stop().await.expect("clean stop");
    assert_eq!(committed(&kafka, group, &topic(TENANT), 1), vec![3 * rounds as i64], "the commit passed the refusals");
    let log = mosquitto_log(&mqtt);
    assert_eq!(log.matches("Denied PUBLISH").count(), rounds, "each refused event sent once");
    assert_eq!(publisher_connects(&mqtt, group), 1, "one connection, no reconnect storm");
    assert!(refused.received().is_empty());
    stop_devices(allowed, refused).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_across_a_service_restart_lose_nothing_for_the_allowed_devices() {
    let (kafka, mqtt, allowed, refused) = setup(true).await;
    let group = "refusal-restart";
    let env = k2v_env(&kafka, &mqtt.url(), group);
    let rounds = 150;
    let stream = tokio::spawn({
        let p = producer(&kafka);
        async move { produce_rounds(&p, rounds, Duration::from_millis(10)).await }
    });
    let app = start_app(&env).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    app.stop().await.expect("clean stop");
    let app = start_app(&env).await;
    stream.await.expect("produced");
    let all = async || allowed.iter().all(|d| firsts(d).len() >= rounds);
    let complete = wait_until(Duration::from_secs(30), all).await;
    for device in &allowed {
        let got = firsts(device);
        let lost = (0..rounds as u64).filter(|n| !got.contains(n)).count();
        println!("refusals across a restart: {} received {} (lost {lost})", device.count(), got.len());
        assert_eq!(got, (0..rounds as u64).collect::<Vec<_>>(), "lost {lost}, or out of order");
    }
    assert!(complete);
    check_dead_letters(&kafka, rounds).await;
    app.stop().await.expect("clean stop");
    assert_eq!(committed(&kafka, group, &topic(TENANT), 1), vec![3 * rounds as i64]);
    assert!(publisher_connects(&mqtt, group) <= 2, "one connection per start, no reconnect storm");
    assert!(refused.received().is_empty());
    stop_devices(allowed, refused).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_dead_letter_topic_a_refusal_is_only_logged_and_counted() {
    let (kafka, mqtt, allowed, refused) = setup(false).await;
    let group = "refusal-no-topic";
    let rounds = 3;
    produce_rounds(&producer(&kafka), rounds, Duration::ZERO).await;
    let app = start_app(&k2v_env(&kafka, &mqtt.url(), group)).await;
    let no_topic = "iotagent_k2v_dead_letters_total{outcome=\"no_topic\"}";
    assert!(
        wait_until(Duration::from_secs(15), async || metric(&app.metrics().await, no_topic) == rounds as f64).await,
        "missing dead-letter topic counted"
    );
    assert!(wait_until(Duration::from_secs(10), async || allowed.iter().all(|d| firsts(d).len() >= rounds)).await);
    app.stop().await.expect("clean stop");
    assert_eq!(committed(&kafka, group, &topic(TENANT), 1), vec![3 * rounds as i64], "not blocked");
    stop_devices(allowed, refused).await;
}
