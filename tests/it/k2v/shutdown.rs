//! SIGTERM against the service process: one SHUTDOWN_TIMEOUT budget for every step, under load and with Kafka gone.

use super::faults::{KafkaPosition, PARTITIONS, assert_commits_only_cover_delivered, devices, received_events, stream};
use super::*;

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
    // The linger holds more QoS 0 records than a tenant's default bound, which would drop them (counted).
    env.push(("V2K_TENANT_MAX_IN_FLIGHT", "1000000".into()));
    env.push(("V2K_MODE", "on_publish".into()));

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

    let (status, took) = process.terminate_within(budget * 4).await;
    stream.task.abort();
    println!("SIGTERM under load: exited after {took:?} (budget {budget:?})");
    assert!(status.success(), "a clean stop exits 0: {status}");
    // As with Kafka gone (below): the budget bounds the service's own steps, and the process's exit after the last
    // one (dropping the Kafka clients, the runtimes winding down) plus this loop's 20 ms polling come on top: the
    // same 1.5 s of slack, so a loaded 2-core machine does not fail a stop that kept its budget.
    assert!(
        took <= budget + Duration::from_millis(1500),
        "the stop took {took:?}, over the {budget:?} budget (+1.5 s for the exit)"
    );

    // K2V: the commit covers every event the broker acknowledged (the devices received), and nothing more.
    let committed = committed(&kafka, group, &topic("admin"), PARTITIONS);
    let positions: HashMap<(usize, u64), KafkaPosition> =
        stream.produced.lock().unwrap().iter().map(|(position, event)| (*event, *position)).collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let received = received_events(&devices);
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
    let mut env = k2v_env(&kafka, &mqtt.url(), "sigterm-kafka-gone");
    env.push(("V2K_MODE", "on_publish".into()));
    let mut process = ServiceProcess::start(&env);
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
    let (status, took) = process.terminate_within(budget * 4).await;
    println!("SIGTERM with Kafka gone: exited after {took:?} (budget {budget:?})");
    assert!(status.success(), "the stop is clean even when it cannot flush: {status}");
    // The process's own exit (dropping the Kafka clients) comes after the budget's last step.
    assert!(took <= budget + Duration::from_millis(1500), "the stop took {took:?}, over the {budget:?} budget");
}

/// K2V stops first: while it waits for the broker's PUBACKs of its in-flight configurations, VerneMQ still has to
/// authorise those publishes (and every device's) through the webhooks, so the listener keeps serving until K2V is
/// done. Had the webhooks stopped first, a real VerneMQ would refuse the in-flight configurations. Meanwhile
/// `/health/ready` says the service is shutting down, and `/health/live` that it is alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_keep_serving_while_k2v_drains() {
    let kafka = Tansu::start(Storage::Memory);
    kafka.create_topic(&topic("admin"), PARTITIONS).await;
    let (mut mqtt, _device_port) = mosquitto("");
    let mut env = k2v_env(&kafka, &mqtt.url(), "drain-webhooks");
    env.push(("SHUTDOWN_TIMEOUT", "10".into()));
    let stream = stream(&kafka, 250);
    let mut process = ServiceProcess::start(&env);
    process.wait_ready().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Publishes sent now wait for PUBACKs that cannot come: K2V's drain waits for them.
    mqtt.stop();
    tokio::time::sleep(Duration::from_millis(300)).await;
    process.signal_term();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let body = json!({"username": "k2v-bridge", "mountpoint": "", "client_id": "iotagent-mqtt-k2v", "qos": 1,
                      "topic": "admin:dev0/config", "payload": "e30=", "retain": false});
    let reply = reqwest::Client::new()
        .post(process.url("/vmq/auth_on_publish"))
        .header("vernemq-hook", "auth_on_publish")
        .body(body.to_string())
        .send()
        .await
        .expect("the webhooks still answer while K2V drains");
    assert_eq!(reply.status(), 200);
    assert_eq!(reply.json::<Value>().await.unwrap()["result"], "ok", "the service's config publish is authorised");
    let ready = reqwest::get(process.url("/health/ready")).await.expect("readiness answers while K2V drains");
    assert_eq!(ready.status(), 503);
    let report: Value = ready.json().await.unwrap();
    let checks = report["checks"].as_array().expect("checks");
    assert!(checks.contains(&json!({"name": "shutdown", "up": false, "reason": "shutting_down"})), "{report}");
    let live = reqwest::get(process.url("/health/live")).await.expect("liveness answers while K2V drains");
    assert_eq!(live.status(), 200);
    stream.task.abort();
    // Waits for the stop the first SIGTERM started: a second one would end it at once.
    let (status, took) = process.exit_within(Duration::from_secs(20)).await;
    println!("stopped {took:?} after the webhook call");
    assert!(status.success(), "{status}");
}
