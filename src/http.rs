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
