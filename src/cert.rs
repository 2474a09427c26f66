//! Reads the client certificate VerneMQ forwards (`client_cert`, base64 DER): its common name, serial number and
//! SHA-256 fingerprint.

use base64::Engine as _;
use openssl::nid::Nid;
use openssl::x509::X509;

use crate::policy::Fingerprint;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCertificate {
    /// `None` when the subject has no common name or several; interior NULs are kept, so they never match a username.
    pub common_name: Option<String>,
    /// Upper-case hex, as `openssl x509 -serial` prints it.
    pub serial: String,
    /// The serial as big-endian bytes without leading zeros, as CRL entries are compared (`sessions/crl.rs`).
    pub serial_bytes: Vec<u8>,
    /// The issuer's name, DER: with the serial, what a CRL revokes.
    pub issuer_der: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    #[error("client_cert is not base64")]
    Base64(#[from] base64::DecodeError),
    #[error("client_cert is not a DER X.509 certificate")]
    Der(#[source] openssl::error::ErrorStack),
}

/// Decodes the `client_cert` field and computes its SHA-256 fingerprint (what pins the service's own certificates).
///
/// # Errors
/// Not base64, or not a DER certificate.
pub fn parse_forwarded(client_cert: &str) -> Result<(ClientCertificate, Fingerprint), CertificateError> {
    let der = base64::engine::general_purpose::STANDARD.decode(client_cert)?;
    let x509 = X509::from_der(&der).map_err(CertificateError::Der)?;
    let fingerprint = Fingerprint(openssl::sha::sha256(&der));
    let mut names = x509.subject_name().entries_by_nid(Nid::COMMONNAME);
    let common_name = match (names.next(), names.next()) {
        // Two CNs make the identity ambiguous: treat as no usable CN, which denies.
        (Some(entry), None) => openssl::asn1::Asn1StringRef::to_string(entry.data()).ok(),
        _ => None,
    };
    let serial = x509.serial_number().to_bn().map_err(CertificateError::Der)?;
    let serial_bytes = serial.to_vec();
    let serial = serial.to_hex_str().map(|s| s.to_string()).map_err(CertificateError::Der)?;
    let issuer_der = x509.issuer_name().to_der().map_err(CertificateError::Der)?;
    Ok((ClientCertificate { common_name, serial, serial_bytes, issuer_der }, fingerprint))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAPTURED: &str = include_str!("../tests/data/client_cert-a1998e.b64");

    #[test]
    fn reads_the_certificate_verne_forwarded() {
        let (cert, fingerprint) = parse_forwarded(CAPTURED.trim()).unwrap();
        assert_eq!(cert.common_name.as_deref(), Some("admin:a1998e"));
        assert_eq!(cert.serial, "1001");
        assert_eq!(cert.serial_bytes, vec![0x10, 0x01]);
        assert!(!cert.issuer_der.is_empty());
        let der = base64::engine::general_purpose::STANDARD.decode(CAPTURED.trim()).unwrap();
        assert_eq!(fingerprint, Fingerprint(openssl::sha::sha256(&der)));
    }

    #[test]
    fn rejects_garbage() {
        assert!(matches!(parse_forwarded("not base64!"), Err(CertificateError::Base64(_))));
        assert!(matches!(parse_forwarded("AAAA"), Err(CertificateError::Der(_))));
        assert!(matches!(parse_forwarded(""), Err(CertificateError::Der(_))));
    }
}
