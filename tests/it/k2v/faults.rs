//! K2V fault tests: Mosquitto restarted, the service stopped, aborted and SIGKILLed, and the publisher alone across a
//! broker restart, in the middle of a stream; lost and duplicated events counted, commits checked against deliveries.

use tokio::task::JoinHandle;

use crate::common::link::DelayedLink;

use super::*;

const DEVICES: usize = 5;
const PER_DEVICE: u64 = 400;
pub(super) const PARTITIONS: i32 = 4;

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
pub(super) type KafkaPosition = (i32, i64);

pub(super) struct Stream {
    /// (partition, offset) → (device, n) of every produced event.
    pub(super) produced: Arc<Mutex<HashMap<KafkaPosition, (usize, u64)>>>,
    pub(super) task: JoinHandle<()>,
}

/// Produces PER_DEVICE configure events for each device, interleaved, keyed by device (so each device's events share a
/// partition), at about `rate` events/s.
pub(super) fn stream(kafka: &Tansu, rate: u64) -> Stream {
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

pub(super) async fn devices(port: u16) -> Vec<Subscriber> {
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

/// `(device index, n)` of every configuration the devices received.
pub(super) fn received_events(devices: &[Subscriber]) -> BTreeSet<(usize, u64)> {
    devices
        .iter()
        .enumerate()
        .flat_map(|(i, d)| {
            d.received()
                .into_iter()
                .filter_map(move |(_, p)| Some((i, serde_json::from_slice::<Value>(&p).ok()?["n"].as_u64()?)))
        })
        .collect()
}

/// Every event below the committed offset of its partition was delivered: a commit never passed an event the
/// broker had not acknowledged (the broker holds acknowledged ones for the persistent device sessions).
pub(super) async fn assert_commits_only_cover_delivered(
    kafka: &Tansu,
    group: &str,
    stream: &Stream,
    devices: &[Subscriber],
) {
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
        let received = received_events(devices);
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
        lag = metric(&app.metrics().await, "iotagent_k2v_lag");
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
    let resent = metric(&app.metrics().await, "iotagent_k2v_resent_total");
    println!("publishes re-sent after reconnects: {resent}; lag while Mosquitto was down: {lag}");
    assert!(lag > 0.0, "the lag gauge shows the backlog");
    assert!(complete && outcome.lost == 0, "lost {}", outcome.lost);
    app.stop().await.expect("clean stop");
    assert_commits_only_cover_delivered(&kafka, "fault-mqtt", &stream, &devices).await;
    for d in devices {
        d.stop().await;
    }
}

/// Mosquitto's default Receive Maximum (its `max_inflight_messages`): the broker lets the service have this many
/// publishes unacknowledged on a connection.
const SMALL_RECEIVE_MAXIMUM: u16 = 20;
/// K2V's window (`K2V_MAX_IN_FLIGHT`), ten times the broker's.
const LARGE_K2V_WINDOW: u16 = 200;
/// Between the service and the broker, each way: a PUBACK comes back 50 ms after its publish, as from a broker on
/// another host. Over the bare loopback PUBACKs come back faster than rumqttc takes publishes from its pending list
/// (about one a millisecond), so publishes sent again would never find their packet ids still in use.
const ONE_WAY_LATENCY: Duration = Duration::from_millis(25);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_mosquitto_restarts_with_a_receive_maximum_below_the_k2v_window() {
    let kafka = Tansu::start(Storage::Memory);
    kafka.create_topic(&topic("admin"), PARTITIONS).await;
    let mut mqtt = Mosquitto::start_with_receive_maximum(&[("k2v-bridge", K2V_PASSWORD)], SMALL_RECEIVE_MAXIMUM);
    let devices = devices(mqtt.device_port).await;
    let link = DelayedLink::start(mqtt.port, ONE_WAY_LATENCY).await;
    let group = "fault-receive-max";
    let mut env = k2v_env(&kafka, &link.url(), group);
    env.push(("K2V_MAX_IN_FLIGHT", LARGE_K2V_WINDOW.to_string()));
    let app = start_app(&env).await;

    let started = Instant::now();
    let mut stream = stream(&kafka, 2000);
    // Stopped once devices receive: the burst outgrows what 20 publishes per round trip carry, so K2V has its whole
    // window unacknowledged, which the publisher keeps: the reconnect has ten times the broker's Receive Maximum to
    // send again.
    let total = async || devices.iter().map(Subscriber::count).sum::<usize>();
    assert!(
        wait_until(Duration::from_secs(10), async || total().await > 0).await,
        "K2V publishes before the broker stops"
    );
    mqtt.stop();
    let window_filled = wait_until(Duration::from_secs(10), async || {
        metric(&app.metrics().await, "iotagent_k2v_in_flight") >= f64::from(LARGE_K2V_WINDOW)
    })
    .await;
    assert!(window_filled, "K2V never had its whole window unacknowledged: the test would exercise nothing");
    mqtt.restart();
    // Restarted again while that backlog is being sent again, some of it acknowledged, some in flight and the rest
    // still waiting (at most 20 per round trip of 50 ms: the 200 take half a second).
    let publisher_connected = async || {
        let ready: Value = reqwest::get(app.url("/health/ready")).await.unwrap().json().await.unwrap();
        ready["checks"].as_array().is_some_and(|c| c.iter().any(|c| c["name"] == "k2v_mqtt" && c["up"] == true))
    };
    // The reconnect backoff starts over only after 5 s connected: up to its 30 s ceiling (with jitter) after a long
    // first outage on a loaded machine.
    assert!(wait_until(Duration::from_secs(40), publisher_connected).await, "the publisher reconnected");
    tokio::time::sleep(Duration::from_millis(150)).await;
    mqtt.restart();
    (&mut stream.task).await.unwrap();
    let complete = wait_all_delivered(&devices, Duration::from_secs(40)).await;
    let outcome = check(&devices);
    // The counter is refreshed every second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let resent = metric(&app.metrics().await, "iotagent_k2v_resent_total");
    println!(
        "receive maximum {SMALL_RECEIVE_MAXIMUM}, K2V window {LARGE_K2V_WINDOW}, mosquitto restarted twice: {} events, \
         lost {}, duplicates {}, re-sent {resent}, {:?}",
        DEVICES as u64 * PER_DEVICE,
        outcome.lost,
        outcome.duplicates,
        started.elapsed()
    );
    assert!(
        resent > f64::from(SMALL_RECEIVE_MAXIMUM),
        "re-sent {resent}: no more than the broker's window to send again, the test exercised nothing"
    );
    assert!(complete && outcome.lost == 0, "lost {}", outcome.lost);
    app.stop().await.expect("clean stop");
    // Every event was acknowledged, so the final commit reaches the end of every partition.
    let mut ends = vec![-1_i64; PARTITIONS as usize];
    for (partition, offset) in stream.produced.lock().unwrap().keys() {
        let end = &mut ends[*partition as usize];
        *end = (*end).max(offset + 1);
    }
    assert_eq!(committed(&kafka, group, &topic("admin"), PARTITIONS), ends, "committed offsets against the ends");
    for d in devices {
        d.stop().await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_publisher_resends_in_order_what_a_broker_restart_cut_off() {
    use iotagent_mqtt::mqtt::MqttSettings;
    use iotagent_mqtt::mqtt::publisher::Publisher;
    use iotagent_mqtt::readiness::ReadyFlag;
    use iotagent_mqtt::secret::Secret;

    let (mut mqtt, device_port) = mosquitto("");
    let device = Subscriber::connect(device_port, "admin:a1998e", "admin:a1998e", "admin:a1998e/config").await;
    let settings = MqttSettings {
        host: "127.0.0.1".into(),
        port: mqtt.port,
        tls: None,
        username: "k2v-bridge".into(),
        password: Some(Secret::new(K2V_PASSWORD)),
        client_id: "it-publisher".into(),
        keep_alive: Duration::from_secs(5),
    };
    let (publisher, mut acks) = Publisher::start(&settings, "k2v", 1000, ReadyFlag::default()).expect("publisher");
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
        while let Ok(ack) = acks.try_recv() {
            acked.insert(delivered(ack));
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
                Ok(Some(ack)) => {
                    acked.insert(delivered(ack));
                }
                _ => panic!("no acks for 30 s"),
            }
        }
    }
    while acked.len() < total as usize {
        match tokio::time::timeout(Duration::from_secs(30), acks.recv()).await {
            Ok(Some(ack)) => {
                acked.insert(delivered(ack));
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

/// The sequence number of an ack that must be a delivery (nothing is refused in these tests).
fn delivered(ack: iotagent_mqtt::mqtt::publisher::Ack) -> u64 {
    assert_eq!(ack.outcome, iotagent_mqtt::mqtt::publisher::Outcome::Delivered, "{ack:?}");
    ack.seq
}
