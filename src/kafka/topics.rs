//! Which tenants have a device-data topic: the `<tenant>.<suffix>` topics in Kafka's metadata, refreshed
//! periodically, so that devices of tenants whose data has nowhere to go are refused at connect.

use std::collections::HashSet;

use parking_lot::RwLock;
use rdkafka::error::KafkaError;

use super::producer::Producer;

/// Whether a tenant's data topic exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TenantStatus {
    Known,
    Unknown,
    /// Kafka has not answered a metadata request since the start: nothing is known yet.
    NotLoaded,
}

/// The tenants whose `<tenant>.<suffix>` topic existed at the last successful refresh.
#[derive(Debug)]
pub struct TenantTopics {
    suffix: String,
    known: RwLock<Option<HashSet<Box<str>>>>,
}

impl TenantTopics {
    /// `suffix` is the produce suffix (`device-data`): `<tenant>.<suffix>` names a tenant's data topic.
    pub fn new(suffix: &str) -> Self {
        Self { suffix: format!(".{suffix}"), known: RwLock::new(None) }
    }

    pub fn is_loaded(&self) -> bool {
        self.known.read().is_some()
    }

    pub fn status(&self, tenant: &str) -> TenantStatus {
        match &*self.known.read() {
            None => TenantStatus::NotLoaded,
            Some(set) if set.contains(tenant) => TenantStatus::Known,
            Some(_) => TenantStatus::Unknown,
        }
    }

    /// Replaces the set with the tenants of these topic names; returns how many there are.
    pub fn update<'a>(&self, topics: impl IntoIterator<Item = &'a str>) -> usize {
        let set: HashSet<Box<str>> = topics
            .into_iter()
            .filter_map(|t| t.strip_suffix(self.suffix.as_str()))
            .filter(|t| !t.is_empty())
            .map(Box::from)
            .collect();
        let count = set.len();
        *self.known.write() = Some(set);
        count
    }

    /// Asks Kafka for every topic's name and updates the set; on error the last set stays.
    ///
    /// # Errors
    /// The metadata request failed.
    pub async fn refresh(&self, producer: &Producer) -> Result<usize, KafkaError> {
        let names = producer.topic_names().await?;
        Ok(self.update(names.iter().map(String::as_str)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenants_are_the_prefixes_of_data_topics() {
        let topics = TenantTopics::new("device-data");
        assert_eq!(topics.status("admin"), TenantStatus::NotLoaded);
        let names =
            ["admin.device-data", "admin.device-data.dead-letter", "acme.other", ".device-data", "x.y.device-data"];
        assert_eq!(topics.update(names), 2);
        assert_eq!(topics.status("admin"), TenantStatus::Known);
        assert_eq!(topics.status("x.y"), TenantStatus::Known);
        assert_eq!(topics.status("acme"), TenantStatus::Unknown);
        assert_eq!(topics.update([]), 0);
        assert_eq!(topics.status("admin"), TenantStatus::Unknown, "a deleted topic is forgotten");
    }
}
