//! V2K throughput and added latency against a plain rdkafka producer measured in the same run on the same broker
//! (tansu, memory storage) with the same settings, plus the service's CPU time per webhook call next to a trivial
//! axum responder's. Run with `cargo bench --bench v2k`.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::routing::post;
use base64::Engine as _;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::net::TcpStream;

const DEVICES: usize = 64;
const PHASE: Duration = Duration::from_secs(5);
const TOPIC: &str = "bench.device-data";
/// Tenants of the per-tenant rows.
const MANY_TENANTS: usize = 100;

#[allow(dead_code)]
#[path = "../tests/it/common/brokers.rs"]
mod brokers;
#[path = "v2k/cpu.rs"]
mod cpu;
#[path = "v2k/subscription.rs"]
mod subscription;

use brokers::free_port;

/// Mosquitto as the bench always ran it: no persistence, room for every device's in-flight and queued messages.
const MOSQUITTO_SETTINGS: &str = "persistence false\nmax_inflight_messages 1000\nmax_queued_messages 1000000\n";

fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "port {port} not listening");
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        self.0.kill().ok();
        self.0.wait().ok();
    }
}

impl Proc {
    /// User + system CPU seconds so far (from /proc, in clock ticks of 10 ms).
    fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.0.id())).unwrap_or_default();
        let fields: Vec<&str> =
            stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
        let ticks: f64 = fields.get(11).and_then(|u| u.parse().ok()).unwrap_or(0.0)
            + fields.get(12).and_then(|s| s.parse().ok()).unwrap_or(0.0);
        ticks / 100.0
    }

    /// Runs `work`, which returns what it got and how many items (messages, calls) that was; with the process's CPU µs
    /// per item over that time.
    fn cpu_per_item<T>(&self, work: impl FnOnce() -> (T, u64)) -> (T, f64) {
        let before = self.cpu_seconds();
        let (done, items) = work();
        (done, (self.cpu_seconds() - before) * 1e6 / items.max(1) as f64)
    }
}

fn payload(n: u64) -> String {
    format!(r#"{{"temperature": 21.5, "humidity": 40, "n": {n}}}"#)
}

fn dojot_value(device: usize, n: u64) -> String {
    format!(
        r#"{{"metadata":{{"deviceid":"d{device}","tenant":"bench","timestamp":1732540000000}},"attrs":{}}}"#,
        payload(n)
    )
}

struct Outcome {
    per_second: f64,
    latency: Histogram<u64>,
}

fn micros(h: &Histogram<u64>, q: f64) -> u64 {
    h.value_at_quantile(q)
}

/// A producer with the service's settings (see `iotagent_mqtt::kafka::producer`).
fn plain_producer_client(brokers: &str) -> FutureProducer {
    plain_producer_compressed(brokers, "none")
}

fn plain_producer_compressed(brokers: &str, compression: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.type", compression)
        .set("linger.ms", "5")
        .create()
        .expect("producer")
}

/// Baseline: a plain producer with the service's settings, `DEVICES` concurrent senders each waiting for its ack.
async fn plain_producer(brokers: &str, tenants: usize) -> Outcome {
    let producer = plain_producer_client(brokers);
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for device in 0..DEVICES {
        let producer = producer.clone();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new(3).expect("hist");
            let key = format!("{}:d{device}", tenant(device, tenants));
            let topic = format!("{}.device-data", tenant(device, tenants));
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let value = dojot_value(device, n);
                let started = Instant::now();
                producer.send(FutureRecord::to(&topic).key(&key).payload(&value), Duration::from_secs(5)).await.ok();
                hist.record(started.elapsed().as_micros() as u64).ok();
                n += 1;
            }
            hist
        }));
    }
    collect(stop, tasks).await
}

async fn collect(stop: Arc<AtomicBool>, tasks: Vec<tokio::task::JoinHandle<Histogram<u64>>>) -> Outcome {
    let started = Instant::now();
    tokio::time::sleep(PHASE).await;
    stop.store(true, Ordering::Relaxed);
    let mut latency = Histogram::<u64>::new(3).expect("hist");
    for t in tasks {
        latency.add(t.await.expect("task")).expect("bounds");
    }
    Outcome { per_second: latency.len() as f64 / started.elapsed().as_secs_f64(), latency }
}

/// The tenant of a device when the load is spread over `tenants` tenants (`bench` alone when 1).
fn tenant(device: usize, tenants: usize) -> String {
    if tenants == 1 { "bench".to_string() } else { format!("bench{}", device % tenants) }
}

