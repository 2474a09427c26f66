//! Notification hooks that keep the session registry exact where lifetimes do not: `on_register(_m5)` confirms a
//! connection (which replaces the one registered before under its key), `on_client_offline` and `on_client_gone`
//! forget the registered connection — unless it took one over whose gone hook was still to come, which this is
//! (`sessions::registry`).

use super::{HookState, Reply, wire};

pub(super) fn on_register(state: &HookState, body: &[u8]) -> Reply {
    match wire::parse::<wire::Registered>(body) {
        Ok(r) => {
            state.sessions.registered(&r.mountpoint, &r.client_id);
            Reply::Notified
        }
        Err(reply) => reply,
    }
}

pub(super) fn on_client_gone(state: &HookState, body: &[u8]) -> Reply {
    match wire::parse::<wire::Gone>(body) {
        Ok(g) => {
            state.sessions.gone(&g.mountpoint, &g.client_id);
            Reply::Notified
        }
        Err(reply) => reply,
    }
}
