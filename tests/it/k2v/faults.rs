//! K2V fault tests: Mosquitto restarted, the service stopped, aborted and SIGKILLed, and the publisher alone across a
//! broker restart, in the middle of a stream; lost and duplicated events counted, commits checked against deliveries.

use std::sync::atomic::{AtomicBool, Ordering};

use tokio::task::JoinHandle;

use crate::common::brokers::RECEIVE_MAXIMUM;
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
fn check(devices: &[Subscriber], per_device: u64) -> Outcome {
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
        lost += (0..per_device).filter(|n| !seen.contains(n)).count();
    }
    Outcome { lost, duplicates }
}

/// Deliveries the broker flagged DUP: its own redeliveries, after a restart, of what a device had not acknowledged.
/// A broker never passes a publisher's DUP flag on to subscribers (MQTT 3.1.1 and 5.0, §3.3.1.1: it is set solely by
/// whether the outgoing PUBLISH is a retransmission), so K2V's own re-sends reach devices without it.
fn broker_redeliveries(devices: &[Subscriber]) -> usize {
    devices.iter().map(|d| d.log.lock().unwrap().iter().filter(|entry| entry.starts_with("D{")).count()).sum()
}

/// CONNECTs of the MQTT client `client_id` in Mosquitto's log (kept across restarts): each one after the first
/// follows a lost connection.
fn connects(mqtt: &Mosquitto, client_id: &str) -> usize {
    let log = std::fs::read_to_string(mqtt.dir().join("mosquitto.log")).unwrap_or_default();
    let as_client = format!(" as {client_id} ");
    log.lines().filter(|l| l.contains("New client connected") && l.contains(&as_client)).count()
}

/// Duplicates after broker restarts, bounded by where they can come from, so that a publisher sending again what the
/// broker had acknowledged (everything since the start, say) fails:
/// - K2V re-sends only what was unacknowledged when a connection went, and never holds more than its `window`: at most
///   one window re-sent per lost connection. (A publish rumqttc drops on a packet id collision is re-sent once more;
///   that needs PUBACKs out of order, which Mosquitto does not send.)
/// - A re-send duplicates only a publish the broker had taken without its PUBACK reaching K2V: one sent on the lost
///   connection and unanswered, at most min(`window`, the broker's `receive_maximum`) per lost connection.
/// - The broker delivers again to devices what they had not acknowledged when it stopped: DUP-flagged
///   (`redelivered`; it holds at most its `max_inflight_messages` per device unacknowledged, so that many per device
///   and restart).
///
/// Every duplicate is one of the last two.
fn assert_duplicates_explained(
    duplicates: usize,
    resent: u64,
    redelivered: usize,
    lost_connections: usize,
    window: u64,
    receive_maximum: u64,
) {
    let lost = lost_connections as u64;
    assert!(
        resent <= lost * window,
        "re-sent {resent}: more than the window of {window} per lost connection ({lost_connections}), so messages \
         already acknowledged were sent again"
    );
    let by_resends = (duplicates as u64).saturating_sub(redelivered as u64);
    assert!(
        by_resends <= resent.min(lost * window.min(receive_maximum)),
        "{duplicates} duplicates, {redelivered} of them redelivered by the broker: the other {by_resends} are more than \
         K2V re-sent ({resent}) or had unanswered on its lost connections (at most {} each)",
        window.min(receive_maximum)
    );
}

/// (partition, offset).
pub(super) type KafkaPosition = (i32, i64);

pub(super) struct Stream {
    /// (partition, offset) → (device, n) of every produced event.
    pub(super) produced: Arc<Mutex<HashMap<KafkaPosition, (usize, u64)>>>,
    pub(super) task: JoinHandle<()>,
    /// Events per device.
    per_device: u64,
    /// Once set, the rest is produced as fast as Kafka takes it.
    unpaced: Arc<AtomicBool>,
}

