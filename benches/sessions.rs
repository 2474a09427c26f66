//! Live session control: registry bytes per session and removed-set bytes per removed device at 100 k and 1 M
//! (counting allocator and RSS delta), and the time from a CRL change listing 10 000 connected serials to the last
//! disconnect call received by a local recorder. `cargo bench --bench sessions -- removed` runs the removed set only.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use iotagent_mqtt::cert::ClientCertificate;
use iotagent_mqtt::metrics::Metrics;
use iotagent_mqtt::sessions::registry::{NewSession, Registry};
use iotagent_mqtt::sessions::removed::{Change, RemovedSet};
use iotagent_mqtt::sessions::{self, SessionRegistry, Settings, VernemqApi, crl};
use tokio_util::sync::CancellationToken;

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts the bytes requested.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as isize - layout.size() as isize, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn rss_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    statm.split_whitespace().nth(1).and_then(|p| p.parse::<usize>().ok()).unwrap_or(0) * 4096
}

/// A device session as the defaults make it: `scoped` client id `<username>|<client id>` with the client id equal to
/// the username, on the mutual-TLS listener (16-byte serial, like `openssl ca -rand_serial`).
fn fill(n: usize) -> Registry {
    let mut registry = Registry::default();
    for i in 0..n {
        let device = format!("admin:d{i:07x}");
        let client_id = format!("{device}|{device}");
        let serial = (i as u128).wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C834).to_be_bytes();
        registry
            .admit(NewSession {
                mountpoint: "",
                client_id: &client_id,
                device: &device,
                issuer: 1,
                serial: &serial,
                expires: 1800,
            })
            .expect("valid session");
    }
    registry
}

/// Removed devices as dojot names them: `<tenant>:<6 hex digits>` (12 bytes).
fn fill_removed(n: usize) -> RemovedSet {
    let mut set = RemovedSet::default();
    for i in 0..n {
        set.apply(&Change::Removed(format!("admin:{i:06x}")));
    }
    set
}

/// What `build` makes, and what it cost: bytes by the allocator's count and by the RSS growth.
fn measured<T>(build: impl FnOnce() -> T) -> (T, isize, usize) {
    let (heap0, rss0) = (LIVE.load(Ordering::Relaxed), rss_bytes());
    let built = build();
    (built, LIVE.load(Ordering::Relaxed) - heap0, rss_bytes().saturating_sub(rss0))
}

/// One memory line: `n` items of `unit` (device, session) in `what`, holding `entries`.
fn print_memory(what: &str, unit: &str, n: usize, heap: isize, rss: usize, entries: usize) {
    println!(
        "{what} {n:>9} {unit}s: {:>6.1} bytes/{unit} (allocator), {:>6.1} bytes/{unit} (RSS delta), {entries} entries",
        heap as f64 / n as f64,
        rss as f64 / n as f64,
    );
}

async fn crl_to_last_disconnect(connected: usize, revoked: usize) -> Duration {
    let received = Arc::new(AtomicUsize::new(0));
    let counter = received.clone();
    let app = axum::Router::new().fallback(move || {
        let counter = counter.clone();
        async move {
            counter.fetch_add(1, Ordering::Relaxed);
            "[{\"text\":\"Done\",\"type\":\"text\"}]"
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move { axum::serve(listener, app).await.expect("recorder") });

    let registry = Arc::new(SessionRegistry::new(&Metrics::new(), true));
    let settings = Settings {
        api: Some(VernemqApi::new(&format!("http://{address}"), None).expect("url")),
        crl_file: None,
        crl_schedule: "1h".parse().expect("schedule"),
        admin_token: None,
        disconnect_concurrency: 16,
        topic_suffix: "dojot.device-manager.device".into(),
        topic_pattern: r"^.+\.dojot\.device-manager\.device$".into(),
        id_charset: Default::default(),
        lifetimes: true,
    };
    let shutdown = CancellationToken::new();
    sessions::start(&registry, &settings, &shutdown);
    let serial = |i: usize| (i as u64 + 1).to_be_bytes().to_vec();
    for i in 0..connected {
        let device = format!("admin:d{i:07x}");
        let cert = ClientCertificate {
            common_name: Some(device.clone()),
            serial: String::new(),
            serial_bytes: serial(i),
            issuer_der: b"bench CA".to_vec(),
        };
        registry.admit(&device, "", &format!("{device}|{device}"), Some(&cert), Some(1800)).expect("admitted");
    }
    let crl = crl::Revocations { issuer_der: b"bench CA".to_vec(), serials: (0..revoked).map(serial).collect() };
    let started = Instant::now();
    registry.set_revocations(&[crl]);
    while received.load(Ordering::Relaxed) < revoked {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = started.elapsed();
    shutdown.cancel();
    elapsed
}

fn main() {
    for n in [100_000, 1_000_000] {
        let (set, heap, rss) = measured(|| fill_removed(n));
        print_memory("removed set", "device", n, heap, rss, set.len());
        drop(set);
    }
    if std::env::args().any(|a| a == "removed") {
        return;
    }
    for n in [100_000, 1_000_000] {
        let (registry, heap, rss) = measured(|| fill(n));
        print_memory("registry", "session", n, heap, rss, registry.len());
        drop(registry);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    for run in 1..=3 {
        let elapsed = runtime.block_on(crl_to_last_disconnect(100_000, 10_000));
        println!(
            "CRL listing 10 000 of 100 000 connected serials -> last disconnect call received: {elapsed:?} (run {run})"
        );
    }
}
