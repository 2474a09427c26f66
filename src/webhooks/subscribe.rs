//! `auth_on_subscribe(_m5)`: one decision per requested filter, in the order VerneMQ sent them.

use serde::Serialize;

use super::{HookState, Reply, wire};
use crate::log_guard::{LogKind, clip};
use crate::policy::FilterDecision;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Version {
    V3,
    V5,
}

/// SUBACK code VerneMQ 3.1.1 sessions read as "refused" from a top-level `topics` entry.
const V3_REFUSED: u8 = 128;

#[derive(Serialize)]
struct Topic<'a> {
    topic: &'a str,
    qos: u8,
}

#[derive(Serialize)]
struct Topics<'a> {
    topics: Vec<Topic<'a>>,
}

pub(super) fn auth_on_subscribe(state: &HookState, body: &[u8], version: Version) -> Reply {
    let req: wire::Subscribe = match wire::parse(body) {
        Ok(req) => req,
        Err(reply) => return reply,
    };
    if req.topics.is_empty() {
        return Reply::BadRequest("topics is empty".into());
    }
    let decisions =
        state.policy.subscribe(req.username.as_deref(), req.topics.iter().map(|t| (t.topic.as_str(), t.qos)));
    let first_denial = decisions.iter().find_map(|d| match d {
        FilterDecision::Deny(reason) => Some(*reason),
        FilterDecision::Grant(_) => None,
    });
    let Some(reason) = first_denial else {
        // Cached only in the shape a device subscribes in (its one filter): VerneMQ keeps a row per distinct request
        // until the same request comes again, so lists and properties of the client's choosing are not cached.
        let cacheable = req.topics.len() == 1 && req.properties.is_empty();
        return Reply::ok(state.cache.subscribe.filter(|_| cacheable));
    };
    let username = req.username.as_deref().unwrap_or_default();
    if let Some(suppressed) = state.log_guard.admit(LogKind::Subscribe, username) {
        tracing::info!(username = %clip(username), client_id = %clip(&req.client_id), %reason, suppressed,
                       "subscription denied");
    }
    match version {
        // VerneMQ 2.1 subscribes a v5 filter whose modifier entry says 135, and crashes on 128 (ARCHITECTURE.md §2.3):
        // only an error result for the whole SUBSCRIBE is safe.
        Version::V5 => Reply::Deny(reason),
        // v3: one entry per filter, in request order (VerneMQ reverses both ways), refused ones with 128.
        Version::V3 => {
            let topics = req
                .topics
                .iter()
                .zip(&decisions)
                .map(|(t, d)| Topic {
                    topic: &t.topic,
                    qos: match d {
                        FilterDecision::Grant(qos) => *qos,
                        FilterDecision::Deny(_) => V3_REFUSED,
                    },
                })
                .collect();
            // Never cached: a refusal costs one call per SUBSCRIBE, as in v5, and filters a device made up leave no
            // row in VerneMQ's cache.
            Reply::ok_with(&Topics { topics }, None)
        }
    }
}