impl Stream {
    /// Stops pacing: the events left are produced at once.
    fn unpace(&self) {
        self.unpaced.store(true, Ordering::Relaxed);
    }
}

/// Produces PER_DEVICE configure events for each device, interleaved, keyed by device (so each device's events share a
/// partition), at about `rate` events/s.
pub(super) fn stream(kafka: &Tansu, rate: u64) -> Stream {
    stream_of(kafka, rate, PER_DEVICE)
}

/// [`stream`] of `per_device` events per device.
fn stream_of(kafka: &Tansu, rate: u64, per_device: u64) -> Stream {
    let producer = producer(kafka);
    let produced = Arc::new(Mutex::new(HashMap::new()));
    let unpaced = Arc::new(AtomicBool::new(false));
    let task = tokio::spawn({
        let produced = produced.clone();
        let unpaced = unpaced.clone();
        async move {
            let topic = topic("admin");
            let round = Duration::from_micros(1_000_000 * DEVICES as u64 / rate);
            for n in 0..per_device {
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
                if !unpaced.load(Ordering::Relaxed) {
                    tokio::time::sleep_until(next).await;
                }
            }
        }
    });
    Stream { produced, task, per_device, unpaced }
}

pub(super) async fn devices(port: u16) -> Vec<Subscriber> {
    let mut out = Vec::new();
    for i in 0..DEVICES {
        let name = format!("admin:{}", device_name(i));
        out.push(Subscriber::connect(port, &name, &name, &format!("{name}/config")).await);
    }
    out
}

