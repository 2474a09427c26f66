//! CPU per forwarded message in on_publish mode under the load VerneMQ puts on the service (issue 10): 100 keep-alive
//! connections (VerneMQ's webhook pool), one request at a time each, 100-byte payloads. Next to it, under the same
//! load, the two floors: a trivial responder (HTTP alone) and a plain producer process sending the same records.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::producer::FutureRecord;

use super::{
    DEVICES, Load, MANY_TENANTS, PHASE, Proc, free_port, padded_payload, plain_producer_compressed, service_command,
    start_service, start_service_binary, start_trivial, tenant, trivial_command, wait_port, webhook_load,
};

/// VerneMQ's webhook connection pool towards one endpoint.
const POOL: usize = 100;
pub const PAYLOAD_BYTES: usize = 100;

/// Paced at the rate the real node reached in on_publish mode (5 112 msg/s), and unpaced.
const RATES: [Option<f64>; 2] = [Some(PACED_RATE), None];

/// The real node's rate in on_publish mode (5 112 msg/s), rounded; the subscription bench's paced row uses it too.
pub const PACED_RATE: f64 = 5_000.0;

/// Rounds per rate (`V2K_BENCH_ROUNDS` overrides); each row reports its median, so that one disturbed phase on a shared
/// machine does not decide it.
const ROUNDS: usize = 3;

