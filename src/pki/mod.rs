//! The development PKI (ARCHITECTURE.md): a CA kept in `PKI_DIR`, the broker's and the service's certificates, device
//! certificates signed from CSRs, revocation and the CRL VerneMQ reads; `iotagent-mqtt pki` and an HTTP API use it.

mod api;
pub mod cli;
mod store;
mod upkeep;
mod users;
mod x509;

use std::path::PathBuf;
use std::time::Duration;

use crate::policy::IdCharset;

pub use api::{ApiSettings, serve};
pub use store::{Role, Store};
pub use upkeep::{UpkeepSettings, start as start_upkeep};
pub use users::Users;

/// What the CA store needs, validated (from `PKI_*` settings, `MQTT_USERNAME` and `DEVICE_ID_CHARS`).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Public output (`ca.crt`, `crl.pem`, `server.*`, `service.*`); the CA key and index live in `<dir>/ca/`.
    pub dir: PathBuf,
    /// The CA's common name, also the name under which the HTTP API serves it (`/ca/<name>`).
    pub ca_name: String,
    /// Validity of issued certificates (broker, service, devices).
    pub cert_days: u32,
    /// Validity of a newly created CA.
    pub ca_days: u32,
    /// How far ahead the CRL's nextUpdate is set; brokers built on OpenSSL refuse an expired CRL.
    pub crl_days: u32,
    /// subjectAltNames of the broker's certificate: IP addresses become IP entries, the rest DNS entries.
    pub server_names: Vec<String>,
    /// subjectAltNames of the service's HTTPS webhook certificate: the host VerneMQ's endpoint URLs name.
    pub webhook_names: Vec<String>,
    /// The service's MQTT username: CN of its certificate, and a name `sign` refuses.
    pub service_name: String,
    /// Which characters device ids may contain (the ACL's rule).
    pub id_charset: IdCharset,
    /// Certificates expiring within this window are issued again by `init` and the upkeep.
    pub renew_before: Duration,
    /// Owners given to the broker's and the service's keys when running as root (as the compose `pki` step does).
    pub broker_uid: Option<u32>,
    pub service_uid: Option<u32>,
    /// Group that may read the broker's key (0640): VerneMQ's, so that a key renewed by the service (not root, a
    /// member of that group) stays readable by the broker.
    pub broker_gid: Option<u32>,
}

impl Settings {
    /// Defaults for `dir` (as the CLI and the service use without any `PKI_*` variable).
    pub fn with_defaults(dir: PathBuf) -> Self {
        Self {
            dir,
            ca_name: "IOTmidCA".into(),
            cert_days: 365,
            ca_days: 3650,
            crl_days: 30,
            server_names: ["vernemq", "localhost", "127.0.0.1"].map(String::from).to_vec(),
            webhook_names: ["iotagent-mqtt", "localhost", "127.0.0.1"].map(String::from).to_vec(),
            service_name: "k2v-bridge".into(),
            id_charset: IdCharset::default(),
            renew_before: Duration::from_secs(30 * 24 * 3600),
            broker_uid: None,
            service_uid: None,
            broker_gid: None,
        }
    }
}

/// Why a PKI operation failed. `Request` errors are the caller's fault (bad CSR, refused identity, unknown serial);
/// the others are the store's.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{0}")]
    Request(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("no CA in {0}: run `iotagent-mqtt pki init` first")]
    NoCa(PathBuf),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("token key: {0}")]
    Token(String),
    #[error("openssl: {0}")]
    Crypto(#[from] openssl::error::ErrorStack),
    #[error("the index {path} is corrupt: {problem}")]
    Index { path: PathBuf, problem: String },
}

impl PkiError {
    fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| Self::Io { context, source }
    }
}
