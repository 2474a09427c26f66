//! Kafka clients (rdkafka with its bundled librdkafka). The only module that imports rdkafka.

/// A librdkafka log line as a tracing event at its level, prefixed with which client said it. A macro, so that the
/// event keeps the calling module as its target (what `RUST_LOG` filters on).
macro_rules! forward_log {
    ($client:literal, $level:expr, $facility:expr, $message:expr) => {{
        use rdkafka::config::RDKafkaLogLevel as L;
        let (facility, message) = ($facility, $message);
        match $level {
            L::Emerg | L::Alert | L::Critical | L::Error => tracing::error!(facility, "{}: {message}", $client),
            L::Warning => tracing::warn!(facility, "{}: {message}", $client),
            _ => tracing::debug!(facility, "{}: {message}", $client),
        }
    }};
}

pub mod consumer;
pub mod lease;
mod offsets;
pub mod producer;
pub mod relay;
pub mod removed;
pub mod topics;
