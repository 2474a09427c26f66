//! Subscription-mode rows of the V2K bench: the shared (`$share`) and the plain (leased) subscription, devices
//! publishing QoS 1 through Mosquitto, the service acknowledging after Kafka.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::{DEVICES, http_get, payload, start_service, tenant};

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
            ("V2K_SHARE_GROUP", format!("bench{tenants}")),
            ("V2K_MAX_IN_FLIGHT", self.window.to_string()),
            // A lease group per row: the previous row's holder is killed, and its membership would hold the lease
            // until Kafka's session timeout.
            ("V2K_LEASE_GROUP", format!("bench{tenants}-plain")),
        ]);
        // Each variant's session is removed afterwards, so that Mosquitto does not keep queueing for it. With one
        // tenant, the shared variant also runs with the whole window as the tenant's bound, to show what the default
        // bound (V2K_TENANT_MAX_IN_FLIGHT 500 of the 1 000) costs a single tenant.
        let shared = format!("bench-{tenants}-v2k");
        let mut variants = vec![("shared", shared.clone(), None), ("plain", format!("bench{tenants}-plain-v2k"), None)];
        if tenants == 1 {
            variants.push(("shared", shared, Some(self.window)));
        }
        for (kind, session, bound) in variants {
            let mut env = env.clone();
            env.push(("V2K_SUBSCRIPTION", kind.to_string()));
            if let Some(bound) = bound {
                env.push(("V2K_TENANT_MAX_IN_FLIGHT", bound.to_string()));
            }
            let (service, service_addr) = start_service(&env);
            rt.block_on(wait_subscribed(service_addr));
            let per_second = rt.block_on(subscription_load(service_addr, self.device_port, kind, self.total, tenants));
            let bound = bound.map_or(String::new(), |b| format!(", tenant bound {b}"));
            println!(
                "subscription {kind:<6}, {tenants:>3} tenant(s){bound} {:>8.0} msg/s  ratio {:.2} to the plain producer with the same window",
                per_second,
                per_second / plain_window
            );
            drop(service);
            rt.block_on(remove_session(self.mqtt_port, &session));
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

/// Devices publish `total` QoS 1 messages through Mosquitto as fast as they can; returns the rate at which the
/// service got them acknowledged by Kafka.
async fn subscription_load(service_addr: SocketAddr, device_port: u16, kind: &str, total: u64, tenants: usize) -> f64 {
    let started = Instant::now();
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
        for n in 0..per_device {
            client
                .publish(
                    format!("{}:d{device}/attrs", tenant(device, tenants)),
                    rumqttc::QoS::AtLeastOnce,
                    false,
                    payload(n),
                )
                .await
                .ok();
        }
        clients.push(client);
    }
    let sent = per_device * DEVICES as u64;
    let rate = loop {
        let text = http_get(service_addr, "/metrics").await;
        let produced: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix(r#"iotagent_v2k_produced_total{kind="data"} "#))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if produced >= sent || started.elapsed() > Duration::from_secs(120) {
            println!("subscription {kind}: {produced} of {sent} acknowledged by Kafka");
            break produced as f64 / started.elapsed().as_secs_f64();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // The devices go away with their event loops (which would otherwise reconnect).
    drop(clients);
    for device in loops {
        device.abort();
    }
    rate
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