/// A webhook load: `connections` keep-alive sessions, each sending its next publish when the previous one was answered
/// (as VerneMQ does), devices spread over `tenants` tenants, optionally paced to `rate` requests per second in all.
#[derive(Clone, Copy)]
struct Load {
    connections: usize,
    tenants: usize,
    /// Payloads padded to this many bytes (None: the short `payload(n)` of the other rows).
    payload_bytes: Option<usize>,
    rate: Option<f64>,
}

impl Load {
    /// The load of the throughput rows: `DEVICES` sessions as fast as the service answers.
    fn devices(tenants: usize) -> Self {
        Self { connections: DEVICES, tenants, payload_bytes: None, rate: None }
    }
}

/// A JSON object of exactly `bytes` bytes (at least the short payload's length).
fn padded_payload(n: u64, bytes: usize) -> String {
    let short = format!(r#"{{"temperature": 21.5, "humidity": 40, "n": {n}, "pad": ""}}"#);
    let pad = "x".repeat(bytes.saturating_sub(short.len()));
    format!(r#"{{"temperature": 21.5, "humidity": 40, "n": {n}, "pad": "{pad}"}}"#)
}

async fn webhook_load(addr: SocketAddr, hook: &'static str, counter: Arc<AtomicU64>, load: Load) -> Outcome {
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    let period = load.rate.map(|rate| Duration::from_secs_f64(load.connections as f64 / rate));
    for device in 0..load.connections {
        let stop = stop.clone();
        let counter = counter.clone();
        tasks.push(tokio::spawn(async move {
            let stream = TcpStream::connect(addr).await.expect("connect");
            stream.set_nodelay(true).ok();
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("http");
            tokio::spawn(conn);
            let mut hist = Histogram::<u64>::new(3).expect("hist");
            let username = format!("{}:d{device}", tenant(device, load.tenants));
            let started = tokio::time::Instant::now();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                if let Some(period) = period {
                    tokio::time::sleep_until(started + period * n as u32).await;
                }
                let payload = match load.payload_bytes {
                    Some(bytes) => padded_payload(n, bytes),
                    None => payload(n),
                };
                let body = serde_json::json!({"username": username, "mountpoint": "", "client_id": username, "qos": 1,
                    "topic": format!("{username}/attrs"),
                    "payload": base64::engine::general_purpose::STANDARD.encode(payload), "retain": false})
                .to_string();
                let request = Request::post(format!("/vmq/{hook}"))
                    .header("host", "127.0.0.1")
                    .header("vernemq-hook", hook)
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(body)))
                    .expect("request");
                let sent = Instant::now();
                let response = sender.send_request(request).await.expect("response");
                let status = response.status();
                let body = response.into_body().collect().await.expect("body").to_bytes();
                assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
                hist.record(sent.elapsed().as_micros() as u64).ok();
                counter.fetch_add(1, Ordering::Relaxed);
                n += 1;
            }
            hist
        }));
    }
    collect(stop, tasks).await
}

fn start_service(env: &[(&str, String)]) -> (Proc, SocketAddr) {
    start_service_binary(env!("CARGO_BIN_EXE_iotagent-mqtt"), env)
}

/// The service from `binary` (this build's, or another build to compare with in the same run).
fn start_service_binary(binary: &str, env: &[(&str, String)]) -> (Proc, SocketAddr) {
    let port = free_port();
    let child = service_command(Command::new(binary), port, env).spawn().expect("service");
    wait_port(port);
    (Proc(child), SocketAddr::from(([127, 0, 0, 1], port)))
}

/// `command` (the service's binary, or a program that runs it) with the service's environment and nothing else.
fn service_command(mut command: Command, port: u16, env: &[(&str, String)]) -> Command {
    command
        .env_clear()
        .env("IOTAGENT_LISTEN", format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "error")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    command
}

