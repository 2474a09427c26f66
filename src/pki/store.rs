//! The CA store on disk: CA key and index under `<PKI_DIR>/ca/` (0700), public output beside it, every file written
//! atomically (temporary file, fsync, rename) so that the broker never reads half a certificate or CRL.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use openssl::pkey::{PKey, Private};
use openssl::x509::X509;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::x509::{self, Usage};
use super::{PkiError, Settings};
use crate::policy::parse_device;

/// Whose certificate an index entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The broker's server certificate (`server.crt`).
    Server,
    /// The service's own client certificate (`service.crt`).
    Service,
    /// A device certificate signed from a CSR.
    Device,
    /// The service's HTTPS webhook server certificate (`webhook.crt`, SAN = the host names VerneMQ calls).
    Webhook,
    /// The broker's client certificate for the HTTPS webhooks (`broker-client.crt`, CN `vernemq`).
    BrokerClient,
}

impl Role {
    fn file(self) -> &'static str {
        match self {
            Self::Server => "server",
            Self::Service => "service",
            Self::Device => "device",
            Self::Webhook => "webhook",
            Self::BrokerClient => "broker-client",
        }
    }
}

/// One certificate the CA issued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedCert {
    /// Upper-case hex.
    pub serial: String,
    pub cn: String,
    pub role: Role,
    /// Unix seconds.
    pub not_after: i64,
    /// Unix seconds; `None` while valid.
    pub revoked_at: Option<i64>,
}

/// The CA database: what was issued and revoked, the registered device identities, the last CRL number.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Index {
    crl_number: u64,
    entities: BTreeSet<String>,
    certificates: Vec<IssuedCert>,
}

/// A CA store in a directory. Operations lock it (within the process and across processes, so that `pki revoke`
/// from a shell and the running service do not lose each other's index updates).
#[derive(Debug)]
pub struct Store {
    settings: Settings,
    lock: Mutex<()>,
}

/// The loaded CA.
struct Ca {
    cert: X509,
    key: PKey<Private>,
}

const CA_SUBDIR: &str = "ca";

impl Store {
    pub fn new(settings: Settings) -> Self {
        Self { settings, lock: Mutex::new(()) }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    fn private_dir(&self) -> PathBuf {
        self.settings.dir.join(CA_SUBDIR)
    }

    fn index_path(&self) -> PathBuf {
        self.private_dir().join("index.json")
    }

    /// Path of a public output file (`ca.crt`, `crl.pem`, `server.crt`, …).
    pub fn path(&self, file: &str) -> PathBuf {
        self.settings.dir.join(file)
    }

    /// Whether `init` has run: the CA key exists.
    pub fn is_initialised(&self) -> bool {
        self.private_dir().join("ca.key").is_file()
    }

    /// Runs `f` holding the in-process mutex and an exclusive lock on `<dir>/ca/lock`.
    fn locked<T>(&self, f: impl FnOnce() -> Result<T, PkiError>) -> Result<T, PkiError> {
        // A poisoned mutex only means another operation panicked; the files are consistent (atomic renames).
        let _guard = self.lock.lock();
        let dir = self.private_dir();
        if !dir.is_dir() {
            return Err(PkiError::NoCa(self.settings.dir.clone()));
        }
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(dir.join("lock"))
            .map_err(PkiError::io("open the CA lock file"))?;
        lock.lock().map_err(PkiError::io("lock the CA"))?;
        f()
    }

    fn load_index(&self) -> Result<Index, PkiError> {
        let path = self.index_path();
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| PkiError::Index { path: path.clone(), problem: e.to_string() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Index::default()),
            Err(e) => Err(PkiError::Io { context: format!("read {}", path.display()), source: e }),
        }
    }

    fn save_index(&self, index: &Index) -> Result<(), PkiError> {
        let bytes = serde_json::to_vec_pretty(index)
            .map_err(|e| PkiError::Index { path: self.index_path(), problem: e.to_string() })?;
        self.write_atomic(&self.index_path(), &bytes, 0o600, self.settings.service_uid)
    }

    fn load_ca(&self) -> Result<Ca, PkiError> {
        let dir = self.private_dir();
        let (Ok(key), Ok(cert)) = (std::fs::read(dir.join("ca.key")), std::fs::read(dir.join("ca.crt"))) else {
            return Err(PkiError::NoCa(self.settings.dir.clone()));
        };
        Ok(Ca { key: PKey::private_key_from_pem(&key)?, cert: X509::from_pem(&cert)? })
    }

    /// Writes `bytes` to `path` through a temporary file in the same directory and a rename: readers see the old
    /// or the new content, never a mix. `owner` applies only when running as root.
    fn write_atomic(&self, path: &Path, bytes: &[u8], mode: u32, owner: Option<u32>) -> Result<(), PkiError> {
        self.write_atomic_shared(path, bytes, mode, owner, None)
    }

