//! VerneMQ `vmq_webhooks` endpoints: one route per hook under `/vmq/<hook>`, translating the wire format to the
//! policy and back. Every reply is one VerneMQ accepts without crashing the session (ARCHITECTURE.md §2.3).

pub mod cache_clear;
mod publish;
mod register;
mod reply;
mod session_events;
mod subscribe;
mod wire;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, header};
use axum::response::Response;
use axum::routing::post;

use metrics::{Counter, Histogram};
pub use reply::{Outcome, Reply};

use crate::log_guard::{LogGuard, LogKind, clip};
use crate::metrics::Metrics;
use crate::policy::{DenyReason, Policy};
use crate::service_certs::ServiceCertificates;
use crate::sessions::SessionRegistry;
use crate::v2k::V2k;

/// The hooks this service serves. Anything else VerneMQ could call is deliberately not routed (404 = deny).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hook {
    AuthOnRegister,
    AuthOnRegisterM5,
    AuthOnPublish,
    AuthOnPublishM5,
    AuthOnSubscribe,
    AuthOnSubscribeM5,
    OnRegister,
    OnRegisterM5,
    OnPublish,
    OnPublishM5,
    OnClientOffline,
    OnClientGone,
}

impl Hook {
    pub const ALL: [Hook; 12] = [
        Hook::AuthOnRegister,
        Hook::AuthOnRegisterM5,
        Hook::AuthOnPublish,
        Hook::AuthOnPublishM5,
        Hook::AuthOnSubscribe,
        Hook::AuthOnSubscribeM5,
        Hook::OnRegister,
        Hook::OnRegisterM5,
        Hook::OnPublish,
        Hook::OnPublishM5,
        Hook::OnClientOffline,
        Hook::OnClientGone,
    ];

    /// The name VerneMQ uses in its config and in the `vernemq-hook` header.
    pub fn name(self) -> &'static str {
        match self {
            Hook::AuthOnRegister => "auth_on_register",
            Hook::AuthOnRegisterM5 => "auth_on_register_m5",
            Hook::AuthOnPublish => "auth_on_publish",
            Hook::AuthOnPublishM5 => "auth_on_publish_m5",
            Hook::AuthOnSubscribe => "auth_on_subscribe",
            Hook::AuthOnSubscribeM5 => "auth_on_subscribe_m5",
            Hook::OnRegister => "on_register",
            Hook::OnRegisterM5 => "on_register_m5",
            Hook::OnPublish => "on_publish",
            Hook::OnPublishM5 => "on_publish_m5",
            Hook::OnClientOffline => "on_client_offline",
            Hook::OnClientGone => "on_client_gone",
        }
    }

    pub fn path(self) -> String {
        format!("/vmq/{}", self.name())
    }
}

/// `cache-control: max-age` values, in seconds; `None` sends no header (VerneMQ then calls every time).
#[derive(Debug, Clone, Copy, Default)]
pub struct CachePolicy {
    pub register: Option<u32>,
    pub publish: Option<u32>,
    pub subscribe: Option<u32>,
    /// How often VerneMQ's cache is emptied through its API (`cache_clear`); `None` when nothing is cached.
    pub clear_every: Option<std::time::Duration>,
}

/// One hook's requests by outcome, and its latency.
struct HookMetrics {
    /// Indexed like [`Outcome::ALL`].
    outcomes: [Counter; Outcome::ALL.len()],
    latency: Histogram,
}

impl HookMetrics {
    fn new(metrics: &Metrics, hook: Hook) -> Self {
        Self {
            outcomes: metrics.counters(
                "iotagent_webhook_requests_total",
                "Webhook requests by hook and outcome",
                &[("hook", hook.name())],
                ("outcome", Outcome::name),
                Outcome::ALL,
            ),
            latency: metrics.histogram(
                "iotagent_webhook_duration_seconds",
                "Time from request to reply, by hook",
                &[("hook", hook.name())],
            ),
        }
    }
}

