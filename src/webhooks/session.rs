//! Notification hooks that feed the session registry: `on_register(_m5)`, `on_client_offline`, `on_client_gone`.

use super::{HookState, Reply, wire};
use crate::sessions::SubscriberId;

pub fn on_register(state: &HookState, body: &[u8]) -> Reply {
    match wire::parse::<wire::Registered>(body) {
        Ok(r) => {
            let id = SubscriberId { mountpoint: r.mountpoint, client_id: r.client_id };
            state.sessions.connected(id, r.username);
            Reply::Notified
        }
        Err(reply) => reply,
    }
}

pub fn on_client_gone(state: &HookState, body: &[u8]) -> Reply {
    match wire::parse::<wire::Gone>(body) {
        Ok(g) => {
            state.sessions.disconnected(&SubscriberId { mountpoint: g.mountpoint, client_id: g.client_id });
            Reply::Notified
        }
        Err(reply) => reply,
    }
}
