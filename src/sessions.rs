//! Node-local registry of connected MQTT sessions, fed by the notification hooks: who is connected, since when,
//! with which certificate.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// VerneMQ's session key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SubscriberId {
    pub mountpoint: String,
    pub client_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub username: Option<String>,
    pub connected_at_ms: u64,
    pub certificate_serial: Option<String>,
}

/// A certificate serial seen in `auth_on_register` and waiting for the matching `on_register`.
#[derive(Debug)]
struct Pending {
    serial: String,
    at: Instant,
}

/// How long an accepted CONNECT may take to reach `on_register` before its pending certificate is forgotten.
const PENDING_TTL: Duration = Duration::from_secs(30);
/// Bound on pending entries, so CONNECT floods that never complete cannot grow memory.
const PENDING_MAX: usize = 100_000;

#[derive(Debug, Default)]
pub struct SessionRegistry {
    sessions: Mutex<HashMap<SubscriberId, Session>>,
    pending: Mutex<HashMap<SubscriberId, Pending>>,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl SessionRegistry {
    /// Remembers the certificate of an accepted CONNECT until `on_register` confirms the session.
    pub fn expect(&self, id: SubscriberId, serial: String) {
        let mut pending = self.pending.lock();
        if pending.len() >= PENDING_MAX {
            let now = Instant::now();
            pending.retain(|_, p| now.duration_since(p.at) < PENDING_TTL);
            if pending.len() >= PENDING_MAX {
                return;
            }
        }
        pending.insert(id, Pending { serial, at: Instant::now() });
    }

    pub fn connected(&self, id: SubscriberId, username: Option<String>) {
        let certificate_serial = {
            let mut pending = self.pending.lock();
            pending.remove(&id).filter(|p| p.at.elapsed() < PENDING_TTL).map(|p| p.serial)
        };
        let session = Session { username, connected_at_ms: now_ms(), certificate_serial };
        self.sessions.lock().insert(id, session);
    }

    pub fn disconnected(&self, id: &SubscriberId) -> Option<Session> {
        self.sessions.lock().remove(id)
    }

    pub fn get(&self, id: &SubscriberId) -> Option<Session> {
        self.sessions.lock().get(id).cloned()
    }

    pub fn len(&self) -> usize {
        self.sessions.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sessions whose certificate serial is in `serials` (for disconnects after a CRL refresh).
    pub fn with_serials(&self, serials: &[String]) -> Vec<SubscriberId> {
        let sessions = self.sessions.lock();
        sessions
            .iter()
            .filter(|(_, s)| s.certificate_serial.as_ref().is_some_and(|serial| serials.contains(serial)))
            .map(|(id, _)| id.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(c: &str) -> SubscriberId {
        SubscriberId { mountpoint: String::new(), client_id: c.into() }
    }

    #[test]
    fn tracks_connect_and_disconnect_with_certificate() {
        let reg = SessionRegistry::default();
        reg.expect(id("a"), "1001".into());
        reg.connected(id("a"), Some("admin:a1998e".into()));
        reg.connected(id("b"), Some("admin:b".into()));
        assert_eq!(reg.len(), 2);
        let a = reg.get(&id("a")).unwrap();
        assert_eq!(a.certificate_serial.as_deref(), Some("1001"));
        assert!(a.connected_at_ms > 0);
        assert_eq!(reg.get(&id("b")).unwrap().certificate_serial, None);
        assert_eq!(reg.with_serials(&["1001".into()]), vec![id("a")]);
        assert!(reg.disconnected(&id("a")).is_some());
        assert!(reg.disconnected(&id("a")).is_none());
        assert_eq!(reg.len(), 1);
    }

    #[test]
    fn reconnect_replaces_the_session() {
        let reg = SessionRegistry::default();
        reg.connected(id("a"), Some("u1".into()));
        reg.connected(id("a"), Some("u2".into()));
        assert_eq!(reg.len(), 1);
        assert_eq!(reg.get(&id("a")).unwrap().username.as_deref(), Some("u2"));
    }
}
