//! The binary as operators run it: how it answers signals, what it refuses to start with.

use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

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
