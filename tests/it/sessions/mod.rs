//! Live session control over real sockets: the captured webhook sequences, tansu for device-manager events, the
//! project's PKI for CRLs, and a recorder standing in for VerneMQ's HTTP API (it only records what it receives).

mod crl;
mod flows;
mod removed;
mod unreachable;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use parking_lot::Mutex;
use serde_json::Value;

use crate::common::captures::{self, Captured};
use crate::common::{RawClient, RawResponse, TestApp, wait_until};

pub const API_KEY: &str = "it-api-key";
pub const ADMIN_TOKEN: &str = "it-admin-token";
pub const DEVICE: &str = "admin:a1998e";

/// One call VerneMQ's API received: method, path, query pairs decoded in order, `x-api-key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub method: String,
    pub path: String,
    pub query: Vec<(String, String)>,
    pub api_key: Option<String>,
}

impl Call {
    /// The values of one query parameter, however many times it appears.
    pub fn params(&self, name: &str) -> Vec<&str> {
        self.query.iter().filter(|(k, _)| k == name).map(|(_, v)| v.as_str()).collect()
    }

    /// A v1 disconnect of exactly this session, without `--cleanup`, with the API key.
    pub fn assert_disconnect(&self, mountpoint: &str, client_id: &str) {
        assert_eq!((self.method.as_str(), self.path.as_str()), ("GET", "/api/v1/session/disconnect"), "{self:?}");
        assert_eq!(self.params("client-id"), [client_id], "{self:?}");
        let mountpoints = self.params("--mountpoint");
        if mountpoint.is_empty() {
            assert!(mountpoints.is_empty(), "{self:?}");
        } else {
            assert_eq!(mountpoints, [mountpoint], "{self:?}");
        }
        assert!(self.query.iter().all(|(k, _)| k == "client-id" || k == "--mountpoint"), "only those: {self:?}");
        assert_eq!(self.api_key.as_deref(), Some(API_KEY));
    }
}

/// Stands in for VerneMQ's API: answers what VerneMQ 2.1.2 answers a v1 disconnect (capture 4) and records the call.
#[derive(Clone, Default)]
pub struct Recorder {
    calls: Arc<Mutex<Vec<Call>>>,
    pub url: String,
}

impl Recorder {
    pub async fn start() -> Self {
        Self::start_on(0).await
    }

    /// On a given loopback port (0: any free one).
    pub async fn start_on(port: u16) -> Self {
        let calls: Arc<Mutex<Vec<Call>>> = Arc::default();
        let record = calls.clone();
        let app = axum::Router::new().fallback(move |request: Request<Body>| {
            let record = record.clone();
            async move {
                let query = url::form_urlencoded::parse(request.uri().query().unwrap_or("").as_bytes())
                    .map(|(k, v)| (k.into_owned(), v.into_owned()))
                    .collect();
                record.lock().push(Call {
                    method: request.method().to_string(),
                    path: request.uri().path().to_string(),
                    query,
                    api_key: request.headers().get("x-api-key").and_then(|v| v.to_str().ok()).map(String::from),
                });
                (StatusCode::OK, [("content-type", "application/json")], r#"{"text":"Done","type":"text"}"#)
            }
        });
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.expect("bind recorder");
        let url = format!("http://{}", listener.local_addr().expect("recorder address"));
        tokio::spawn(async move { axum::serve(listener, app).await.expect("recorder") });
        Self { calls, url }
    }

    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().clone()
    }

    /// Forgets the calls recorded so far.
    pub fn clear(&self) {
        self.calls.lock().clear();
    }

    /// Waits up to `timeout` for at least `n` calls, then returns them all.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Call> {
        wait_until(timeout, async || self.calls.lock().len() >= n).await;
        self.calls()
    }

    /// The calls after a quiet `settle`: none may still be on its way.
    pub async fn settled(&self, settle: Duration) -> Vec<Call> {
        tokio::time::sleep(settle).await;
        self.calls()
    }
}

/// The options that turn live session control on against `recorder`.
pub fn session_env(recorder: &Recorder) -> Vec<(&'static str, String)> {
    vec![
        ("VERNEMQ_API_URL", recorder.url.clone()),
        ("VERNEMQ_API_KEY", API_KEY.into()),
        ("ADMIN_TOKEN", ADMIN_TOKEN.into()),
    ]
}

/// The first captured request of `hook` in `file`.
pub fn captured(file: &str, hook: &str) -> Captured {
    captures::load()
        .into_iter()
        .find(|c| c.file == file && c.hook == hook)
        .unwrap_or_else(|| panic!("no {hook} in {file}"))
}

/// A captured body with some fields replaced, as VerneMQ would send it for another client.
pub fn body_with(body_raw: &str, fields: &[(&str, Value)]) -> Vec<u8> {
    let mut body: Value = serde_json::from_str(body_raw).expect("captured body is JSON");
    for (k, v) in fields {
        body[*k] = v.clone();
    }
    serde_json::to_vec(&body).expect("serialise")
}

/// `auth_on_register` as the capture of `file` has it, for `client_id` on `mountpoint`, with an optional forwarded
/// certificate (base64 DER, the last key, as VerneMQ sends it with `forward_connection_opts`).
pub async fn register(
    client: &mut RawClient,
    username: &str,
    mountpoint: &str,
    client_id: &str,
    cert_b64: Option<&str>,
) -> RawResponse {
    let c = captured("1a-v311-device-session.jsonl", "auth_on_register");
    let mut fields = vec![
        ("username", Value::from(username)),
        ("mountpoint", Value::from(mountpoint)),
        ("client_id", Value::from(client_id)),
    ];
    if let Some(cert) = cert_b64 {
        fields.push(("password", Value::Null));
        fields.push(("client_cert", Value::from(cert)));
    }
    client.hook("auth_on_register", &body_with(&c.body_raw, &fields)).await
}

/// Whether a hook reply allowed.
pub fn allowed(reply: &RawResponse) -> bool {
    reply.status == 200 && reply.json()["result"] == "ok"
}

/// The session key VerneMQ uses after the reply's client-id rewrite (the request's own key without one).
pub fn session_key(reply: &RawResponse, mountpoint: &str, client_id: &str) -> (String, String) {
    let modifiers = &reply.json()["modifiers"];
    match (modifiers["mountpoint"].as_str(), modifiers["client_id"].as_str()) {
        (Some(m), Some(c)) => (m.to_string(), c.to_string()),
        _ => (mountpoint.to_string(), client_id.to_string()),
    }
}

/// `GET /admin/sessions?device=…` with the token: the session keys listed.
pub async fn listed(app: &TestApp, device: &str) -> Vec<(String, String)> {
    let response = reqwest::Client::new()
        .get(app.url("/admin/sessions"))
        .query(&[("device", device)])
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("admin list");
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("admin list JSON");
    assert_eq!(body["device"], device);
    body["sessions"]
        .as_array()
        .expect("sessions")
        .iter()
        .map(|s| (s["mountpoint"].as_str().unwrap().to_string(), s["client_id"].as_str().unwrap().to_string()))
        .collect()
}

/// `POST /admin/sessions/<device>/disconnect`, with `token` as bearer if any: status and body.
pub async fn operator_disconnect(base: &str, device: &str, token: Option<&str>) -> (u16, Value) {
    let mut request = reqwest::Client::new().post(format!("{base}/admin/sessions/{device}/disconnect"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("admin disconnect");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

pub use crate::common::metrics_text;

/// One series of the Prometheus text (0 when absent).
pub fn metric(text: &str, series: &str) -> f64 {
    crate::common::metric(text, series).unwrap_or(0.0)
}
