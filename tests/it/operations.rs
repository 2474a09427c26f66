//! The binary as operators run it: how it answers signals, what it refuses to start with.

use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::common::RawClient;
use crate::common::brokers::{Storage, Tansu};
use crate::common::process::ServiceProcess;

/// The first SIGTERM starts the ordered stop, which waits for the request in flight; a second one exits at once,
/// with the status a shell gives a process SIGTERM killed (143), instead of waiting out the drain.
#[tokio::test]
async fn a_second_sigterm_exits_at_once() {
    a_second_signal_exits_at_once("TERM", 143).await;
}

/// Ctrl-C twice: the same with SIGINT (130).
#[tokio::test]
async fn a_second_sigint_exits_at_once() {
    a_second_signal_exits_at_once("INT", 130).await;
}

async fn a_second_signal_exits_at_once(signal: &str, status: i32) {
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut service = ServiceProcess::start_logging_to(log.path(), &[("SHUTDOWN_TIMEOUT", "30".into())]);
    service.wait_ready().await;
    // A request whose body never comes holds the drain open until the request timeout (6 s).
    let mut held = TcpStream::connect(("127.0.0.1", service.port)).await.unwrap();
    held.write_all(b"POST /vmq/auth_on_register HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    service.signal(signal);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(service.running(), "the ordered stop waits for the request in flight");
    service.signal(signal);
    let (exit, took) = service.exit_within(Duration::from_secs(15)).await;
    assert!(took < Duration::from_secs(2), "exited {took:?} after the second SIG{signal}");
    assert_eq!(exit.code(), Some(status), "{exit}");
    let logged = std::fs::read_to_string(log.path()).unwrap();
    assert!(logged.contains(&format!("SIG{signal} again: exiting at once")), "{logged}");
}

/// A RUST_LOG that does not parse stops the start, as any invalid configuration does, naming the variable and the
/// fault (it used to fall back to `info` silently, dropping the operator's other directives).
#[tokio::test]
async fn an_invalid_rust_log_is_refused_at_start() {
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut service = ServiceProcess::start_logging_to(log.path(), &[("RUST_LOG", "info,rdkafka=verbose".into())]);
    let (exit, _) = service.exit_within(Duration::from_secs(10)).await;
    assert_eq!(exit.code(), Some(2), "{exit}");
    let logged = std::fs::read_to_string(log.path()).unwrap();
    assert!(logged.contains("RUST_LOG") && logged.contains("info,rdkafka=verbose"), "{logged}");
    assert!(logged.contains("level"), "the parse error says what is wrong: {logged}");
}

/// A connection stalled in a request head (anyone who reaches the plain port can hold one) does not take the
/// producer's flush time at SIGTERM: the webhooks' drain gives up FLUSH_RESERVE (2 s) before the deadline, and the
/// flush of records answered in `on_publish` mode gets that. Before, the drain waited for that connection to the end of
/// the budget and the flush got nothing. (What the flush then achieves is librdkafka's business: the record here
/// lingers 30 s so that only the flush can send it, and librdkafka sends it within a second or two.)
#[tokio::test]
async fn a_stalled_connection_does_not_cost_the_flush_at_shutdown() {
    let kafka = Tansu::start(Storage::Memory);
    crate::v2k::create_topics(&kafka, &["admin"]).await;
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut service = ServiceProcess::start_logging_to(
        log.path(),
        &[
            ("KAFKA_BROKERS", kafka.brokers()),
            ("V2K_MODE", "on_publish".into()),
            ("KAFKA_LINGER_MS", "30000".into()),
            ("V2K_DELIVERY_TIMEOUT_MS", "60000".into()),
            ("V2K_ACK_TIMEOUT_MS", "100".into()),
            ("SHUTDOWN_TIMEOUT", "4".into()),
            ("RUST_LOG", "info".into()),
            ("LOG_FORMAT", "json".into()),
        ],
    );
    service.wait_ready().await;
    let mut client = RawClient::connect(format!("127.0.0.1:{}", service.port).parse().unwrap()).await;
    let body = crate::v2k::publish_body("admin:a1998e", "admin:a1998e/attrs", br#"{"t": 1}"#, 1);
    assert_eq!(client.hook("on_publish", body.as_bytes()).await.status, 200, "answered before Kafka's ack");
    let mut stalled = TcpStream::connect(("127.0.0.1", service.port)).await.unwrap();
    stalled.write_all(b"POST /vmq/auth_on_register HTTP/1.1\r\nHo").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    service.signal("TERM");
    let (exit, took) = service.exit_within(Duration::from_secs(15)).await;
    assert_eq!(exit.code(), Some(0), "{exit}");
    assert!(took < Duration::from_millis(5500), "within SHUTDOWN_TIMEOUT: {took:?}");
    let logged = std::fs::read_to_string(log.path()).unwrap();
    assert!(logged.contains("in-flight webhooks did not finish"), "the stalled connection held the drain: {logged}");
    let flush_budget = logged
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|line| line["message"] == "flushing the Kafka producer")
        .and_then(|line| line["budget_ms"].as_u64())
        .unwrap_or_else(|| panic!("no flush line: {logged}"));
    assert!(flush_budget >= 1500, "the flush kept its reserve: {flush_budget} ms");
}
