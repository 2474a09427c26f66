//! `auth_on_publish(_m5)` and `on_publish(_m5)`: who may publish where, and device data into Kafka in the webhook
//! modes of V2K.

use super::{HookState, Reply, wire};
use crate::log_guard::{LogKind, clip};
use crate::policy::Principal;
use crate::v2k::{Admission, Notice};

pub(super) async fn auth_on_publish(state: &HookState, body: &[u8]) -> Reply {
    let req: wire::Publish = match wire::parse(body) {
        Ok(req) => req,
        Err(reply) => return reply,
    };
    let username = req.username.as_deref();
    // One parse of the username decides, names the data source and tells whether the answer may be cached.
    let principal = match state.policy.authorize_publish(username, &req.topic, req.retain) {
        Ok(principal) => principal,
        Err(reason) => {
            let who = username.unwrap_or_default();
            if let Some(suppressed) = state.log_guard.admit(LogKind::Publish, who) {
                tracing::info!(username = %clip(who), client_id = %clip(&req.client_id), topic = %clip(&req.topic),
                               %reason, suppressed, "publish denied");
            }
            return Reply::Deny(reason);
        }
    };
    let cacheable = principal.publish_cacheable()
        && req.properties.is_empty()
        && state.v2k.as_ref().is_none_or(|v2k| v2k.publish_cacheable());
    if let (Some(v2k), Principal::Device(device)) = (&state.v2k, principal) {
        match v2k.admit(device, &req.topic, req.payload.as_deref(), req.qos).await {
            Admission::Admit => {}
            Admission::NeedsPayload => {
                return Reply::BadRequest("strict V2K mode needs the payload: register with no_payload = off".into());
            }
            Admission::Unavailable(reason) => return Reply::Unavailable(reason.to_string()),
        }
    }
    Reply::ok(state.cache.publish.filter(|_| cacheable))
}

pub(super) async fn on_publish(state: &HookState, body: &[u8]) -> Reply {
    let req: wire::Publish = match wire::parse(body) {
        Ok(req) => req,
        Err(reply) => return reply,
    };
    let Some(v2k) = &state.v2k else { return Reply::Notified };
    // Only a device's own attrs are device data: the service's config publishes fire this hook too.
    let Some(device) = state.policy.device_data_source(req.username.as_deref(), &req.topic) else {
        return Reply::Notified;
    };
    match v2k.notify(device, &req.topic, req.payload.as_deref(), req.qos).await {
        Notice::Done => Reply::Notified,
        Notice::NeedsPayload => Reply::BadRequest("on_publish without payload".into()),
        Notice::NotDelivered(e) => Reply::Internal(format!("device record for {device} not delivered: {e}")),
    }
}
