//! Revocation and the CRL: revoke by serial, certificate or entity, and write the CRL VerneMQ reads.

use openssl::x509::{X509, X509Crl};

use super::super::PkiError;
use super::super::x509::{self, Revoked};
use super::{Ca, Index, IssuedCert, Role, Store, normalise_serial};

impl Store {
    /// Revokes the certificate with this serial (hex, any case, optional `0x`/colons) and rewrites the CRL.
    ///
    /// # Errors
    /// `NotFound` when the CA never issued it.
    pub fn revoke_serial(&self, serial: &str) -> Result<IssuedCert, PkiError> {
        let wanted = normalise_serial(serial)?;
        self.revoke_where(|c| c.serial == wanted)?
            .into_iter()
            .next()
            .ok_or_else(|| PkiError::NotFound(format!("certificate with serial {wanted}")))
    }

    /// Revokes the certificate given in PEM or DER (it must be one this CA issued).
    ///
    /// # Errors
    /// Not a certificate, or not one the CA issued.
    pub fn revoke_certificate(&self, cert: &[u8]) -> Result<IssuedCert, PkiError> {
        let cert = X509::from_pem(cert)
            .or_else(|_| X509::from_der(cert))
            .map_err(|_| PkiError::Request("not a certificate (PEM or DER)".into()))?;
        self.revoke_serial(&x509::serial_hex(&cert)?)
    }

    /// Revokes every valid device certificate of `cn` (`POST /revoke/<cn>`); returns what it revoked.
    ///
    /// # Errors
    /// Store failures.
    pub fn revoke_entity(&self, cn: &str) -> Result<Vec<IssuedCert>, PkiError> {
        self.check_identity(cn)?;
        self.revoke_where(|c| c.cn == cn && c.role == Role::Device)
    }

    fn revoke_where(&self, select: impl Fn(&IssuedCert) -> bool) -> Result<Vec<IssuedCert>, PkiError> {
        self.locked(|| {
            let ca = self.load_ca()?;
            let mut index = self.load_index()?;
            let now = x509::now();
            let mut revoked = Vec::new();
            for cert in index.certificates.iter_mut().filter(|c| select(c)) {
                if cert.revoked_at.is_none() {
                    cert.revoked_at = Some(now);
                    tracing::info!(cn = cert.cn, serial = cert.serial, "revoked a certificate");
                }
                revoked.push(cert.clone());
            }
            if !revoked.is_empty() {
                self.save_index(&index)?;
                self.write_crl_locked(&ca, &mut index)?;
            }
            Ok(revoked)
        })
    }

    /// Writes `crl.pem` (a new CRL number, nextUpdate `crl_days` ahead) and returns the CRL.
    ///
    /// # Errors
    /// No CA, file system or openssl failures.
    pub fn write_crl(&self) -> Result<X509Crl, PkiError> {
        self.locked(|| {
            let ca = self.load_ca()?;
            let mut index = self.load_index()?;
            self.write_crl_locked(&ca, &mut index)
        })
    }

    pub(super) fn write_crl_locked(&self, ca: &Ca, index: &mut Index) -> Result<X509Crl, PkiError> {
        index.crl_number += 1;
        let revoked: Vec<Revoked<'_>> = index
            .certificates
            .iter()
            .filter_map(|c| c.revoked_at.map(|at| Revoked { serial: &c.serial, at }))
            .collect();
        let crl = x509::crl(&ca.cert, &ca.key, &revoked, index.crl_number, self.settings.crl_days)?;
        self.save_index(index)?;
        self.write_atomic(&self.path("crl.pem"), &crl.to_pem()?, 0o644, self.settings.service_uid)?;
        Ok(crl)
    }

    /// The current CRL as last written.
    ///
    /// # Errors
    /// No CRL yet, or unreadable.
    pub fn crl(&self) -> Result<X509Crl, PkiError> {
        let pem = std::fs::read(self.path("crl.pem")).map_err(PkiError::io("read crl.pem"))?;
        Ok(X509Crl::from_pem(&pem)?)
    }
}
