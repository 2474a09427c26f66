//! Webhook decision throughput and latency, against a trivial axum handler measured in the same run.
//!
//! Both servers run in this process on runtimes of the same size, loaded one at a time by the same generator, so the
//! ratio is what the service's work costs on top of HTTP itself. The service's HTTPS listener (TLS 1.2, client
//! certificate, keep-alive connections as hackney pools them) is compared with its plain listener.
//! Run with `cargo bench --bench webhooks`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::routing::post;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use iotagent_mqtt::{Config, Listeners};
use openssl::ssl::{SslConnector, SslFiletype, SslMethod, SslVersion};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

// The tests' throwaway PKI; the bench uses only `write`.
#[allow(dead_code)]
#[path = "../tests/it/common/pki.rs"]
mod pki;

/// Where the load goes: plain HTTP, or HTTPS with a client certificate.
#[derive(Clone)]
enum Target {
    Plain(SocketAddr),
    Tls(SocketAddr, SslConnector),
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

impl Target {
    async fn connect(&self) -> Box<dyn Io> {
        let addr = match self {
            Target::Plain(addr) | Target::Tls(addr, _) => *addr,
        };
        let stream = TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).ok();
        match self {
            Target::Plain(_) => Box::new(stream),
            Target::Tls(_, connector) => {
                let ssl = connector.configure().expect("ssl").into_ssl("localhost").expect("ssl");
                let mut tls = tokio_openssl::SslStream::new(ssl, stream).expect("ssl stream");
                std::pin::Pin::new(&mut tls).connect().await.expect("TLS handshake");
                Box::new(tls)
            }
        }
    }
}

/// A TLS 1.2 client (VerneMQ's default `vmq_webhooks.tls_version`) with the test PKI's client certificate.
fn tls_connector(dir: &std::path::Path) -> SslConnector {
    let mut connector = SslConnector::builder(SslMethod::tls_client()).expect("connector");
    connector.set_ca_file(dir.join("ca.pem")).expect("ca");
    connector.set_max_proto_version(Some(SslVersion::TLS1_2)).expect("version");
    connector.set_certificate_file(dir.join("k2v.pem"), SslFiletype::PEM).expect("cert");
    connector.set_private_key_file(dir.join("k2v.key"), SslFiletype::PEM).expect("key");
    connector.build()
}

const CONNECTIONS: usize = 32;
const PHASE: Duration = Duration::from_secs(3);
const ROUNDS: usize = 2;

const PUBLISH: &str = r#"{"username":"admin:a1998e","mountpoint":"","client_id":"admin:a1998e","qos":1,"topic":"admin:a1998e/attrs","payload":"eyJ0ZW1wZXJhdHVyZSI6MjEuNX0=","retain":false}"#;
const REGISTER: &str = r#"{"peer_addr":"127.0.0.1","peer_port":48724,"mountpoint":"","client_id":"admin:a1998e","username":"admin:a1998e","password":null,"clean_session":true}"#;

struct Load {
    hook: &'static str,
    body: &'static str,
}

const LOADS: [Load; 2] =
    [Load { hook: "auth_on_publish", body: PUBLISH }, Load { hook: "auth_on_register", body: REGISTER }];

struct Outcome {
    per_second: f64,
    latency: Histogram<u64>,
}

/// Runs a server on its own 2-worker runtime (the machine has 2 cores; the load generator shares them).
fn server_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

/// The service on loopback, with its HTTPS listener on a free port too.
fn start_service(rt: &tokio::runtime::Runtime, pki: &std::path::Path) -> (SocketAddr, SocketAddr, CancellationToken) {
    rt.block_on(async {
        let tls_addr = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port");
        let file = |name: &str| pki.join(name).to_string_lossy().into_owned();
        let tls_listen = tls_addr.to_string();
        let args = [
            "iotagent-mqtt",
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "text",
            "--tls-listen",
            &tls_listen,
            "--tls-cert-file",
            &file("server.pem"),
            "--tls-key-file",
            &file("server.key"),
            "--tls-client-ca-file",
            &file("ca.pem"),
            "--tls-client-names",
            "k2v-bridge",
            // The same number of threads as the trivial server's runtime (the service's default is one).
            "--webhook-threads",
            "2",
        ];
        let config = Config::from_env_and_args(args).expect("config");
        let listeners = Listeners::bind(&config).await.expect("bind");
        let addr = listeners.http.local_addr().expect("addr");
        let token = CancellationToken::new();
        tokio::spawn(iotagent_mqtt::run(config, listeners, token.clone()));
        (addr, tls_addr, token)
    })
}

