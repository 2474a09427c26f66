//! K2V throughput: a backlog of configure events in Kafka (tansu, memory storage) drained to Mosquitto PUBACKs by the
//! bridge, against a plain rumqttc QoS 1 publish loop to the same broker in the same run.
//!
//! `cargo bench --bench k2v` (needs `tansu` and `mosquitto`, as the tests do). `K2V_BENCH_EVENTS` overrides the
//! backlog size (default 100 000).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use iotagent_mqtt::health::Probe;
use iotagent_mqtt::k2v::{EventRules, K2v, K2vSettings};
use iotagent_mqtt::kafka::consumer::ConsumerSettings;
use iotagent_mqtt::metrics::Metrics;
use iotagent_mqtt::mqtt::MqttSettings;
use iotagent_mqtt::policy::IdCharset;
use iotagent_mqtt::secret::Secret;
use iotagent_mqtt::shutdown::Budget;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};

const PASSWORD: &str = "bench";
const TOPIC: &str = "bench.dojot.device-manager.device";
const PARTITIONS: i32 = 4;
const DEVICES: usize = 100;
const IN_FLIGHT: u16 = 500;

// ---- minimal broker harness (benches cannot use tests/it/common) ----

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

fn binary(name: &str) -> PathBuf {
    let home = std::env::var("HOME").unwrap_or_default();
    let path = std::env::var("PATH").unwrap_or_default();
    let dirs = path.split(':').map(PathBuf::from).chain([
        PathBuf::from("/usr/sbin"),
        PathBuf::from("/usr/local/bin"),
        Path::new(&home).join(".cargo/bin"),
    ]);
    dirs.map(|d| d.join(name)).find(|p| p.is_file()).unwrap_or_else(|| panic!("{name} is not installed"))
}

struct Broker(Child);

impl Drop for Broker {
    fn drop(&mut self) {
        self.0.kill().ok();
        self.0.wait().ok();
    }
}

fn spawn(command: &mut Command, port: u16) -> Broker {
    let child = command.stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("start broker");
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port))).is_err() {
        assert!(Instant::now() < deadline, "broker on {port} did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Broker(child)
}

fn tansu(port: u16) -> Broker {
    let url = format!("tcp://127.0.0.1:{port}");
    let mut command = Command::new(binary("tansu"));
    command.args(["broker", "--listener-url", &url, "--advertised-listener-url", &url, "--storage-engine"]);
    command.arg("memory://tansu/").env("RUST_LOG", "warn");
    spawn(&mut command, port)
}

fn mosquitto(dir: &Path, port: u16) -> Broker {
    let passwd = dir.join("passwd");
    std::fs::write(&passwd, "").expect("passwd");
    let status = Command::new(binary("mosquitto_passwd"))
        .args(["-b", passwd.to_str().expect("utf-8"), "k2v-bridge", PASSWORD])
        .status()
        .expect("mosquitto_passwd");
    assert!(status.success());
    let config = format!(
        "user root\nper_listener_settings true\npersistence false\nlog_dest none\nmax_queued_messages 1000000\n\
         listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}\n",
        passwd.display()
    );
    let config_path = dir.join("mosquitto.conf");
    std::fs::write(&config_path, config).expect("config");
    spawn(Command::new(binary("mosquitto")).arg("-c").arg(&config_path), port)
}

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

/// The baseline: `events` QoS 1 publishes from one rumqttc client with the same in-flight window, until the last PUBACK.
/// `nodelay` as the K2V publisher sets it; rumqttc's default leaves Nagle's algorithm on.
async fn plain_publish_loop(port: u16, events: usize, nodelay: bool) -> Duration {
    let mut options = MqttOptions::new(format!("bench-plain-{nodelay}"), "127.0.0.1", port);
    options.set_credentials("k2v-bridge", PASSWORD);
    options.set_inflight(IN_FLIGHT);
    let (client, mut eventloop) = AsyncClient::new(options, usize::from(IN_FLIGHT));
    let mut network = eventloop.network_options();
    network.set_tcp_nodelay(nodelay);
    eventloop.set_network_options(network);
    let started = Instant::now();
    let publisher = tokio::spawn(async move {
        for n in 0..events {
            let topic = format!("bench:d{}/config", n % DEVICES);
            client.publish(topic, QoS::AtLeastOnce, false, attrs(n)).await.expect("publish");
        }
        client
    });
    let mut acked = 0;
    while acked < events {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::PubAck(_))) => acked += 1,
            Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
            Ok(_) => {}
            Err(e) => panic!("baseline connection failed: {e}"),
        }
    }
    let elapsed = started.elapsed();
    let _ = publisher.await;
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
        rules: EventRules { id_charset: IdCharset::default(), config_suffix: "config".into() },
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
    let k2v = K2v::start(settings, &metrics, Probe::default(), Probe::default(), Budget::new(Duration::from_secs(10)))
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
    let dir = tempfile::tempdir().expect("temp dir");
    let (kafka_port, mqtt_port) = (free_port(), free_port());
    let _tansu = tansu(kafka_port);
    let _mosquitto = mosquitto(dir.path(), mqtt_port);
    let brokers = format!("127.0.0.1:{kafka_port}");

    runtime.block_on(async {
        let produce = backlog(&brokers, events).await;
        println!("backlog: {events} configure events in Kafka ({PARTITIONS} partitions) in {produce:.2?}");

        let plain = plain_publish_loop(mqtt_port, events, true).await;
        let plain_rate = events as f64 / plain.as_secs_f64();
        println!("plain rumqttc QoS 1 loop, TCP_NODELAY (as K2V): {events} publishes acked in {plain:.2?} = {plain_rate:.0}/s");
        let nagle = plain_publish_loop(mqtt_port, events, false).await;
        let nagle_rate = events as f64 / nagle.as_secs_f64();
        println!("plain rumqttc QoS 1 loop, Nagle on (rumqttc default): {nagle:.2?} = {nagle_rate:.0}/s");

        let (first, last) = drain(&brokers, mqtt_port, events).await;
        let steady = last.saturating_sub(first);
        let k2v_rate = events as f64 / steady.as_secs_f64();
        println!(
            "K2V: backlog drained {last:.2?} after start (first PUBACK after {first:.2?}: group join); \
             {k2v_rate:.0} events/s from first to last PUBACK"
        );
        println!("ratio K2V / plain loop with Nagle on: {:.2}", k2v_rate / nagle_rate);
        println!("ratio K2V / plain loop, same TCP settings: {:.2} (target >= 0.8)", k2v_rate / plain_rate);
    });
}
