//! Strict mode (`V2K_MODE=auth_on_publish`) with the service itself killed. VerneMQ treats a refused connection or a
//! timeout of `auth_on_publish` as "not authorised": the device keeps its message and sends it again, so whatever it
//! was told is stored must be in Kafka.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;

use super::{create_topics, lost_and_duplicates, publish_body, sequence_by_device};
use crate::common::brokers::{Storage, Tansu};
use crate::common::process::ServiceProcess;

/// One device session as VerneMQ runs it in strict mode: message `n + 1` goes out only once `auth_on_publish`
/// answered `ok` for `n` (the PUBACK); any other outcome means "resend". Returns how many calls were not `ok`.
async fn device_session(url: String, device: String, count: u64) -> u64 {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().expect("HTTP client");
    let mut refused = 0;
    for n in 0..count {
        let body = publish_body(&device, &format!("{device}/attrs"), format!(r#"{{"n": {n}}}"#).as_bytes(), 1);
        loop {
            let reply = client
                .post(&url)
                .header("vernemq-hook", "auth_on_publish")
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await;
            let ok = match reply {
                Ok(r) if r.status() == 200 => r.json::<Value>().await.is_ok_and(|v| v["result"] == "ok"),
                _ => false,
            };
            if ok {
                break;
            }
            refused += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    refused
}

#[tokio::test]
async fn strict_mode_loses_nothing_when_the_service_is_killed_between_calls() {
    let kafka = Tansu::start(Storage::Sqlite);
    create_topics(&kafka, &["admin"]).await;
    let env = vec![
        ("KAFKA_BROKERS", kafka.brokers()),
        ("V2K_MODE", "auth_on_publish".to_string()),
        // Records wait this long in the producer's memory before they are sent: had `ok` been answered before
        // Kafka's ack, the SIGKILL below would lose every record still lingering.
        ("KAFKA_LINGER_MS", "200".to_string()),
        ("V2K_ACK_TIMEOUT_MS", "2000".to_string()),
    ];
    let service = ServiceProcess::start(&env);
    service.wait_ready().await;
    let port = service.port;
    let url = service.url("/vmq/auth_on_publish");

    let devices: Vec<String> = (0..20).map(|i| format!("admin:dev{i}")).collect();
    let per_device = 25;
    let sessions: Vec<_> =
        devices.iter().map(|d| tokio::spawn(device_session(url.clone(), d.clone(), per_device))).collect();

    tokio::time::sleep(Duration::from_millis(1500)).await;
    service.kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let service = ServiceProcess::start_on(port, &env);
    service.wait_ready().await;

    let mut refused = 0;
    for session in sessions {
        refused += session.await.expect("device session");
    }
    assert!(refused > 0, "the kill happened while devices were publishing");

    let total = devices.len() * per_device as usize;
    let mut records = kafka.read("admin.device-data", total, Duration::from_secs(60)).await;
    let all = kafka.read("admin.device-data", usize::MAX, Duration::from_secs(3)).await;
    if all.len() > records.len() {
        records = all;
    }
    let expected: BTreeMap<String, u64> = devices.iter().map(|d| (d.clone(), per_device)).collect();
    let (lost, duplicates) = lost_and_duplicates(&sequence_by_device(&records), &expected);
    println!(
        "strict, service killed: refused {refused}, in Kafka {}, lost {lost}, duplicates {duplicates}",
        records.len()
    );
    assert_eq!(lost, 0, "a publish answered ok is missing from Kafka");
    drop(service);
}
