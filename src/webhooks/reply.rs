//! The replies VerneMQ accepts, and only those: always a `result`, never an empty `modifiers` object.

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use serde::Serialize;

const OK: &str = r#"{"result":"ok"}"#;
/// VerneMQ maps every webhook error string to the same CONNACK/PUBACK/SUBACK code, so the reason stays in our logs.
const NOT_ALLOWED: &str = r#"{"result":{"error":"not_allowed"}}"#;
const NOTIFIED: &str = "{}";
const UNAVAILABLE: &str = r#"{"result":{"error":"unavailable"}}"#;

/// A hook's answer. `Allow` carries the exact body, so its shape is decided by the hook module that knows the rules.
#[derive(Debug)]
pub enum Reply {
    Allow {
        body: AllowBody,
        max_age: Option<u32>,
    },
    Deny(crate::policy::DenyReason),
    /// Notification hooks: VerneMQ ignores the body of these.
    Notified,
    /// The request could not be read: 400, which VerneMQ treats as a denial.
    BadRequest(String),
    /// Accepted by the rules but refused because a dependency cannot take it now (Kafka in strict mode or behind the
    /// gate): a 200 error result, so the device keeps the message and sends it again.
    Unavailable(String),
    /// Something on our side failed (for example Kafka did not ack in time): 500, also a denial.
    Failed(String),
}

#[derive(Debug)]
pub enum AllowBody {
    Ok,
    Json(String),
}

impl Reply {
    pub fn ok(max_age: Option<u32>) -> Self {
        Reply::Allow { body: AllowBody::Ok, max_age }
    }

    /// `{"result":"ok", ...extra}`, with `result` first for whoever reads VerneMQ traces; `extra` must serialise to a
    /// JSON object.
    pub fn ok_with<T: Serialize>(extra: &T, max_age: Option<u32>) -> Self {
        match serde_json::to_string(extra) {
            Ok(json) if json == "{}" => Reply::ok(max_age),
            Ok(json) if json.starts_with('{') => {
                Reply::Allow { body: AllowBody::Json(format!(r#"{{"result":"ok",{}"#, &json[1..])), max_age }
            }
            _ => Reply::Failed("reply modifiers did not serialise to an object".into()),
        }
    }

    pub fn into_response(self) -> Response {
        let (status, body, max_age) = match self {
            Reply::Allow { body: AllowBody::Ok, max_age } => (StatusCode::OK, Body::from(OK), max_age),
            Reply::Allow { body: AllowBody::Json(json), max_age } => (StatusCode::OK, Body::from(json), max_age),
            Reply::Deny(_) => (StatusCode::OK, Body::from(NOT_ALLOWED), None),
            Reply::Notified => (StatusCode::OK, Body::from(NOTIFIED), None),
            Reply::Unavailable(_) => (StatusCode::OK, Body::from(UNAVAILABLE), None),
            Reply::BadRequest(message) => (StatusCode::BAD_REQUEST, error_body("bad_request", &message), None),
            Reply::Failed(message) => (StatusCode::INTERNAL_SERVER_ERROR, error_body("internal", &message), None),
        };
        let mut response = Response::new(body);
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(seconds) = max_age {
            // VerneMQ caches only `ok` results; the header is set only on those.
            if let Ok(value) = HeaderValue::from_str(&format!("max-age={seconds}")) {
                headers.insert(header::CACHE_CONTROL, value);
            }
        }
        response
    }
}

fn error_body(kind: &str, message: &str) -> Body {
    Body::from(serde_json::json!({ "error": kind, "message": message }).to_string())
}
