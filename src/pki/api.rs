//! The seed's PKI HTTP API (dojot's `/auth`, `/user`, `/sign/<cn>/pkcs10`, `/ca/<name>`), on its own listener.
//! Every route but `/auth` needs a bearer token from `/auth`.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tower_http::timeout::TimeoutLayer;

use super::users::{Tokens, Users};
use super::{PkiError, Store};
use crate::log_guard::clip;

/// Largest request body: a CSR is a few KiB; anything near this is not one.
const MAX_BODY_BYTES: usize = 64 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection idle, or stalled in a request head, this long is closed (an operator's or script's calls, not a pool's).
const API_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
const JWT_SECRET_FILE: &str = "jwt.secret";
/// Password checks at once. An argon2 check takes about 19 MiB and tens of milliseconds of CPU: run off the async
/// threads (which K2V and session control share) and bounded, so that a flood of `/auth` requests costs neither the
/// service's other work nor its memory, only the waiting requests' own time (they time out).
const PASSWORD_CHECKS_AT_ONCE: usize = 2;

/// What the API needs besides the store.
#[derive(Debug, Clone)]
pub struct ApiSettings {
    pub users: Users,
    /// Lifetime of the tokens `/auth` issues.
    pub token_ttl: Duration,
}

#[derive(Clone)]
struct Api {
    store: Arc<Store>,
    users: Arc<Users>,
    password_checks: Arc<Semaphore>,
    tokens: Tokens,
}

/// A JSON error answer `{"error": "…"}`.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, axum::Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<PkiError> for ApiError {
    fn from(e: PkiError) -> Self {
        match e {
            PkiError::Request(problem) => Self(StatusCode::BAD_REQUEST, problem),
            PkiError::NotFound(what) => Self(StatusCode::NOT_FOUND, format!("{what} not found")),
            other => {
                tracing::error!(error = %other, "PKI operation failed");
                internal_error()
            }
        }
    }
}

fn internal_error() -> ApiError {
    ApiError(StatusCode::INTERNAL_SERVER_ERROR, "internal error".into())
}

fn bad_request(problem: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, problem.into())
}

/// Initialises the store when it is empty (as `pki init`), then serves the API on `listener` until `shutdown`.
///
/// # Errors
/// The store cannot be initialised or its JWT secret cannot be read.
pub async fn serve(
    listener: TcpListener,
    store: Arc<Store>,
    settings: ApiSettings,
    shutdown: CancellationToken,
) -> Result<JoinHandle<()>, PkiError> {
    let secret = blocking({
        let store = store.clone();
        move || {
            if !store.is_initialised() {
                tracing::info!(dir = %store.settings().dir.display(), "PKI_DIR is empty: initialising it");
                store.init()?;
            }
            store.secret(JWT_SECRET_FILE, 32)
        }
    })
    .await?;
    if settings.users.is_empty() {
        tracing::warn!("PKI_USERS is empty: nobody can obtain a token");
    }
    let tokens = Tokens::new(&secret, settings.token_ttl).map_err(|e| PkiError::Token(e.to_string()))?;
    let password_checks = Arc::new(Semaphore::new(PASSWORD_CHECKS_AT_ONCE));
    let api = Api { store, users: Arc::new(settings.users), password_checks, tokens };
    let app = router(api);
    let address = listener.local_addr().ok();
    tracing::info!(?address, "PKI API listening");
    // Served like the webhooks, so that a client stalling in a request head does not keep its connection.
    Ok(tokio::spawn(crate::http::serve(listener, app, API_IDLE_TIMEOUT, shutdown)))
}

fn router(api: Api) -> Router {
    let protected = Router::new()
        .route("/user", post(register))
        .route("/sign/{cn}/pkcs10", post(sign))
        .route("/revoke/{cn}", post(revoke))
        .route("/ca/{name}", get(ca))
        .route("/ca/{name}/crl", get(crl))
        .route_layer(middleware::from_fn_with_state(api.clone(), require_token));
    Router::new()
        .route("/auth", post(auth))
        .merge(protected)
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such route".into()) })
        .layer(TimeoutLayer::with_status_code(StatusCode::SERVICE_UNAVAILABLE, REQUEST_TIMEOUT))
        .with_state(api)
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, PkiError> + Send + 'static) -> Result<T, PkiError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(PkiError::Io { context: "PKI task".into(), source: std::io::Error::other(e.to_string()) })
    })
}

/// Reads at most MAX_BODY_BYTES and parses it as `T`; every failure is a JSON 4xx.
async fn json_body<T: DeserializeOwned>(body: Body) -> Result<T, ApiError> {
    let bytes = axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|_| ApiError(StatusCode::PAYLOAD_TOO_LARGE, format!("the body exceeds {MAX_BODY_BYTES} bytes")))?;
    let value: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| bad_request(format!("invalid JSON body: {e}")))?;
    // serde would also fill a struct from an array; the seed's bodies are objects.
    if !value.is_object() {
        return Err(bad_request("the body must be a JSON object"));
    }
    serde_json::from_value(value).map_err(|e| bad_request(format!("invalid JSON body: {e}")))
}

