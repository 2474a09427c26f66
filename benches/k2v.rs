//! K2V throughput: a backlog of configure events in Kafka (tansu, memory storage) drained to Mosquitto PUBACKs by the
//! bridge, against a plain rumqttc QoS 1 publish loop (MQTT 5, as the K2V publisher) to the same broker in the same run.
//!
//! `cargo bench --bench k2v` (needs `tansu` and `mosquitto`, as the tests do). `K2V_BENCH_EVENTS` overrides the
//! backlog size (default 100 000).

use std::time::{Duration, Instant};

use iotagent_mqtt::k2v::{EventRules, K2v, K2vSettings};
use iotagent_mqtt::kafka::consumer::ConsumerSettings;
use iotagent_mqtt::metrics::Metrics;
use iotagent_mqtt::mqtt::MqttSettings;
use iotagent_mqtt::policy::IdCharset;
use iotagent_mqtt::readiness::ReadyFlag;
use iotagent_mqtt::secret::Secret;
use iotagent_mqtt::shutdown::{Budget, Critical};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rumqttc::Outgoing;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, Incoming, MqttOptions};

const PASSWORD: &str = "bench";
const TOPIC: &str = "bench.dojot.device-manager.device";
const PARTITIONS: i32 = 4;
const DEVICES: usize = 100;
const IN_FLIGHT: u16 = 500;

// ---- brokers: the test suite's harness ----

#[allow(dead_code)]
#[path = "../tests/it/common/brokers.rs"]
mod brokers;

/// Mosquitto as the bench always ran it: no persistence, a queue long enough for the whole backlog. (brokers.rs
/// raises `max_inflight_messages`, which Mosquitto also announces as its Receive Maximum to MQTT 5 clients: its
/// default, 20, would cap the window of 500 at 20.)
const MOSQUITTO_SETTINGS: &str = "persistence false\nmax_queued_messages 1000000\n";

// ---- workloads ----

fn attrs(n: usize) -> String {
    format!(r#"{{"n":{n},"setpoint":21.5,"mode":"eco"}}"#)
}

/// Fills the topic with `events` configure events over DEVICES devices.
async fn backlog(brokers: &str, events: usize) -> Duration {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", brokers).create().expect("admin");
    let topic = NewTopic::new(TOPIC, PARTITIONS, TopicReplication::Fixed(1));
    admin.create_topics(&[topic], &AdminOptions::new()).await.expect("create topic");
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "20")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .expect("producer");
    let started = Instant::now();
    let mut deliveries = Vec::with_capacity(events);
    for n in 0..events {
        let device = format!("d{}", n % DEVICES);
        let value = format!(
            r#"{{"event":"configure","meta":{{"service":"bench","timestamp":1}},"data":{{"id":"{device}","attrs":{}}}}}"#,
            attrs(n)
        );
        let record = FutureRecord::to(TOPIC).key(&device).payload(&value);
        deliveries.push(producer.send_result(record).map_err(|(e, _)| e).expect("enqueue"));
    }
    for d in deliveries {
        d.await.expect("producer alive").map_err(|(e, _)| e).expect("delivered");
    }
    started.elapsed()
}

