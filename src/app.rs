//! Start and stop order of the whole service.

use std::future::IntoFuture as _;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError, V2kMode};
use crate::health::{Probe, Readiness};
use crate::kafka::producer::{Producer, ProducerSettings};
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::sessions::SessionRegistry;
use crate::v2k::{Contract, V2k, V2kSettings};
use crate::webhooks::HookState;

/// Sockets bound by the caller, so tests can bind port 0 and read the address before the service starts.
#[derive(Debug)]
pub struct Listeners {
    pub http: TcpListener,
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
        Ok(Self { http })
    }
}

/// How often histogram samples are folded into buckets and the session gauge is refreshed.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Runs the service until `shutdown` is cancelled, then stops in dependency order (ARCHITECTURE.md §7): stop accepting
/// webhooks and let in-flight ones finish, let the V2K subscription acknowledge what Kafka took, flush the producer,
/// then stop K2V (stop consuming, drain publishes, commit, disconnect).
///
/// # Errors
/// Invalid configuration, or a listener that fails.
pub async fn run(config: Config, listeners: Listeners, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut policy_config = config.policy()?;
    let mqtt = config.mqtt_settings()?;
    let metrics = Arc::new(Metrics::new());
    // Live session control (README): entries expire with the lifetime handed out, when there is one.
    let session_settings = config.sessions.settings(&config, !policy_config.lifetime.base.is_zero())?;
    let sessions = Arc::new(SessionRegistry::new(&metrics, session_settings.lifetimes));
    let mut session_tasks = crate::sessions::start(&sessions, &session_settings, &shutdown);
    let mut readiness = Readiness::default();

    let v2k = match &config.kafka_brokers {
        Some(brokers) => Some(Arc::new(start_v2k(&config, brokers, &metrics)?)),
        None => None,
    };
    let mut background = Vec::new();
    if let Some(v2k) = &v2k {
        background.push(tokio::spawn(watch_kafka(v2k.clone(), readiness.probe("kafka"), shutdown.clone())));
        if v2k.mode() == V2kMode::Subscription {
            let settings = mqtt.clone().ok_or_else(|| ConfigError {
                variable: "MQTT_URL",
                problem: "V2K_MODE=subscription needs the internal MQTT client".into(),
            })?;
            let filter = format!("$share/{}/+/{}", config.v2k.v2k_share_group, config.attrs_suffix);
            policy_config.service_subscription = Some(filter.clone());
            policy_config.service_max_inflight = Some(config.v2k.v2k_max_in_flight);
            let subscription = crate::v2k::subscription::run(
                settings,
                filter,
                v2k.clone(),
                Arc::new(Policy::new(policy_config.clone())),
                readiness.probe("v2k_mqtt"),
                shutdown.clone(),
                config.shutdown_timeout(),
            );
            background.push(tokio::spawn(subscription));
        }
    }
    let policy = Arc::new(Policy::new(policy_config));

    let mut cache = config.cache();
    if v2k.as_ref().is_some_and(|v| v.mode() == V2kMode::AuthOnPublish || config.v2k.v2k_gate) {
        // Strict mode and the gate decide per message: a cached allow would skip them.
        cache.publish = None;
    }
    let hooks = HookState::new(policy, sessions.clone(), cache, config.webhook_max_body_bytes, v2k.clone(), &metrics);
    let k2v_settings = crate::k2v::settings(&config)?;
    let k2v_probes = k2v_settings.as_ref().map(|_| (readiness.probe("k2v_kafka"), readiness.probe("k2v_mqtt")));
    let mut router = crate::http::router(hooks, readiness, metrics.clone());
    if let Some(token) = session_settings.admin_token.clone() {
        router =
            router.merge(crate::sessions::admin::routes(sessions.clone(), token, session_settings.id_charset.clone()));
    }
    if let Some(brokers) = &config.kafka_brokers {
        let client_id = config.mqtt.mqtt_client_id.clone().unwrap_or_else(|| "iotagent-mqtt".into());
        session_tasks.push(
            crate::sessions::start_removed_reader(&sessions, &session_settings, brokers, &client_id, &shutdown)
                .context("cannot start the removed-device reader (KAFKA_BROKERS)")?,
        );
    }

    let upkeep = tokio::spawn({
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
    });

    let address = listeners.http.local_addr()?;
    tracing::info!(%address, "serving webhooks");
    // K2V starts once the webhook listener is up: the broker authorises the service's connection through it.
    let k2v = match (k2v_settings, k2v_probes) {
        (Some(settings), Some((kafka, mqtt))) => Some(
            crate::k2v::K2v::start(settings, &metrics, kafka, mqtt, config.shutdown_timeout())
                .context("cannot start K2V")?,
        ),
        _ => None,
    };
    let server = axum::serve(listeners.http, router).with_graceful_shutdown(shutdown.clone().cancelled_owned());
    tokio::select! {
        result = server.into_future() => result.context("webhook server failed")?,
        () = async {
            shutdown.cancelled().await;
            tokio::time::sleep(config.shutdown_timeout()).await;
        } => tracing::warn!("in-flight webhooks did not finish within SHUTDOWN_TIMEOUT; stopping anyway"),
    }
    // Webhooks are drained; the subscription drains its in-flight messages itself (same token, same deadline).
    for task in background {
        let _ = tokio::time::timeout(config.shutdown_timeout(), task).await;
    }
    if let Some(v2k) = &v2k {
        match v2k.producer().flush(config.shutdown_timeout()).await {
            Ok(()) => tracing::info!("Kafka producer flushed"),
            Err(left) => tracing::error!(left, "Kafka producer not flushed within SHUTDOWN_TIMEOUT; records lost"),
        }
    }
    // K2V: stop consuming, drain in-flight publishes, commit what was acknowledged, disconnect.
    if let Some(k2v) = k2v {
        k2v.shutdown().await;
    }
    upkeep.abort();
    for task in session_tasks {
        task.abort();
    }
    tracing::info!("stopped");
    Ok(())
}

fn start_v2k(config: &Config, brokers: &str, metrics: &Metrics) -> anyhow::Result<V2k> {
    let v = &config.v2k;
    if v.v2k_topic_suffix.is_empty()
        || v.v2k_topic_suffix.contains(|c: char| !(c.is_ascii_alphanumeric() || "._-".contains(c)))
    {
        return Err(ConfigError {
            variable: "V2K_MESSENGER_PRODUCE_TOPIC_SUFFIX",
            problem: "must be a non-empty Kafka topic part ([A-Za-z0-9._-])".into(),
        }
        .into());
    }
    let producer = Producer::new(&ProducerSettings {
        brokers: brokers.to_string(),
        compression: v.kafka_compression.clone(),
        linger_ms: v.kafka_linger_ms,
        delivery_timeout_ms: v.v2k_delivery_timeout_ms,
        client_id: config.mqtt.mqtt_client_id.clone().unwrap_or_else(|| "iotagent-mqtt".into()),
    })
    .context("cannot create the Kafka producer (KAFKA_BROKERS)")?;
    let settings = V2kSettings {
        mode: v.v2k_mode,
        contract: Contract { topic_suffix: v.v2k_topic_suffix.clone(), max_payload_bytes: v.v2k_max_payload_bytes },
        ack_timeout: Duration::from_millis(v.v2k_ack_timeout_ms),
        gate_max_queue: v.v2k_gate.then_some(v.v2k_gate_max_queue),
    };
    Ok(V2k::new(producer, settings, metrics))
}

/// Keeps the Kafka readiness probe current.
async fn watch_kafka(v2k: Arc<V2k>, probe: Probe, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => probe.set(v2k.producer().check_health().await),
        }
    }
}
