//! Kafka clients (rdkafka with its bundled librdkafka). The only module that imports rdkafka.

pub mod consumer;
pub mod lease;
mod offsets;
pub mod producer;
pub mod removed;
pub mod topics;