/// What the hook handlers share.
#[derive(Clone)]
pub struct HookState {
    pub policy: Arc<Policy>,
    pub sessions: Arc<SessionRegistry>,
    pub cache: CachePolicy,
    pub max_body_bytes: usize,
    pub v2k: Option<Arc<V2k>>,
    /// The only certificates that make a connection the service (none unless set).
    pub service_certificates: Arc<ServiceCertificates>,
    /// Samples denial log lines per identity.
    pub log_guard: Arc<LogGuard>,
    metrics: Arc<[HookMetrics; Hook::ALL.len()]>,
    /// Indexed by [`DenyReason::index`].
    denied: Arc<[Counter; DenyReason::LABELS.len()]>,
}

impl HookState {
    pub fn new(
        policy: Arc<Policy>,
        sessions: Arc<SessionRegistry>,
        cache: CachePolicy,
        max_body_bytes: usize,
        v2k: Option<Arc<V2k>>,
        metrics: &Metrics,
    ) -> Self {
        let per_hook = Hook::ALL.map(|hook| HookMetrics::new(metrics, hook));
        Self {
            policy,
            sessions,
            cache,
            max_body_bytes,
            v2k,
            service_certificates: Arc::default(),
            log_guard: Arc::new(LogGuard::new(metrics)),
            metrics: Arc::new(per_hook),
            denied: Arc::new(metrics.counters(
                "iotagent_webhook_denied_total",
                "Requests refused, by reason (VerneMQ only sees not_allowed)",
                &[],
                ("reason", |label| label),
                DenyReason::LABELS,
            )),
        }
    }

    /// Accepts these certificates as the service's own.
    #[must_use]
    pub fn with_service_certificates(mut self, certificates: Arc<ServiceCertificates>) -> Self {
        self.service_certificates = certificates;
        self
    }

    fn metrics(&self, hook: Hook) -> &HookMetrics {
        // `Hook::ALL` lists the variants in declaration order.
        &self.metrics[hook as usize]
    }
}

/// The routes of every hook.
pub fn routes(state: HookState) -> Router {
    let mut router = Router::new();
    for hook in Hook::ALL {
        // One shared state: a call clones one Arc, not each of the state's parts.
        let handler = move |State(state): State<Arc<HookState>>, request: Request| async move {
            let (parts, body) = request.into_parts();
            match read_body(&parts.headers, body, state.max_body_bytes).await {
                Ok(body) => dispatch(hook, &state, &parts.headers, &body).await,
                // Oversized or unreadable bodies: 400 like any malformed request (VerneMQ denies on non-200).
                Err(reason) => dispatch_rejected(hook, &state, reason),
            }
        };
        router = router.route(&hook.path(), post(handler));
    }
    router.with_state(Arc::new(state))
}

/// Reads the body up to `limit` bytes; a declared length over the limit is refused before anything is read.
async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, String> {
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(format!(
            "request body of {} bytes exceeds WEBHOOK_MAX_BODY_BYTES ({limit})",
            declared.unwrap_or(0)
        ));
    }
    axum::body::to_bytes(body, limit).await.map_err(|e| format!("cannot read request body: {e}"))
}

fn dispatch_rejected(hook: Hook, state: &HookState, reason: String) -> Response {
    record(hook, state, &Reply::BadRequest(reason.clone()), Instant::now());
    Reply::BadRequest(reason).into_response()
}

