//! The HTTP surface: webhook routes, health and metrics on one listener, and how both webhook listeners (plain and
//! HTTPS) serve their connections.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_http::timeout::TimeoutLayer;

use crate::metrics::Metrics;
use crate::readiness::Readiness;
use crate::webhooks::{self, HookState};

/// Longer than VerneMQ's 5 s response timeout: past that our answer is useless anyway.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(6);
/// Pause after a failed accept (out of descriptors and the like), rather than spinning on it.
const ACCEPT_PAUSE: Duration = Duration::from_millis(50);

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

/// Serves the plain webhook listener until `shutdown`, then lets open requests finish (connections close after their
/// reply).
pub(crate) async fn serve(listener: TcpListener, router: Router, idle: Duration, shutdown: CancellationToken) {
    let connections = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = accept(&listener, "HTTP") => accepted,
        };
        if let Some((tcp, _)) = accepted {
            connections.spawn(serve_connection(tcp, router.clone(), idle, shutdown.clone()));
        }
    }
    // Refused from now on rather than left waiting in the backlog.
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// The next connection of `listener` (`None` after a failed accept, logged and paused on).
pub(crate) async fn accept(listener: &TcpListener, which: &'static str) -> Option<(TcpStream, SocketAddr)> {
    match listener.accept().await {
        Ok((tcp, peer)) => {
            // One request, one reply, on and on: a reply held back for Nagle's algorithm would only add latency.
            tcp.set_nodelay(true).ok();
            Some((tcp, peer))
        }
        Err(error) => {
            tracing::warn!(%error, listener = which, "accept failed");
            tokio::time::sleep(ACCEPT_PAUSE).await;
            None
        }
    }
}

/// Serves one accepted connection, plain or TLS, until the client closes it, or leaves it idle or in a request head
/// for `idle` (WEBHOOK_IDLE_TIMEOUT: clients that stall cannot hold descriptors until none are left for VerneMQ);
/// once `shutdown` is cancelled, the request in flight is answered and the connection closed.
pub(crate) async fn serve_connection<S>(stream: S, router: Router, idle: Duration, shutdown: CancellationToken)
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    // axum::serve builds its connections without a timer, which leaves hyper's header read timeout off.
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        // Hyper runs this clock from the end of each reply too: it is the idle timeout as well.
        .header_read_timeout(idle)
        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(router));
    tokio::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => {}
        () = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        }
    }
}
