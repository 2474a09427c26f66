//! `auth_on_publish(_m5)` and `on_publish(_m5)`: who may publish where, and (with V2K) device data into Kafka.

use super::{HookState, Reply, wire};

pub async fn auth_on_publish(state: &HookState, body: &[u8]) -> Reply {
    let req: wire::Publish = match wire::parse(body) {
        Ok(req) => req,
        Err(reply) => return reply,
    };
    match state.policy.publish(req.username.as_deref(), &req.topic, req.retain) {
        Ok(()) => Reply::ok(state.cache.publish.filter(|_| state.policy.publish_cacheable(req.username.as_deref()))),
        Err(reason) => {
            tracing::info!(username = ?req.username, client_id = %req.client_id, topic = %req.topic, %reason, "publish denied");
            Reply::Deny(reason)
        }
    }
}

pub async fn on_publish(_state: &HookState, body: &[u8]) -> Reply {
    match wire::parse::<wire::Publish>(body) {
        Ok(_) => Reply::Notified,
        Err(reply) => reply,
    }
}
