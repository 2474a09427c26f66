//! Real brokers started by the tests on free loopback ports with their own config and data directory: `tansu`
//! (Kafka protocol) and Mosquitto. Each is killed when dropped.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use tempfile::TempDir;

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

fn wait_for_port(port: u16, child: &mut Child, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port))).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited at start: {status}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{what} did not listen on {port} within 20 s");
}

/// The path of an installed program the tests need; fails the test at once, naming the one command that installs it,
/// when it is missing.
pub fn binary(name: &str) -> PathBuf {
    for dir in std::env::var("PATH").unwrap_or_default().split(':').chain(["/usr/sbin", "/usr/local/bin"]) {
        let candidate = Path::new(dir).join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    if let Some(home) = std::env::var_os("HOME") {
        let candidate = Path::new(&home).join(".cargo/bin").join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!("{name} is not installed: run ./scripts/test, which installs it");
}

/// How tansu stores data: `Memory` is fastest; `Sqlite` survives a restart (fault tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    Memory,
    Sqlite,
}

pub struct Tansu {
    pub port: u16,
    storage: Storage,
    dir: TempDir,
    child: Option<Child>,
}

impl Tansu {
    pub fn start(storage: Storage) -> Self {
        let dir = tempfile::tempdir().expect("tansu dir");
        let mut tansu = Self { port: free_port(), storage, dir, child: None };
        tansu.spawn();
        tansu
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let storage = match self.storage {
            Storage::Memory => "memory://tansu/".to_string(),
            // An absolute path needs four slashes: tansu reads `sqlite:///x` as relative.
            Storage::Sqlite => format!("sqlite:///{}", self.dir.path().join("tansu.db").display()),
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("tansu.log"))
            .expect("tansu log");
        let mut child = Command::new(binary("tansu"))
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url, "--storage-engine", &storage])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start tansu");
        wait_for_port(self.port, &mut child, "tansu");
        self.child = Some(child);
    }

    /// Kills the broker (SIGKILL: the harshest stop) and waits for it to be gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().ok();
            child.wait().ok();
        }
    }

    /// Starts it again on the same port with the same storage.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub async fn create_topic(&self, name: &str, partitions: i32) {
        let admin: AdminClient<DefaultClientContext> =
            ClientConfig::new().set("bootstrap.servers", self.brokers()).create().expect("admin client");
        let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        let results = admin.create_topics(&[topic], &options).await.expect("create_topics");
        for r in results {
            if let Err((name, code)) = r {
                assert_eq!(code, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists, "creating {name}");
            }
        }
    }

    /// Reads `topic` from the beginning until `count` records arrived or `timeout` passed.
    pub async fn read(&self, topic: &str, count: usize, timeout: Duration) -> Vec<Record> {
        read_topic(&self.brokers(), topic, count, timeout).await
    }
}

/// Reads `topic` of the cluster at `brokers` from the beginning until `count` records arrived or `timeout` passed.
pub async fn read_topic(brokers: &str, topic: &str, count: usize, timeout: Duration) -> Vec<Record> {
    let consumer = reader(brokers);
    consumer.subscribe(&[topic]).expect("subscribe");
    read_from(consumer, count, timeout).await
}

/// Like [`read_topic`], for partition 0 of `topic`, assigned rather than joined as a group (librdkafka's mock
/// cluster is slow to form a group).
pub async fn read_partition(brokers: &str, topic: &str, count: usize, timeout: Duration) -> Vec<Record> {
    let consumer = reader(brokers);
    let mut partitions = rdkafka::TopicPartitionList::new();
    partitions.add_partition_offset(topic, 0, rdkafka::Offset::Beginning).expect("partition");
    consumer.assign(&partitions).expect("assign");
    read_from(consumer, count, timeout).await
}

fn reader(brokers: &str) -> StreamConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("reader-{}", rand::random::<u64>()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer")
}

async fn read_from(consumer: StreamConsumer, count: usize, timeout: Duration) -> Vec<Record> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    while out.len() < count {
        match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Err(_) => break,
            Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(50)).await,
            Ok(Ok(m)) => out.push(Record {
                partition: m.partition(),
                key: m.key().map(|k| String::from_utf8_lossy(k).to_string()),
                value: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                headers: m
                    .headers()
                    .map(raw_headers::all)
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (String::from_utf8_lossy(&k).into_owned(), String::from_utf8_lossy(&v).into_owned()))
                    .collect(),
            }),
        }
    }
    out
}

impl Drop for Tansu {
    fn drop(&mut self) {
        self.stop();
    }
}

#[derive(Debug, Clone)]
pub struct Record {
    pub partition: i32,
    pub key: Option<String>,
    pub value: Vec<u8>,
    pub headers: Vec<(String, String)>,
}

impl Record {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.value).expect("record value is JSON")
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// The Receive Maximum the tests' Mosquitto announces to MQTT 5 clients: its `max_inflight_messages` is both (default
/// 20, which would cap K2V's window); 1 000 is closer to VerneMQ, whose `receive_max_broker` defaults to 65 535.
pub const RECEIVE_MAXIMUM: u16 = 1000;

/// A Mosquitto broker with a plain listener protected by a password file, and a second, anonymous one for devices
/// (Mosquitto's password file cannot hold `tenant:device` names: they contain its separator).
pub struct Mosquitto {
    pub port: u16,
    pub device_port: u16,
    dir: TempDir,
    child: Option<Child>,
}