/// This bench binary re-executed as the trivial responder, so both servers are processes measured alike.
fn trivial_server_main(port: u16) {
    // One thread, as the service's webhook runtime has by default (WEBHOOK_THREADS).
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
    rt.block_on(async move {
        let router = Router::new().route(
            "/vmq/{hook}",
            post(|_b: Bytes| async { ([("content-type", "application/json")], r#"{"result":"ok"}"#) }),
        );
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.expect("bind");
        axum::serve(listener, router).await.ok();
    });
}

fn start_trivial() -> (Proc, SocketAddr) {
    let port = free_port();
    let child = trivial_command(Command::new(std::env::current_exe().expect("exe")), port).spawn().expect("trivial");
    wait_port(port);
    (Proc(child), SocketAddr::from(([127, 0, 0, 1], port)))
}

/// `command` (this bench binary, or a program that runs it) set up to be the trivial responder on `port`.
fn trivial_command(mut command: Command, port: u16) -> Command {
    command.env("V2K_BENCH_TRIVIAL_PORT", port.to_string()).stdout(Stdio::null());
    command
}

fn main() {
    if let Ok(port) = std::env::var("V2K_BENCH_TRIVIAL_PORT") {
        return trivial_server_main(port.parse().expect("port"));
    }
    if let Ok(spec) = std::env::var("V2K_BENCH_PRODUCER") {
        return cpu::producer_main(&spec);
    }
    // `cargo bench --bench v2k -- cpu`: only the CPU rows (for profiling).
    // `cargo bench --bench v2k -- instructions`: only the instruction counts (valgrind; see `cpu::instructions`).
    // `cargo bench --bench v2k -- subscription`: only the subscription rows.
    let only_subscription = std::env::args().any(|a| a == "subscription");
    let only_cpu = std::env::args().any(|a| a == "cpu");
    let only_instructions = std::env::args().any(|a| a == "instructions");
    let kafka = brokers::Tansu::start(brokers::Storage::Memory);
    let brokers = kafka.brokers();
    let mqtt = brokers::Mosquitto::start_with(&[("k2v-bridge", "pw")], MOSQUITTO_SETTINGS);
    let (mqtt_port, device_port) = (mqtt.port, mqtt.device_port);

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("rt");
    rt.block_on(async {
        let admin: AdminClient<DefaultClientContext> =
            ClientConfig::new().set("bootstrap.servers", &brokers).create().expect("admin");
        let topics = [
            NewTopic::new(TOPIC, 3, TopicReplication::Fixed(1)),
            NewTopic::new("bench.device-data.dead-letter", 1, TopicReplication::Fixed(1)),
            // The removed-device reader's topic, as a deployment has one: without any, its consumer retries joining
            // its group every second, matching every topic's name against its pattern each time.
            NewTopic::new("bench.dojot.device-manager.device", 1, TopicReplication::Fixed(1)),
        ];
        admin.create_topics(&topics, &AdminOptions::new()).await.expect("topics");
        // The 100-tenant rows: one data topic per tenant (tansu creates no topic by itself).
        let many: Vec<String> = (0..MANY_TENANTS).map(|t| format!("bench{t}.device-data")).collect();
        let many: Vec<NewTopic> = many.iter().map(|t| NewTopic::new(t, 1, TopicReplication::Fixed(1))).collect();
        admin.create_topics(&many, &AdminOptions::new()).await.expect("tenant topics");
    });

    let kafka_env = |mode: &str| {
        vec![
            ("KAFKA_BROKERS", brokers.clone()),
            ("V2K_MODE", mode.to_string()),
            ("MQTT_USERNAME", "k2v-bridge".to_string()),
            ("K2V_ENABLED", "false".to_string()),
        ]
    };
    if only_instructions {
        return cpu::instructions(&rt, &kafka_env("on_publish"));
    }
    if only_cpu {
        cpu::run(&rt, &kafka_env("on_publish"), &brokers);
        return cpu::many_partitions(&brokers);
    }
    if only_subscription {
        return subscription_rows(&rt, &brokers, kafka_env("subscription"), mqtt_port, device_port);
    }
    println!("V2K benchmark: {DEVICES} concurrent devices, {PHASE:?} per phase, tansu (memory) on this machine");
    // Baselines on the same topics as the rows they are compared with: one tenant's, or 100 tenants' topics.
    let plain_one = rt.block_on(plain_producer(&brokers, 1));
    let plain_many = rt.block_on(plain_producer(&brokers, MANY_TENANTS));
    for (plain, tenants) in [(&plain_one, 1), (&plain_many, MANY_TENANTS)] {
        println!(
            "plain producer, {tenants:>3} topic(s) {:>8.0} msg/s  p50 {:>6} µs  p99 {:>6} µs",
            plain.per_second,
            micros(&plain.latency, 0.5),
            micros(&plain.latency, 0.99)
        );
    }
    for (mode, hook, tenants) in [
        ("on_publish", "on_publish", 1),
        ("auth_on_publish", "auth_on_publish", 1),
        ("auth_on_publish", "auth_on_publish", MANY_TENANTS),
    ] {
        let (service, addr) = start_service(&kafka_env(mode));
        std::thread::sleep(Duration::from_secs(2));
        let calls = Arc::new(AtomicU64::new(0));
        let (outcome, cpu_per_call) = service.cpu_per_item(|| {
            let outcome = rt.block_on(webhook_load(addr, hook, calls.clone(), Load::devices(tenants)));
            (outcome, calls.load(Ordering::Relaxed))
        });
        let plain = if tenants == 1 { &plain_one } else { &plain_many };
        let mode = format!("{mode}, {tenants} tenant(s)");
        println!(
            "{mode:<28} {:>8.0} msg/s  p50 {:>6} µs  p99 {:>6} µs  ratio {:.2}  added p50 {:>5} µs p99 {:>5} µs  CPU {:.1} µs/call",
            outcome.per_second,
            micros(&outcome.latency, 0.5),
            micros(&outcome.latency, 0.99),
            outcome.per_second / plain.per_second,
            micros(&outcome.latency, 0.5).saturating_sub(micros(&plain.latency, 0.5)),
            micros(&outcome.latency, 0.99).saturating_sub(micros(&plain.latency, 0.99)),
            cpu_per_call
        );
    }

    // CPU per webhook call: the ACL decision (what VerneMQ calls on every uncached publish) vs a trivial responder.
    let (acl, acl_addr) = start_service(&[]);
    let (trivial, trivial_addr) = start_trivial();
    for (name, proc_, addr) in
        [("trivial axum responder", &trivial, trivial_addr), ("service auth_on_publish (ACL)", &acl, acl_addr)]
    {
        let calls = Arc::new(AtomicU64::new(0));
        let (outcome, cpu_per_call) = proc_.cpu_per_item(|| {
            let outcome = rt.block_on(webhook_load(addr, "auth_on_publish", calls.clone(), Load::devices(1)));
            (outcome, calls.load(Ordering::Relaxed))
        });
        println!("{name:<28} {:>8.0} calls/s  CPU {:.1} µs/call", outcome.per_second, cpu_per_call);
    }
    drop(acl);
    drop(trivial);

    subscription_rows(&rt, &brokers, kafka_env("subscription"), mqtt_port, device_port);
    cpu::run(&rt, &kafka_env("on_publish"), &brokers);
    cpu::many_partitions(&brokers);
}

/// Subscription mode: devices publish QoS 1 through Mosquitto as fast as they can; the service holds up to
/// V2K_MAX_IN_FLIGHT (1000) unacknowledged. Baseline: the same records from a plain producer with the same window.
fn subscription_rows(
    rt: &tokio::runtime::Runtime,
    brokers: &str,
    kafka_env: Vec<(&'static str, String)>,
    mqtt_port: u16,
    device_port: u16,
) {
    let total: u64 = 100_000;
    let window = 1000;
    rt.block_on(async {
        let admin: AdminClient<DefaultClientContext> =
            ClientConfig::new().set("bootstrap.servers", brokers).create().expect("admin");
        let lease = NewTopic::new("iotagent.v2k-lease", 1, TopicReplication::Fixed(1));
        admin.create_topics(&[lease], &AdminOptions::new()).await.expect("lease topic");
    });
    for tenants in [1, MANY_TENANTS] {
        let plain_window = rt.block_on(plain_producer_window(brokers, total, window, tenants));
        println!("plain producer, {tenants:>3} topic(s), {window} in flight: {:>8.0} msg/s", plain_window);
        let rows = subscription::Rows { kafka_env: kafka_env.clone(), mqtt_port, device_port, total, window };
        rows.run(rt, plain_window, tenants);
    }
}

/// `total` records with at most `window` unacknowledged; returns records/s.
async fn plain_producer_window(brokers: &str, total: u64, window: usize, tenants: usize) -> f64 {
    let producer = plain_producer_client(brokers);
    let started = Instant::now();
    let mut in_flight = std::collections::VecDeque::new();
    for n in 0..total {
        let device = (n % DEVICES as u64) as usize;
        let key = format!("{}:d{device}", tenant(device, tenants));
        let topic = format!("{}.device-data", tenant(device, tenants));
        let value = dojot_value(device, n);
        loop {
            match producer.send_result(FutureRecord::to(&topic).key(&key).payload(&value)) {
                Ok(delivery) => {
                    in_flight.push_back(delivery);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
        if in_flight.len() >= window
            && let Some(oldest) = in_flight.pop_front()
        {
            let _ = oldest.await;
        }
    }
    for delivery in in_flight {
        let _ = delivery.await;
    }
    total as f64 / started.elapsed().as_secs_f64()
}

async fn http_get(addr: SocketAddr, path: &str) -> String {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("http");
    tokio::spawn(conn);
    let request = Request::get(path).header("host", "x").body(Full::new(Bytes::new())).expect("req");
    let response = sender.send_request(request).await.expect("response");
    String::from_utf8_lossy(&response.into_body().collect().await.expect("body").to_bytes()).to_string()
}
