//! The HTTP surface: webhook routes, health and metrics on one listener.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tower_http::timeout::TimeoutLayer;

use crate::metrics::Metrics;
use crate::readiness::Readiness;
use crate::webhooks::{self, HookState};

/// Longer than VerneMQ's 5 s response timeout: past that our answer is useless anyway.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(6);

#[derive(Clone)]
struct OpsState {
    readiness: Readiness,
    metrics: Arc<Metrics>,
}

pub(crate) fn router(hooks: HookState, readiness: Readiness, metrics: Arc<Metrics>) -> Router {
    let ops = Router::new()
        .route("/health/live", get(|| async { axum::Json(serde_json::json!({ "live": true })) }))
        .route("/health/ready", get(ready))
        .route("/metrics", get(render_metrics))
        .with_state(OpsState { readiness, metrics });
    webhooks::routes(hooks)
        .merge(ops)
        .layer(TimeoutLayer::with_status_code(StatusCode::SERVICE_UNAVAILABLE, REQUEST_TIMEOUT))
}

async fn ready(State(ops): State<OpsState>) -> Response {
    let report = ops.readiness.report();
    let status = if report.ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, axum::Json(report)).into_response()
}

async fn render_metrics(State(ops): State<OpsState>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], ops.metrics.render()).into_response()
}

/// The webhooks' own runtime: VerneMQ's calls are served apart from K2V and the V2K subscription, on few threads
/// (one by default, then a current-thread runtime). With one thread no call wakes a second one to share its work,
/// which cost about a third of the CPU per forwarded message (README, V2K bench). Its thread stops, and the runtime
/// with it, when this is dropped (it may be dropped inside the main runtime).
pub(crate) struct WebhookRuntime {
    handle: tokio::runtime::Handle,
    /// Dropping it ends the thread that drives the runtime.
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl WebhookRuntime {
    pub(crate) fn new(threads: usize) -> std::io::Result<Self> {
        let mut builder = if threads <= 1 {
            tokio::runtime::Builder::new_current_thread()
        } else {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(threads);
            builder
        };
        let runtime = builder.thread_name("webhooks").enable_all().build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new().name("webhooks".into()).spawn(move || {
            runtime.block_on(async {
                let _ = stopped.await;
            });
            // Whatever is still running (a connection past the shutdown budget) is dropped, not awaited.
            runtime.shutdown_background();
        })?;
        Ok(Self { handle, _stop: stop })
    }

    /// Moves a listener to this runtime, so that its connections are polled by the webhooks' threads.
    pub(crate) fn adopt(&self, listener: tokio::net::TcpListener) -> std::io::Result<tokio::net::TcpListener> {
        let listener = listener.into_std()?;
        self.within(|| tokio::net::TcpListener::from_std(listener))
    }

    /// Runs `make()` inside this runtime's context (what it spawns or registers belongs to the webhooks' threads).
    pub(crate) fn within<T>(&self, make: impl FnOnce() -> T) -> T {
        let _context = self.handle.enter();
        make()
    }

    pub(crate) fn spawn<F>(&self, future: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle.spawn(future)
    }
}
