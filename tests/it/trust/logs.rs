//! Attack 7: denials are not a flood channel into the logs.

use std::time::Duration;

use serde_json::json;

use crate::common::RawClient;
use crate::common::process::ServiceProcess;

/// 300 denied publishes with a 60 KiB topic (an MQTT 5 device is not disconnected for them) leave a bounded log:
/// topics truncated, repeated lines per identity sampled; the metrics count every one.
#[tokio::test]
async fn denied_publishes_do_not_flood_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("service.log");
    let service = ServiceProcess::start_logging_to(&log, &[("RUST_LOG", "info".into())]);
    let ready = crate::common::wait_until(Duration::from_secs(10), async || {
        reqwest::get(service.url("/health/live")).await.is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert!(ready, "service up");
    let mut client = RawClient::connect(format!("127.0.0.1:{}", service.port).parse().unwrap()).await;
    let topic = format!("admin:a1998e/{}", "x".repeat(60 * 1024));
    let body = json!({"username": "admin:a1998e", "client_id": "c", "qos": 1, "topic": topic, "payload": "e30=",
                      "retain": false})
    .to_string();
    for _ in 0..300 {
        let reply = client.hook("auth_on_publish_m5", body.as_bytes()).await;
        assert_eq!(reply.json()["result"], json!({"error": "not_allowed"}));
    }
    let metrics = reqwest::get(service.url("/metrics")).await.unwrap().text().await.unwrap();
    assert!(
        metrics.contains(r#"iotagent_webhook_requests_total{hook="auth_on_publish_m5",outcome="deny"} 300"#),
        "every denial counted"
    );
    let size = std::fs::metadata(&log).unwrap().len();
    assert!(size < 64 * 1024, "log grew by {size} bytes for 300 denials");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("publish denied"), "a sample is logged: {text}");
}

/// Strict mode with Kafka unreachable refuses every device publish `unavailable`: the refusals are sampled like
/// denials (an outage is not a flood of one line per publish), and every one is counted.
#[tokio::test]
async fn refusals_while_kafka_is_down_do_not_flood_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("service.log");
    let service = ServiceProcess::start_logging_to(
        &log,
        &[
            ("RUST_LOG", "info".into()),
            ("KAFKA_BROKERS", "127.0.0.1:1".into()),
            ("V2K_REQUIRE_TENANT_TOPIC", "false".into()),
            ("V2K_ACK_TIMEOUT_MS", "1".into()),
        ],
    );
    let up = crate::common::wait_until(Duration::from_secs(10), async || {
        reqwest::get(service.url("/health/live")).await.is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert!(up, "service up");
    let mut client = RawClient::connect(format!("127.0.0.1:{}", service.port).parse().unwrap()).await;
    let body = json!({"username": "admin:a1998e", "mountpoint": "", "client_id": "admin:a1998e|c", "qos": 1,
                      "topic": "admin:a1998e/attrs", "payload": "eyJ0IjoxfQ==", "retain": false})
    .to_string();
    let mut refused = 0;
    for _ in 0..300 {
        let reply = client.hook("auth_on_publish", body.as_bytes()).await;
        if reply.json()["result"] == json!({"error": "unavailable"}) {
            refused += 1;
        }
    }
    assert!(refused > 250, "Kafka down: refused {refused} of 300");
    let metrics = reqwest::get(service.url("/metrics")).await.unwrap().text().await.unwrap();
    let counted =
        format!(r#"iotagent_webhook_requests_total{{hook="auth_on_publish",outcome="unavailable"}} {refused}"#);
    assert!(metrics.contains(&counted), "every refusal counted: {counted}");
    let text = std::fs::read_to_string(&log).unwrap();
    let lines = text.lines().filter(|l| l.contains("Kafka cannot take it now")).count();
    assert!((1..=30).contains(&lines), "{lines} log lines for {refused} refusals");
}
