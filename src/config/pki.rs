//! `PKI_*` settings and the certificate upkeep schedules (ARCHITECTURE.md), validated into `pki` types.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use super::{ConfigError, invalid};
use crate::pki::{self, ApiSettings, UpkeepSettings, Users};
use crate::policy::IdCharset;
use crate::schedule::Schedule;
use crate::secret::Secret;

/// The development PKI: CA store, HTTP API, certificate upkeep.
#[derive(Debug, Clone, clap::Args)]
pub struct PkiArgs {
    /// Directory of the CA store: public output (ca.crt, crl.pem, server.*, service.*) and `ca/` (CA key, index).
    #[arg(long, env = "PKI_DIR", default_value = "/pki")]
    pub pki_dir: PathBuf,

    /// Address of the PKI HTTP API (the seed's /auth, /user, /sign, /ca). Unset: no API and no certificate upkeep.
    #[arg(long, env = "PKI_LISTEN")]
    pub pki_listen: Option<SocketAddr>,

    /// Users of the PKI API: comma-separated `name:password` or `name:$argon2id$…` (a PHC hash).
    #[arg(long, env = "PKI_USERS", hide_env_values = true)]
    pub pki_users: Option<Secret>,

    /// Name (and CN) of the CA, as in `GET /ca/<name>`.
    #[arg(long, env = "PKI_CA_NAME", default_value = "IOTmidCA")]
    pub pki_ca_name: String,

    /// Validity of issued certificates, in days.
    #[arg(long, env = "PKI_CERT_DAYS", default_value_t = 365, value_parser = clap::value_parser!(u32).range(1..=3650))]
    pub pki_cert_days: u32,

    /// Validity of a newly created CA, in days.
    #[arg(long, env = "PKI_CA_DAYS", default_value_t = 3650, value_parser = clap::value_parser!(u32).range(1..=36500))]
    pub pki_ca_days: u32,

    /// nextUpdate of the CRL, in days from each write.
    #[arg(long, env = "PKI_CRL_DAYS", default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..=365))]
    pub pki_crl_days: u32,

    /// subjectAltNames of the broker's certificate (space or comma separated; the first is also its CN).
    #[arg(long, env = "PKI_SERVER_NAMES", default_value = "vernemq localhost 127.0.0.1")]
    pub pki_server_names: String,

    /// subjectAltNames of the service's HTTPS webhook certificate (the host in VerneMQ's endpoint URLs; the first is
    /// also its CN).
    #[arg(long, env = "PKI_WEBHOOK_NAMES", default_value = "iotagent-mqtt localhost 127.0.0.1")]
    pub pki_webhook_names: String,

    /// Lifetime of the API's tokens (`1h`, `15m`).
    #[arg(long, env = "PKI_TOKEN_TTL", default_value = "1h", value_parser = humantime::parse_duration)]
    pub pki_token_ttl: Duration,

    /// Owner of the broker's key when run as root (VerneMQ's image runs as 10000).
    #[arg(long, env = "PKI_BROKER_UID", default_value_t = 10000)]
    pub pki_broker_uid: u32,

    /// Owner of the store and the service's key when run as root (the service's image runs as 10001).
    #[arg(long, env = "PKI_SERVICE_UID", default_value_t = 10001)]
    pub pki_service_uid: u32,

    /// When to rewrite the CRL VerneMQ reads (duration or cron expression).
    #[arg(long, env = "CRL_UPDATE_TIME", default_value = "1h")]
    pub crl_update_time: String,

    /// When to check the broker's and the service's certificates for expiry (duration or cron expression).
    #[arg(long, env = "CHECK_EXPIRATION_TIME", default_value = "1h")]
    pub check_expiration_time: String,

    /// Renew a certificate that expires within this many seconds (also used by `pki init`).
    #[arg(long, env = "CHECKEND_EXPIRATION_SEC", default_value_t = 30 * 24 * 3600)]
    pub checkend_expiration_sec: u64,

    /// When to check whether the broker's or the service's certificate was revoked (duration or cron expression).
    #[arg(long, env = "CHECK_BROKER_CERT_REVOKED_TIME", default_value = "1h")]
    pub check_broker_cert_revoked_time: String,
}

/// The PKI's part of the service: the store, its API and the upkeep schedules.
#[derive(Debug)]
pub struct PkiParts {
    pub store: pki::Settings,
    pub api: ApiSettings,
    pub upkeep: UpkeepSettings,
}

impl PkiArgs {
    /// The PKI's settings when PKI_LISTEN is set (the API and the upkeep run together).
    ///
    /// # Errors
    /// The first invalid PKI value.
    pub fn parts(&self, service_name: &str, id_charset: IdCharset) -> Result<Option<PkiParts>, ConfigError> {
        let Some(api) = self.api()? else { return Ok(None) };
        Ok(Some(PkiParts { store: self.settings(service_name, id_charset)?, api, upkeep: self.upkeep()? }))
    }

