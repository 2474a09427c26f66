//! The certificates the PKI issues for the deployment itself (not devices): checked by `init` and the upkeep,
//! issued again when missing, expiring, not from the current CA, renamed or revoked.

use openssl::pkey::PKey;
use openssl::x509::X509;

use super::super::PkiError;
use super::super::x509::{self, Usage};
use super::{Ca, Index, IssuedCert, Role, Store};

/// Every role `init` and the upkeep keep valid, in issuing order.
pub(super) const OWN_ROLES: [Role; 4] = [Role::Server, Role::Service, Role::Webhook, Role::BrokerClient];

/// CN of the broker's webhook client certificate (what the service's HTTPS listener sees).
const BROKER_CLIENT_CN: &str = "vernemq";

impl Store {
    /// Issues the broker's and the service's certificates again where they are missing, expire within the renewal
    /// window, do not chain to the CA or were revoked.
    pub(super) fn ensure_own_certs(&self, ca: &Ca, index: &mut Index) -> Result<Vec<Role>, PkiError> {
        let mut issued = Vec::new();
        for role in OWN_ROLES {
            match self.own_cert_problem(ca, index, role) {
                None => {}
                Some(problem) => {
                    tracing::info!(certificate = role.file(), problem, "issuing a new certificate");
                    self.issue_own(ca, index, role)?;
                    issued.push(role);
                }
            }
        }
        if !issued.is_empty() {
            self.save_index(index)?;
        }
        Ok(issued)
    }

    /// Why the broker's or the service's certificate must be issued again, if it must.
    fn own_cert_problem(&self, ca: &Ca, index: &Index, role: Role) -> Option<&'static str> {
        let (Ok(cert), Ok(key)) = (
            std::fs::read(self.path(&format!("{}.crt", role.file()))),
            std::fs::read(self.path(&format!("{}.key", role.file()))),
        ) else {
            return Some("missing");
        };
        let (Ok(cert), Ok(key)) = (X509::from_pem(&cert), PKey::private_key_from_pem(&key)) else {
            return Some("unreadable");
        };
        if !cert.public_key().is_ok_and(|public| public.public_eq(&key)) {
            return Some("key and certificate do not match");
        }
        if !ca.cert.public_key().and_then(|ca_key| cert.verify(&ca_key)).unwrap_or(false) {
            return Some("not signed by the current CA");
        }
        let wanted_cn = match role {
            Role::Server => self.settings.server_names.first().map(String::as_str),
            Role::Webhook => self.settings.webhook_names.first().map(String::as_str),
            Role::BrokerClient => Some(BROKER_CLIENT_CN),
            Role::Service | Role::Device => Some(self.settings.service_name.as_str()),
        };
        if x509::common_name(cert.subject_name()).as_deref() != wanted_cn {
            return Some("its CN is not the configured name");
        }
        let Ok(serial) = x509::serial_hex(&cert) else { return Some("unreadable serial") };
        if index.certificates.iter().any(|c| c.serial == serial && c.revoked_at.is_some()) {
            return Some("revoked");
        }
        match x509::unix_time(cert.not_after()) {
            Ok(not_after) if not_after - x509::now() > self.renew_before_secs() => None,
            _ => Some("expires within the renewal window"),
        }
    }

    fn renew_before_secs(&self) -> i64 {
        i64::try_from(self.settings.renew_before.as_secs()).unwrap_or(i64::MAX)
    }

    fn issue_own(&self, ca: &Ca, index: &mut Index, role: Role) -> Result<(), PkiError> {
        let key = x509::new_key()?;
        let public = PKey::public_key_from_der(&key.public_key_to_der()?)?;
        let (cn, usage, owner) = match role {
            Role::Server => {
                let cn = self.settings.server_names.first().cloned().unwrap_or_else(|| "localhost".into());
                (cn, Usage::Server(&self.settings.server_names), self.settings.broker_uid)
            }
            Role::Webhook => {
                let cn = self.settings.webhook_names.first().cloned().unwrap_or_else(|| "localhost".into());
                (cn, Usage::Server(&self.settings.webhook_names), self.settings.service_uid)
            }
            // VerneMQ reads this key: it belongs to the broker's user.
            Role::BrokerClient => (BROKER_CLIENT_CN.to_string(), Usage::Client, self.settings.broker_uid),
            Role::Service | Role::Device => {
                (self.settings.service_name.clone(), Usage::Client, self.settings.service_uid)
            }
        };
        let cert = x509::leaf(&ca.cert, &ca.key, &cn, &public, self.settings.cert_days, &usage)?;
        // The key first: a reader that sees the new certificate also finds its key.
        // The broker's key is shared with the broker's group when this process may hand it over (root or a member):
        // VerneMQ (another uid) must read a key the service renewed. Otherwise it stays 0600.
        let group = match role {
            Role::Server => self.settings.broker_gid.filter(|gid| super::is_root() || super::in_group(*gid)),
            _ => None,
        };
        let mode = if group.is_some() { 0o640 } else { 0o600 };
        let key_pem = key.private_key_to_pem_pkcs8()?;
        self.write_atomic_shared(&self.path(&format!("{}.key", role.file())), &key_pem, mode, owner, group)?;
        self.write_atomic(&self.path(&format!("{}.crt", role.file())), &cert.to_pem()?, 0o644, owner)?;
        index.certificates.push(IssuedCert {
            serial: x509::serial_hex(&cert)?,
            cn,
            role,
            not_after: x509::unix_time(cert.not_after())?,
            revoked_at: None,
        });
        Ok(())
    }

    /// Checks the broker's and the service's certificates and issues new ones where needed (the upkeep's job).
    ///
    /// # Errors
    /// No CA, file system or openssl failures.
    pub fn renew_own_certs(&self) -> Result<Vec<Role>, PkiError> {
        self.locked(|| {
            let ca = self.load_ca()?;
            let mut index = self.load_index()?;
            let issued = self.ensure_own_certs(&ca, &mut index)?;
            Ok(issued)
        })
    }
}
