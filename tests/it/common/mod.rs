//! Shared test harness: start the service on a free port, talk raw HTTP/1.1 to it like VerneMQ's hackney does, and
//! check replies against the shapes VerneMQ accepts.

#![allow(dead_code)]

pub mod brokers;
pub mod captures;
pub mod link;
pub mod pki;
pub mod process;
pub mod shape;
pub mod subscriber;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use clap::CommandFactory;
use iotagent_mqtt::{Config, Listeners};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A running service; stops when dropped.
pub struct TestApp {
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
    pub task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub async fn client(&self) -> RawClient {
        RawClient::connect(self.addr).await
    }

    /// Its Prometheus text.
    pub async fn metrics(&self) -> String {
        metrics_text(&self.url("")).await
    }

    /// Cancels and waits for `run` to return.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        let task = self.task.take().expect("stopped once");
        tokio::time::timeout(Duration::from_secs(30), task).await.expect("service stops within 30 s")?
    }
}

/// Starts the service with these flags (plus a free loopback port).
pub async fn spawn_app(args: &[String]) -> TestApp {
    let mut argv = vec![
        "iotagent-mqtt".to_string(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--log-format".into(),
        "text".into(),
    ];
    argv.extend(args.iter().cloned());
    let config = Config::from_env_and_args(argv).unwrap_or_else(|e| panic!("test config: {e}"));
    let _ = tracing_subscriber::fmt().with_test_writer().with_env_filter("warn").try_init();
    let listeners = Listeners::bind(&config).await.expect("bind 127.0.0.1:0");
    let addr = listeners.http.local_addr().expect("local addr");
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(iotagent_mqtt::run(config, listeners, shutdown.clone()));
    TestApp { addr, shutdown, task: Some(task) }
}

/// The service user's password in the Mosquitto of the K2V tests.
pub const K2V_PASSWORD: &str = "k2v-secret";

/// Environment of a K2V service: short intervals so tests see new topics and commits quickly.
pub fn k2v_env(kafka: &brokers::Tansu, mqtt_url: &str, group: &str) -> Vec<(&'static str, String)> {
    vec![
        ("KAFKA_BROKERS", kafka.brokers()),
        ("MQTT_URL", mqtt_url.to_string()),
        ("MQTT_PASSWORD", K2V_PASSWORD.into()),
        ("MQTT_CLIENT_ID", format!("it-{group}")),
        ("SERVICE_CLIENT_ID_PREFIX", "it-".into()),
        ("K2V_KAFKA_GROUP_ID", group.into()),
        ("K2V_METADATA_REFRESH_MS", "500".into()),
        ("K2V_STATS_INTERVAL_MS", "500".into()),
        ("K2V_LAG_INTERVAL_MS", "300".into()),
        ("K2V_SDK_COMMIT_INTERVAL_MS", "200".into()),
        ("K2V_SESSION_TIMEOUT_MS", "6000".into()),
        ("SHUTDOWN_TIMEOUT", "5".into()),
    ]
}

/// Starts the service with this environment (as flags) and waits until it is ready.
pub async fn start_app(env: &[(&str, String)]) -> TestApp {
    let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let app = spawn_app(&flags(&pairs)).await;
    wait_ready(&app.url("/health/ready")).await;
    app
}

/// The Prometheus text of the service at `base` (`http://host:port`).
pub async fn metrics_text(base: &str) -> String {
    reqwest::get(format!("{base}/metrics")).await.expect("metrics").text().await.expect("metrics body")
}

/// The value of one series (`name` or `name{labels}`, as rendered) in Prometheus text, when it is there.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Flags for a map of environment variable names to values, so tests never mutate the process environment
/// (tests run in parallel threads).
pub fn args_from_env(env: &BTreeMap<String, String>) -> Vec<String> {
    let command = Config::command();
    let mut args = Vec::new();
    for (name, value) in env {
        let arg = command
            .get_arguments()
            .find(|a| a.get_env().is_some_and(|e| e == name.as_str()))
            .unwrap_or_else(|| panic!("no option reads the environment variable {name}"));
        args.push(format!("--{}", arg.get_long().expect("every option has a long flag")));
        args.push(value.clone());
    }
    args
}

pub fn flags(pairs: &[(&str, &str)]) -> Vec<String> {
    args_from_env(&pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
}

#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("reply is not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }
}

/// One keep-alive HTTP/1.1 connection writing requests exactly as given, the way hackney does.
pub struct RawClient {
    reader: BufReader<TcpStream>,
}

impl RawClient {
    pub async fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).await.expect("connect to service");
        stream.set_nodelay(true).ok();
        Self { reader: BufReader::new(stream) }
    }

    /// A webhook POST with VerneMQ 2.1's header set and order.
    pub async fn hook(&mut self, hook: &str, body: &[u8]) -> RawResponse {
        let headers = [
            ("vernemq-hook".to_string(), hook.to_string()),
            ("Host".into(), "127.0.0.1:8080".into()),
            ("User-Agent".into(), "hackney/1.20.1".into()),
            ("Content-Type".into(), "application/json".into()),
            ("Content-Length".into(), body.len().to_string()),
        ];
        self.send("POST", &format!("/vmq/{hook}"), &headers, body).await
    }

    pub async fn send(&mut self, method: &str, path: &str, headers: &[(String, String)], body: &[u8]) -> RawResponse {
        self.send_prefix(method, path, headers, body, body.len()).await
    }

    /// Sends the head and only the first `sent` bytes of the body, then reads the reply: for replies that must come
    /// before the body has been read whole.
    pub async fn send_prefix(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(String, String)],
        body: &[u8],
        sent: usize,
    ) -> RawResponse {
        let body = &body[..sent.min(body.len())];
        let mut request = format!("{method} {path} HTTP/1.1\r\n").into_bytes();
        for (k, v) in headers {
            request.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
        }
        request.extend_from_slice(b"\r\n");
        request.extend_from_slice(body);
        let stream = self.reader.get_mut();
        stream.write_all(&request).await.expect("write request");
        self.read_response().await
    }

    async fn read_response(&mut self) -> RawResponse {
        let mut line = String::new();
        self.reader.read_line(&mut line).await.expect("status line");
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {line:?}"));
        let mut headers = Vec::new();
        loop {
            line.clear();
            self.reader.read_line(&mut line).await.expect("header line");
            let trimmed = line.trim_end();
            if trimmed.is_empty() {
                break;
            }
            let (k, v) = trimmed.split_once(':').expect("header has a colon");
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
        let length: usize = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .map(|(_, v)| v.parse().expect("numeric content-length"))
            .expect("every reply has a content-length (no chunking: hackney reads it whole)");
        let mut body = vec![0; length];
        self.reader.read_exact(&mut body).await.expect("body");
        RawResponse { status, headers, body }
    }
}