    /// [`Store::write_atomic`], the file's group set to `group` (root, or a member of that group, may do that).
    fn write_atomic_shared(
        &self,
        path: &Path,
        bytes: &[u8],
        mode: u32,
        owner: Option<u32>,
        group: Option<u32>,
    ) -> Result<(), PkiError> {
        let Some(name) = path.file_name() else {
            return Err(PkiError::Request(format!("{} is not a file path", path.display())));
        };
        let tmp = path.with_file_name(format!(".{}.tmp{}", name.to_string_lossy(), std::process::id()));
        let context = || format!("write {}", path.display());
        let result = (|| {
            let _ = std::fs::remove_file(&tmp);
            // Created with its final mode: a key is never readable by others, not even for a moment.
            let mut file = OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
            file.write_all(bytes)?;
            file.sync_all()?;
            // The umask may have narrowed the mode (a CRL must stay world-readable for the broker).
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
            let uid = owner.filter(|_| is_root());
            let gid = group.or(uid);
            if uid.is_some() || gid.is_some() {
                std::os::unix::fs::chown(&tmp, uid, gid)?;
            }
            std::fs::rename(&tmp, path)?;
            if let Some(parent) = path.parent() {
                File::open(parent)?.sync_all()?;
            }
            Ok(())
        })();
        result.map_err(|source| {
            let _ = std::fs::remove_file(&tmp);
            PkiError::Io { context: context(), source }
        })
    }

    /// Creates what is missing and keeps what exists and is valid: the CA, the broker's and the service's
    /// certificates (issued again when they expire within the renewal window, no longer match the CA or were
    /// revoked), then writes the CRL. Returns the roles whose certificates were issued.
    ///
    /// # Errors
    /// File system or openssl failures.
    pub fn init(&self) -> Result<Vec<Role>, PkiError> {
        let dir = &self.settings.dir;
        std::fs::create_dir_all(self.private_dir()).map_err(PkiError::io(format!("create {}", dir.display())))?;
        std::fs::set_permissions(self.private_dir(), std::fs::Permissions::from_mode(0o700))
            .map_err(PkiError::io("chmod the CA directory"))?;
        if is_root() {
            // The running service (not root) owns the store after a root `pki init`, so it can sign and renew.
            for path in [dir.clone(), self.private_dir()] {
                std::os::unix::fs::chown(&path, self.settings.service_uid, self.settings.service_uid)
                    .map_err(PkiError::io(format!("chown {}", path.display())))?;
            }
        }
        self.locked(|| {
            let ca = match self.load_ca() {
                Ok(ca) => ca,
                Err(PkiError::NoCa(_)) => self.create_ca()?,
                Err(e) => return Err(e),
            };
            let ca_pem = ca.cert.to_pem()?;
            if std::fs::read(self.path("ca.crt")).ok().as_deref() != Some(&ca_pem[..]) {
                self.write_atomic(&self.path("ca.crt"), &ca_pem, 0o644, self.settings.service_uid)?;
            }
            let mut index = self.load_index()?;
            let issued = self.ensure_own_certs(&ca, &mut index)?;
            self.write_crl_locked(&ca, &mut index)?;
            Ok(issued)
        })
    }

    fn create_ca(&self) -> Result<Ca, PkiError> {
        tracing::info!(ca = self.settings.ca_name, days = self.settings.ca_days, "creating the CA");
        let key = x509::new_key()?;
        let cert = x509::ca_certificate(&self.settings.ca_name, &key, self.settings.ca_days)?;
        let dir = self.private_dir();
        let owner = self.settings.service_uid;
        self.write_atomic(&dir.join("ca.key"), &key.private_key_to_pem_pkcs8()?, 0o600, owner)?;
        self.write_atomic(&dir.join("ca.crt"), &cert.to_pem()?, 0o644, owner)?;
        Ok(Ca { cert, key })
    }

    /// Checks that `cn` is a device identity the ACL accepts (and never the service's name).
    ///
    /// # Errors
    /// `PkiError::Request` naming the rule it breaks.
    pub fn check_identity(&self, cn: &str) -> Result<(), PkiError> {
        if cn == self.settings.service_name {
            return Err(PkiError::Request("the service's identity is never signed on request".into()));
        }
        parse_device(cn, &self.settings.id_charset)
            .map(|_| ())
            .map_err(|e| PkiError::Request(format!("{cn:?} is not a device identity: {e}")))
    }

