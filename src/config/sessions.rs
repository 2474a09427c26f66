//! Live session control options (VERNEMQ_API_URL, VERNEMQ_API_KEY, CRL_FILE, CRL_UPDATE_TIME, ADMIN_TOKEN), validated
//! into `sessions::Settings`.

use std::path::PathBuf;

use super::{ConfigError, invalid};
use crate::policy::IdCharset;
use crate::schedule::Schedule;
use crate::secret::Secret;
use crate::sessions::{Settings, VernemqApi};

#[derive(Debug, Clone, clap::Args)]
pub struct SessionsArgs {
    /// VerneMQ's HTTP API (`http://vernemq:8888`), to disconnect removed and revoked sessions. Unset: they are only
    /// refused at their next connection.
    #[arg(long, env = "VERNEMQ_API_URL")]
    pub vernemq_api_url: Option<String>,

    /// API key (scope mgmt) sent as `x-api-key`.
    #[arg(long, env = "VERNEMQ_API_KEY", hide_env_values = true)]
    pub vernemq_api_key: Option<Secret>,

    /// The CRL file VerneMQ uses (`crlfile`): sessions whose certificate it lists are closed.
    #[arg(long, env = "CRL_FILE")]
    pub crl_file: Option<PathBuf>,

    /// Bearer token of the /admin routes; unset: the routes are off.
    #[arg(long, env = "ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<Secret>,

    /// Disconnect calls to VerneMQ's API in flight at once.
    #[arg(long, env = "DISCONNECT_CONCURRENCY", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub disconnect_concurrency: u16,
}

impl SessionsArgs {
    /// # Errors
    /// A malformed URL or schedule, or an empty secret, naming the variable.
    /// `crl_schedule` is CRL_UPDATE_TIME (the PKI writes the CRL on it, this part re-reads CRL_FILE on it as well as
    /// on change); `k2v_topic_suffix`/`topic_pattern` name the device-manager topics the removed devices come from.
    pub fn settings(
        &self,
        id_charset: IdCharset,
        k2v_topic_suffix: &str,
        topic_pattern: String,
        crl_schedule: Schedule,
        lifetimes: bool,
    ) -> Result<Settings, ConfigError> {
        for (variable, secret) in [("VERNEMQ_API_KEY", &self.vernemq_api_key), ("ADMIN_TOKEN", &self.admin_token)] {
            if secret.as_ref().is_some_and(|s| s.expose().is_empty()) {
                return Err(invalid(variable, "is empty; unset it instead"));
            }
        }
        let api = self
            .vernemq_api_url
            .as_deref()
            .map(|url| VernemqApi::new(url, self.vernemq_api_key.clone()))
            .transpose()
            .map_err(|e| invalid("VERNEMQ_API_URL", e.to_string()))?;
        Ok(Settings {
            api,
            crl_file: self.crl_file.clone(),
            crl_schedule,
            admin_token: self.admin_token.clone(),
            disconnect_concurrency: usize::from(self.disconnect_concurrency),
            topic_suffix: k2v_topic_suffix.to_string(),
            topic_pattern,
            id_charset,
            lifetimes,
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn parse(args: &[&str]) -> Config {
        crate::config::parse(args).unwrap()
    }

    #[test]
    fn defaults_are_off() {
        let s = parse(&[]).settings().unwrap().sessions;
        assert!(s.api.is_none() && s.crl_file.is_none() && s.admin_token.is_none());
    }

    #[test]
    fn bad_values_name_their_variable() {
        let variable = |args: &[&str]| parse(args).settings().unwrap_err().variable;
        assert_eq!(variable(&["--vernemq-api-url", "https://v:8888"]), "VERNEMQ_API_URL");
        assert_eq!(variable(&["--crl-update-time", "soon"]), "CRL_UPDATE_TIME");
        assert_eq!(variable(&["--admin-token", ""]), "ADMIN_TOKEN");
    }

    #[test]
    fn secrets_never_printed() {
        let c = parse(&[
            "--vernemq-api-key",
            "k3y-secret",
            "--admin-token",
            "t0k3n-secret",
            "--vernemq-api-url",
            "http://v:8888",
        ]);
        let s = c.settings().unwrap().sessions;
        let printed = format!("{c:?} {s:?}");
        assert!(!printed.contains("k3y-secret") && !printed.contains("t0k3n-secret"), "{printed}");
    }
}
