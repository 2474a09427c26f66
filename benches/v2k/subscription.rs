//! Subscription-mode rows of the V2K bench: the shared (`$share`) and the plain (leased) subscription, devices
//! publishing QoS 1 through Mosquitto, the service acknowledging after Kafka.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::cpu::{PACED_RATE, PAYLOAD_BYTES};
use super::{DEVICES, http_get, padded_payload, payload, start_service_binary, tenant};

/// What every subscription row shares.
pub struct Rows {
    pub kafka_env: Vec<(&'static str, String)>,
    pub mqtt_port: u16,
    pub device_port: u16,
    pub total: u64,
    pub window: usize,
}

impl Rows {
    /// Both variants with the devices spread over `tenants` tenants, against `plain_window` (a plain producer with
    /// the same window on the same topics).
    pub fn run(&self, rt: &tokio::runtime::Runtime, plain_window: f64, tenants: usize) {
        let mut env = self.kafka_env.clone();
        env.extend([
            ("MQTT_URL", format!("mqtt://127.0.0.1:{}", self.mqtt_port)),
            ("MQTT_PASSWORD", "pw".to_string()),
            ("MQTT_CLIENT_ID", format!("bench-{tenants}")),
            ("SERVICE_CLIENT_ID_PREFIX", "bench".to_string()),
            ("V2K_SHARE_GROUP", format!("bench{tenants}")),
            ("V2K_MAX_IN_FLIGHT", self.window.to_string()),
        ]);
        // Each variant's session is removed afterwards, so that Mosquitto does not keep queueing for it. With one
        // tenant, the shared variant also runs with the whole window as the tenant's bound, to show what the default
        // bound (V2K_TENANT_MAX_IN_FLIGHT 500 of the 1 000) costs a single tenant, and the plain variant also runs
        // paced at the on_publish CPU rows' 5 000 msg/s, for a CPU per message comparable with theirs.
        // A lease group per plain row: the previous row's holder is killed, and its membership would hold the lease
        // until Kafka's session timeout.
        let lease = |row: &str| Some(format!("bench{tenants}-{row}"));
        let mut variants = vec![("shared", None, None, None), ("plain", lease("plain"), None, None)];
        if tenants == 1 {
            variants.push(("shared", None, Some(self.window), None));
            variants.push(("plain", lease("paced"), None, Some(PACED_RATE)));
        }
        // Another build of the service (`V2K_BENCH_OTHER_BUILD`) runs each row right after this one's, so that the two
        // share that moment's noise.
        let mut builds = vec![("", env!("CARGO_BIN_EXE_iotagent-mqtt").to_string())];
        builds.extend(std::env::var("V2K_BENCH_OTHER_BUILD").ok().map(|binary| (" (other build)", binary)));
        for (kind, lease_group, bound, rate) in variants {
            for (build, binary) in &builds {
                let mut env = env.clone();
                env.push(("V2K_SUBSCRIPTION", kind.to_string()));
                // The session to remove afterwards: the shared subscriber's, or the lease's `<group>-v2k`.
                let lease_group = lease_group
                    .as_ref()
                    .map(|group| if build.is_empty() { group.clone() } else { format!("{group}-other") });
                let session =
                    lease_group.as_ref().map_or(format!("bench-{tenants}-v2k"), |group| format!("{group}-v2k"));
                if let Some(group) = lease_group {
                    env.push(("V2K_LEASE_GROUP", group));
                }
                if let Some(bound) = bound {
                    env.push(("V2K_TENANT_MAX_IN_FLIGHT", bound.to_string()));
                }
                let (service, service_addr) = start_service_binary(binary, &env);
                rt.block_on(wait_subscribed(service_addr));
                // Paced: about 6 s of messages, a steady CPU reading (the unpaced rows' 100 000 would take 20 s).
                let total = rate.map_or(self.total, |rate| (rate * 6.0) as u64);
                // The service's CPU over the whole load, per message Kafka acknowledged (comparable with the
                // on_publish rows of `cpu`, where each message costs a webhook call).
                let ((produced, elapsed), cpu_per_message) = service.cpu_per_item(|| {
                    let (produced, elapsed) =
                        rt.block_on(subscription_load(service_addr, self.device_port, kind, total, tenants, rate));
                    ((produced, elapsed), produced)
                });
                let per_second = produced as f64 / elapsed.as_secs_f64();
                let bound = bound.map_or(String::new(), |b| format!(", tenant bound {b}"));
                // A paced row's rate is the pace: no ratio to the plain producer's top rate.
                let against = match rate {
                    Some(rate) => format!(", paced {rate:.0}/s, {PAYLOAD_BYTES}-byte payloads"),
                    None => {
                        format!("  ratio {:.2} to the plain producer with the same window", per_second / plain_window)
                    }
                };
                println!(
                    "subscription {kind:<6}, {tenants:>3} tenant(s){bound}{build} {per_second:>8.0} msg/s{against}, service CPU {cpu_per_message:.1} µs/msg"
                );
                drop(service);
                rt.block_on(remove_session(self.mqtt_port, &session));
            }
        }
    }
}

/// Waits until the service's V2K subscription is subscribed (a plain one first has to get the lease).
async fn wait_subscribed(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let report = http_get(addr, "/health/ready").await;
        let subscribed = serde_json::from_str::<serde_json::Value>(&report).ok().is_some_and(|r| {
            r["checks"].as_array().is_some_and(|checks| {
                checks.iter().any(|c| c["name"] == "v2k_mqtt" && c["up"] == true && c.get("note").is_none())
            })
        });
        if subscribed {
            return;
        }
        assert!(Instant::now() < deadline, "V2K subscription not subscribed within 60 s: {report}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Devices publish `total` QoS 1 messages through Mosquitto, as fast as they can or at `rate` messages/s in all
/// (then with `PAYLOAD_BYTES`-byte payloads, as the on_publish CPU rows); returns how many the service got
/// acknowledged by Kafka, and in what time.
async fn subscription_load(
    service_addr: SocketAddr,
    device_port: u16,
    kind: &str,
    total: u64,
    tenants: usize,
    rate: Option<f64>,
) -> (u64, Duration) {
    // One start for every paced device (each then adds its offset); 1 s ahead, to let them all connect. A paced
    // row's rate counts from there.
    let paced_start = tokio::time::Instant::now() + Duration::from_secs(1);
    let started = if rate.is_some() { paced_start.into_std() } else { Instant::now() };
    let per_device = total / DEVICES as u64;
    let mut clients = Vec::new();
    let mut loops = Vec::new();
    for device in 0..DEVICES {
        let mut options = rumqttc::MqttOptions::new(format!("{kind}-{tenants}-dev{device}"), "127.0.0.1", device_port);
        options.set_max_packet_size(1 << 20, 1 << 20);
        // Devices stay on MQTT 3.1.1, with Nagle off as the service's own clients.
        let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 10_000);
        let mut network = eventloop.network_options();
        network.set_tcp_nodelay(true);
        eventloop.set_network_options(network);
        loops.push(tokio::spawn(async move {
            loop {
                if let Err(e) = eventloop.poll().await {
                    println!("device {device}: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }));
        let (publisher, topic) = (client.clone(), format!("{}:d{device}/attrs", tenant(device, tenants)));
        // Unpaced, a device's messages are all queued at once (the client's queue holds them).
        let period = rate.map(|rate| Duration::from_secs_f64(DEVICES as f64 / rate));
        // Paced devices start a slice of the period apart: messages then arrive evenly, not in bursts of `DEVICES`.
        let offset = period.map_or(Duration::ZERO, |period| period.mul_f64(device as f64 / DEVICES as f64));
        tokio::spawn(async move {
            let start = paced_start + offset;
            for n in 0..per_device {
                let body = match period {
                    Some(period) => {
                        tokio::time::sleep_until(start + period.mul_f64(n as f64)).await;
                        padded_payload(n, PAYLOAD_BYTES)
                    }
                    None => payload(n),
                };
                publisher.publish(topic.as_str(), rumqttc::QoS::AtLeastOnce, false, body).await.ok();
            }
        });
        clients.push(client);
    }
    let sent = per_device * DEVICES as u64;
    let outcome = loop {
        let text = http_get(service_addr, "/metrics").await;
        let produced: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix(r#"iotagent_v2k_produced_total{kind="data"} "#))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if produced >= sent || started.elapsed() > Duration::from_secs(120) {
            println!("subscription {kind}: {produced} of {sent} acknowledged by Kafka");
            break (produced, started.elapsed());
        }
        // Each look has the service render its metrics, CPU the row counts: paced, few messages share it, so rarely.
        tokio::time::sleep(Duration::from_millis(if rate.is_some() { 250 } else { 20 })).await;
    };
    // The devices go away with their event loops (which would otherwise reconnect).
    drop(clients);
    for device in loops {
        device.abort();
    }
    outcome
}

/// Connects with a clean session under `client_id`, which removes the persistent session of that id.
async fn remove_session(port: u16, client_id: &str) {
    let mut options = rumqttc::MqttOptions::new(client_id, "127.0.0.1", port);
    options.set_credentials("k2v-bridge", "pw");
    options.set_clean_session(true);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 10);
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                    client.disconnect().await.ok();
                }
                Ok(rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
}