    /// The store's settings; `service_name` is MQTT_USERNAME, `id_charset` the ACL's.
    ///
    /// # Errors
    /// An empty CA name or server name list.
    pub fn settings(&self, service_name: &str, id_charset: IdCharset) -> Result<pki::Settings, ConfigError> {
        let server_names: Vec<String> =
            self.pki_server_names.split([' ', ',']).filter(|n| !n.is_empty()).map(String::from).collect();
        if server_names.is_empty() {
            return Err(invalid("PKI_SERVER_NAMES", "needs at least one name"));
        }
        let webhook_names: Vec<String> =
            self.pki_webhook_names.split([' ', ',']).filter(|n| !n.is_empty()).map(String::from).collect();
        if webhook_names.is_empty() {
            return Err(invalid("PKI_WEBHOOK_NAMES", "needs at least one name"));
        }
        if self.pki_ca_name.trim().is_empty() || self.pki_ca_name.contains('/') {
            return Err(invalid("PKI_CA_NAME", "must be non-empty and contain no '/'"));
        }
        if service_name.is_empty() || service_name.contains(':') {
            return Err(invalid("MQTT_USERNAME", "must be non-empty and contain no ':'"));
        }
        let mut settings = pki::Settings::with_defaults(self.pki_dir.clone());
        settings.ca_name = self.pki_ca_name.clone();
        settings.cert_days = self.pki_cert_days;
        settings.ca_days = self.pki_ca_days;
        settings.crl_days = self.pki_crl_days;
        settings.server_names = server_names;
        settings.webhook_names = webhook_names;
        settings.service_name = service_name.to_string();
        settings.id_charset = id_charset;
        settings.renew_before = Duration::from_secs(self.checkend_expiration_sec);
        settings.broker_uid = Some(self.pki_broker_uid);
        settings.service_uid = Some(self.pki_service_uid);
        Ok(settings)
    }

    /// The API's settings when PKI_LISTEN is set.
    ///
    /// # Errors
    /// PKI_LISTEN without PKI_USERS, or malformed users.
    pub fn api(&self) -> Result<Option<ApiSettings>, ConfigError> {
        if self.pki_listen.is_none() {
            return Ok(None);
        }
        let users =
            self.pki_users.as_ref().ok_or_else(|| invalid("PKI_USERS", "PKI_LISTEN needs at least one user"))?;
        let users = Users::parse(users.expose()).map_err(|e| invalid("PKI_USERS", e.to_string()))?;
        if users.is_empty() {
            return Err(invalid("PKI_USERS", "PKI_LISTEN needs at least one user"));
        }
        Ok(Some(ApiSettings { users, token_ttl: self.pki_token_ttl }))
    }

    /// The upkeep schedules.
    ///
    /// # Errors
    /// A schedule that is neither a duration nor a cron expression.
    pub fn upkeep(&self) -> Result<UpkeepSettings, ConfigError> {
        let parse = |variable: &'static str, text: &str| -> Result<Schedule, ConfigError> {
            text.parse().map_err(|e: crate::schedule::ScheduleError| invalid(variable, e.to_string()))
        };
        Ok(UpkeepSettings {
            crl_update: parse("CRL_UPDATE_TIME", &self.crl_update_time)?,
            check_expiration: parse("CHECK_EXPIRATION_TIME", &self.check_expiration_time)?,
            check_revoked: parse("CHECK_BROKER_CERT_REVOKED_TIME", &self.check_broker_cert_revoked_time)?,
        })
    }
}

/// `iotagent-mqtt pki …`: only the PKI's own settings are read, not the service's.
#[derive(Debug, Parser)]
#[command(name = "iotagent-mqtt pki", about = "The development PKI (CA store in PKI_DIR)")]
struct PkiCli {
    #[command(subcommand)]
    command: pki::cli::Command,

    #[command(flatten)]
    pki: PkiArgs,

    /// The service's MQTT username: CN of its certificate.
    #[arg(long, env = "MQTT_USERNAME", default_value = "k2v-bridge")]
    mqtt_username: String,

    /// Characters allowed in device ids [default: A-Za-z0-9_.-].
    #[arg(long, env = "DEVICE_ID_CHARS")]
    device_id_chars: Option<String>,

    /// Characters allowed in tenant ids, never `.` [default: A-Za-z0-9_-].
    #[arg(long, env = "TENANT_ID_CHARS")]
    tenant_id_chars: Option<String>,
}

/// Parses `args` (starting at `pki`) and runs the command.
pub fn cli(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let parsed = match PkiCli::try_parse_from(args) {
        Ok(parsed) => parsed,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(2) } else { ExitCode::SUCCESS };
        }
    };
    let charset = match &parsed.device_id_chars {
        Some(chars) => IdCharset::from_chars(chars).map_err(|e| invalid("DEVICE_ID_CHARS", e)),
        None => Ok(IdCharset::default()),
    }
    .and_then(|charset| match &parsed.tenant_id_chars {
        Some(chars) => charset.with_tenant_chars(chars).map_err(|e| invalid("TENANT_ID_CHARS", e)),
        None => Ok(charset),
    });
    match charset.and_then(|charset| parsed.pki.settings(&parsed.mqtt_username, charset)) {
        Ok(settings) => pki::cli::run(&parsed.command, &pki::Store::new(settings)),
        Err(e) => {
            eprintln!("pki: {e}");
            ExitCode::from(2)
        }
    }
}
