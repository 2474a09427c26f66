//! Webhook options, validated into [`CachePolicy`], the body limit and the HTTPS listener's files.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::{ConfigError, invalid};
use crate::http_tls::TlsSettings;
use crate::webhooks::CachePolicy;

/// What VerneMQ may cache and how large a request may be.
#[derive(Debug, Clone, clap::Args)]
pub struct WebhookArgs {
    /// `cache-control: max-age` (seconds) on allowed publish and subscribe decisions where caching is safe; 0 = off.
    #[arg(long, env = "WEBHOOK_CACHE_MAX_AGE", default_value_t = 300)]
    pub webhook_cache_max_age: u32,

    /// `cache-control: max-age` on accepted registrations; 0 (default) so a removed device cannot reconnect from
    /// VerneMQ's cache.
    #[arg(long, env = "REGISTER_CACHE_MAX_AGE", default_value_t = 0)]
    pub register_cache_max_age: u32,

    /// Seconds a webhook connection may stay idle, or in an unfinished request head, before it is closed. Above
    /// VerneMQ's `vmq_webhooks.pool_timeout` (60 s) so that VerneMQ closes its idle pooled connections first: a call
    /// sent just as the service closed the connection would fail, and VerneMQ counts a failed call as a denial.
    #[arg(long, env = "WEBHOOK_IDLE_TIMEOUT", default_value_t = 65, value_parser = clap::value_parser!(u32).range(1..=3600))]
    pub webhook_idle_timeout: u32,

    /// Seconds between clears of VerneMQ's webhook cache through its API (VERNEMQ_API_URL), which VerneMQ 2.1 never
    /// prunes by itself; 0 = never.
    #[arg(long, env = "WEBHOOK_CACHE_CLEAR_INTERVAL", default_value_t = 3600)]
    pub webhook_cache_clear_interval: u32,

    /// Threads that serve the webhooks (their own runtime, apart from K2V and the V2K subscription). One serves far
    /// more calls than a VerneMQ node makes, and a second one costs CPU per call in wake-ups between the two.
    #[arg(long, env = "WEBHOOK_THREADS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub webhook_threads: u16,

    /// Largest webhook request body accepted (bytes); larger ones are refused with 400.
    #[arg(long, env = "WEBHOOK_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    pub webhook_max_body_bytes: usize,

    /// Address of the HTTPS webhook listener, served when IOTAGENT_TLS_CERT_FILE is set.
    #[arg(long, env = "IOTAGENT_TLS_LISTEN", default_value = "0.0.0.0:8443")]
    pub tls_listen: SocketAddr,

    /// Server certificate (PEM, chain after it) of the HTTPS listener; its SAN names the host VerneMQ calls.
    #[arg(long, env = "IOTAGENT_TLS_CERT_FILE")]
    pub tls_cert_file: Option<PathBuf>,

    /// Its key (PEM).
    #[arg(long, env = "IOTAGENT_TLS_KEY_FILE")]
    pub tls_key_file: Option<PathBuf>,

    /// CA certificates (PEM) that sign the client certificate VerneMQ presents; every client must present one.
    #[arg(long, env = "IOTAGENT_TLS_CLIENT_CA_FILE")]
    pub tls_client_ca_file: Option<PathBuf>,

    /// Common names the client certificate may have (comma separated; empty: any that CA signed). The PKI's CA also
    /// signs devices: only the broker's name gets in.
    #[arg(long, env = "IOTAGENT_TLS_CLIENT_NAMES", default_value = "vernemq", value_delimiter = ',')]
    pub tls_client_names: Vec<String>,
}

impl WebhookArgs {
    /// The HTTPS listener's files, when IOTAGENT_TLS_CERT_FILE is set: all three or none.
    ///
    /// # Errors
    /// One file given without the others.
    pub fn tls(&self) -> Result<Option<TlsSettings>, ConfigError> {
        match (&self.tls_cert_file, &self.tls_key_file, &self.tls_client_ca_file) {
            (None, None, None) => Ok(None),
            (Some(cert), Some(key), Some(client_ca)) => {
                let client_names =
                    self.tls_client_names.iter().map(|n| n.trim().to_string()).filter(|n| !n.is_empty()).collect();
                Ok(Some(TlsSettings {
                    cert: cert.clone(),
                    key: key.clone(),
                    client_ca: client_ca.clone(),
                    client_names,
                }))
            }
            (_, None, _) => Err(invalid("IOTAGENT_TLS_KEY_FILE", "HTTPS needs the certificate, key and client CA")),
            (None, _, _) => Err(invalid("IOTAGENT_TLS_CERT_FILE", "HTTPS needs the certificate, key and client CA")),
            // Without client verification anyone reaching the port would be VerneMQ: never serve that.
            (_, _, None) => {
                Err(invalid("IOTAGENT_TLS_CLIENT_CA_FILE", "HTTPS webhooks require client certificates: set their CA"))
            }
        }
    }

    /// Which decisions VerneMQ may cache, and for how long.
    pub fn cache(&self) -> CachePolicy {
        let max_age = |seconds: u32| (seconds > 0).then_some(seconds);
        let (register, publish) = (max_age(self.register_cache_max_age), max_age(self.webhook_cache_max_age));
        let caching = register.is_some() || publish.is_some();
        CachePolicy {
            register,
            publish,
            subscribe: publish,
            clear_every: (caching && self.webhook_cache_clear_interval > 0)
                .then(|| Duration::from_secs(u64::from(self.webhook_cache_clear_interval))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::parse;

    #[test]
    fn the_cache_is_cleared_hourly_only_while_anything_is_cached() {
        let clear = |args: &[&str]| parse(args).unwrap().webhooks.cache().clear_every.map(|d| d.as_secs());
        assert_eq!(clear(&[]), Some(3600));
        assert_eq!(clear(&["--webhook-cache-clear-interval", "60"]), Some(60));
        assert_eq!(clear(&["--webhook-cache-clear-interval", "0"]), None);
        assert_eq!(clear(&["--webhook-cache-max-age", "0"]), None);
        assert_eq!(clear(&["--webhook-cache-max-age", "0", "--register-cache-max-age", "5"]), Some(3600));
    }

    #[test]
    fn tls_files_go_together() {
        assert!(parse(&[]).unwrap().webhooks.tls().unwrap().is_none());
        let all = ["--tls-cert-file", "c", "--tls-key-file", "k", "--tls-client-ca-file", "ca"];
        let tls = parse(&all).unwrap().webhooks.tls().unwrap().unwrap();
        assert_eq!(tls.client_ca.to_str(), Some("ca"));
        assert_eq!(tls.client_names, ["vernemq"]);
        assert_eq!(parse(&all[..4]).unwrap().webhooks.tls().unwrap_err().variable, "IOTAGENT_TLS_CLIENT_CA_FILE");
        assert_eq!(parse(&all[2..]).unwrap().webhooks.tls().unwrap_err().variable, "IOTAGENT_TLS_CERT_FILE");
        assert_eq!(
            parse(&[&all[..2], &all[4..]].concat()).unwrap().webhooks.tls().unwrap_err().variable,
            "IOTAGENT_TLS_KEY_FILE"
        );
    }

    #[test]
    fn webhook_threads_default_to_one_and_are_bounded() {
        assert_eq!(parse(&[]).unwrap().webhooks.webhook_threads, 1);
        assert_eq!(parse(&["--webhook-threads", "4"]).unwrap().webhooks.webhook_threads, 4);
        for refused in ["0", "257", "-1", "many"] {
            assert!(parse(&["--webhook-threads", refused]).is_err(), "{refused}");
        }
    }
}