fn path<T>(extracted: Result<Path<T>, PathRejection>) -> Result<T, ApiError> {
    extracted.map(|Path(value)| value).map_err(|e| bad_request(e.body_text()))
}

async fn require_token(State(api): State<Api>, request: Request, next: Next) -> Response {
    let token = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim);
    match token.and_then(|t| api.tokens.verify(t)) {
        Some(_user) => next.run(request).await,
        None => ApiError(StatusCode::UNAUTHORIZED, "a valid bearer token from POST /auth is required".into())
            .into_response(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthRequest {
    username: String,
    passwd: String,
}

async fn auth(State(api): State<Api>, body: Body) -> Result<Response, ApiError> {
    let AuthRequest { username, passwd } = json_body(body).await?;
    let right = {
        // Never closed: the semaphore lives as long as the API.
        let _turn = api.password_checks.acquire().await.map_err(|_| internal_error())?;
        let (users, name) = (api.users.clone(), username.clone());
        tokio::task::spawn_blocking(move || users.check(&name, &passwd)).await.map_err(|_| internal_error())?
    };
    if !right {
        tracing::info!(user = %clip(&username), "PKI API: wrong credentials");
        return Err(ApiError(StatusCode::UNAUTHORIZED, "wrong username or password".into()));
    }
    let jwt = api.tokens.issue(&username).map_err(|e| {
        tracing::error!(error = %e, "cannot issue a token");
        internal_error()
    })?;
    Ok(axum::Json(json!({ "jwt": jwt })).into_response())
}

#[derive(Deserialize)]
struct UserRequest {
    username: String,
}

async fn register(State(api): State<Api>, body: Body) -> Result<Response, ApiError> {
    let request: UserRequest = json_body(body).await?;
    let store = api.store.clone();
    let name = request.username.clone();
    let created = blocking(move || store.register(&name)).await?;
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, axum::Json(json!({ "username": request.username }))).into_response())
}

#[derive(Deserialize)]
struct SignRequest {
    certificate: String,
    /// dojot's (EJBCA's) end-entity password: accepted for compatibility, not used.
    #[serde(default, rename = "passwd")]
    _passwd: Option<serde_json::Value>,
}

async fn sign(
    State(api): State<Api>,
    cn: Result<Path<String>, PathRejection>,
    body: Body,
) -> Result<Response, ApiError> {
    let cn = path(cn)?;
    let request: SignRequest = json_body(body).await?;
    let text = request.certificate.trim();
    // The seed sends the base64 body without armour; a full PEM is accepted too.
    let csr = if text.starts_with("-----BEGIN") {
        text.as_bytes().to_vec()
    } else {
        let compact: String = text.chars().filter(|c| !c.is_ascii_whitespace()).collect();
        STANDARD.decode(compact).map_err(|_| bad_request("certificate is not base64"))?
    };
    let store = api.store.clone();
    let cert = blocking(move || store.sign(&csr, Some(&cn))).await?;
    let der = cert.to_der().map_err(PkiError::from)?;
    Ok(axum::Json(json!({ "status": { "data": STANDARD.encode(der) } })).into_response())
}

async fn revoke(State(api): State<Api>, cn: Result<Path<String>, PathRejection>) -> Result<Response, ApiError> {
    let cn = path(cn)?;
    let store = api.store.clone();
    let revoked = blocking(move || store.revoke_entity(&cn)).await?;
    let serials: Vec<&str> = revoked.iter().map(|c| c.serial.as_str()).collect();
    Ok(axum::Json(json!({ "revoked": serials })).into_response())
}

fn check_ca_name(api: &Api, name: &str) -> Result<(), ApiError> {
    if name == api.store.settings().ca_name {
        Ok(())
    } else {
        Err(ApiError(StatusCode::NOT_FOUND, format!("no CA named {name:?}")))
    }
}

async fn ca(State(api): State<Api>, name: Result<Path<String>, PathRejection>) -> Result<Response, ApiError> {
    check_ca_name(&api, &path(name)?)?;
    let store = api.store.clone();
    let der = blocking(move || Ok(store.ca_certificate()?.to_der()?)).await?;
    Ok(axum::Json(json!({ "certificate": STANDARD.encode(der) })).into_response())
}

async fn crl(State(api): State<Api>, name: Result<Path<String>, PathRejection>) -> Result<Response, ApiError> {
    check_ca_name(&api, &path(name)?)?;
    let store = api.store.clone();
    let der = blocking(move || Ok(store.crl()?.to_der()?)).await?;
    Ok(axum::Json(json!({ "CRL": STANDARD.encode(der) })).into_response())
}
