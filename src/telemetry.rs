//! Logging: JSON lines by default (one object per event, for log shippers), plain text for humans.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber; `RUST_LOG` overrides the default `info` level.
pub fn init(format: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    // A second init (tests that start several services) keeps the first subscriber.
    let _ = if format == "json" { builder.json().flatten_event(true).try_init() } else { builder.try_init() };
}