impl Mosquitto {
    /// `users` are `(name, password)` pairs written to the password file.
    pub fn start(users: &[(&str, &str)]) -> Self {
        Self::start_with(users, "")
    }

    /// With extra configuration lines appended (for example a TLS listener).
    pub fn start_with(users: &[(&str, &str)], extra: &str) -> Self {
        Self::start_with_acl(users, None, extra)
    }

    /// With an ACL file (Mosquitto's `user` / `topic` lines) on the password-protected listener.
    pub fn start_with_acl(users: &[(&str, &str)], acl: Option<&str>, extra: &str) -> Self {
        Self::launch(users, acl, extra, RECEIVE_MAXIMUM)
    }

    /// Announcing `receive_maximum` (Mosquitto's `max_inflight_messages`) to MQTT 5 clients instead of
    /// [`RECEIVE_MAXIMUM`]: 20 is Mosquitto's default, a window smaller than the service's.
    pub fn start_with_receive_maximum(users: &[(&str, &str)], receive_maximum: u16) -> Self {
        Self::launch(users, None, "", receive_maximum)
    }

    fn launch(users: &[(&str, &str)], acl: Option<&str>, extra: &str, receive_maximum: u16) -> Self {
        let dir = tempfile::tempdir().expect("mosquitto dir");
        let passwd = dir.path().join("passwd");
        std::fs::write(&passwd, "").expect("passwd file");
        for (user, password) in users.iter().filter(|(user, _)| !user.contains(':')) {
            let status = Command::new(binary("mosquitto_passwd"))
                .args(["-b", passwd.to_str().expect("utf-8 path"), user, password])
                .status()
                .expect("mosquitto_passwd");
            assert!(status.success(), "mosquitto_passwd failed");
        }
        let acl_line = match acl {
            Some(rules) => {
                let path = dir.path().join("acl");
                std::fs::write(&path, rules).expect("acl file");
                format!("acl_file {}\n", path.display())
            }
            None => String::new(),
        };
        let port = free_port();
        let device_port = free_port();
        let config = format!(
            "user root\nper_listener_settings true\npersistence true\npersistence_location {dir}/\n\
             log_dest file {dir}/mosquitto.log\nmax_queued_messages 100000\nmax_inflight_messages {receive_maximum}\n\
             listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {passwd}\n{acl_line}\
             listener {device_port} 127.0.0.1\nallow_anonymous true\n{extra}\n",
            dir = dir.path().display(),
            passwd = passwd.display(),
        );
        std::fs::write(dir.path().join("mosquitto.conf"), config).expect("mosquitto.conf");
        let mut m = Self { port, device_port, dir, child: None };
        m.spawn();
        m
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn spawn(&mut self) {
        let mut child = Command::new(binary("mosquitto"))
            .args(["-c", self.dir.path().join("mosquitto.conf").to_str().expect("utf-8 path")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto");
        wait_for_port(self.port, &mut child, "mosquitto");
        self.child = Some(child);
    }

    /// SIGTERM, so that Mosquitto writes its persistence file (sessions and queued messages survive).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            child.kill().ok();
            child.wait().ok();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().ok();
            child.wait().ok();
        }
    }
}

/// Kafka headers as bytes, for what rdkafka's safe API cannot do: send a header name that is not UTF-8, as any
/// producer may, and read one back (rdkafka panics reading one).
pub mod raw_headers {
    use std::ffi::{CStr, c_void};

    use rdkafka::bindings::{rd_kafka_header_add, rd_kafka_header_get_all, rd_kafka_headers_t, rd_kafka_resp_err_t};
    use rdkafka::message::{BorrowedHeaders, Headers as _, OwnedHeaders};

    /// `BorrowedHeaders` is librdkafka's header list itself: rdkafka casts between the two.
    fn native(headers: &BorrowedHeaders) -> *mut rd_kafka_headers_t {
        std::ptr::from_ref(headers).cast_mut().cast()
    }

    /// `headers` with one more, named by any bytes.
    pub fn add(headers: OwnedHeaders, name: &[u8], value: &[u8]) -> OwnedHeaders {
        let (name_len, value_len) = (isize::try_from(name.len()).unwrap(), isize::try_from(value.len()).unwrap());
        // SAFETY: the list is owned and alive; librdkafka copies both buffers, whose lengths are passed.
        let err = unsafe {
            rd_kafka_header_add(
                native(headers.as_borrowed()),
                name.as_ptr().cast(),
                name_len,
                value.as_ptr().cast(),
                value_len,
            )
        };
        assert_eq!(err, rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR, "header added");
        headers
    }

    /// Every header as (name, value) bytes; a header without a value has an empty one.
    pub fn all(headers: &BorrowedHeaders) -> Vec<(Vec<u8>, Vec<u8>)> {
        (0..headers.count())
            .map(|index| {
                let (mut name, mut value, mut size) = (std::ptr::null(), std::ptr::null::<c_void>(), 0);
                // SAFETY: the list outlives this call; librdkafka hands out pointers into it, NUL-terminated for the name,
                // copied before the list can go.
                unsafe {
                    let err =
                        rd_kafka_header_get_all(native(headers), index, &raw mut name, &raw mut value, &raw mut size);
                    assert_eq!(err, rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR, "header {index}");
                    let value = if value.is_null() {
                        Vec::new()
                    } else {
                        std::slice::from_raw_parts(value.cast::<u8>(), size).to_vec()
                    };
                    (CStr::from_ptr(name).to_bytes().to_vec(), value)
                }
            })
            .collect()
    }
}
