//! Which tenants have a device-data topic: the `<tenant>.<suffix>` topics in Kafka's metadata, refreshed
//! periodically, so that devices of tenants whose data has nowhere to go are refused at connect; and which have a
//! dead-letter topic (`<tenant>.<suffix>.dead-letter`), so that a dead letter with nowhere to go is not waited for.

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

/// The tenants whose topics existed at the last successful refresh.
#[derive(Debug)]
pub struct TenantTopics {
    /// `.<suffix>`
    data_suffix: String,
    /// `.<suffix>.dead-letter`
    dead_letter_suffix: String,
    known: RwLock<Option<Known>>,
}

#[derive(Debug, Default)]
struct Known {
    /// Tenants with a data topic.
    data: HashSet<Box<str>>,
    /// Tenants with a dead-letter topic.
    dead_letter: HashSet<Box<str>>,
}

impl TenantTopics {
    /// `suffix` is the produce suffix (`device-data`): `<tenant>.<suffix>` names a tenant's data topic,
    /// `<tenant>.<suffix>.dead-letter` its dead-letter topic.
    pub fn new(suffix: &str) -> Self {
        Self {
            data_suffix: format!(".{suffix}"),
            dead_letter_suffix: format!(".{suffix}.dead-letter"),
            known: RwLock::new(None),
        }
    }

    pub fn is_loaded(&self) -> bool {
        self.known.read().is_some()
    }

    /// Whether the tenant's data topic exists: a known tenant.
    pub fn status(&self, tenant: &str) -> TenantStatus {
        self.lookup(tenant, |known| &known.data)
    }

    /// Whether the tenant's dead-letter topic exists.
    pub fn dead_letter_status(&self, tenant: &str) -> TenantStatus {
        self.lookup(tenant, |known| &known.dead_letter)
    }

    fn lookup(&self, tenant: &str, set: impl Fn(&Known) -> &HashSet<Box<str>>) -> TenantStatus {
        match &*self.known.read() {
            None => TenantStatus::NotLoaded,
            Some(known) if set(known).contains(tenant) => TenantStatus::Known,
            Some(_) => TenantStatus::Unknown,
        }
    }

    /// Replaces the sets with the tenants of these topic names; returns how many tenants have a data topic.
    pub fn update<'a>(&self, topics: impl IntoIterator<Item = &'a str>) -> usize {
        let mut known = Known::default();
        for topic in topics {
            let (set, tenant) = match topic.strip_suffix(self.dead_letter_suffix.as_str()) {
                Some(tenant) => (&mut known.dead_letter, tenant),
                None => match topic.strip_suffix(self.data_suffix.as_str()) {
                    Some(tenant) => (&mut known.data, tenant),
                    None => continue,
                },
            };
            if !tenant.is_empty() {
                set.insert(Box::from(tenant));
            }
        }
        let count = known.data.len();
        *self.known.write() = Some(known);
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
        assert_eq!(topics.dead_letter_status("admin"), TenantStatus::Known);
        assert_eq!(topics.dead_letter_status("x.y"), TenantStatus::Unknown, "a data topic only");
        assert_eq!(topics.update(["acme.device-data.dead-letter"]), 0, "a dead-letter topic makes no tenant known");
        assert_eq!(topics.status("acme"), TenantStatus::Unknown);
        assert_eq!(topics.dead_letter_status("acme"), TenantStatus::Known);
        assert_eq!(topics.update([]), 0);
        assert_eq!(topics.status("admin"), TenantStatus::Unknown, "a deleted topic is forgotten");
    }
}
