//! `auth_on_publish(_m5)` and `on_publish(_m5)`: who may publish where, and device data into Kafka in the webhook
//! modes of V2K.

use super::{HookState, Reply, wire};
use crate::config::V2kMode;
use crate::kafka::producer::ProduceError;
use crate::policy::Principal;
use crate::v2k::Payload;

pub async fn auth_on_publish(state: &HookState, body: &[u8]) -> Reply {
    let req: wire::Publish = match wire::parse(body) {
        Ok(req) => req,
        Err(reply) => return reply,
    };
    let username = req.username.as_deref();
    // One parse of the username decides, names the data source and tells whether the answer may be cached.
    let principal = match state.policy.authorize_publish(username, &req.topic, req.retain) {
        Ok(principal) => principal,
        Err(reason) => {
            tracing::info!(?username, client_id = %req.client_id, topic = %req.topic, %reason, "publish denied");
            return Reply::Deny(reason);
        }
    };
    let device = match principal {
        Principal::Device(device) => Some(device),
        Principal::Service => None,
    };
    match (&state.v2k, device) {
        (Some(v2k), Some(device)) if v2k.mode() == V2kMode::AuthOnPublish => {
            let Some(payload) = req.payload.as_deref() else {
                return Reply::BadRequest("strict V2K mode needs the payload: register with no_payload = off".into());
            };
            // Strict: ok only once Kafka holds the record; otherwise the device keeps it and sends it again.
            match v2k.forward(device, &req.topic, Payload::Base64(payload), req.qos).await {
                Ok(()) => Reply::ok(None),
                Err(e) => Reply::Unavailable(e.to_string()),
            }
        }
        (Some(v2k), Some(_)) if !v2k.accepting() => Reply::Unavailable("V2K gate closed: Kafka is behind".into()),
        _ => Reply::ok(state.cache.publish.filter(|_| principal.publish_cacheable())),
    }
}

pub async fn on_publish(state: &HookState, body: &[u8]) -> Reply {
    let req: wire::Publish = match wire::parse(body) {
        Ok(req) => req,
        Err(reply) => return reply,
    };
    let Some(v2k) = state.v2k.as_ref().filter(|v| v.mode() == V2kMode::OnPublish) else {
        return Reply::Notified;
    };
    // Only a device's own attrs are device data: the service's config publishes fire this hook too.
    let Some(device) = state.policy.device_data_source(req.username.as_deref(), &req.topic) else {
        return Reply::Notified;
    };
    let Some(payload) = req.payload.as_deref() else {
        return Reply::BadRequest("on_publish without payload".into());
    };
    // VerneMQ sends the device's PUBACK only after this reply: waiting for Kafka's ack makes the PUBACK mean "in
    // Kafka" whenever Kafka answers within the deadline.
    match v2k.forward(device, &req.topic, Payload::Base64(payload), req.qos).await {
        Ok(()) | Err(ProduceError::Pending(_)) => Reply::Notified,
        Err(e) => Reply::Failed(format!("device record for {device} not delivered: {e}")),
    }
}
