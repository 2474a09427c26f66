//! Logging: JSON lines by default (one object per event, for log shippers), plain text for humans; levels and filters
//! from RUST_LOG.

use std::ffi::OsString;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::{LevelFilter, ParseError};

/// A RUST_LOG the service refuses to start with.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("invalid value '{value}' for RUST_LOG: {source}")]
    Filter {
        value: String,
        #[source]
        source: ParseError,
    },
    #[error("invalid value for RUST_LOG: not UTF-8")]
    NotUnicode,
}

/// Installs the global subscriber, at the `info` level unless RUST_LOG says otherwise.
///
/// # Errors
/// RUST_LOG does not parse: refused rather than replaced by `info`, which would drop the operator's other directives
/// without a word.
pub fn init(format: &str) -> Result<(), TelemetryError> {
    let filter = filter(std::env::var_os(EnvFilter::DEFAULT_ENV))?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    // A second init (tests that start several services) keeps the first subscriber.
    let _ = if format == "json" { builder.json().flatten_event(true).try_init() } else { builder.try_init() };
    Ok(())
}

/// The filter RUST_LOG's value makes; unset or blank is `info` (a blank one would otherwise turn every log off).
fn filter(value: Option<OsString>) -> Result<EnvFilter, TelemetryError> {
    let value = value.map(OsString::into_string).transpose().map_err(|_| TelemetryError::NotUnicode)?;
    let builder = EnvFilter::builder().with_default_directive(LevelFilter::INFO.into());
    match value.as_deref().map(str::trim) {
        None | Some("") => Ok(builder.parse_lossy("")),
        Some(value) => builder.parse(value).map_err(|source| TelemetryError::Filter { value: value.into(), source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_log_is_parsed_or_refused() {
        let filter = |value: &str| filter(Some(value.into()));
        assert_eq!(filter("info,rdkafka=warn").unwrap().to_string(), "rdkafka=warn,info");
        for blank in [None, Some(""), Some("  ")] {
            assert_eq!(super::filter(blank.map(Into::into)).unwrap().to_string(), "info", "{blank:?}");
        }
        let refused = filter("info,rdkafka=verbose").unwrap_err().to_string();
        assert!(refused.starts_with("invalid value 'info,rdkafka=verbose' for RUST_LOG: "), "{refused}");
    }
}
