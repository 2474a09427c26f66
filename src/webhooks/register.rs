//! `auth_on_register(_m5)`: identity, certificate, client-id policy and the session modifiers (lifetime).

use serde::Serialize;

use super::{HookState, Reply, wire};
use crate::cert;
use crate::log_guard::{LogKind, clip};
use crate::policy::{DenyReason, Principal, RegisterDecision, RegisterRequest};

/// Modifier keys allowed for `auth_on_register(_m5)` (ARCHITECTURE.md §2.3); `mountpoint`, `client_id` only together.
#[derive(Serialize)]
struct Modifiers<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    max_connection_lifetime: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_message_size: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_inflight_messages: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_online_messages: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_offline_messages: Option<u32>,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    subscriber_id: Option<SubscriberIdModifier<'a>>,
}

#[derive(Serialize)]
struct SubscriberIdModifier<'a> {
    mountpoint: &'a str,
    client_id: &'a str,
}

#[derive(Serialize)]
struct WithModifiers<'a> {
    modifiers: Modifiers<'a>,
}

pub(super) fn auth_on_register(state: &HookState, body: &[u8]) -> Reply {
    let req: wire::Register = match wire::parse(body) {
        Ok(req) => req,
        Err(reply) => return reply,
    };
    let (certificate, fingerprint) = match req.client_cert.as_deref().map(cert::parse_forwarded).transpose() {
        Ok(parsed) => parsed.unzip(),
        Err(e) => return Reply::BadRequest(e.to_string()),
    };
    let service_certificates = state.service_certificates.current();
    let request = RegisterRequest {
        username: req.username.as_deref(),
        password: req.password.as_deref(),
        mountpoint: &req.mountpoint,
        client_id: &req.client_id,
        certificate_cn: certificate.as_ref().map(|c| c.common_name.as_deref()),
        certificate_fingerprint: fingerprint,
        service_certificates: &service_certificates,
    };
    match state.policy.register(&request, rand::random::<f64>()) {
        RegisterDecision::Deny(reason) => {
            let username = req.username.as_deref().unwrap_or_default();
            denied(state, username, username, &req.client_id, reason)
        }
        RegisterDecision::Allow { principal, modifiers } => {
            if let Principal::Device(device) = principal {
                // Data of a tenant without a topic has nowhere to go: refuse the device before it publishes.
                if state.v2k.as_ref().is_some_and(|v2k| !v2k.tenant_admitted(device.tenant)) {
                    // Sampled per tenant: a tenant's many devices are one story in the log.
                    let name = device.key();
                    return denied(state, device.tenant, &name, &req.client_id, DenyReason::UnknownTenant);
                }
                // The session key VerneMQ will use: the policy's rewrite if any (live session control).
                let (mountpoint, client_id) =
                    modifiers.subscriber_id.as_ref().map_or((&req.mountpoint, &req.client_id), |(m, c)| (m, c));
                let name = device.key();
                let admitted = state.sessions.admit(
                    &name,
                    mountpoint,
                    client_id,
                    certificate.as_ref(),
                    modifiers.max_connection_lifetime,
                );
                if let Err(reason) = admitted {
                    return denied(state, &name, &name, &req.client_id, reason);
                }
            }
            let max_age = state.cache.register;
            if modifiers.is_empty() {
                return Reply::ok(max_age);
            }
            let wire_modifiers = Modifiers {
                max_connection_lifetime: modifiers.max_connection_lifetime,
                max_message_size: modifiers.max_message_size,
                max_inflight_messages: modifiers.max_inflight_messages,
                max_online_messages: modifiers.max_online_messages,
                max_offline_messages: modifiers.max_offline_messages,
                subscriber_id: modifiers
                    .subscriber_id
                    .as_ref()
                    .map(|(mountpoint, client_id)| SubscriberIdModifier { mountpoint, client_id }),
            };
            Reply::ok_with(&WithModifiers { modifiers: wire_modifiers }, max_age)
        }
    }
}

/// A refused registration: logged (sampled per `sample_key`, what the caller sent clipped) and answered
/// `not_allowed`.
fn denied(state: &HookState, sample_key: &str, username: &str, client_id: &str, reason: DenyReason) -> Reply {
    if let Some(suppressed) = state.log_guard.admit(LogKind::Register, sample_key) {
        tracing::info!(username = %clip(username), client_id = %clip(client_id), %reason, suppressed,
                       "connection denied");
    }
    Reply::Deny(reason)
}
