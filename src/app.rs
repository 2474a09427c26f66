//! Start and stop order of the whole service.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, V2kParts};
use crate::kafka::producer::Producer;
use crate::kafka::relay::ReportRelay;
use crate::metrics::Metrics;
use crate::own_runtime::OwnRuntime;
use crate::policy::Policy;
use crate::readiness::{Readiness, ReadyFlag};
use crate::sessions::SessionRegistry;
use crate::shutdown::{Budget, Critical};
use crate::v2k::V2k;
use crate::webhooks::HookState;

/// Sockets bound by the caller, so tests can bind port 0 and read the address before the service starts.
#[derive(Debug)]
pub struct Listeners {
    pub http: TcpListener,
    /// The HTTPS webhook listener's (IOTAGENT_TLS_LISTEN), when its files are set.
    pub https: Option<TcpListener>,
    /// The PKI API's (PKI_LISTEN), when set.
    pub pki: Option<TcpListener>,
}

impl Listeners {
    /// Binds the addresses the configuration names.
    ///
    /// # Errors
    /// The address is in use or not ours.
    pub async fn bind(config: &Config) -> anyhow::Result<Self> {
        let http = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {} (IOTAGENT_LISTEN)", config.listen))?;
        let https =
            match config.webhooks.tls_cert_file {
                Some(_) => Some(TcpListener::bind(config.webhooks.tls_listen).await.with_context(|| {
                    format!("cannot listen on {} (IOTAGENT_TLS_LISTEN)", config.webhooks.tls_listen)
                })?),
                None => None,
            };
        let pki = match config.pki.pki_listen {
            Some(address) => Some(
                TcpListener::bind(address).await.with_context(|| format!("cannot listen on {address} (PKI_LISTEN)"))?,
            ),
            None => None,
        };
        Ok(Self { http, https, pki })
    }
}

/// How often histogram samples are folded into buckets and the session gauge is refreshed.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Part of the shutdown budget kept, after K2V stopped, for the webhooks to drain and the producer to flush.
const AFTER_K2V_RESERVE: Duration = Duration::from_secs(3);
/// Part of the shutdown budget kept for the producer's flush, whatever the webhooks and the subscription still wait
/// for: a connection stalled in a request head (anyone who reaches the port can hold one) or a drain must not take
/// the time records already taken need to reach Kafka.
const FLUSH_RESERVE: Duration = Duration::from_secs(2);