fn start_trivial(rt: &tokio::runtime::Runtime) -> (SocketAddr, CancellationToken) {
    rt.block_on(async {
        let router = Router::new().route(
            "/vmq/{hook}",
            post(|_body: Bytes| async { ([("content-type", "application/json")], r#"{"result":"ok"}"#) }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let token = CancellationToken::new();
        let stop = token.clone();
        tokio::spawn(async move {
            axum::serve(listener, router).with_graceful_shutdown(stop.cancelled_owned()).await.ok();
        });
        (addr, token)
    })
}

/// `rate` = None: closed loop, each connection sends as soon as the previous answer came (peak).
/// `rate` = Some(r): paced at r requests/s in total.
async fn drive(target: Target, load: &'static Load, rate: Option<f64>) -> Outcome {
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for i in 0..CONNECTIONS {
        let stop = stop.clone();
        let target = target.clone();
        tasks.push(tokio::spawn(async move {
            let stream = target.connect().await;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("handshake");
            tokio::spawn(conn);
            let mut hist = Histogram::<u64>::new(3).expect("histogram");
            let interval = rate.map(|r| Duration::from_secs_f64(CONNECTIONS as f64 / r));
            let start =
                Instant::now() + interval.map_or(Duration::ZERO, |iv| iv.mul_f64(i as f64 / CONNECTIONS as f64));
            let mut n: u32 = 0;
            while !stop.load(Ordering::Relaxed) {
                if let Some(iv) = interval {
                    tokio::time::sleep_until((start + iv * n).into()).await;
                }
                // From the actual send: tokio's timer has 1 ms granularity, which would otherwise dominate.
                let sent = Instant::now();
                let request = Request::post(format!("/vmq/{}", load.hook))
                    .header("host", "127.0.0.1")
                    .header("vernemq-hook", load.hook)
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from_static(load.body.as_bytes())))
                    .expect("request");
                let response = sender.send_request(request).await.expect("response");
                assert_eq!(response.status(), 200);
                let body = response.into_body().collect().await.expect("body").to_bytes();
                assert!(body.starts_with(br#"{"result":"ok""#));
                hist.record(sent.elapsed().as_micros() as u64).ok();
                n += 1;
            }
            hist
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(PHASE).await;
    stop.store(true, Ordering::Relaxed);
    let mut latency = Histogram::<u64>::new(3).expect("histogram");
    for t in tasks {
        latency.add(t.await.expect("load task")).expect("same bounds");
    }
    let per_second = latency.len() as f64 / started.elapsed().as_secs_f64();
    Outcome { per_second, latency }
}

fn micros(h: &Histogram<u64>, q: f64) -> String {
    format!("{:.0} µs", h.value_at_quantile(q) as f64)
}

/// The round with the highest rate.
fn best(rounds: Vec<Outcome>) -> Outcome {
    rounds.into_iter().max_by(|a, b| a.per_second.total_cmp(&b.per_second)).expect("at least one round")
}

fn main() {
    let load_rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("rt");
    let service_rt = server_runtime();
    let trivial_rt = server_runtime();
    let pki_dir = tempfile::tempdir().expect("pki dir");
    pki::write(pki_dir.path());
    let (service, service_tls, service_stop) = start_service(&service_rt, pki_dir.path());
    let (trivial, trivial_stop) = start_trivial(&trivial_rt);
    let (service, trivial) = (Target::Plain(service), Target::Plain(trivial));
    let tls = Target::Tls(service_tls, tls_connector(pki_dir.path()));

    println!("webhook benchmark: {CONNECTIONS} keep-alive connections, {PHASE:?} per phase, best of {ROUNDS} rounds");
    for load in &LOADS {
        // Alternate so that drift in machine load hits both sides alike.
        let (mut services, mut trivials) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            trivials.push(load_rt.block_on(drive(trivial.clone(), load, None)));
            services.push(load_rt.block_on(drive(service.clone(), load, None)));
        }
        let (s, t) = (best(services), best(trivials));
        println!(
            "{:<18} peak: service {:>8.0}/s (p50 {}, p99 {})  trivial axum {:>8.0}/s (p50 {}, p99 {})  ratio {:.2}",
            load.hook,
            s.per_second,
            micros(&s.latency, 0.5),
            micros(&s.latency, 0.99),
            t.per_second,
            micros(&t.latency, 0.5),
            micros(&t.latency, 0.99),
            s.per_second / t.per_second
        );
        let half = s.per_second / 2.0;
        let s50 = load_rt.block_on(drive(service.clone(), load, Some(half)));
        let t50 = load_rt.block_on(drive(trivial.clone(), load, Some(half)));
        println!(
            "{:<18} at 50% of service peak ({:.0}/s, achieved {:.0}/s): service p50 {} p99 {} | trivial p50 {} p99 {}",
            load.hook,
            half,
            s50.per_second,
            micros(&s50.latency, 0.5),
            micros(&s50.latency, 0.99),
            micros(&t50.latency, 0.5),
            micros(&t50.latency, 0.99)
        );
        let h = best((0..ROUNDS).map(|_| load_rt.block_on(drive(tls.clone(), load, None))).collect());
        println!(
            "{:<18} HTTPS (TLS 1.2, client cert, keep-alive): service {:>8.0}/s (p50 {}, p99 {})  ratio to plain {:.2}",
            load.hook,
            h.per_second,
            micros(&h.latency, 0.5),
            micros(&h.latency, 0.99),
            h.per_second / s.per_second
        );
    }
    service_stop.cancel();
    trivial_stop.cancel();
}
