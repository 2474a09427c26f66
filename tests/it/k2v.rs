//! K2V against real brokers: tansu (Kafka) and Mosquitto; devices are rumqttc clients with persistent sessions.

use std::collections::{BTreeSet, HashMap};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

use crate::common::brokers::{Mosquitto, Storage, Tansu, free_port};
use crate::common::{TestApp, flags, spawn_app, wait_until};

const SERVICE_PASSWORD: &str = "k2v-secret";
const TOPIC_SUFFIX: &str = "dojot.device-manager.device";

fn topic(tenant: &str) -> String {
    format!("{tenant}.{TOPIC_SUFFIX}")
}

/// Mosquitto with the service user and an extra anonymous listener for devices (Mosquitto's password file cannot
/// hold `tenant:device` names).
fn mosquitto(extra: &str) -> (Mosquitto, u16) {
    let device_port = free_port();
    let extra = format!("listener {device_port} 127.0.0.1\nallow_anonymous true\n{extra}");
    (Mosquitto::start_with(&[("k2v-bridge", SERVICE_PASSWORD)], &extra), device_port)
}

/// Environment of a K2V service: short intervals so tests see new topics and commits quickly.
fn k2v_env(kafka: &Tansu, mqtt_url: &str, group: &str) -> Vec<(&'static str, String)> {
    vec![
        ("KAFKA_BROKERS", kafka.brokers()),
        ("MQTT_URL", mqtt_url.to_string()),
        ("MQTT_PASSWORD", SERVICE_PASSWORD.into()),
        ("MQTT_CLIENT_ID", format!("it-{group}")),
        ("K2V_KAFKA_GROUP_ID", group.into()),
        ("K2V_METADATA_REFRESH_MS", "500".into()),
        ("K2V_STATS_INTERVAL_MS", "500".into()),
        ("K2V_LAG_INTERVAL_MS", "300".into()),
        ("K2V_SDK_COMMIT_INTERVAL_MS", "200".into()),
        ("K2V_SESSION_TIMEOUT_MS", "6000".into()),
        ("SHUTDOWN_TIMEOUT", "5".into()),
    ]
}

