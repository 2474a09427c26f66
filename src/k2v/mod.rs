//! Commands to devices (K2V): device-manager events consumed from Kafka, each device's configuration published to
//! `<tenant>:<device>/config` through the service's MQTT client, offsets committed only after the broker's PUBACK.

mod config;
pub mod event;

pub use config::K2vArgs;