pub fn run(rt: &tokio::runtime::Runtime, kafka_env: &[(&'static str, String)], brokers: &str) {
    // Another build of the service (a path), measured in the same rounds: before/after comparisons on a noisy machine.
    let other_build = std::env::var("V2K_BENCH_OTHER_BUILD").ok();
    let rounds = std::env::var("V2K_BENCH_ROUNDS").ok().and_then(|n| n.parse().ok()).unwrap_or(ROUNDS);
    println!(
        "CPU per message, VerneMQ-shaped load: {POOL} keep-alive connections, one request at a time, \
         {PAYLOAD_BYTES}-byte payloads; median of {rounds} interleaved rounds"
    );
    for rate in RATES {
        let load = Load { connections: POOL, tenants: 1, payload_bytes: Some(PAYLOAD_BYTES), rate };
        let pace = rate.map_or("unpaced".to_string(), |r| format!("paced {r:.0}/s"));
        let (mut service, mut trivial, mut producer, mut other) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            let (process, addr) = start_service(kafka_env);
            std::thread::sleep(Duration::from_secs(2));
            service.push(measured(&process, || webhook_calls(rt, addr, load)));
            drop(process);
            if let Some(binary) = &other_build {
                let (process, addr) = start_service_binary(binary, kafka_env);
                std::thread::sleep(Duration::from_secs(2));
                other.push(measured(&process, || webhook_calls(rt, addr, load)));
            }
            let (process, addr) = start_trivial();
            trivial.push(measured(&process, || webhook_calls(rt, addr, load)));
            drop(process);
            producer.push(producer_floor(brokers, Floor { rate, senders: POOL, tenants: 1, compression: "none" }));
        }
        // Rounds are paired in time: each round's ratio compares two builds under the same moment's noise.
        let mut paired: Vec<f64> = service.iter().zip(&other).map(|(this, that)| this.1 / that.1).collect();
        let ((service_rate, service_cpu), (trivial_rate, trivial_cpu), (producer_rate, producer_cpu)) =
            (median(&mut service), median(&mut trivial), median(&mut producer));
        // `median` sorted the rounds by CPU per message.
        let (fastest, slowest) = (service[0].1, service[service.len() - 1].1);
        println!(
            "  {pace:<13} on_publish {service_rate:>6.0} msg/s {service_cpu:>5.1} µs/msg (rounds {fastest:.1}–{slowest:.1}) \
             | trivial responder {trivial_rate:>6.0}/s {trivial_cpu:>5.1} µs | plain producer process \
             {producer_rate:>6.0}/s {producer_cpu:>5.1} µs | service / (sum of floors) {:.2}",
            service_cpu / (trivial_cpu + producer_cpu)
        );
        if !other.is_empty() {
            let (other_rate, other_cpu) = median(&mut other);
            paired.sort_by(f64::total_cmp);
            println!(
                "  {pace:<13} V2K_BENCH_OTHER_BUILD {other_rate:>6.0} msg/s {other_cpu:>5.1} µs/msg | this build / other \
                 {:.2} (per round: median {:.2}, {:.2}–{:.2})",
                service_cpu / other_cpu,
                paired[paired.len() / 2],
                paired[0],
                paired[paired.len() - 1],
            );
        }
    }
}

fn webhook_calls(rt: &tokio::runtime::Runtime, addr: std::net::SocketAddr, load: Load) -> u64 {
    let calls = Arc::new(AtomicU64::new(0));
    rt.block_on(webhook_load(addr, "on_publish", calls.clone(), load));
    calls.load(Ordering::Relaxed)
}

/// The round with the median CPU per message: (messages/s, µs per message).
fn median(rounds: &mut [(f64, f64)]) -> (f64, f64) {
    rounds.sort_by(|a, b| a.1.total_cmp(&b.1));
    rounds[rounds.len() / 2]
}

/// Runs `work` (which returns how many messages it got through) and returns messages/s and the process's CPU µs per
/// message over that time.
fn measured(process: &Proc, work: impl FnOnce() -> u64) -> (f64, f64) {
    let started = Instant::now();
    let (count, cpu_per_message) = process.cpu_per_item(|| {
        let count = work();
        (count, count)
    });
    (count.max(1) as f64 / started.elapsed().as_secs_f64(), cpu_per_message)
}

/// User-space instructions per message, counted by callgrind (valgrind) for the load of the unpaced CPU row, this
/// build's service next to the trivial responder's (and `V2K_BENCH_OTHER_BUILD`'s). Unlike CPU time, a count does not
/// move with what else this machine is doing, so builds compare without noise; the kernel's work is not in it.
pub fn instructions(rt: &tokio::runtime::Runtime, kafka_env: &[(&'static str, String)]) {
    if Command::new("callgrind_control").arg("--version").output().is_err() {
        println!("instructions: valgrind's callgrind_control not found (Debian package valgrind), skipped");
        return;
    }
    let load = Load { connections: POOL, tenants: 1, payload_bytes: Some(PAYLOAD_BYTES), rate: None };
    let dumps = tempfile::tempdir().expect("dump dir");
    let count = |name: &str, process: Callgrind, addr| {
        // Instrumented only once warm: start-up is not the cost per message. (Each load opens its 100 connections,
        // so the count includes them, for every build alike.)
        webhook_calls(rt, addr, load);
        process.instrument();
        let calls = webhook_calls(rt, addr, load);
        let per_call = process.instructions() / calls.max(1);
        println!("  {name:<40} {calls:>6} calls {per_call:>7} instructions/call");
        per_call
    };
    println!("User-space instructions per call (callgrind), {POOL} keep-alive connections, unpaced:");
    let mut builds = vec![("on_publish, this build".to_string(), env!("CARGO_BIN_EXE_iotagent-mqtt").to_string())];
    if let Ok(other) = std::env::var("V2K_BENCH_OTHER_BUILD") {
        builds.push(("on_publish, V2K_BENCH_OTHER_BUILD".to_string(), other));
    }
    let services: Vec<u64> = builds
        .iter()
        .map(|(name, binary)| {
            let port = free_port();
            let process = Callgrind::start(dumps.path(), binary, |command| service_command(command, port, kafka_env));
            wait_port(port);
            count(name, process, std::net::SocketAddr::from(([127, 0, 0, 1], port)))
        })
        .collect();
    let port = free_port();
    let exe = std::env::current_exe().expect("exe");
    let trivial = Callgrind::start(dumps.path(), &exe.to_string_lossy(), |command| trivial_command(command, port));
    wait_port(port);
    let trivial = count("trivial responder", trivial, std::net::SocketAddr::from(([127, 0, 0, 1], port)));
    println!("  service / trivial responder {:.2}", services[0] as f64 / trivial as f64);
    if let [this, other] = services[..] {
        println!("  this build / other {:.3}", this as f64 / other as f64);
    }
}

/// A process under callgrind, not instrumented until `instrument` (so that it runs faster until then).
struct Callgrind {
    process: Proc,
    dumps: PathBuf,
}

impl Callgrind {
    fn start(dumps: &Path, program: &str, configure: impl FnOnce(Command) -> Command) -> Callgrind {
        let mut valgrind = Command::new("valgrind");
        valgrind.args(["--quiet", "--tool=callgrind", "--instr-atstart=no"]);
        valgrind.arg(format!("--callgrind-out-file={}/out.%p", dumps.display())).arg(program);
        let mut command = configure(valgrind);
        // The service's command has a cleared environment: valgrind still needs to find its tools, and to put its
        // control pipes where `callgrind_control` looks for them.
        for name in ["PATH", "TMPDIR"] {
            if let Ok(value) = std::env::var(name) {
                command.env(name, value);
            }
        }
        Callgrind { process: Proc(command.spawn().expect("valgrind")), dumps: dumps.to_path_buf() }
    }

    fn control(&self, args: &[&str]) {
        let status = Command::new("callgrind_control")
            .args(args)
            .arg(self.process.0.id().to_string())
            .stdout(Stdio::null())
            .status()
            .expect("callgrind_control");
        assert!(status.success(), "callgrind_control {args:?}");
    }

    fn instrument(&self) {
        self.control(&["--instr=on"]);
    }

    /// Instructions executed since `instrument`, from callgrind's first dump.
    fn instructions(&self) -> u64 {
        self.control(&["--dump"]);
        let dump = self.dumps.join(format!("out.{}.1", self.process.0.id()));
        let text = std::fs::read_to_string(&dump).expect("callgrind dump");
        let totals = text.lines().find_map(|line| line.strip_prefix("totals: ")).expect("totals line");
        totals.trim().parse().expect("instruction count")
    }
}

/// What a plain producer process sends: `senders` each waiting for its ack, over `tenants` topics.
#[derive(Clone, Copy)]
struct Floor {
    rate: Option<f64>,
    senders: usize,
    tenants: usize,
    compression: &'static str,
}

/// Why a strict-mode tenant per partition costs so much more CPU than one topic: the plain producer process alone,
/// the strict rows' shape (`DEVICES` senders each waiting for its ack), on 1 and on 100 one-partition topics, with the
/// compression the service used before (lz4) and without (its default now).
pub fn many_partitions(brokers: &str) {
    println!(
        "Plain producer process, {DEVICES} senders each waiting for its ack, CPU per record (median of {ROUNDS}):"
    );
    for tenants in [1, MANY_TENANTS] {
        for compression in ["lz4", "none"] {
            let floor = Floor { rate: None, senders: DEVICES, tenants, compression };
            let mut rounds: Vec<_> = (0..ROUNDS).map(|_| producer_floor(brokers, floor)).collect();
            let (rate, cpu) = median(&mut rounds);
            println!(
                "  {tenants:>3} topic(s), compression {compression:<4} {rate:>7.0} records/s {cpu:>6.1} µs/record"
            );
        }
    }
}

/// This bench binary re-executed as a plain producer under the same load shape, measured as a process like the
/// service; returns records/s and CPU µs per record.
fn producer_floor(brokers: &str, floor: Floor) -> (f64, f64) {
    let spec =
        format!("{brokers} {} {} {} {}", floor.rate.unwrap_or(0.0), floor.senders, floor.tenants, floor.compression);
    let mut child = Command::new(std::env::current_exe().expect("exe"))
        .env("V2K_BENCH_PRODUCER", spec)
        .stdout(Stdio::piped())
        .spawn()
        .expect("producer process");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let process = Proc(child);
    assert_eq!(lines.next().and_then(Result::ok).as_deref(), Some("start"));
    measured(&process, || {
        lines
            .next()
            .and_then(Result::ok)
            .and_then(|line| line.strip_prefix("stop ").and_then(|n| n.parse().ok()))
            .expect("stop line")
    })
}

/// The child's side of `producer_floor`: the senders, warmed up for 2 s, then measured for `PHASE` between a `start`
/// and a `stop <records>` line.
pub fn producer_main(spec: &str) {
    let fields: Vec<&str> = spec.split(' ').collect();
    let [brokers, rate, senders, tenants, compression] = fields[..] else { panic!("producer spec {spec:?}") };
    let rate: f64 = rate.parse().expect("rate");
    let senders: usize = senders.parse().expect("senders");
    let tenants: usize = tenants.parse().expect("tenants");
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("rt");
    rt.block_on(async move {
        let producer = plain_producer_compressed(brokers, compression);
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let period = (rate > 0.0).then(|| Duration::from_secs_f64(senders as f64 / rate));
        for device in 0..senders {
            let (producer, stop, count) = (producer.clone(), stop.clone(), count.clone());
            tokio::spawn(async move {
                let tenant = tenant(device, tenants);
                let key = format!("{tenant}:d{device}");
                let topic = format!("{tenant}.device-data");
                let started = tokio::time::Instant::now();
                let mut n = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    if let Some(period) = period {
                        tokio::time::sleep_until(started + period * n).await;
                    }
                    let value = format!(
                        r#"{{"metadata":{{"deviceid":"d{device}","tenant":"{tenant}","timestamp":1732540000000}},"attrs":{}}}"#,
                        padded_payload(u64::from(n), PAYLOAD_BYTES)
                    );
                    let record = FutureRecord::to(&topic).key(&key).payload(&value);
                    producer.send(record, Duration::from_secs(5)).await.ok();
                    count.fetch_add(1, Ordering::Relaxed);
                    n += 1;
                }
            });
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let before = count.load(Ordering::Relaxed);
        println!("start");
        tokio::time::sleep(PHASE).await;
        println!("stop {}", count.load(Ordering::Relaxed) - before);
        stop.store(true, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(200)).await;
    });
}
