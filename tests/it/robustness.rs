//! Mutated VerneMQ requests (bytes flipped, cut short, values swapped for other JSON types) never crash the service
//! and always get an answer VerneMQ can read: a well-formed decision or a 400 with a JSON error. A client that stalls
//! in a request head does not keep its connection.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::captures;
use crate::common::{flags, shape, spawn_app};

fn mutate(body: &str, rng: &mut StdRng) -> Vec<u8> {
    let mut bytes = body.as_bytes().to_vec();
    match rng.random_range(0..4) {
        0 => {
            for _ in 0..rng.random_range(1..4) {
                let i = rng.random_range(0..bytes.len());
                bytes[i] = rng.random();
            }
            bytes
        }
        1 => {
            bytes.truncate(rng.random_range(0..bytes.len()));
            bytes
        }
        _ => {
            // Valid JSON with one field's value replaced by another type or an edge value.
            let Ok(Value::Object(mut map)) = serde_json::from_str::<Value>(body) else { return bytes };
            let keys: Vec<String> = map.keys().cloned().collect();
            let key = &keys[rng.random_range(0..keys.len())];
            let replacements = [
                Value::Null,
                Value::Bool(true),
                serde_json::json!(-1),
                serde_json::json!(1e300),
                serde_json::json!(u64::MAX),
                serde_json::json!("\u{0000}\u{fffd}/+#"),
                serde_json::json!([]),
                serde_json::json!({}),
                serde_json::json!([{"topic": null, "qos": 9}]),
                Value::String("A".repeat(5000)),
            ];
            map.insert(key.clone(), replacements[rng.random_range(0..replacements.len())].clone());
            if rng.random_bool(0.2) {
                map.remove(&keys[rng.random_range(0..keys.len())]);
            }
            Value::Object(map).to_string().into_bytes()
        }
    }
}

#[tokio::test]
async fn mutated_requests_never_crash_the_service_or_get_an_unreadable_reply() {
    let captures = captures::load();
    let app = spawn_app(&[]).await;
    let mut client = app.client().await;
    let mut rng = StdRng::seed_from_u64(0x1071_a6e7);
    let (mut answered, mut refused) = (0, 0);
    for c in captures.iter().filter(|c| shape::AUTH_HOOKS.contains(&c.hook.as_str()) || c.hook.starts_with("on_")) {
        for _ in 0..3 {
            let body = mutate(&c.body_raw, &mut rng);
            let response = client.hook(&c.hook, &body).await;
            let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            match response.status {
                // Hooks the service does not implement.
                404 => continue,
                200 => answered += 1,
                400 => refused += 1,
                other => panic!("{}: status {other} for {:?}", c.hook, String::from_utf8_lossy(&body)),
            }
            shape::check(&c.hook, &request, &response)
                .unwrap_or_else(|e| panic!("{}: {e} for {:?}", c.hook, String::from_utf8_lossy(&body)));
        }
    }
    println!("mutated requests: {answered} answered, {refused} refused with 400");
    assert!(answered > 100 && refused > 100, "the mutations exercise both paths");
    // Still serving after all of it.
    let health = reqwest::get(app.url("/health/live")).await.unwrap();
    assert_eq!(health.status(), 200);
}

/// A client that sends half a request head and nothing more is dropped after WEBHOOK_IDLE_TIMEOUT, on the plain port
/// as on the HTTPS one, so idle sockets cannot pile up until the service runs out of descriptors. A keep-alive
/// connection that pauses between requests for less than that (VerneMQ's pooled ones) is not cut.
#[tokio::test]
async fn a_trickling_request_head_is_dropped_on_the_plain_port() {
    let app = spawn_app(&flags(&[("WEBHOOK_IDLE_TIMEOUT", "3")])).await;
    let mut pooled = app.client().await;
    let body = captures::load().into_iter().find(|c| c.hook == "auth_on_register").expect("a capture").body_raw;
    assert_eq!(pooled.hook("auth_on_register", body.as_bytes()).await.status, 200);
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    stream.write_all(b"POST /vmq/auth_on_register HTTP/1.1\r\nHo").await.unwrap();
    let trickling = async {
        let mut buf = [0u8; 256];
        tokio::time::timeout(Duration::from_secs(15), stream.read(&mut buf)).await
    };
    let paused = async {
        let mut statuses = Vec::new();
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            statuses.push(pooled.hook("auth_on_register", body.as_bytes()).await.status);
        }
        statuses
    };
    let (read, statuses) = tokio::join!(trickling, paused);
    assert!(matches!(read, Ok(Ok(_)) | Ok(Err(_))), "still open after 15 s with half a request head");
    assert_eq!(statuses, [200; 4], "a keep-alive connection pausing 1.5 s between calls still serves");
}
