//! The replies VerneMQ accepts, and only those: always a `result`, never an empty `modifiers` object.

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use serde::Serialize;

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
    /// Something on our side failed (for example a device record Kafka will never take): 500, also a denial.
    Internal(String),
}

/// The outcome of a hook, one name each: the metric label, and the error kind of a non-200 reply's body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Allow,
    Deny,
    Notified,
    Unavailable,
    BadRequest,
    Internal,
}

impl Outcome {
    pub const ALL: [Outcome; 6] = [
        Outcome::Allow,
        Outcome::Deny,
        Outcome::Notified,
        Outcome::Unavailable,
        Outcome::BadRequest,
        Outcome::Internal,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Outcome::Allow => "allow",
            Outcome::Deny => "deny",
            Outcome::Notified => "notified",
            Outcome::Unavailable => "unavailable",
            Outcome::BadRequest => "bad_request",
            Outcome::Internal => "internal",
        }
    }
}

#[derive(Debug)]
pub enum AllowBody {
    Ok,
    Json(String),
}

/// `{"result":"ok", ...extra}`, with `result` first for whoever reads VerneMQ traces.
#[derive(Serialize)]
struct OkBody<'a, T> {
    result: &'static str,
    #[serde(flatten)]
    extra: &'a T,
}

/// `{"result":{"error":…}}`: the refusal VerneMQ understands. It maps every error string to the same
/// CONNACK/PUBACK/SUBACK code, so the reason stays in our logs.
#[derive(Serialize)]
struct Refused {
    result: ErrorResult,
}

#[derive(Serialize)]
struct ErrorResult {
    error: &'static str,
}

/// The body of a non-200 reply (VerneMQ only logs it).
#[derive(Serialize)]
struct Failure<'a> {
    error: &'static str,
    message: &'a str,
}

/// `{}`: notification hooks.
#[derive(Serialize)]
struct Empty {}

fn json<T: Serialize>(value: &T) -> Body {
    // Serialising these plain structs cannot fail.
    Body::from(serde_json::to_vec(value).unwrap_or_default())
}

fn refused(error: &'static str) -> Body {
    json(&Refused { result: ErrorResult { error } })
}

impl Reply {
    pub fn ok(max_age: Option<u32>) -> Self {
        Reply::Allow { body: AllowBody::Ok, max_age }
    }

    /// `{"result":"ok", ...extra}`; `extra` must serialise to a JSON object.
    pub fn ok_with<T: Serialize>(extra: &T, max_age: Option<u32>) -> Self {
        match serde_json::to_string(&OkBody { result: "ok", extra }) {
            Ok(json) => Reply::Allow { body: AllowBody::Json(json), max_age },
            Err(_) => Reply::Internal("reply modifiers did not serialise to an object".into()),
        }
    }

    pub fn outcome(&self) -> Outcome {
        match self {
            Reply::Allow { .. } => Outcome::Allow,
            Reply::Deny(_) => Outcome::Deny,
            Reply::Notified => Outcome::Notified,
            Reply::Unavailable(_) => Outcome::Unavailable,
            Reply::BadRequest(_) => Outcome::BadRequest,
            Reply::Internal(_) => Outcome::Internal,
        }
    }

    pub fn into_response(self) -> Response {
        let outcome = self.outcome();
        let (status, body, max_age) = match self {
            Reply::Allow { body: AllowBody::Ok, max_age } => {
                (StatusCode::OK, json(&OkBody { result: "ok", extra: &Empty {} }), max_age)
            }
            Reply::Allow { body: AllowBody::Json(json), max_age } => (StatusCode::OK, Body::from(json), max_age),
            Reply::Deny(_) => (StatusCode::OK, refused("not_allowed"), None),
            Reply::Notified => (StatusCode::OK, json(&Empty {}), None),
            Reply::Unavailable(_) => (StatusCode::OK, refused(outcome.name()), None),
            Reply::BadRequest(message) | Reply::Internal(message) => {
                let status = match outcome {
                    Outcome::BadRequest => StatusCode::BAD_REQUEST,
                    _ => StatusCode::INTERNAL_SERVER_ERROR,
                };
                (status, json(&Failure { error: outcome.name(), message: &message }), None)
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    async fn body(reply: Reply) -> (u16, String) {
        let response = reply.into_response();
        let status = response.status().as_u16();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
        (status, String::from_utf8(bytes.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn bodies_are_the_bytes_vernemq_gets() {
        #[derive(Serialize)]
        struct Extra {
            topics: [u8; 1],
        }
        let cases = [
            (Reply::ok(Some(5)), 200, r#"{"result":"ok"}"#),
            (Reply::ok_with(&Extra { topics: [1] }, None), 200, r#"{"result":"ok","topics":[1]}"#),
            (Reply::ok_with(&Empty {}, None), 200, r#"{"result":"ok"}"#),
            (Reply::Deny(crate::policy::DenyReason::Topic), 200, r#"{"result":{"error":"not_allowed"}}"#),
            (Reply::Notified, 200, "{}"),
            (Reply::Unavailable("x".into()), 200, r#"{"result":{"error":"unavailable"}}"#),
            (Reply::BadRequest("b \"q\"".into()), 400, r#"{"error":"bad_request","message":"b \"q\""}"#),
            (Reply::Internal("i".into()), 500, r#"{"error":"internal","message":"i"}"#),
        ];
        for (reply, status, expected) in cases {
            assert_eq!(body(reply).await, (status, expected.to_string()));
        }
        assert!(matches!(Reply::ok_with(&[1], None), Reply::Internal(_)), "not an object");
    }
}
