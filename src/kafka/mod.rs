//! Kafka clients (rdkafka with its bundled librdkafka). The only module that imports rdkafka.

pub mod consumer;
pub mod lease;
mod offsets;
pub mod producer;
pub mod removed;
pub mod topics;

use rdkafka::config::RDKafkaLogLevel;

/// A librdkafka log line as a tracing event at its level, prefixed with `client` (which of the clients said it).
fn log(client: &str, level: RDKafkaLogLevel, facility: &str, message: &str) {
    match level {
        RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical | RDKafkaLogLevel::Error => {
            tracing::error!(facility, "{client}: {message}");
        }
        RDKafkaLogLevel::Warning => tracing::warn!(facility, "{client}: {message}"),
        _ => tracing::debug!(facility, "{client}: {message}"),
    }
}