/// The baseline: `events` QoS 1 publishes from one rumqttc MQTT 5 client set up as the K2V publisher (TCP_NODELAY,
/// in-flight upper limit and request queue as `Publisher::start` sets them), with the same window: at most IN_FLIGHT
/// publishes unacknowledged, handed to rumqttc with `try_publish` (no waiting) from the task that polls the event
/// loop, until the last PUBACK. The broker's Receive Maximum (CONNACK) caps both the same way.
async fn plain_publish_loop(port: u16, events: usize) -> Duration {
    let mut options = MqttOptions::new("bench-plain", "127.0.0.1", port);
    options.set_credentials("k2v-bridge", PASSWORD);
    options.set_outgoing_inflight_upper_limit(IN_FLIGHT.saturating_mul(2).saturating_add(10));
    let mut network = options.network_options();
    network.set_tcp_nodelay(true);
    options.set_network_options(network);
    let (client, mut eventloop) = AsyncClient::new(options, usize::from(IN_FLIGHT) + 64);
    let started = Instant::now();
    let (mut submitted, mut acked) = (0, 0);
    let mut receive_max = None;
    while acked < events {
        while submitted < events && submitted - acked < usize::from(IN_FLIGHT) {
            let topic = format!("bench:d{}/config", submitted % DEVICES);
            if client.try_publish(topic, QoS::AtLeastOnce, false, attrs(submitted)).is_err() {
                break; // request queue full: poll first
            }
            submitted += 1;
        }
        match eventloop.poll().await {
            Ok(Event::Incoming(Incoming::PubAck(_))) => acked += 1,
            Ok(Event::Incoming(Incoming::ConnAck(ack))) => {
                receive_max = ack.properties.and_then(|p| p.receive_max);
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
            Ok(_) => {}
            Err(e) => panic!("baseline connection failed: {e}"),
        }
    }
    let elapsed = started.elapsed();
    println!("broker's Receive Maximum (CONNACK): {receive_max:?}");
    let _ = client.try_disconnect();
    elapsed
}

fn acked(metrics: &Metrics) -> f64 {
    metrics
        .render()
        .lines()
        .find_map(|l| l.strip_prefix("iotagent_k2v_acked_total ").and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

/// Starts the bridge on the backlog; returns (time to the first ack, time to the last ack).
async fn drain(brokers: &str, mqtt_port: u16, events: usize) -> (Duration, Duration) {
    let settings = K2vSettings {
        rules: EventRules {
            id_charset: IdCharset::default(),
            config_suffix: "config".into(),
            topic_suffix: "dojot.device-manager.device".into(),
            max_message_size: None,
        },
        retain: false,
        max_in_flight: IN_FLIGHT,
        lag_interval: Duration::from_secs(10),
        consumer: ConsumerSettings {
            brokers: brokers.to_string(),
            group_id: "bench".into(),
            client_id: "bench-k2v".into(),
            topic_pattern: r"^.+\.dojot\.device-manager\.device$".into(),
            commit_interval: Duration::from_secs(1),
            session_timeout: Duration::from_secs(10),
            metadata_refresh: Duration::from_secs(10),
            auto_offset_reset: "earliest".into(),
            stats_interval: Duration::from_secs(1),
        },
        mqtt: MqttSettings {
            host: "127.0.0.1".into(),
            port: mqtt_port,
            tls: None,
            username: "k2v-bridge".into(),
            password: Some(Secret::new(PASSWORD)),
            client_id: "bench".into(),
            keep_alive: Duration::from_secs(30),
        },
    };
    let metrics = Metrics::new();
    let started = Instant::now();
    let k2v = K2v::start(
        settings,
        &metrics,
        ReadyFlag::default(),
        ReadyFlag::default(),
        Budget::new(Duration::from_secs(10)),
        &Critical::new(tokio_util::sync::CancellationToken::new()),
    )
    .expect("K2V starts");
    let mut first = None;
    loop {
        let done = acked(&metrics);
        if first.is_none() && done > 0.0 {
            first = Some(started.elapsed());
        }
        if done >= events as f64 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(600), "backlog not drained in 10 minutes ({done} acked)");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let last = started.elapsed();
    k2v.shutdown().await;
    (first.unwrap_or(last), last)
}

fn main() {
    let events: usize = std::env::var("K2V_BENCH_EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let tansu = brokers::Tansu::start(brokers::Storage::Memory);
    let mosquitto = brokers::Mosquitto::start_with(&[("k2v-bridge", PASSWORD)], MOSQUITTO_SETTINGS);
    let (brokers, mqtt_port) = (tansu.brokers(), mosquitto.port);

    runtime.block_on(async {
        let produce = backlog(&brokers, events).await;
        println!("backlog: {events} configure events in Kafka ({PARTITIONS} partitions) in {produce:.2?}");

        let plain = plain_publish_loop(mqtt_port, events).await;
        let plain_rate = events as f64 / plain.as_secs_f64();
        println!("plain rumqttc v5 QoS 1 loop, same window and settings as K2V: {events} publishes acked in {plain:.2?} = {plain_rate:.0}/s");

        let (first, last) = drain(&brokers, mqtt_port, events).await;
        let steady = last.saturating_sub(first);
        let k2v_rate = events as f64 / steady.as_secs_f64();
        println!(
            "K2V: backlog drained {last:.2?} after start (first PUBACK after {first:.2?}: group join); \
             {k2v_rate:.0} events/s from first to last PUBACK"
        );
        println!("ratio K2V / plain loop: {:.2} (target >= 0.8)", k2v_rate / plain_rate);
    });
}