async fn dispatch(hook: Hook, state: &HookState, headers: &HeaderMap, body: &[u8]) -> Response {
    let started = Instant::now();
    let reply = match check_hook_header(hook, headers) {
        Err(reply) => reply,
        Ok(()) => match hook {
            Hook::AuthOnRegister | Hook::AuthOnRegisterM5 => register::auth_on_register(state, body),
            Hook::AuthOnPublish | Hook::AuthOnPublishM5 => publish::auth_on_publish(state, body).await,
            Hook::AuthOnSubscribe => subscribe::auth_on_subscribe(state, body, subscribe::Version::V3),
            Hook::AuthOnSubscribeM5 => subscribe::auth_on_subscribe(state, body, subscribe::Version::V5),
            Hook::OnPublish | Hook::OnPublishM5 => publish::on_publish(state, body).await,
            Hook::OnRegister | Hook::OnRegisterM5 => session_events::on_register(state, body),
            Hook::OnClientOffline | Hook::OnClientGone => session_events::on_client_gone(state, body),
        },
    };
    record(hook, state, &reply, started);
    reply.into_response()
}

fn record(hook: Hook, state: &HookState, reply: &Reply, started: Instant) {
    let metrics = state.metrics(hook);
    // `Outcome::ALL` lists the variants in declaration order.
    metrics.outcomes[reply.outcome() as usize].increment(1);
    match reply {
        Reply::Deny(reason) => state.denied[reason.index()].increment(1),
        // Both follow Kafka's state, so an outage turns every device publish into one: sampled per reason and per
        // hook (the message of an undelivered record names its device, and V2K logs that record, sampled, too).
        Reply::Unavailable(message) => {
            if let Some(suppressed) = state.log_guard.admit(LogKind::Unavailable, message) {
                tracing::warn!(hook = hook.name(), %message, suppressed, "publish refused: Kafka cannot take it now");
            }
        }
        // Anyone who reaches the port can send these: sampled, and what they sent clipped.
        Reply::BadRequest(message) => {
            if let Some(suppressed) = state.log_guard.admit(LogKind::BadRequest, hook.name()) {
                tracing::warn!(hook = hook.name(), message = %clip(message), suppressed,
                               "rejected malformed webhook request");
            }
        }
        Reply::Internal(message) => {
            if let Some(suppressed) = state.log_guard.admit(LogKind::DeliveryFailure, hook.name()) {
                tracing::error!(hook = hook.name(), %message, suppressed, "webhook failed");
            }
        }
        Reply::Allow { .. } | Reply::Notified => {}
    }
    metrics.latency.record(started.elapsed().as_secs_f64());
}

/// A hook registered at the wrong URL would get another hook's reply shape, which can crash the VerneMQ session
/// (e.g. `{}` to an auth hook); refusing it fails closed instead.
fn check_hook_header(hook: Hook, headers: &HeaderMap) -> Result<(), Reply> {
    match headers.get("vernemq-hook") {
        None => Ok(()),
        Some(value) if value.as_bytes() == hook.name().as_bytes() => Ok(()),
        Some(value) => Err(Reply::BadRequest(format!(
            "vernemq-hook header {:?} does not match the endpoint {}; check vmq_webhooks.*.endpoint in vernemq.conf",
            String::from_utf8_lossy(value.as_bytes()),
            hook.path()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_lists_hooks_and_outcomes_in_declaration_order() {
        crate::metrics::assert_declaration_order(&Hook::ALL, |h| h as usize, Hook::name);
        crate::metrics::assert_declaration_order(&Outcome::ALL, |o| o as usize, Outcome::name);
    }

    #[test]
    fn metrics_are_labelled_by_hook_and_outcome() {
        let m = Metrics::new();
        let h = HookMetrics::new(&m, Hook::AuthOnPublish);
        h.outcomes[Outcome::Allow as usize].increment(2);
        h.outcomes[Outcome::Internal as usize].increment(1);
        h.latency.record(0.0003);
        m.upkeep();
        let text = m.render();
        for line in [
            r#"iotagent_webhook_requests_total{hook="auth_on_publish",outcome="allow"} 2"#,
            r#"iotagent_webhook_requests_total{hook="auth_on_publish",outcome="internal"} 1"#,
            r#"iotagent_webhook_duration_seconds_bucket{hook="auth_on_publish",le="0.0005"} 1"#,
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
    }
}
