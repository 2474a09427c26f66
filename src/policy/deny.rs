//! Why a request is refused, and the one metric label per reason.

use super::IdentityError;

/// Why a request is refused. Logged and counted; VerneMQ only ever sees `not_allowed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DenyReason {
    #[error("no username")]
    Anonymous,
    #[error("invalid device identity: {0}")]
    InvalidIdentity(IdentityError),
    #[error("certificate common name does not match the username")]
    CertificateMismatch,
    #[error("a client certificate is required")]
    CertificateRequired,
    #[error("wrong service credentials")]
    ServiceCredentials,
    #[error("certificate names the service but is not one of the service's own")]
    ServiceCertificate,
    #[error("client id not allowed by the client id policy")]
    ClientId,
    #[error("client id contains a quote, a backslash or a control character")]
    UnsafeClientId,
    #[error("client id is one of the service's own")]
    ServiceClientId,
    #[error("device removed")]
    Removed,
    #[error("certificate revoked")]
    Revoked,
    /// The tenant has no device-data topic in Kafka (decided by V2K, handed to the register hook).
    #[error("unknown_tenant: the tenant has no data topic in Kafka")]
    UnknownTenant,
    #[error("topic not allowed for this identity")]
    Topic,
    #[error("retained publishes are not allowed")]
    Retain,
}

impl DenyReason {
    /// The metric label of each variant, in declaration order: `LABELS[reason.index()]`.
    pub const LABELS: [&'static str; 14] = [
        "anonymous",
        "invalid_identity",
        "certificate_mismatch",
        "certificate_required",
        "service_credentials",
        "service_certificate",
        "client_id",
        "unsafe_client_id",
        "service_client_id",
        "removed",
        "revoked",
        "unknown_tenant",
        "topic",
        "retain",
    ];

    pub fn index(&self) -> usize {
        match self {
            DenyReason::Anonymous => 0,
            DenyReason::InvalidIdentity(_) => 1,
            DenyReason::CertificateMismatch => 2,
            DenyReason::CertificateRequired => 3,
            DenyReason::ServiceCredentials => 4,
            DenyReason::ServiceCertificate => 5,
            DenyReason::ClientId => 6,
            DenyReason::UnsafeClientId => 7,
            DenyReason::ServiceClientId => 8,
            DenyReason::Removed => 9,
            DenyReason::Revoked => 10,
            DenyReason::UnknownTenant => 11,
            DenyReason::Topic => 12,
            DenyReason::Retain => 13,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_its_own_label() {
        let all = [
            DenyReason::Anonymous,
            DenyReason::InvalidIdentity(IdentityError::ColonCount),
            DenyReason::CertificateMismatch,
            DenyReason::CertificateRequired,
            DenyReason::ServiceCredentials,
            DenyReason::ServiceCertificate,
            DenyReason::ClientId,
            DenyReason::UnsafeClientId,
            DenyReason::ServiceClientId,
            DenyReason::Removed,
            DenyReason::Revoked,
            DenyReason::UnknownTenant,
            DenyReason::Topic,
            DenyReason::Retain,
        ];
        assert_eq!(all.len(), DenyReason::LABELS.len());
        for (i, reason) in all.iter().enumerate() {
            assert_eq!(reason.index(), i, "{reason:?} in declaration order");
        }
        let snake = |l: &str| !l.is_empty() && l.chars().all(|c| c.is_ascii_lowercase() || c == '_');
        assert!(DenyReason::LABELS.iter().all(|l| snake(l)));
        assert_eq!(DenyReason::LABELS[DenyReason::InvalidIdentity(IdentityError::TooLong).index()], "invalid_identity");
    }
}
