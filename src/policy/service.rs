//! The service's own certificates, pinned by SHA-256 fingerprint, and the one rule that ties a device-manager topic
//! to its tenant.

use std::fmt;
use std::str::FromStr;

/// SHA-256 of a certificate's DER encoding.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02X}")?;
        }
        Ok(())
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a SHA-256 fingerprint is 64 hexadecimal digits, optionally separated by ':'")]
pub struct FingerprintError;

impl FromStr for Fingerprint {
    type Err = FingerprintError;

    /// `AB:CD:…` (as `openssl x509 -fingerprint -sha256` prints it) or plain hex, any case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let digits: Vec<u8> = s.trim().bytes().filter(|b| *b != b':').collect();
        if digits.len() != 64 {
            return Err(FingerprintError);
        }
        let mut out = [0u8; 32];
        for (i, pair) in digits.chunks(2).enumerate() {
            let text = std::str::from_utf8(pair).map_err(|_| FingerprintError)?;
            out[i] = u8::from_str_radix(text, 16).map_err(|_| FingerprintError)?;
        }
        Ok(Self(out))
    }
}

/// The tenant a device-manager topic `<tenant>.<suffix>` belongs to, if the topic is exactly that. An event read from
/// it may only act on this tenant: whoever can write one tenant's topic must not reach another tenant's devices.
pub fn topic_tenant<'t>(topic: &'t str, suffix: &str) -> Option<&'t str> {
    topic.strip_suffix(suffix).and_then(|t| t.strip_suffix('.')).filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_parse_as_openssl_prints_them() {
        let colons = "AB:".repeat(31) + "CD";
        let f: Fingerprint = colons.parse().unwrap();
        assert_eq!(f.0[0], 0xAB);
        assert_eq!(f.0[31], 0xCD);
        assert_eq!(colons.replace(':', "").to_lowercase().parse::<Fingerprint>(), Ok(f));
        assert_eq!(f.to_string(), colons.replace(':', ""));
        for bad in ["", "AB", &"AB".repeat(33), &"G0".repeat(32), &"é".repeat(32)] {
            assert_eq!(bad.parse::<Fingerprint>(), Err(FingerprintError), "{bad:?}");
        }
    }

    #[test]
    fn topic_tenant_is_the_exact_prefix() {
        let suffix = "dojot.device-manager.device";
        assert_eq!(topic_tenant("admin.dojot.device-manager.device", suffix), Some("admin"));
        assert_eq!(topic_tenant("evil.dojot.device-manager.device", suffix), Some("evil"));
        assert_eq!(topic_tenant("x.admin.dojot.device-manager.device", suffix), Some("x.admin"));
        assert_eq!(topic_tenant(".dojot.device-manager.device", suffix), None);
        assert_eq!(topic_tenant("admindojot.device-manager.device", suffix), None);
        assert_eq!(topic_tenant("admin.other", suffix), None);
    }
}
