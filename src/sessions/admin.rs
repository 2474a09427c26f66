//! Operator routes, behind a bearer token (`ADMIN_TOKEN`; without it they are not mounted):
//! `GET /admin/sessions?device=…` and `POST /admin/sessions/<tenant:device>/disconnect`.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use super::SessionRegistry;
use crate::policy::{IdCharset, parse_device};
use crate::secret::Secret;

#[derive(Clone)]
struct AdminState {
    sessions: Arc<SessionRegistry>,
    id_charset: IdCharset,
}

#[derive(serde::Deserialize)]
struct DeviceQuery {
    device: String,
}

/// The admin routes, each behind the token.
pub fn routes(sessions: Arc<SessionRegistry>, token: Secret, id_charset: IdCharset) -> Router {
    let token = Arc::new(token);
    Router::new()
        .route("/admin/sessions", get(list))
        .route("/admin/sessions/{device}/disconnect", post(disconnect))
        .with_state(AdminState { sessions, id_charset })
        // `route_layer`: only these routes need the token; unmatched paths stay 404, not 401.
        .route_layer(middleware::from_fn(move |request: Request, next: Next| {
            let token = token.clone();
            async move { authorize(&token, request, next).await }
        }))
}

async fn authorize(token: &Secret, request: Request, next: Next) -> Response {
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // `matches` compares hashes in constant time; a missing header is compared too, so timing tells nothing.
    if token.matches(given.unwrap_or("")) && given.is_some() {
        next.run(request).await
    } else {
        (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, "Bearer")], "").into_response()
    }
}

fn bad_device(device: &str) -> Response {
    let body = serde_json::json!({"error": "bad_request", "message": format!("{device:?} is not a tenant:device id")});
    (StatusCode::BAD_REQUEST, axum::Json(body)).into_response()
}

async fn list(State(state): State<AdminState>, Query(query): Query<DeviceQuery>) -> Response {
    if parse_device(&query.device, &state.id_charset).is_err() {
        return bad_device(&query.device);
    }
    let sessions = state.sessions.of_device(&query.device);
    axum::Json(serde_json::json!({ "device": query.device, "sessions": sessions })).into_response()
}

async fn disconnect(State(state): State<AdminState>, Path(device): Path<String>) -> Response {
    if parse_device(&device, &state.id_charset).is_err() {
        return bad_device(&device);
    }
    let queued = state.sessions.disconnect_device(&device);
    tracing::info!(device, queued, "operator disconnect");
    (StatusCode::ACCEPTED, axum::Json(serde_json::json!({ "device": device, "queued": queued }))).into_response()
}
