//! Denial and delivery-failure logs that no client or outage can turn into a flood: user-controlled strings clipped,
//! lines per identity sampled, every suppressed line counted.

use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::time::{Duration, Instant};

use metrics::Counter;
use parking_lot::Mutex;

use crate::metrics::Metrics;

/// Longest part of a user-controlled string (topic, client id, username) that reaches a log line, in bytes.
pub(crate) const MAX_LOGGED_BYTES: usize = 128;
/// Lines per identity and kind within one window; the rest are counted, and the next window's first line says how
/// many were left out.
const BURST: u32 = 3;
const WINDOW: Duration = Duration::from_secs(10);
/// Lines per second over all identities, so that rotating identities does not flood either.
const GLOBAL_PER_SECOND: u32 = 50;
/// Identities tracked at once (a hash table without growth: colliding identities share a budget).
const SLOTS: usize = 1024;

/// What a sampled line reports (a refusal, or a record Kafka did not take): the `kind` label of
/// `iotagent_log_lines_suppressed_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogKind {
    Register,
    Publish,
    Subscribe,
    BadRequest,
    /// A device record Kafka did not take: after a long outage every queued record expires at once.
    DeliveryFailure,
    /// A publish refused because Kafka cannot take it now: while Kafka is down, every device publish is one.
    Unavailable,
}

impl LogKind {
    /// Every variant, in declaration order (so `kind as usize` indexes it).
    pub const ALL: [LogKind; 6] = [
        LogKind::Register,
        LogKind::Publish,
        LogKind::Subscribe,
        LogKind::BadRequest,
        LogKind::DeliveryFailure,
        LogKind::Unavailable,
    ];

    pub fn name(self) -> &'static str {
        match self {
            LogKind::Register => "register",
            LogKind::Publish => "publish",
            LogKind::Subscribe => "subscribe",
            LogKind::BadRequest => "bad_request",
            LogKind::DeliveryFailure => "delivery_failure",
            LogKind::Unavailable => "unavailable",
        }
    }
}

/// A user-controlled string as it may appear in a log: at most [`MAX_LOGGED_BYTES`], control characters escaped,
/// the length of what was cut said.
pub(crate) struct Clipped<'a>(&'a str);

pub(crate) fn clip(value: &str) -> Clipped<'_> {
    Clipped(value)
}

impl fmt::Display for Clipped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut end = self.0.len().min(MAX_LOGGED_BYTES);
        while !self.0.is_char_boundary(end) {
            end -= 1;
        }
        for c in self.0[..end].chars() {
            if c.is_control() {
                write!(f, "{}", c.escape_default())?;
            } else {
                write!(f, "{c}")?;
            }
        }
        if end < self.0.len() {
            write!(f, "…(+{} bytes)", self.0.len() - end)?;
        }
        Ok(())
    }
}

#[derive(Clone, Copy)]
struct Slot {
    key: u64,
    window_start: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

struct State {
    slots: Vec<Slot>,
    second_start: Option<Instant>,
    second_logged: u32,
}

/// Decides which denial and delivery-failure lines are written.
pub struct LogGuard {
    hasher: RandomState,
    state: Mutex<State>,
    /// Indexed by [`LogKind`].
    suppressed: [Counter; LogKind::ALL.len()],
}

impl fmt::Debug for LogGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogGuard").finish_non_exhaustive()
    }
}

impl LogGuard {
    pub fn new(metrics: &Metrics) -> Self {
        let empty = Slot { key: 0, window_start: None, logged: 0, suppressed: 0 };
        Self {
            hasher: RandomState::new(),
            state: Mutex::new(State { slots: vec![empty; SLOTS], second_start: None, second_logged: 0 }),
            suppressed: metrics.counters(
                "iotagent_log_lines_suppressed_total",
                "Denial and delivery-failure log lines left out by sampling (each is still counted by its own metric)",
                &[],
                ("kind", LogKind::name),
                LogKind::ALL,
            ),
        }
    }

    /// Whether to log a line of `kind` for `identity` now; `Some(n)`: log it, saying `n` lines were left out since
    /// this identity's last line.
    pub fn admit(&self, kind: LogKind, identity: &str) -> Option<u64> {
        self.admit_at(kind, identity, Instant::now())
    }

    fn key(&self, kind: LogKind, identity: &str) -> u64 {
        self.hasher.hash_one((kind as u8, identity)) | 1
    }

    #[cfg(test)]
    fn slot(&self, kind: LogKind, identity: &str) -> usize {
        (self.key(kind, identity) as usize) % SLOTS
    }