/// Threads of this process with this name (the service's own runtimes name theirs).
pub fn threads_named(name: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim() == name)
        .count()
}

/// Polls `check` until it returns true or `timeout` passes.
pub async fn wait_until(timeout: Duration, mut check: impl AsyncFnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `url` (a `/health/ready`) answers 200: every configured dependency (Kafka, MQTT) is up.
pub async fn wait_ready(url: &str) {
    let ready =
        wait_until(Duration::from_secs(20), async || reqwest::get(url).await.is_ok_and(|r| r.status() == 200)).await;
    assert!(ready, "service ready (Kafka and MQTT probes up) at {url}");
}

/// An MQTT client acting as a device or backend, its event loop driven in the background (reconnecting). Device
/// names (`tenant:device`) connect to the broker's anonymous device listener.
pub async fn mqtt_client(
    broker: &brokers::Mosquitto,
    username: &str,
    password: &str,
    client_id: &str,
    clean_session: bool,
) -> rumqttc::AsyncClient {
    let device = username.contains(':');
    let port = if device { broker.device_port } else { broker.port };
    let mut options = rumqttc::MqttOptions::new(client_id, "127.0.0.1", port);
    if !device {
        options.set_credentials(username, password);
    }
    options.set_clean_session(clean_session);
    options.set_keep_alive(Duration::from_secs(10));
    options.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 100_000);
    let (connected_tx, connected_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut connected = Some(connected_tx);
        loop {
            match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                    if let Some(tx) = connected.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), connected_rx).await.expect("MQTT client connects").ok();
    client
}