async fn wait_all_delivered(devices: &[Subscriber], per_device: u64, timeout: Duration) -> bool {
    wait_until(timeout, async || {
        devices.iter().all(|d| {
            let seen: BTreeSet<u64> = d
                .received()
                .iter()
                .filter_map(|(_, p)| serde_json::from_slice::<Value>(p).ok()?["n"].as_u64())
                .collect();
            seen.len() as u64 == per_device
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
/// broker had not acknowledged (the broker holds acknowledged ones for the persistent device sessions). Something
/// must have been committed (with nothing committed this would hold trivially). Returns the committed offsets.
pub(super) async fn assert_commits_only_cover_delivered(
    kafka: &Tansu,
    group: &str,
    stream: &Stream,
    devices: &[Subscriber],
) -> Vec<i64> {
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
    assert!(!covered.is_empty(), "nothing committed ({committed:?}): the check would pass trivially");
    assert!(delivered, "a committed offset covers an event the devices never received");
    committed
}

/// Events the devices received that lie at or past their partition's committed offset: acknowledged but not
/// committed, so a start from these commits sends them again.
fn uncommitted_deliveries(committed: &[i64], stream: &Stream, devices: &[Subscriber]) -> usize {
    let positions: HashMap<(usize, u64), KafkaPosition> =
        stream.produced.lock().unwrap().iter().map(|(position, event)| (*event, *position)).collect();
    received_events(devices)
        .iter()
        .filter(|event| positions.get(event).is_none_or(|(p, o)| *o >= committed[*p as usize]))
        .count()
}

/// Events the committed offsets cover that were not among `before` (what the devices had received before an
/// instance started): committed by that instance, or by none since.
fn newly_committed(committed: &[i64], stream: &Stream, before: &BTreeSet<(usize, u64)>) -> usize {
    let produced = stream.produced.lock().unwrap();
    produced.iter().filter(|((p, o), event)| *o < committed[*p as usize] && !before.contains(event)).count()
}

/// After a clean stop with every event acknowledged, the committed offsets are the ends of the partitions.
fn assert_committed_to_the_ends(kafka: &Tansu, group: &str, stream: &Stream) {
    let mut ends = vec![-1_i64; PARTITIONS as usize];
    for (partition, offset) in stream.produced.lock().unwrap().keys() {
        let end = &mut ends[*partition as usize];
        *end = (*end).max(offset + 1);
    }
    assert_eq!(committed(kafka, group, &topic("admin"), PARTITIONS), ends, "committed offsets against the ends");
}

/// Whether `/health/ready` reports the K2V publisher connected (`k2v_mqtt`).
async fn k2v_publisher_up(app: &crate::common::TestApp) -> bool {
    let ready: Value = reqwest::get(app.url("/health/ready")).await.unwrap().json().await.unwrap();
    ready["checks"].as_array().is_some_and(|c| c.iter().any(|c| c["name"] == "k2v_mqtt" && c["up"] == true))
}

/// K2V_MAX_IN_FLIGHT's default, which k2v_env leaves: K2V's window unless a test sets its own.
const DEFAULT_K2V_WINDOW: u64 = 500;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_mosquitto_restarts_mid_stream() {
    let kafka = Tansu::start(Storage::Memory);
    kafka.create_topic(&topic("admin"), PARTITIONS).await;
    let (mut mqtt, device_port) = mosquitto("");
    let devices = devices(device_port).await;
    let group = "fault-mqtt";
    let app = start_app(&k2v_env(&kafka, &mqtt.url(), group)).await;

    let started = Instant::now();
    let mut stream = stream_of(&kafka, 1000, 700);
    // Stopped once 1 200 events were delivered (a publisher re-sending everything since the start would then re-send
    // those too), down for a second while events keep coming (a backlog builds up; 3 500 events at 1 000/s leave
    // enough to come even if K2V joined its group late), then restarted again while the bridge drains that backlog.
    assert!(
        wait_until(Duration::from_secs(20), async || received_events(&devices).len() >= 1200).await,
        "1 200 events delivered before the broker stops"
    );
    mqtt.stop();
    let produced_at_stop = stream.produced.lock().unwrap().len();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // The backlog shows in the lag gauge (measured every 300 ms here, once the partitions are being consumed), and
    // K2V holds its whole window unacknowledged across the outage (the in-flight gauge, refreshed every second): the
    // first restart has those to deliver.
    let (mut lag, mut held) = (0.0, 0.0);
    let backlog = wait_until(Duration::from_secs(5), async || {
        let text = app.metrics().await;
        (lag, held) = (metric(&text, "iotagent_k2v_lag"), metric(&text, "iotagent_k2v_in_flight"));
        lag > 0.0 && held == DEFAULT_K2V_WINDOW as f64
    })
    .await;
    assert!(backlog, "lag {lag} and {held} in flight while Mosquitto is down: no backlog, the test exercises nothing");
    let before = received_events(&devices).len();
    mqtt.restart();
    // The second restart comes once K2V is back: its publisher reconnected, and 50 more events delivered (distinct
    // ones: the broker's redeliveries to the reconnecting devices do not count). See the end for why that does not
    // make it cut publishes in flight every time.
    assert!(
        wait_until(Duration::from_secs(40), async || k2v_publisher_up(&app).await).await,
        "the publisher reconnected after the first restart"
    );
    assert!(
        wait_until(Duration::from_secs(10), async || received_events(&devices).len() > before + 50).await,
        "K2V delivers again after the first restart"
    );
    mqtt.restart();
    (&mut stream.task).await.unwrap();
    let complete = wait_all_delivered(&devices, stream.per_device, Duration::from_secs(40)).await;
    let outcome = check(&devices, stream.per_device);
    // The counter is refreshed every second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let resent = metric(&app.metrics().await, "iotagent_k2v_resent_total") as u64;
    let redelivered = broker_redeliveries(&devices);
    let lost_connections = connects(&mqtt, &format!("it-{group}-k2v")) - 1;
    println!(
        "mosquitto restarted twice mid-stream: {} events, lost {}, duplicates {}, re-sent {resent}, redelivered by the \
         broker {redelivered}, publisher connections lost {lost_connections}, first stop after {produced_at_stop} produced, \
         {:?}",
        DEVICES as u64 * stream.per_device,
        outcome.lost,
        outcome.duplicates,
        started.elapsed()
    );
    assert!(complete && outcome.lost == 0, "lost {}", outcome.lost);
    assert_eq!(lost_connections, 2, "one lost connection per restart");
    // Not asserted: `resent > 0`. The window K2V held through the outage waits in rumqttc's request queue and goes out
    // after the reconnect as first sends, not re-sends; and on the loopback K2V may have drained the backlog (some
    // 2 000 events at tens of thousands a second) before the second restart's SIGTERM lands, with nothing in flight.
    // What the first outage cut into is asserted above (the whole window held unacknowledged); the test where a
    // restart must cut publishes off in flight is the Receive Maximum one, whose 25 ms link keeps them in flight.
    // K2V re-sends at most its window per restart: 1 000. A publisher re-sending everything since the start would
    // re-send over 1 200 at the first reconnect alone.
    assert_duplicates_explained(
        outcome.duplicates,
        resent,
        redelivered,
        lost_connections,
        DEFAULT_K2V_WINDOW,
        RECEIVE_MAXIMUM.into(),
    );
    app.stop().await.expect("clean stop");
    // Every event was acknowledged, so the final commit reaches the end of every partition.
    assert_committed_to_the_ends(&kafka, group, &stream);
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
    // The reconnect backoff starts over only after 5 s connected: up to its 30 s ceiling (with jitter) after a long
    // first outage on a loaded machine.
    assert!(
        wait_until(Duration::from_secs(40), async || k2v_publisher_up(&app).await).await,
        "the publisher reconnected"
    );
    tokio::time::sleep(Duration::from_millis(150)).await;
    mqtt.restart();
    (&mut stream.task).await.unwrap();
    let complete = wait_all_delivered(&devices, stream.per_device, Duration::from_secs(40)).await;
    let outcome = check(&devices, stream.per_device);
    // The counter is refreshed every second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let resent = metric(&app.metrics().await, "iotagent_k2v_resent_total") as u64;
    let redelivered = broker_redeliveries(&devices);
    let lost_connections = connects(&mqtt, &format!("it-{group}-k2v")) - 1;
    println!(
        "receive maximum {SMALL_RECEIVE_MAXIMUM}, K2V window {LARGE_K2V_WINDOW}, mosquitto restarted twice: {} events, \
         lost {}, duplicates {}, re-sent {resent}, redelivered by the broker {redelivered}, publisher connections lost \
         {lost_connections}, {:?}",
        DEVICES as u64 * stream.per_device,
        outcome.lost,
        outcome.duplicates,
        started.elapsed()
    );
    assert!(
        resent > u64::from(SMALL_RECEIVE_MAXIMUM),
        "re-sent {resent}: no more than the broker's window to send again, the test exercised nothing"
    );
    assert!(complete && outcome.lost == 0, "lost {}", outcome.lost);
    assert_eq!(lost_connections, 2, "one lost connection per restart");
    // At most K2V's window of 200 re-sent per restart (400; 259-278 seen), and at most the broker's Receive Maximum
    // of 20 duplicated by re-sends per restart (2-18 duplicates seen, all but 0-11 of them broker redeliveries; one
    // re-sending everything since the start duplicated 80).
    assert_duplicates_explained(
        outcome.duplicates,
        resent,
        redelivered,
        lost_connections,
        LARGE_K2V_WINDOW.into(),
        SMALL_RECEIVE_MAXIMUM.into(),
    );
    app.stop().await.expect("clean stop");
    // Every event was acknowledged, so the final commit reaches the end of every partition.
    assert_committed_to_the_ends(&kafka, group, &stream);
    for d in devices {
        d.stop().await;
    }
}

/// The stream's rate in the service-stop test, events/s.
const SERVICE_STOPS_RATE: u64 = 250;
/// k2v_env's K2V_SDK_COMMIT_INTERVAL_MS.
const COMMIT_INTERVAL: Duration = Duration::from_millis(200);
/// How long each instance runs at the stream's own rate before it is stopped: four commit intervals.
const STEADY: Duration = Duration::from_millis(800);
/// What one crash may send again, by the README ("a crash replays at most the last K2V_SDK_COMMIT_INTERVAL_MS of
/// acknowledged events"): one commit interval of the stream (50 events), plus a margin of 1 s for what the broker
/// took but had not acknowledged yet, the commit's round trip and a loaded machine: 300 events. 0-60 were measured at
/// the SIGKILL. An instance that committed only at its close would leave everything it delivered to replay (455-1 040
/// measured with the periodic commits turned off).
const CRASH_REPLAY: u64 = SERVICE_STOPS_RATE * (COMMIT_INTERVAL.as_millis() as u64 + 1000) / 1000;

/// Waits until the devices have every event produced so far (a new instance has drained what piled up while none
/// ran), then lets the stream flow for [`STEADY`]: a stop cuts into the stream at its own rate, not into a backlog
/// drained at full speed, which the replay bound per crash assumes.
async fn drained_then_steady(stream: &Stream, devices: &[Subscriber]) {
    let produced: Vec<(usize, u64)> = stream.produced.lock().unwrap().values().copied().collect();
    let drained = wait_until(Duration::from_secs(20), async || {
        let received = received_events(devices);
        produced.iter().all(|event| received.contains(event))
    })
    .await;
    assert!(drained, "the new instance delivers what was produced before it started");
    tokio::time::sleep(STEADY).await;
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
    // Paced for 16 s, longer than the three instances take to start and stop on a loaded machine, so that the SIGKILL
    // cuts into the stream as it flows; after it the rest is produced at once.
    let mut stream = stream_of(&kafka, SERVICE_STOPS_RATE, 800);
    // 1. Clean stop and start again: the final commit covers every event delivered.
    let app = start_app(&env).await;
    drained_then_steady(&stream, &devices).await;
    app.stop().await.expect("clean stop");
    let after_stop = assert_commits_only_cover_delivered(&kafka, group, &stream, &devices).await;
    assert_eq!(uncommitted_deliveries(&after_stop, &stream, &devices), 0, "a clean stop commits everything delivered");
    // 2. Abort: the task is dropped mid-stream, no drain, no final commit. What it committed while it ran is there at
    // once (librdkafka's own commit at close, on a thread of its own, lands too late for this check).
    let before = received_events(&devices);
    let mut app = start_app(&env).await;
    drained_then_steady(&stream, &devices).await;
    app.task.take().expect("running").abort();
    drop(app);
    let after_abort = assert_commits_only_cover_delivered(&kafka, group, &stream, &devices).await;
    let committed_by_aborted = newly_committed(&after_abort, &stream, &before);
    assert!(committed_by_aborted > 0, "the aborted instance committed nothing while it ran: {after_abort:?}");
    // 3. SIGKILL of the service process: nothing runs after it, so only the commits made while it ran count.
    let before = received_events(&devices);
    let process = ServiceProcess::start(&env);
    process.wait_ready().await;
    drained_then_steady(&stream, &devices).await;
    let produced_at_kill = stream.produced.lock().unwrap().len();
    process.kill();
    stream.unpace();
    let after_kill = assert_commits_only_cover_delivered(&kafka, group, &stream, &devices).await;
    let committed_by_killed = newly_committed(&after_kill, &stream, &before);
    assert!(committed_by_killed > 0, "the killed instance committed nothing while it ran: {after_kill:?}");
    let replayed = uncommitted_deliveries(&after_kill, &stream, &devices);
    println!(
        "committed {after_stop:?} -> {after_abort:?} ({committed_by_aborted} by the aborted instance) -> \
         {after_kill:?} ({committed_by_killed} by the killed one); SIGKILL after {produced_at_kill} of {} events \
         produced: {replayed} delivered but not committed",
        DEVICES as u64 * stream.per_device
    );
    assert!(
        replayed as u64 <= CRASH_REPLAY,
        "{replayed} events delivered but not committed at the SIGKILL, over one commit interval and margin \
         ({CRASH_REPLAY})"
    );
    // 4. Start again and let it finish.
    let app = start_app(&env).await;
    (&mut stream.task).await.unwrap();
    let complete = wait_all_delivered(&devices, stream.per_device, Duration::from_secs(40)).await;
    let outcome = check(&devices, stream.per_device);
    println!(
        "service stopped, aborted and killed mid-stream: {} events, lost {}, duplicates {}, {:?}",
        DEVICES as u64 * stream.per_device,
        outcome.lost,
        outcome.duplicates,
        started.elapsed()
    );
    assert!(complete && outcome.lost == 0, "lost {}", outcome.lost);
    // Two crashes (the abort and the SIGKILL) each replay at most CRASH_REPLAY; the clean stop replays nothing
    // (checked above). Mosquitto runs throughout, so it redelivers nothing.
    assert!(
        outcome.duplicates as u64 <= 2 * CRASH_REPLAY,
        "{} duplicates, over two crashes' worth ({})",
        outcome.duplicates,
        2 * CRASH_REPLAY
    );
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
    // Publishes the broker may have taken without their PUBACK reaching the publisher when it stopped: the only ones
    // a correct re-send can duplicate. (Acks still on their way to `acked` make this an over-estimate.)
    let mut unacked_at_stop = 0;
    let mut stopped_at = 0;
    while next < total {
        let payload = bytes::Bytes::from(json!({"n": next}).to_string());
        match publisher.publish("admin:a1998e/config", payload, false) {
            Ok(_) => next += 1,
            Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
        }
        while let Ok(ack) = acks.try_recv() {
            acked.insert(delivered(ack));
        }
        // Stop the broker once 1 500 publishes are acknowledged (a publisher re-sending everything since the start
        // would re-send those too) and while others are not, so the restart really cuts some off (stopping at a
        // moment when everything happened to be acknowledged would test nothing).
        if !restarted && acked.len() >= 1500 && publisher.in_flight() > 0 {
            unacked_at_stop = next - acked.len() as u64;
            stopped_at = next;
            mqtt.stop();
            stopped = true;
            restarted = true;
        }
        if stopped && (next >= stopped_at + 500 || publisher.in_flight() >= 1000) {
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
    let (mut next_expected, mut seen, mut duplicates) = (0_u64, BTreeSet::new(), 0_u64);
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
    let redelivered = broker_redeliveries(std::slice::from_ref(&device));
    println!(
        "publisher across a broker restart: {total} publishes, re-sent {resent}, lost {lost}, duplicates {duplicates}, \
         unacknowledged at the stop {unacked_at_stop}, redelivered by the broker {redelivered}"
    );
    assert!(resent > 0, "the restart cut nothing off: the test did not exercise the re-send");
    assert_eq!(lost, 0);
    assert_eq!(connects(&mqtt, "it-publisher-k2v"), 2, "one lost connection, for the one restart");
    // One lost connection with at most 1 000 in flight (the loop's bound) re-sends at most 1 000 (334-838 seen;
    // re-sending everything since the start would be over 1 500).
    assert_duplicates_explained(duplicates as usize, resent, redelivered, 1, 1000, RECEIVE_MAXIMUM.into());
    // Sharper: only what was unacknowledged at the stop can come twice from the publisher (1-152 duplicates seen, all
    // but 0-35 of them redelivered by the broker).
    assert!(
        duplicates <= unacked_at_stop + redelivered as u64,
        "{duplicates} duplicates, more than the {unacked_at_stop} publishes unacknowledged at the stop and the \
         broker's {redelivered} redeliveries: acknowledged publishes were sent again"
    );
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