    fn admit_at(&self, kind: LogKind, identity: &str, now: Instant) -> Option<u64> {
        let key = self.key(kind, identity);
        let mut state = self.state.lock();
        let index = (key as usize) % SLOTS;
        let slot = &mut state.slots[index];
        let expired = slot.window_start.is_none_or(|start| now.duration_since(start) >= WINDOW);
        // Within a window, an identity that collides with the slot's shares its budget: taking the slot over would
        // give two alternating identities a fresh budget each time.
        if expired {
            let carried = if slot.key == key { slot.suppressed } else { 0 };
            *slot = Slot { key, window_start: Some(now), logged: 0, suppressed: carried };
        }
        let identity_allows = slot.logged < BURST;
        if state.second_start.is_none_or(|start| now.duration_since(start) >= Duration::from_secs(1)) {
            state.second_start = Some(now);
            state.second_logged = 0;
        }
        if identity_allows && state.second_logged < GLOBAL_PER_SECOND {
            state.second_logged += 1;
            let slot = &mut state.slots[index];
            slot.logged += 1;
            Some(std::mem::take(&mut slot.suppressed))
        } else {
            state.slots[index].suppressed += 1;
            drop(state);
            // `LogKind::ALL` lists the variants in declaration order.
            self.suppressed[kind as usize].increment(1);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_listed_in_declaration_order() {
        crate::metrics::assert_declaration_order(&LogKind::ALL, |k| k as usize, LogKind::name);
    }

    #[test]
    fn clipping_bounds_and_escapes() {
        assert_eq!(clip("admin:a1998e").to_string(), "admin:a1998e");
        let long = "x".repeat(64 * 1024);
        let shown = clip(&long).to_string();
        assert!(shown.len() < MAX_LOGGED_BYTES + 32, "{}", shown.len());
        assert!(shown.ends_with(&format!("…(+{} bytes)", 64 * 1024 - MAX_LOGGED_BYTES)));
        assert_eq!(clip("a\nfake line\u{1b}[31m").to_string(), "a\\nfake line\\u{1b}[31m");
        let multibyte = "é".repeat(100);
        assert!(clip(&multibyte).to_string().starts_with(&"é".repeat(MAX_LOGGED_BYTES / 2)));
    }

    #[test]
    fn each_identity_gets_a_sample_per_window_and_learns_what_was_left_out() {
        // Slots are chosen by a random hash: one in 1 024 guards would put both kinds of admin:a1 in one slot.
        let (metrics, guard) = std::iter::repeat_with(|| {
            let metrics = Metrics::new();
            let guard = LogGuard::new(&metrics);
            (metrics, guard)
        })
        .find(|(_, g)| g.slot(LogKind::Publish, "admin:a1") != g.slot(LogKind::Subscribe, "admin:a1"))
        .expect("an endless supply");
        let t0 = Instant::now();
        let logged = (0..100).filter(|_| guard.admit_at(LogKind::Publish, "admin:a1", t0).is_some()).count();
        assert_eq!(logged, BURST as usize);
        assert_eq!(guard.admit_at(LogKind::Subscribe, "admin:a1", t0), Some(0), "another kind, its own budget");
        let other = (0..)
            .map(|i| format!("admin:b{i}"))
            .find(|b| guard.slot(LogKind::Publish, b) != guard.slot(LogKind::Publish, "admin:a1"));
        assert_eq!(
            guard.admit_at(LogKind::Publish, other.as_deref().unwrap_or_default(), t0),
            Some(0),
            "another identity, its own budget"
        );
        assert_eq!(guard.admit_at(LogKind::Publish, "admin:a1", t0 + WINDOW), Some(100 - u64::from(BURST)));
        metrics.upkeep();
        let text = metrics.render();
        assert!(text.contains(r#"iotagent_log_lines_suppressed_total{kind="publish"} 97"#), "{text}");
    }

    #[test]
    fn colliding_identities_share_a_budget_within_a_window() {
        let guard = LogGuard::new(&Metrics::new());
        let names: Vec<String> = (0..4096).map(|i| format!("t:d{i}")).collect();
        let mut first_in_slot = std::collections::HashMap::new();
        let (a, b) = names
            .iter()
            .find_map(|name| {
                let slot = guard.slot(LogKind::Publish, name);
                first_in_slot.insert(slot, name).map(|earlier| (earlier.clone(), name.clone()))
            })
            .expect("4 096 names in 1 024 slots collide");
        let t0 = Instant::now();
        let logged = (0..100)
            .filter(|i| guard.admit_at(LogKind::Publish, if i % 2 == 0 { &a } else { &b }, t0).is_some())
            .count();
        assert_eq!(logged, BURST as usize, "{a} and {b} alternating");
        assert!(guard.admit_at(LogKind::Publish, &b, t0 + WINDOW).is_some(), "the next window starts afresh");
    }

    #[test]
    fn rotating_identities_hit_the_global_limit() {
        let guard = LogGuard::new(&Metrics::new());
        let t0 = Instant::now();
        let logged = (0..1000).filter(|i| guard.admit_at(LogKind::Register, &format!("t:d{i}"), t0).is_some()).count();
        assert_eq!(logged, GLOBAL_PER_SECOND as usize);
        assert!(guard.admit_at(LogKind::Register, "t:new", t0 + Duration::from_secs(1)).is_some());
    }
}
