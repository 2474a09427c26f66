//! The CRL file VerneMQ uses (`crlfile`): which (issuer, serial) pairs are revoked. Parsing only; the file is the
//! operator's, so its signature is VerneMQ's business, not ours.

use std::collections::HashSet;

use openssl::x509::X509Crl;

/// One CRL's content: the issuer's name (DER) and the revoked serials (big-endian, no leading zeros, as
/// `cert::ClientCertificate::serial_bytes`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocations {
    pub issuer_der: Vec<u8>,
    pub serials: Vec<Vec<u8>>,
}

#[derive(Debug, thiserror::Error)]
pub enum CrlError {
    #[error("cannot read the CRL file: {0}")]
    Read(#[from] std::io::Error),
    #[error("not a CRL (PEM or DER): {0}")]
    Parse(#[source] openssl::error::ErrorStack),
    #[error("the file holds no CRL")]
    Empty,
}

/// Why a CRL file was not loaded: the `reason` label of `iotagent_crl_reload_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrlFailure {
    Unreadable,
    Invalid,
}

impl CrlFailure {
    /// Every variant, in declaration order (so `reason as usize` indexes it).
    pub const ALL: [Self; 2] = [Self::Unreadable, Self::Invalid];

    pub fn name(self) -> &'static str {
        match self {
            Self::Unreadable => "unreadable",
            Self::Invalid => "invalid",
        }
    }
}

impl CrlError {
    pub fn kind(&self) -> CrlFailure {
        match self {
            Self::Read(_) => CrlFailure::Unreadable,
            Self::Parse(_) | Self::Empty => CrlFailure::Invalid,
        }
    }
}

const PEM_BEGIN: &str = "-----BEGIN X509 CRL-----";

/// Parses a CRL file: one DER CRL, or one or more PEM CRLs (one per CA, as VerneMQ's `crlfile` allows). A file with
/// any unparseable block is refused as a whole, so a truncated file never stands for "fewer revocations".
///
/// # Errors
/// Not a CRL, truncated, or no CRL at all.
pub fn parse(bytes: &[u8]) -> Result<Vec<Revocations>, CrlError> {
    let text = std::str::from_utf8(bytes).ok().filter(|t| t.contains(PEM_BEGIN));
    let crls = match text {
        Some(text) => text
            .match_indices(PEM_BEGIN)
            .map(|(start, _)| {
                let block = &text[start..];
                X509Crl::from_pem(block.as_bytes())
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(CrlError::Parse)?,
        None => vec![X509Crl::from_der(bytes).map_err(CrlError::Parse)?],
    };
    if crls.is_empty() {
        return Err(CrlError::Empty);
    }
    crls.iter()
        .map(|crl| {
            let issuer_der = crl.issuer_name().to_der().map_err(CrlError::Parse)?;
            let serials = crl
                .get_revoked()
                .map(|revoked| {
                    revoked
                        .iter()
                        .map(|r| r.serial_number().to_bn().map(|bn| bn.to_vec()))
                        .collect::<Result<Vec<_>, _>>()
                })
                .transpose()
                .map_err(CrlError::Parse)?
                .unwrap_or_default();
            Ok(Revocations { issuer_der, serials })
        })
        .collect()
}

/// How a new CRL differs from the previous one, for the log line.
pub fn diff<T: Eq + std::hash::Hash>(old: &HashSet<T>, new: &HashSet<T>) -> (usize, usize) {
    (new.difference(old).count(), old.difference(new).count())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAPTURED_V1: &[u8] = include_bytes!("../../tests/data/vernemq-2.1.2/pki/crl-v1.pem");
    const CAPTURED_V3: &[u8] = include_bytes!("../../tests/data/vernemq-2.1.2/pki/crl-v3.pem");

    #[test]
    fn reads_the_captured_crls() {
        let v1 = parse(CAPTURED_V1).unwrap();
        assert_eq!(v1.len(), 1);
        assert_eq!(v1[0].serials, vec![vec![0x10, 0x02]]);
        let v3 = parse(CAPTURED_V3).unwrap();
        assert_eq!(v3[0].serials, vec![vec![0x10, 0x02], vec![0x10, 0x03], vec![0x10, 0x04]]);
        assert_eq!(v1[0].issuer_der, v3[0].issuer_der);
    }

    #[test]
    fn several_pem_crls_and_der() {
        let mut both = CAPTURED_V1.to_vec();
        both.extend_from_slice(CAPTURED_V3);
        assert_eq!(parse(&both).unwrap().len(), 2);
        let der = X509Crl::from_pem(CAPTURED_V1).unwrap().to_der().unwrap();
        assert_eq!(parse(&der).unwrap(), parse(CAPTURED_V1).unwrap());
    }

    #[test]
    fn truncated_garbage_and_empty_files_are_refused() {
        let truncated = &CAPTURED_V3[..CAPTURED_V3.len() / 2];
        assert_eq!(parse(truncated).unwrap_err().kind(), CrlFailure::Invalid);
        let mut one_good_one_cut = CAPTURED_V1.to_vec();
        one_good_one_cut.extend_from_slice(truncated);
        assert_eq!(parse(&one_good_one_cut).unwrap_err().kind(), CrlFailure::Invalid);
        assert_eq!(parse(b"").unwrap_err().kind(), CrlFailure::Invalid);
        assert_eq!(parse(b"hello").unwrap_err().kind(), CrlFailure::Invalid);
        assert_eq!(
            parse(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").unwrap_err().kind(),
            CrlFailure::Invalid
        );
    }

    #[test]
    fn diff_counts_added_and_dropped() {
        let old: HashSet<u8> = [1, 2].into();
        let new: HashSet<u8> = [2, 3, 4].into();
        assert_eq!(diff(&old, &new), (2, 1));
    }
}
