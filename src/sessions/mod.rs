//! Live session control: the device sessions connected to this VerneMQ node, and closing those whose device was
//! removed or whose certificate was revoked, through VerneMQ's HTTP API (README "Live session control").

pub mod admin;
mod control;
pub mod crl;
mod disconnect;
mod metrics;
pub mod registry;
pub mod removed;
mod tasks;
pub mod vernemq_api;

use std::path::PathBuf;

use crate::policy::IdCharset;
use crate::schedule::Schedule;
use crate::secret::Secret;
pub use control::SessionRegistry;
pub use tasks::{start, start_removed_reader};
pub use vernemq_api::VernemqApi;

/// What live session control needs, validated (`config/sessions.rs`).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Without it nothing is disconnected; removed and revoked devices are still refused at connect.
    pub api: Option<VernemqApi>,
    pub crl_file: Option<PathBuf>,
    pub crl_schedule: Schedule,
    pub admin_token: Option<Secret>,
    pub disconnect_concurrency: usize,
    /// `<tenant>.<suffix>` topics carry device-manager events (K2V's suffix).
    pub topic_suffix: String,
    /// The regex subscription for that suffix.
    pub topic_pattern: String,
    pub id_charset: IdCharset,
    /// Whether device sessions get a connection lifetime (then entries expire with it and no other hook is needed).
    pub lifetimes: bool,
}

#[cfg(test)]
mod tests;