/// Runs the service until `shutdown` is cancelled, then stops in dependency order (ARCHITECTURE.md §7): stop K2V
/// (stop consuming, drain in-flight publishes, commit, disconnect) while the webhooks still serve — VerneMQ authorises
/// those publishes through `auth_on_publish` —, then stop accepting webhooks and let in-flight ones finish, let the
/// V2K subscription acknowledge what Kafka took, and flush the producer. The steps share one budget,
/// SHUTDOWN_TIMEOUT, whose deadline is set when shutdown starts.
///
/// # Errors
/// Invalid configuration, or a listener that fails.
pub async fn run(config: Config, mut listeners: Listeners, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut settings = config.settings()?;
    warn_about_open_doors(&settings, &listeners)?;
    // VerneMQ's calls are served apart from K2V, on few threads (one by default): a second worker woke to share each
    // call's work, which cost about a third of the CPU per forwarded message (README, V2K bench).
    let webhook_runtime =
        OwnRuntime::new("webhooks", settings.webhook_threads).context("cannot start the webhooks' runtime")?;
    let http = webhook_runtime.adopt(listeners.http).context("cannot serve IOTAGENT_LISTEN")?;
    let https = match (listeners.https, settings.tls) {
        (Some(listener), Some(tls)) => {
            let listener = webhook_runtime.adopt(listener).context("cannot serve IOTAGENT_TLS_LISTEN")?;
            Some(webhook_runtime.within(|| crate::http_tls::TlsListener::new(listener, tls))?)
        }
        _ => None,
    };
    let service_certificates = Arc::new(
        crate::service_certs::ServiceCertificates::load(settings.service_certificates)
            .context("cannot read the service's certificate (MQTT_CERT_FILE)")?,
    );
    let budget = Budget::new(settings.shutdown_timeout);
    let metrics = Arc::new(Metrics::new());
    // Live session control (README): entries expire with the lifetime handed out, when there is one.
    let session_settings = settings.sessions;
    let sessions = Arc::new(SessionRegistry::new(&metrics, session_settings.lifetimes));
    let critical = Critical::new(shutdown.clone());
    let mut session_tasks: Vec<_> = crate::sessions::start(&sessions, &session_settings, &shutdown)
        .into_iter()
        .map(|task| critical.watch_spawned("live session control", task))
        .collect();
    // Down once the stop starts (signal or failed part), while K2V and the webhooks drain.
    let mut readiness = Readiness::new(shutdown.clone());
    let policy = Arc::new(Policy::new(settings.policy));
    // Background tasks, all stopped by `shutdown` and awaited (within the budget) before the producer's flush. The
    // ones the service cannot run without are watched: one that fails stops the service with an error.
    let tasks = TaskTracker::new();
    // The PKI (API and certificate upkeep) runs where PKI_LISTEN is set, before the internal MQTT clients start:
    // they follow its renewals of the service's certificate (and poll the files for renewals made elsewhere).
    if let (Some(pki), Some(listener)) = (settings.pki.take(), listeners.pki.take()) {
        let store = Arc::new(crate::pki::Store::new(pki.store));
        let server = crate::pki::serve(listener, store.clone(), pki.api, shutdown.clone()).await?;
        tasks.spawn(critical.watch_handle("the PKI API", server));
        let renewed = crate::pki::start_upkeep(store, pki.upkeep, &tasks, &critical, shutdown.clone());
        let k2v = settings.k2v.as_mut().map(|k2v| &mut k2v.mqtt);
        let v2k = settings.v2k.as_mut().and_then(|v2k| v2k.subscription.as_mut()).map(|s| &mut s.mqtt);
        follow_renewals([k2v, v2k], &renewed);
    }

    // The subscription's runtime lives until the end: its task is awaited with the others before the producer's flush.
    let (v2k, _subscription_runtime) = match settings.v2k {
        Some(parts) => {
            let (v2k, subscription_runtime) = start_v2k(
                parts,
                &webhook_runtime,
                &policy,
                &metrics,
                &mut readiness,
                &tasks,
                &critical,
                &shutdown,
                &budget,
            )?;
            (Some(v2k), subscription_runtime)
        }
        None => (None, None),
    };
    let hooks =
        HookState::new(policy, sessions.clone(), settings.cache, settings.max_body_bytes, v2k.clone(), &metrics)
            .with_service_certificates(service_certificates.clone());
    if let Some(watcher) = service_certificates.watch(shutdown.clone()) {
        session_tasks.push(critical.watch_spawned("the service certificates' watch", watcher));
    }
    let k2v_probes = settings.k2v.as_ref().map(|_| (readiness.flag("k2v_kafka"), readiness.flag("k2v_mqtt")));
    // Not ready until the removed devices Kafka held at start are read (README "Live session control").
    let removed_probe = settings.removed_reader.as_ref().map(|_| readiness.flag("removed_devices"));
    let mut router = crate::http::router(hooks, readiness, metrics.clone());
    if let Some(token) = session_settings.admin_token.clone() {
        router =
            router.merge(crate::sessions::admin::routes(sessions.clone(), token, session_settings.id_charset.clone()));
    }
    if let (Some(reader), Some(probe)) = (settings.removed_reader, removed_probe) {
        let reader = crate::sessions::start_removed_reader(&sessions, &session_settings, reader, probe, &shutdown)
            .context("cannot start the removed-device reader (KAFKA_BROKERS)")?;
        session_tasks.push(critical.watch_spawned("the removed-device reader", reader));
    }

    match (session_settings.api.clone(), settings.cache.clear_every) {
        (Some(api), Some(every)) => {
            let (metrics, shutdown) = (metrics.clone(), shutdown.clone());
            tasks.spawn(critical.watch("the webhook cache clearing", async move {
                crate::webhooks::cache_clear::run(api, every, &metrics, shutdown).await;
            }));
        }
        (None, Some(_)) => tracing::info!(
            "VerneMQ's webhook cache is not cleared by this service (VERNEMQ_API_URL is unset); it keeps a row per \
             client id until that client id comes back: clear it with `vmq-admin webhooks cache clear` (README \
             \"Caching\")"
        ),
        _ => {}
    }
    tasks.spawn(critical.watch("the metrics upkeep", {
        let metrics = metrics.clone();
        let shutdown = shutdown.clone();
        let sessions_gauge = metrics.gauge("iotagent_sessions", "MQTT sessions connected to this VerneMQ node", &[]);
        let v2k_gauges = v2k.clone();
        async move {
            let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tick.tick() => {
                        sessions_gauge.set(sessions.len() as f64);
                        if let Some(v2k) = &v2k_gauges {
                            v2k.observe();
                        }
                        metrics.upkeep();
                    }
                }
            }
        }
    }));

    let address = http.local_addr()?;
    tracing::info!(%address, "serving webhooks");
    // Both webhook listeners stop together, after K2V (see below).
    let webhooks_stop = CancellationToken::new();
    let idle_timeout = settings.webhook_idle_timeout;
    let https = https.map(|listener| {
        if let Ok(address) = listener.local_addr() {
            tracing::info!(%address, "serving webhooks over HTTPS, client certificates required");
        }
        listener.serve(router.clone(), idle_timeout, webhooks_stop.clone())
    });
    // K2V starts once the webhook listener is up: the broker authorises the service's connection through it.
    let k2v = match (settings.k2v, k2v_probes) {
        (Some(settings), Some((kafka, mqtt))) => {
            let k2v_budget = budget.holding_back(AFTER_K2V_RESERVE);
            Some(
                crate::k2v::K2v::start(settings, &metrics, kafka, mqtt, k2v_budget, &critical)
                    .context("cannot start K2V")?,
            )
        }
        _ => None,
    };
    let plain = crate::http::serve(http, router, idle_timeout, webhooks_stop.clone());
    let mut server = webhook_runtime.spawn(async move {
        match https {
            Some(https) => _ = tokio::join!(plain, https),
            None => plain.await,
        }
    });
    tokio::select! {
        result = &mut server => {
            // The listeners only stop once `webhooks_stop` is cancelled, below: this is a panic.
            return Err(match result {
                Ok(()) => anyhow::anyhow!("webhook server stopped"),
                Err(e) => anyhow::anyhow!("webhook server task failed: {e}"),
            });
        }
        () = shutdown.cancelled() => {}
    }
    // The one deadline of the whole shutdown is set here.
    budget.deadline();
    // K2V first: its in-flight publishes still need VerneMQ's auth_on_publish, served by the webhooks below. Its part
    // of the budget ends AFTER_K2V_RESERVE early.
    if let Some(k2v) = k2v {
        k2v.shutdown().await;
    }
    webhooks_stop.cancel();
    // A call cut here was not answered: VerneMQ calls it a failure, and nothing it carried was acknowledged.
    if tokio::time::timeout_at(budget.before(FLUSH_RESERVE), &mut server).await.is_err() {
        tracing::warn!("in-flight webhooks did not finish within SHUTDOWN_TIMEOUT; stopping anyway");
        server.abort();
    }
    // Webhooks are drained; the subscription drains its in-flight messages itself (same token, same budget).
    tasks.close();
    if tokio::time::timeout_at(budget.before(FLUSH_RESERVE), tasks.wait()).await.is_err() {
        tracing::warn!("background tasks did not stop within SHUTDOWN_TIMEOUT; stopping anyway");
    }
    if let Some(v2k) = &v2k {
        let left = budget.remaining();
        tracing::info!(budget_ms = left.as_millis() as u64, "flushing the Kafka producer");
        match v2k.producer().flush(left).await {
            Ok(()) => tracing::info!("Kafka producer flushed"),
            Err(left) => tracing::error!(left, "Kafka producer not flushed within SHUTDOWN_TIMEOUT; records lost"),
        }
    }
    for task in session_tasks {
        task.abort();
    }
    tracing::info!(took = ?budget.total().saturating_sub(budget.remaining()), "stopped");
    match critical.failure() {
        Some(reason) => Err(anyhow::anyhow!("stopped because {reason}; restart the service")),
        None => Ok(()),
    }
}

