//! Every webhook endpoint `vernemq.conf` registers answers 200 on a running service, and the binary's `healthcheck`
//! mode reports readiness.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use super::conf;
use super::parse::parse_http_url;
use crate::common::{captures, spawn_app};

/// The first recorded body of each hook (`tests/data/vernemq-2.1.2/`), as VerneMQ sent it.
fn captured_bodies() -> BTreeMap<String, Vec<u8>> {
    let mut bodies = BTreeMap::new();
    for c in captures::load() {
        bodies.entry(c.hook).or_insert_with(|| c.body_raw.into_bytes());
    }
    bodies
}

#[tokio::test]
async fn every_registered_endpoint_answers_200() {
    let conf = conf();
    let bodies = captured_bodies();
    let app = spawn_app(&[]).await;
    let mut client = app.client().await;
    for (name, fields) in conf.webhooks() {
        let (_, _, path) = parse_http_url(&fields["endpoint"]).unwrap();
        let hook = &fields["hook"];
        let body = bodies.get(hook).unwrap_or_else(|| panic!("no captured {hook} request"));
        let headers = [
            ("vernemq-hook".to_string(), hook.clone()),
            ("Host".into(), "iotagent-mqtt:8080".into()),
            ("Content-Type".into(), "application/json".into()),
            ("Content-Length".into(), body.len().to_string()),
        ];
        let reply = client.send("POST", &path, &headers, body).await;
        assert_eq!(reply.status, 200, "vmq_webhooks.{name} → POST {path}: {:?}", String::from_utf8_lossy(&reply.body));
    }
    app.stop().await.unwrap();
}

/// Runs `iotagent-mqtt healthcheck` with this IOTAGENT_LISTEN.
fn healthcheck(listen: &str) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_iotagent-mqtt"))
        .arg("healthcheck")
        .env("IOTAGENT_LISTEN", listen)
        .output()
        .expect("run the binary");
    (output.status.success(), String::from_utf8_lossy(&output.stdout).to_string())
}

#[tokio::test]
async fn healthcheck_mode_of_the_binary() {
    let app = spawn_app(&[]).await;
    let listen = app.addr.to_string();
    let (ok, out) = tokio::task::spawn_blocking(move || healthcheck(&listen)).await.unwrap();
    assert!(ok && out.starts_with("ready: {"), "{out}");
    app.stop().await.unwrap();

    // Kafka configured but unreachable: the readiness report says so, and the check fails with it.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let app = spawn_app(&["--kafka-brokers".into(), closed.to_string()]).await;
    let listen = app.addr.to_string();
    let (ok, out) = tokio::task::spawn_blocking(move || healthcheck(&listen)).await.unwrap();
    assert!(!ok && out.contains("503") && out.contains("kafka"), "{out}");
    drop(app);

    // Nothing listening.
    let (ok, out) = tokio::task::spawn_blocking(move || healthcheck(&closed.to_string())).await.unwrap();
    assert!(!ok && out.contains("cannot connect"), "{out}");
    let (ok, out) = tokio::task::spawn_blocking(|| healthcheck("not-an-address")).await.unwrap();
    assert!(!ok && out.contains("IOTAGENT_LISTEN"), "{out}");
    tokio::time::sleep(Duration::from_millis(10)).await;
}
