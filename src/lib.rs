//! iotagent-mqtt: the MQTT device gateway that runs beside stock VerneMQ and is called by it through `vmq_webhooks`.
//!
//! # Layout
//! - [`policy`]: the access rules, pure and exhaustively tested.
//! - [`webhooks`]: one module per hook family, translating VerneMQ's wire format to the policy and back.
//! - [`v2k`]: device data into Kafka (dojot contract, delivery modes); [`k2v`]: commands from Kafka to devices.
//! - [`kafka`], [`mqtt`]: the only modules that talk to rdkafka and rumqttc.
//! - [`sessions`]: live session control: the node's sessions, removed devices, revoked certificates, disconnects.
//! - [`cert`]: reading the client certificates VerneMQ forwards; [`service_certs`]: the service's own, pinned.
//! - [`http_tls`]: the HTTPS webhook listener (client certificates required); [`log_guard`]: bounded denial logs.
//! - [`http`], [`readiness`], [`metrics`], [`telemetry`]: the operational surface; [`healthcheck`]: the container
//!   health check (`iotagent-mqtt healthcheck`).
//! - [`pki`]: the development CA, its HTTP API and certificate upkeep (`iotagent-mqtt pki`).
//! - [`config`]: flags and environment variables, translated into each module's settings (the top layer, with
//!   [`app`]: start and stop order); [`shutdown`]: the shutdown budget; [`secret`]: values kept out of logs.

#![forbid(unsafe_code)]
// Items `pub` in a module that is not part of the library's API would hide dead code from rustc.
#![warn(unreachable_pub)]

mod app;
mod backoff;
pub mod cert;
pub mod config;
mod file_watch;
pub mod healthcheck;
mod http;
mod http_tls;
pub mod k2v;
pub mod kafka;
mod log_guard;
pub mod metrics;
pub mod mqtt;
mod ordered;
mod own_runtime;
pub mod pki;
pub mod policy;
pub mod readiness;
mod schedule;
pub mod secret;
mod service_certs;
pub mod sessions;
pub mod shutdown;
pub mod telemetry;
mod v2k;
pub mod webhooks;

pub use app::{Listeners, run};
pub use config::Config;