async fn start_app(env: &[(&'static str, String)]) -> TestApp {
    let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let app = spawn_app(&flags(&pairs)).await;
    wait_ready(&app.url("/health/ready")).await;
    app
}

async fn wait_ready(url: &str) {
    let ready =
        wait_until(Duration::from_secs(20), async || reqwest::get(url).await.is_ok_and(|r| r.status() == 200)).await;
    assert!(ready, "K2V ready (Kafka and MQTT probes up)");
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

/// Topic and payload of one message a subscriber received.
type Delivery = (String, Vec<u8>);

/// An MQTT subscriber (a device, or a spy on `#`) with a persistent session, recording every publish it receives.
struct Subscriber {
    received: Arc<Mutex<Vec<Delivery>>>,
    /// Payloads with `D` for the DUP flag, and reconnections: shown when an order check fails.
    log: Arc<Mutex<Vec<String>>>,
    client: AsyncClient,
    task: JoinHandle<()>,
}

impl Subscriber {
    async fn connect(port: u16, username: &str, client_id: &str, filter: &str) -> Self {
        let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
        options.set_credentials(username, "");
        options.set_clean_session(false);
        options.set_keep_alive(Duration::from_secs(5));
        options.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut eventloop) = AsyncClient::new(options, 100);
        client.subscribe(filter, QoS::AtLeastOnce).await.expect("subscribe");
        let received = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::new(Mutex::new(Vec::<String>::new()));
        let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel();
        let task = tokio::spawn({
            let received = received.clone();
            let log = log.clone();
            let client = client.clone();
            let filter = filter.to_string();
            async move {
                let mut subscribed_tx = Some(subscribed_tx);
                let mut connections = 0;
                loop {
                    match eventloop.poll().await {
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            received.lock().unwrap().push((p.topic.clone(), p.payload.to_vec()));
                            log.lock().unwrap().push(format!(
                                "{}{}",
                                if p.dup { "D" } else { "" },
                                String::from_utf8_lossy(&p.payload)
                            ));
                        }
                        Ok(Event::Incoming(Packet::SubAck(_))) => {
                            if let Some(tx) = subscribed_tx.take() {
                                let _ = tx.send(());
                            }
                        }
                        Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                            log.lock().unwrap().push(format!("CONNACK sp={}", ack.session_present));
                            connections += 1;
                            if connections > 1 && !ack.session_present {
                                let _ = client.try_subscribe(filter.clone(), QoS::AtLeastOnce);
                            }
                        }
                        Ok(_) => {}
                        Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), subscribed).await.expect("SUBACK in time").expect("SUBACK");
        Self { received, log, client, task }
    }

    fn received(&self) -> Vec<Delivery> {
        self.received.lock().unwrap().clone()
    }

    fn count(&self) -> usize {
        self.received.lock().unwrap().len()
    }

    async fn stop(self) {
        let _ = self.client.disconnect().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.task.abort();
    }
}

async fn metrics_text(app: &TestApp) -> String {
    reqwest::get(app.url("/metrics")).await.expect("metrics").text().await.expect("metrics body")
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
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

    let text = metrics_text(&app).await;
    assert_eq!(metric(&text, "iotagent_k2v_consumed_total"), 8.0);
    assert_eq!(metric(&text, "iotagent_k2v_published_total"), 2.0);
    assert!(
        wait_until(Duration::from_secs(5), async || {
            metric(&metrics_text(&app).await, "iotagent_k2v_acked_total") == 2.0
        })
        .await
    );
    assert!(
        wait_until(Duration::from_secs(5), async || { metric(&metrics_text(&app).await, "iotagent_k2v_lag") == 0.0 })
            .await,
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

/// Throwaway PKI (openssl CLI): a CA, a server certificate for localhost, and the service's client certificate.
fn pki(dir: &std::path::Path) {
    let run = |args: &[&str]| {
        let status = Command::new("openssl").args(args).current_dir(dir).stderr(Stdio::null()).status().unwrap();
        assert!(status.success(), "openssl {args:?}");
    };
    std::fs::write(dir.join("san.ext"), "subjectAltName=DNS:localhost,IP:127.0.0.1\n").unwrap();
    let ca = ["-x509", "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=Test CA"];
    run(&[&["req", "-newkey", "rsa:2048", "-nodes", "-days", "2"][..], &ca[..]].concat());
    for (name, cn, ext) in [("server", "/CN=localhost", Some("san.ext")), ("k2v", "/CN=k2v-bridge", None)] {
        let (key, csr, pem) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"));
        run(&["req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj", cn]);
        let mut sign = vec!["x509", "-req", "-in", &csr, "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial"];
        sign.extend(["-out", &pem, "-days", "2"]);
        if let Some(ext) = ext {
            sign.extend(["-extfile", ext]);
        }
        run(&sign);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_publishes_over_mutual_tls() {
    let pki_dir = tempfile::tempdir().unwrap();
    let d = pki_dir.path();
    pki(d);
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

// ---- fault tests ----

const DEVICES: usize = 5;
const PER_DEVICE: u64 = 400;
const PARTITIONS: i32 = 4;

fn device_name(i: usize) -> String {
    format!("dev{i}")
}

/// What one fault run observed.
struct Outcome {
    lost: usize,
    duplicates: usize,
}

/// Checks per-device order (every delivery is either a repeat of something already delivered or the next one) and
/// counts lost and duplicated events.
fn check(devices: &[Subscriber]) -> Outcome {
    let (mut lost, mut duplicates) = (0, 0);
    for (i, d) in devices.iter().enumerate() {
        let mut seen = BTreeSet::new();
        let mut next = 0_u64;
        for (topic, payload) in d.received() {
            assert_eq!(topic, format!("admin:{}/config", device_name(i)));
            let n = serde_json::from_slice::<Value>(&payload).unwrap()["n"].as_u64().unwrap();
            assert!(
                n <= next,
                "{}: got {n} before {next}: out of order; received: {:?}",
                device_name(i),
                d.log.lock().unwrap()
            );
            if n == next {
                next += 1;
            }
            if !seen.insert(n) {
                duplicates += 1;
            }
        }
        lost += (0..PER_DEVICE).filter(|n| !seen.contains(n)).count();
    }
    Outcome { lost, duplicates }
}

/// (partition, offset).
type KafkaPosition = (i32, i64);

struct Stream {
    /// (partition, offset) → (device, n) of every produced event.
    produced: Arc<Mutex<HashMap<KafkaPosition, (usize, u64)>>>,
    task: JoinHandle<()>,
}

/// Produces PER_DEVICE configure events for each device, interleaved, keyed by device (so each device's events share a
/// partition), at about `rate` events/s.
fn stream(kafka: &Tansu, rate: u64) -> Stream {
    let producer = producer(kafka);
    let produced = Arc::new(Mutex::new(HashMap::new()));
    let task = tokio::spawn({
        let produced = produced.clone();
        async move {
            let topic = topic("admin");
            let round = Duration::from_micros(1_000_000 * DEVICES as u64 / rate);
            for n in 0..PER_DEVICE {
                let next = tokio::time::Instant::now() + round;
                // Enqueued in order (idempotent producer), delivery reports awaited together.
                let mut deliveries = Vec::new();
                for i in 0..DEVICES {
                    let value = configure("admin", &device_name(i), json!({"n": n}));
                    let key = device_name(i);
                    let record = FutureRecord::to(&topic).key(&key).payload(&value);
                    deliveries.push((i, producer.send_result(record).map_err(|(e, _)| e).expect("enqueued")));
                }
                for (i, delivery) in deliveries {
                    let d = delivery.await.expect("producer alive").map_err(|(e, _)| e).expect("delivered");
                    produced.lock().unwrap().insert((d.partition, d.offset), (i, n));
                }
                tokio::time::sleep_until(next).await;
            }
        }
    });
    Stream { produced, task }
}

async fn devices(port: u16) -> Vec<Subscriber> {
    let mut out = Vec::new();
    for i in 0..DEVICES {
        let name = format!("admin:{}", device_name(i));
        out.push(Subscriber::connect(port, &name, &name, &format!("{name}/config")).await);
    }
    out
}

async fn wait_all_delivered(devices: &[Subscriber], timeout: Duration) -> bool {
    wait_until(timeout, async || {
        devices.iter().all(|d| {
            let seen: BTreeSet<u64> = d
                .received()
                .iter()
                .filter_map(|(_, p)| serde_json::from_slice::<Value>(p).ok()?["n"].as_u64())
                .collect();
            seen.len() as u64 == PER_DEVICE
        })
    })
    .await
}

/// Every event below the committed offset of its partition was delivered: a commit never passed an event the
/// broker had not acknowledged (the broker holds acknowledged ones for the persistent device sessions).
async fn assert_commits_only_cover_delivered(kafka: &Tansu, group: &str, stream: &Stream, devices: &[Subscriber]) {
    let committed = committed(kafka, group, &topic("admin"), PARTITIONS);
    let covered: Vec<(usize, u64)> = stream
        .produced
        .lock()
        .unwrap()
        .iter()
        .filter(|((p, o), _)| *o < committed[*p as usize])
        .map(|(_, v)| *v)
        .collect();
    // Deliveries of acknowledged messages may still be on their way from the broker.
    let delivered = wait_until(Duration::from_secs(15), async || {
        let received: BTreeSet<(usize, u64)> = devices
            .iter()
            .enumerate()
            .flat_map(|(i, d)| {
                d.received()
                    .into_iter()
                    .filter_map(move |(_, p)| Some((i, serde_json::from_slice::<Value>(&p).ok()?["n"].as_u64()?)))
            })
            .collect();
        covered.iter().all(|v| received.contains(v))
    })
    .await;
    let received: usize = devices.iter().map(Subscriber::count).sum();
    let produced = stream.produced.lock().unwrap().len();
    println!(
        "committed offsets {committed:?} cover {} events; devices received {received} of {produced} produced",
        covered.len()
    );
    assert!(delivered, "a committed offset covers an event the devices never received");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_mosquitto_restarts_mid_stream() {
    let kafka = Tansu::start(Storage::Memory);
    kafka.create_topic(&topic("admin"), PARTITIONS).await;
    let (mut mqtt, device_port) = mosquitto("");
    let devices = devices(device_port).await;
    let app = start_app(&k2v_env(&kafka, &mqtt.url(), "fault-mqtt")).await;

    let started = Instant::now();
    let mut stream = stream(&kafka, 1000);
    // Down for a second while events keep coming (a backlog builds up), then restarted again while the bridge
    // drains that backlog, with many publishes in flight.
    tokio::time::sleep(Duration::from_millis(400)).await;
    mqtt.stop();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // The backlog shows in the lag gauge (measured every 300 ms here, once the partitions are being consumed).
    let mut lag = 0.0;
    wait_until(Duration::from_secs(5), async || {
        lag = metric(&metrics_text(&app).await, "iotagent_k2v_lag");
        lag > 0.0
    })
    .await;
    let before: usize = devices.iter().map(Subscriber::count).sum();
    mqtt.restart();
    let total = async || devices.iter().map(Subscriber::count).sum::<usize>();
    wait_until(Duration::from_secs(10), async || total().await > before + 50).await;
    mqtt.restart();
    (&mut stream.task).await.unwrap();
    let complete = wait_all_delivered(&devices, Duration::from_secs(40)).await;
    let outcome = check(&devices);
    println!(
        "mosquitto restarted twice mid-stream: {} events, lost {}, duplicates {}, {:?}",
        DEVICES as u64 * PER_DEVICE,
        outcome.lost,
        outcome.duplicates,
        started.elapsed()
    );
    // The counter is refreshed every second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let resent = metric(&metrics_text(&app).await, "iotagent_k2v_resent_total");
    println!("publishes re-sent after reconnects: {resent}; lag while Mosquitto was down: {lag}");
    assert!(lag > 0.0, "the lag gauge shows the backlog");
    assert!(complete && outcome.lost == 0, "lost {}", outcome.lost);
    app.stop().await.expect("clean stop");
    assert_commits_only_cover_delivered(&kafka, "fault-mqtt", &stream, &devices).await;
    for d in devices {
        d.stop().await;
    }
}

/// The service as a separate process, so that it can be killed with SIGKILL.
struct ServiceProcess {
    child: Child,
    port: u16,
}

impl ServiceProcess {
    fn start(env: &[(&'static str, String)]) -> Self {
        let port = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_iotagent-mqtt"))
            .env_clear()
            .env("IOTAGENT_LISTEN", format!("127.0.0.1:{port}"))
            .env("LOG_FORMAT", "text")
            .env("RUST_LOG", "warn")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::null())
            .spawn()
            .expect("start iotagent-mqtt");
        Self { child, port }
    }

    async fn wait_ready(&self) {
        wait_ready(&format!("http://127.0.0.1:{}/health/ready", self.port)).await;
    }

    fn kill(mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_service_stopped_aborted_and_killed_mid_stream() {
    let kafka = Tansu::start(Storage::Memory);
    kafka.create_topic(&topic("admin"), PARTITIONS).await;
    let (mqtt, device_port) = mosquitto("");
    let devices = devices(device_port).await;
    let group = "fault-service";
    let env = k2v_env(&kafka, &mqtt.url(), group);

    let started = Instant::now();
    let mut stream = stream(&kafka, 250);
    // 1. Clean stop and start again.
    let app = start_app(&env).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    app.stop().await.expect("clean stop");
    assert_commits_only_cover_delivered(&kafka, group, &stream, &devices).await;
    // 2. Abort: the task is dropped mid-stream, no drain, no final commit.
    let mut app = start_app(&env).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    app.task.take().expect("running").abort();
    drop(app);
    assert_commits_only_cover_delivered(&kafka, group, &stream, &devices).await;
    // 3. SIGKILL of the service process.
    let process = ServiceProcess::start(&env);
    process.wait_ready().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    process.kill();
    assert_commits_only_cover_delivered(&kafka, group, &stream, &devices).await;
    // 4. Start again and let it finish.
    let app = start_app(&env).await;
    (&mut stream.task).await.unwrap();
    let complete = wait_all_delivered(&devices, Duration::from_secs(40)).await;
    let outcome = check(&devices);
    println!(
        "service stopped, aborted and killed mid-stream: {} events, lost {}, duplicates {}, {:?}",
        DEVICES as u64 * PER_DEVICE,
        outcome.lost,
        outcome.duplicates,
        started.elapsed()
    );
    assert!(complete && outcome.lost == 0, "lost {}", outcome.lost);
    app.stop().await.expect("clean stop");
    for d in devices {
        d.stop().await;
    }
}

/// SIGTERM to the service process; its exit status and how long it took to exit (at most `limit`).
async fn terminate(process: &mut ServiceProcess, limit: Duration) -> (std::process::ExitStatus, Duration) {
    let signalled = Instant::now();
    let _ = Command::new("kill").args(["-TERM", &process.child.id().to_string()]).status();
    loop {
        if let Some(status) = process.child.try_wait().expect("wait for the service") {
            return (status, signalled.elapsed());
        }
        assert!(signalled.elapsed() < limit, "no exit within {limit:?} of SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// SIGTERM under load (K2V events streaming to devices, V2K publishes through on_publish): the process exits within
/// SHUTDOWN_TIMEOUT (one budget for every step), the final commit covers every event the broker acknowledged, and
/// every answered publish is in Kafka.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_exits_within_the_budget_with_everything_acknowledged_committed() {
    let kafka = Tansu::start(Storage::Memory);
    kafka.create_topic(&topic("admin"), PARTITIONS).await;
    crate::v2k::create_topics(&kafka, &["admin"]).await;
    let (mqtt, device_port) = mosquitto("");
    let devices = devices(device_port).await;
    let group = "sigterm-budget";
    // k2v_env's SHUTDOWN_TIMEOUT.
    let budget = Duration::from_secs(5);
    let mut env = k2v_env(&kafka, &mqtt.url(), group);
    // QoS 0 publishes are answered at once: the linger keeps them in the producer until the flush at shutdown.
    env.push(("KAFKA_LINGER_MS", "300".into()));

    let stream = stream(&kafka, 250);
    let mut process = ServiceProcess::start(&env);
    process.wait_ready().await;
    let url = format!("http://127.0.0.1:{}/vmq/on_publish", process.port);
    let v2k_load: Vec<_> = (0..2u8)
        .map(|qos| {
            let url = url.clone();
            tokio::spawn(async move {
                let device = format!("admin:sigterm{qos}");
                let http = reqwest::Client::new();
                let mut answered = 0u64;
                loop {
                    let payload = json!({"n": answered}).to_string();
                    let body = crate::v2k::publish_body(&device, &format!("{device}/attrs"), payload.as_bytes(), qos);
                    match http.post(&url).header("vernemq-hook", "on_publish").body(body).send().await {
                        Ok(r) if r.status() == 200 => answered += 1,
                        _ => break,
                    }
                }
                (device, answered)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(3)).await;

    let (status, took) = terminate(&mut process, budget * 4).await;
    stream.task.abort();
    println!("SIGTERM under load: exited after {took:?} (budget {budget:?})");
    assert!(status.success(), "a clean stop exits 0: {status}");
    assert!(took <= budget, "the stop took {took:?}, over the {budget:?} budget");

    // K2V: the commit covers every event the broker acknowledged (the devices received), and nothing more.
    let committed = committed(&kafka, group, &topic("admin"), PARTITIONS);
    let positions: HashMap<(usize, u64), KafkaPosition> =
        stream.produced.lock().unwrap().iter().map(|(position, event)| (*event, *position)).collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let received: BTreeSet<(usize, u64)> = devices
        .iter()
        .enumerate()
        .flat_map(|(i, d)| {
            d.received()
                .into_iter()
                .filter_map(move |(_, p)| Some((i, serde_json::from_slice::<Value>(&p).ok()?["n"].as_u64()?)))
        })
        .collect();
    assert!(!received.is_empty(), "K2V delivered before the stop");
    let uncommitted: Vec<_> = received
        .iter()
        .filter(|event| positions.get(event).is_none_or(|(p, o)| *o >= committed[*p as usize]))
        .collect();
    println!("committed {committed:?}; devices received {} events", received.len());
    assert!(uncommitted.is_empty(), "acknowledged but not committed: {uncommitted:?}");
    assert_commits_only_cover_delivered(&kafka, group, &stream, &devices).await;

    // V2K: every answered publish is in Kafka.
    let records = kafka.read("admin.device-data", usize::MAX, Duration::from_secs(5)).await;
    for load in v2k_load {
        let (device, answered) = load.await.unwrap();
        assert!(answered > 0, "{device} published before the stop");
        let seen: BTreeSet<u64> = records
            .iter()
            .filter(|r| r.key.as_deref() == Some(device.as_str()))
            .filter_map(|r| r.json()["attrs"]["n"].as_u64())
            .collect();
        let lost = (0..answered).filter(|n| !seen.contains(n)).count();
        println!("{device}: answered {answered}, lost {lost}");
        assert_eq!(lost, 0, "{device}: an answered publish is not in Kafka");
    }
    for d in devices {
        d.stop().await;
    }
}

/// With Kafka gone, the producer's flush and K2V's final commit can never finish: together they still end within
/// the one SHUTDOWN_TIMEOUT budget (each used to get a full timeout of its own, and the commit could hold the
/// process after that).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_kafka_gone_exits_within_the_budget() {
    let mut kafka = Tansu::start(Storage::Memory);
    kafka.create_topic(&topic("admin"), 1).await;
    crate::v2k::create_topics(&kafka, &["admin"]).await;
    let (mqtt, _device_port) = mosquitto("");
    // k2v_env's SHUTDOWN_TIMEOUT.
    let budget = Duration::from_secs(5);
    let mut process = ServiceProcess::start(&k2v_env(&kafka, &mqtt.url(), "sigterm-kafka-gone"));
    process.wait_ready().await;
    kafka.stop();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // QoS 0 publishes are answered once queued: records the flush cannot deliver.
    let url = format!("http://127.0.0.1:{}/vmq/on_publish", process.port);
    let http = reqwest::Client::new();
    let device = "admin:kafka-gone";
    for n in 0..20 {
        let body = crate::v2k::publish_body(device, &format!("{device}/attrs"), format!("{{\"n\":{n}}}").as_bytes(), 0);
        let reply = http.post(&url).header("vernemq-hook", "on_publish").body(body).send().await.expect("on_publish");
        assert_eq!(reply.status(), 200);
    }
    let (status, took) = terminate(&mut process, budget * 4).await;
    println!("SIGTERM with Kafka gone: exited after {took:?} (budget {budget:?})");
    assert!(status.success(), "the stop is clean even when it cannot flush: {status}");
    // The process's own exit (dropping the Kafka clients) comes after the budget's last step.
    assert!(took <= budget + Duration::from_millis(1500), "the stop took {took:?}, over the {budget:?} budget");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_publisher_resends_in_order_what_a_broker_restart_cut_off() {
    use iotagent_mqtt::health::Probe;
    use iotagent_mqtt::mqtt::MqttSettings;
    use iotagent_mqtt::mqtt::publisher::Publisher;
    use iotagent_mqtt::secret::Secret;

    let (mut mqtt, device_port) = mosquitto("");
    let device = Subscriber::connect(device_port, "admin:a1998e", "admin:a1998e", "admin:a1998e/config").await;
    let settings = MqttSettings {
        host: "127.0.0.1".into(),
        port: mqtt.port,
        tls: None,
        username: "k2v-bridge".into(),
        password: Some(Secret::new(SERVICE_PASSWORD)),
        client_id: "it-publisher".into(),
        keep_alive: Duration::from_secs(5),
    };
    let (publisher, mut acks) = Publisher::start(&settings, "k2v", 1000, Probe::default()).expect("publisher");
    let mut connected = publisher.connected();
    connected.wait_for(|up| *up).await.expect("connected");

    // A burst far larger than what the broker acknowledges before it is stopped: part of it is in flight, part
    // still queued in rumqttc, when the connection goes.
    let total = 3000_u64;
    let mut next = 0;
    let mut acked = BTreeSet::new();
    let mut stopped = false;
    let mut restarted = false;
    while next < total {
        let payload = bytes::Bytes::from(json!({"n": next}).to_string());
        match publisher.publish("admin:a1998e/config", payload, false) {
            Ok(_) => next += 1,
            Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
        }
        while let Ok(seq) = acks.try_recv() {
            acked.insert(seq);
        }
        // Stop the broker while publishes are un-acknowledged, so the restart really cuts some off (stopping at a
        // moment when everything happened to be acknowledged would test nothing).
        if !restarted && next >= 1000 && publisher.in_flight() > 0 {
            mqtt.stop();
            stopped = true;
            restarted = true;
        }
        if stopped && (next >= 1500 || publisher.in_flight() >= 1000) {
            mqtt.restart();
            stopped = false;
        }
        // Never more than the bound the caller promised.
        while publisher.in_flight() >= 1000 {
            match tokio::time::timeout(Duration::from_secs(30), acks.recv()).await {
                Ok(Some(seq)) => {
                    acked.insert(seq);
                }
                _ => panic!("no acks for 30 s"),
            }
        }
    }
    while acked.len() < total as usize {
        match tokio::time::timeout(Duration::from_secs(30), acks.recv()).await {
            Ok(Some(seq)) => {
                acked.insert(seq);
            }
            _ => panic!("only {} of {total} acknowledged", acked.len()),
        }
    }
    assert_eq!(acked, (0..total).collect::<BTreeSet<u64>>(), "every sequence number acknowledged once");
    let resent = publisher.resent();
    // The broker holds what it acknowledged for the device's persistent session.
    wait_until(Duration::from_secs(20), async || {
        device
            .received()
            .iter()
            .filter_map(|(_, p)| serde_json::from_slice::<Value>(p).ok()?["n"].as_u64())
            .collect::<BTreeSet<_>>()
            .len() as u64
            == total
    })
    .await;
    // Order: every delivery repeats something delivered already or is the next one.
    let (mut next_expected, mut seen, mut duplicates) = (0_u64, BTreeSet::new(), 0);
    for (_, payload) in device.received() {
        let n = serde_json::from_slice::<Value>(&payload).unwrap()["n"].as_u64().unwrap();
        assert!(n <= next_expected, "got {n} before {next_expected}: out of order");
        if n == next_expected {
            next_expected += 1;
        }
        if !seen.insert(n) {
            duplicates += 1;
        }
    }
    let lost = total - seen.len() as u64;
    println!(
        "publisher across a broker restart: {total} publishes, re-sent {resent}, lost {lost}, duplicates {duplicates}"
    );
    assert!(resent > 0, "the restart cut nothing off: the test did not exercise the re-send");
    assert_eq!(lost, 0);
    assert_eq!(publisher.close(Duration::from_secs(5)).await, 0);
    device.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_bounded_when_kafka_is_gone() {
    let mut kafka = Tansu::start(Storage::Memory);
    kafka.create_topic(&topic("admin"), 1).await;
    let (mqtt, _device_port) = mosquitto("");
    let app = start_app(&k2v_env(&kafka, &mqtt.url(), "kafka-gone")).await;
    kafka.stop();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    app.stop().await.expect("clean stop");
    println!("stopped {:?} after Kafka went away", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(15), "shutdown took {:?}", started.elapsed());
}