/// One warning line per door left open: devices that may connect without a certificate, webhooks that anyone who
/// reaches the plain port can call.
fn warn_about_open_doors(settings: &crate::config::Settings, listeners: &Listeners) -> anyhow::Result<()> {
    if !settings.policy.require_client_cert {
        tracing::warn!(
            "REQUIRE_CLIENT_CERT is off: a device may connect without a certificate, so anyone who reaches VerneMQ's \
             plain listener can claim any device; for testing only"
        );
    }
    // VerneMQ's default vmq_webhooks.pool_timeout: below it the service may close a pooled connection as VerneMQ
    // sends a call on it, which VerneMQ answers as a denial.
    if settings.webhook_idle_timeout <= Duration::from_secs(60) {
        tracing::warn!(
            idle_timeout_s = settings.webhook_idle_timeout.as_secs(),
            "WEBHOOK_IDLE_TIMEOUT is not above VerneMQ's default vmq_webhooks.pool_timeout (60 s): a call VerneMQ sends \
             as the service closes an idle connection fails, and VerneMQ counts it as a denial; keep it above \
             pool_timeout"
        );
    }
    let plain = listeners.http.local_addr()?;
    if !plain.ip().is_loopback() {
        tracing::warn!(
            %plain,
            "webhooks are served over plain HTTP on a non-loopback address: anyone who reaches it acts as VerneMQ; \
             serve VerneMQ over HTTPS (IOTAGENT_TLS_*) and keep IOTAGENT_LISTEN on loopback"
        );
    }
    Ok(())
}

