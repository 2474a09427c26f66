//! Start and stop order of the whole service.

use std::future::IntoFuture as _;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::health::Readiness;
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::sessions::SessionRegistry;
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

/// Runs the service until `shutdown` is cancelled, then stops in dependency order: stop accepting webhooks and let
/// in-flight ones finish, then stop the parts behind them.
///
/// # Errors
/// Invalid configuration, or a listener that fails.
pub async fn run(config: Config, listeners: Listeners, shutdown: CancellationToken) -> anyhow::Result<()> {
    let policy = Arc::new(Policy::new(config.policy()?));
    let metrics = Arc::new(Metrics::new());
    let sessions = Arc::new(SessionRegistry::default());
    let readiness = Readiness::default();

    let hooks = HookState::new(policy, sessions.clone(), config.cache(), config.webhook_max_body_bytes, &metrics);
    let router = crate::http::router(hooks, readiness, metrics.clone());

    let upkeep = tokio::spawn({
        let metrics = metrics.clone();
        let shutdown = shutdown.clone();
        let sessions_gauge = metrics.gauge("iotagent_sessions", "MQTT sessions connected to this VerneMQ node", &[]);
        async move {
            let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tick.tick() => {
                        sessions_gauge.set(sessions.len() as f64);
                        metrics.upkeep();
                    }
                }
            }
        }
    });

    let address = listeners.http.local_addr()?;
    tracing::info!(%address, "serving webhooks");
    let server = axum::serve(listeners.http, router).with_graceful_shutdown(shutdown.clone().cancelled_owned());
    tokio::select! {
        result = server.into_future() => result.context("webhook server failed")?,
        () = async {
            shutdown.cancelled().await;
            tokio::time::sleep(config.shutdown_timeout()).await;
        } => tracing::warn!("in-flight webhooks did not finish within SHUTDOWN_TIMEOUT; stopping anyway"),
    }
    upkeep.abort();
    tracing::info!("stopped");
    Ok(())
}