    /// Registers a device identity (`POST /user`); registering it again is not an error.
    ///
    /// # Errors
    /// The identity is not a device identity; store failures.
    pub fn register(&self, cn: &str) -> Result<bool, PkiError> {
        self.check_identity(cn)?;
        self.locked(|| {
            let mut index = self.load_index()?;
            let new = index.entities.insert(cn.to_string());
            if new {
                self.save_index(&index)?;
            }
            Ok(new)
        })
    }

    /// Signs a CSR (PEM or DER) for a device: clientAuth, the CSR's key and CN, a fresh serial, `cert_days`. With
    /// `expected_cn`, the CSR's CN must equal it and be registered (the HTTP API's rule).
    ///
    /// # Errors
    /// `PkiError::Request` for a bad CSR or refused identity, `NotFound` for an unregistered one.
    pub fn sign(&self, csr: &[u8], expected_cn: Option<&str>) -> Result<X509, PkiError> {
        let req = x509::parse_csr(csr)?;
        let cn = x509::common_name(req.subject_name())
            .ok_or_else(|| PkiError::Request("the request has no UTF-8 common name".into()))?;
        self.check_identity(&cn)?;
        if let Some(expected) = expected_cn
            && expected != cn
        {
            return Err(PkiError::Request(format!("the request's CN {cn:?} is not {expected:?}")));
        }
        let public = req.public_key().map_err(|_| PkiError::Request("unreadable public key".into()))?;
        self.locked(|| {
            let ca = self.load_ca()?;
            let mut index = self.load_index()?;
            if expected_cn.is_some() && !index.entities.contains(&cn) {
                return Err(PkiError::NotFound(format!("entity {cn:?} (register it with POST /user)")));
            }
            let cert = x509::leaf(&ca.cert, &ca.key, &cn, &public, self.settings.cert_days, &Usage::Client)?;
            let serial = x509::serial_hex(&cert)?;
            index.certificates.push(IssuedCert {
                serial: serial.clone(),
                cn: cn.clone(),
                role: Role::Device,
                not_after: x509::unix_time(cert.not_after())?,
                revoked_at: None,
            });
            self.save_index(&index)?;
            tracing::info!(cn, serial, "signed a device certificate");
            Ok(cert)
        })
    }

    /// The CA certificate.
    ///
    /// # Errors
    /// No CA.
    pub fn ca_certificate(&self) -> Result<X509, PkiError> {
        Ok(self.load_ca()?.cert)
    }

    /// Every certificate the CA issued, in issue order (what the tests count).
    #[cfg(test)]
    pub fn issued(&self) -> Result<Vec<IssuedCert>, PkiError> {
        self.locked(|| Ok(self.load_index()?.certificates))
    }

    /// A secret of `len` random bytes kept in `<dir>/ca/<name>` (0600), created on first use.
    ///
    /// # Errors
    /// File system failures.
    pub fn secret(&self, name: &str, len: usize) -> Result<Vec<u8>, PkiError> {
        self.locked(|| {
            let path = self.private_dir().join(name);
            match std::fs::read(&path) {
                Ok(bytes) if bytes.len() >= len => return Ok(bytes),
                Ok(_) => tracing::warn!(file = %path.display(), "secret too short: replacing it"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(PkiError::Io { context: format!("read {}", path.display()), source: e }),
            }
            let mut bytes = vec![0; len];
            openssl::rand::rand_priv_bytes(&mut bytes)?;
            self.write_atomic(&path, &bytes, 0o600, self.settings.service_uid)?;
            Ok(bytes)
        })
    }
}

fn normalise_serial(serial: &str) -> Result<String, PkiError> {
    let trimmed = serial.trim();
    let hex: String = trimmed.strip_prefix("0x").unwrap_or(trimmed).chars().filter(|c| *c != ':').collect();
    if hex.is_empty() || hex.len() > 40 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(PkiError::Request(format!("{serial:?} is not a hexadecimal serial number")));
    }
    // The same canonical form serial_hex gives: upper case, no leading zeros.
    let bn = openssl::bn::BigNum::from_hex_str(&hex)?;
    Ok(bn.to_hex_str()?.to_string())
}

/// Whether this process has `gid` as its group or a supplementary group (from /proc: no libc, unsafe is forbidden).
fn in_group(gid: u32) -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else { return false };
    status
        .lines()
        .filter_map(|l| l.strip_prefix("Groups:").or_else(|| l.strip_prefix("Gid:")))
        .any(|ids| ids.split_whitespace().any(|id| id.parse::<u32>() == Ok(gid)))
}

fn is_root() -> bool {
    // No libc call (unsafe is forbidden): the owner of /proc/self is the effective uid.
    std::fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
}

/// The certificates the PKI issues for itself: broker, service, webhook server, broker webhook client.
#[path = "own.rs"]
mod own;
#[path = "revocation.rs"]
mod revocation;

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;