/// Hands the PKI upkeep's "service certificate renewed" notification to every internal MQTT client on mutual TLS.
fn follow_renewals(clients: [Option<&mut crate::mqtt::MqttSettings>; 2], renewed: &tokio::sync::watch::Receiver<u64>) {
    for tls in clients.into_iter().flatten().filter_map(|mqtt| mqtt.tls.as_mut()) {
        tls.renewed = Some(renewed.clone());
    }
}

#[expect(clippy::too_many_arguments, reason = "the start order's shared parts, each used once")]
fn start_v2k(
    parts: V2kParts,
    webhook_runtime: &OwnRuntime,
    policy: &Arc<Policy>,
    metrics: &Metrics,
    readiness: &mut Readiness,
    tasks: &TaskTracker,
    critical: &Critical,
    shutdown: &CancellationToken,
    budget: &Budget,
) -> anyhow::Result<(Arc<V2k>, Option<OwnRuntime>)> {
    let producer = Producer::new(&parts.producer).context("cannot create the Kafka producer (KAFKA_BROKERS)")?;
    // The subscription gets a thread of its own, for the webhooks' reason: on the main runtime, whose workers (one per
    // core) woke each other to share its work, it cost more CPU per message (README, V2K bench).
    let subscription_runtime = match parts.subscription {
        Some(_) => Some(OwnRuntime::new("v2k-subscriber", 1).context("cannot start the V2K subscription's runtime")?),
        None => None,
    };
    // Reports are relayed where the publishes wait for them: in the webhooks, or in the subscription's tasks.
    let relay = subscription_runtime.as_ref().unwrap_or(webhook_runtime).within(ReportRelay::start);
    let v2k = Arc::new(V2k::new(producer, relay, parts.settings, metrics));
    tasks.spawn(critical.watch("the Kafka watch", watch_kafka(v2k.clone(), readiness.flag("kafka"), shutdown.clone())));
    if let Some(period) = v2k.tenant_refresh() {
        tasks.spawn(critical.watch("the tenant refresh", refresh_tenants(v2k.clone(), period, shutdown.clone())));
    }
    if let (Some(runtime), Some(subscription)) = (&subscription_runtime, parts.subscription) {
        match parts.plain {
            // One instance of the cluster holds the plain subscription; the others stand by (ready).
            Some(plain) => {
                let ready = crate::v2k::plain::ReadyFlags {
                    mqtt: readiness.flag("v2k_mqtt"),
                    lease: readiness.flag("v2k_lease"),
                };
                let run = crate::v2k::plain::run(
                    subscription,
                    plain,
                    v2k.clone(),
                    policy.clone(),
                    ready,
                    shutdown.clone(),
                    budget.total(),
                );
                tasks.spawn_on(critical.watch("the V2K subscription", run), runtime.handle());
            }
            // The subscription counts its drain from the cancellation, as the budget's deadline does.
            None => {
                let run = crate::v2k::subscription::run(
                    subscription,
                    v2k.clone(),
                    policy.clone(),
                    readiness.flag("v2k_mqtt"),
                    shutdown.clone(),
                    budget.total(),
                );
                tasks.spawn_on(critical.watch("the V2K subscription", run), runtime.handle());
            }
        }
    }
    Ok((v2k, subscription_runtime))
}

/// Keeps the set of tenants with a data topic current (V2K_REQUIRE_TENANT_TOPIC).
async fn refresh_tenants(v2k: Arc<V2k>, period: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => v2k.refresh_tenants().await,
        }
    }
}

/// Keeps the Kafka readiness probe current.
async fn watch_kafka(v2k: Arc<V2k>, probe: ReadyFlag, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            // Ready once Kafka answers and, with the tenant check on, the tenants are known.
            _ = tick.tick() => probe.set(v2k.producer().check_health().await && v2k.tenants_loaded()),
        }
    }
}
