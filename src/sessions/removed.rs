//! Removed devices from device-manager events: `remove` adds `tenant:device`, a later `create` clears it. Pure: the
//! Kafka side is `kafka/removed.rs`.

use std::collections::HashSet;

use serde::Deserialize;

use crate::policy::{IdCharset, parse_device, topic_tenant};

/// What one event changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Removed(String),
    Created(String),
    /// Any other event (`configure`, `update`, …).
    Unrelated,
}

/// Why an event was skipped (the `reason` label of the skip counter).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Skip {
    #[error("not a device-manager event: {0}")]
    Malformed(String),
    #[error("topic {topic:?} is not <tenant>.<suffix>")]
    Topic { topic: String },
    #[error("event tenant {event:?} differs from the topic's tenant {topic:?}")]
    TenantMismatch { event: String, topic: String },
    #[error("{0:?} is not a valid device identity")]
    InvalidDevice(String),
}

/// Why the reader skipped something: the `reason` label of `iotagent_removed_events_skipped_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    Malformed,
    Topic,
    TenantMismatch,
    InvalidDevice,
    /// A Kafka error instead of a message (retried).
    Kafka,
}

impl SkipReason {
    /// Every variant, in declaration order (so `reason as usize` indexes it).
    pub const ALL: [Self; 5] = [Self::Malformed, Self::Topic, Self::TenantMismatch, Self::InvalidDevice, Self::Kafka];

    pub fn name(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::Topic => "topic",
            Self::TenantMismatch => "tenant_mismatch",
            Self::InvalidDevice => "invalid_device",
            Self::Kafka => "kafka",
        }
    }
}

impl Skip {
    pub fn reason(&self) -> SkipReason {
        match self {
            Self::Malformed(_) => SkipReason::Malformed,
            Self::Topic { .. } => SkipReason::Topic,
            Self::TenantMismatch { .. } => SkipReason::TenantMismatch,
            Self::InvalidDevice(_) => SkipReason::InvalidDevice,
        }
    }
}

#[derive(Deserialize)]
struct Event {
    event: String,
    meta: Option<Meta>,
    data: Option<Data>,
}

#[derive(Deserialize)]
struct Meta {
    service: String,
}

#[derive(Deserialize)]
struct Data {
    id: String,
}

/// Reads one message of `<tenant>.<suffix>`. The tenant named inside the event must be the topic's: whoever may write
/// to one tenant's topic must not remove (or restore) another tenant's devices.
///
/// # Errors
/// A malformed event, a topic without the suffix, a tenant mismatch or an identity the ACL would refuse.
pub fn interpret(topic: &str, suffix: &str, value: &[u8], charset: &IdCharset) -> Result<Change, Skip> {
    let event: Event = serde_json::from_slice(value).map_err(|e| Skip::Malformed(e.to_string()))?;
    if event.event != "remove" && event.event != "create" {
        return Ok(Change::Unrelated);
    }
    // The same rule as K2V's (policy::topic_tenant).
    let topic_tenant = topic_tenant(topic, suffix).ok_or_else(|| Skip::Topic { topic: topic.to_string() })?;
    let tenant = event.meta.ok_or_else(|| Skip::Malformed("missing meta.service".into()))?.service;
    let device = event.data.ok_or_else(|| Skip::Malformed("missing data.id".into()))?.id;
    if tenant != topic_tenant {
        return Err(Skip::TenantMismatch { event: tenant, topic: topic_tenant.to_string() });
    }
    let name = format!("{tenant}:{device}");
    if parse_device(&name, charset).is_err() {
        return Err(Skip::InvalidDevice(name));
    }
    Ok(if event.event == "remove" { Change::Removed(name) } else { Change::Created(name) })
}

/// The removed devices. One `Box<str>` per device: see README (memory).
#[derive(Debug, Default)]
pub struct RemovedSet {
    devices: HashSet<Box<str>>,
}

impl RemovedSet {
    /// Applies a change; whether the device is newly removed (its sessions must go).
    pub fn apply(&mut self, change: &Change) -> bool {
        match change {
            Change::Removed(device) => self.devices.insert(device.as_str().into()),
            Change::Created(device) => {
                self.devices.remove(device.as_str());
                false
            }
            Change::Unrelated => false,
        }
    }

    pub fn contains(&self, device: &str) -> bool {
        self.devices.contains(device)
    }

    pub fn len(&self) -> usize {
        self.devices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const SUFFIX: &str = "dojot.device-manager.device";
    const TOPIC: &str = "admin.dojot.device-manager.device";

    fn read(topic: &str, value: &serde_json::Value) -> Result<Change, Skip> {
        interpret(topic, SUFFIX, value.to_string().as_bytes(), &IdCharset::default())
    }

    fn event(event: &str, tenant: &str, id: &str) -> serde_json::Value {
        json!({"event": event, "meta": {"service": tenant}, "data": {"id": id, "attrs": {}}})
    }

    #[test]
    fn remove_then_create_clears() {
        let mut set = RemovedSet::default();
        let removed = read(TOPIC, &event("remove", "admin", "a1998e")).unwrap();
        assert_eq!(removed, Change::Removed("admin:a1998e".into()));
        assert!(set.apply(&removed));
        assert!(!set.apply(&removed), "removed twice: nothing new to disconnect");
        assert!(set.contains("admin:a1998e"));
        assert!(!set.apply(&read(TOPIC, &event("create", "admin", "a1998e")).unwrap()));
        assert!(!set.contains("admin:a1998e"));
        assert!(set.is_empty());
    }

    #[test]
    fn other_events_change_nothing() {
        for e in ["configure", "update", "template.update", "Remove"] {
            assert_eq!(read(TOPIC, &event(e, "admin", "a1")).unwrap(), Change::Unrelated, "{e}");
        }
    }

    #[test]
    fn an_event_for_another_tenant_is_skipped() {
        let err = read(TOPIC, &event("remove", "other", "a1")).unwrap_err();
        assert_eq!(err.reason(), SkipReason::TenantMismatch);
        let err = read("other.dojot.device-manager.device", &event("create", "admin", "a1")).unwrap_err();
        assert_eq!(err.reason(), SkipReason::TenantMismatch);
        // A tenant that is a suffix or prefix of the topic's does not pass either.
        assert_eq!(read(TOPIC, &event("remove", "dmin", "a1")).unwrap_err().reason(), SkipReason::TenantMismatch);
        assert_eq!(
            read("x.admin.dojot.device-manager.device", &event("remove", "admin", "a1")).unwrap_err().reason(),
            SkipReason::TenantMismatch
        );
    }

    #[test]
    fn malformed_events_are_skipped() {
        for bad in [
            b"".as_slice(),
            b"not json",
            b"[]",
            br#"{"event":7}"#,
            br#"{"event":"remove"}"#,
            br#"{"event":"remove","meta":{"service":"admin"}}"#,
            br#"{"event":"remove","meta":{"service":"admin"},"data":{"id":5}}"#,
        ] {
            let err = interpret(TOPIC, SUFFIX, bad, &IdCharset::default()).unwrap_err();
            assert_eq!(err.reason(), SkipReason::Malformed, "{}", String::from_utf8_lossy(bad));
        }
        assert_eq!(read(TOPIC, &event("remove", "admin", "a:b")).unwrap_err().reason(), SkipReason::InvalidDevice);
        assert_eq!(read(TOPIC, &event("remove", "admin", "")).unwrap_err().reason(), SkipReason::InvalidDevice);
        assert_eq!(read("admin.other-topic", &event("remove", "admin", "a1")).unwrap_err().reason(), SkipReason::Topic);
        assert_eq!(
            read(".dojot.device-manager.device", &event("remove", "", "a1")).unwrap_err().reason(),
            SkipReason::Topic
        );
    }
}
