//! Who an MQTT username claims to be: a device `tenant:device_id`, the service itself, or nothing we accept.

use std::fmt;

/// Longest tenant or device id part, in bytes (dojot's limit, also keeps Kafka topic names short).
pub const MAX_PART_LEN: usize = 64;

/// A device identity `tenant:device_id`, borrowed from the username it was parsed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceId<'a> {
    pub tenant: &'a str,
    pub device: &'a str,
}

impl fmt::Display for DeviceId<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.tenant, self.device)
    }
}

/// Why a username is not a device identity. Logged, never sent to VerneMQ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("username must be tenant:device_id with exactly one ':'")]
    ColonCount,
    #[error("tenant is empty")]
    EmptyTenant,
    #[error("device id is empty")]
    EmptyDevice,
    #[error("tenant or device id longer than {MAX_PART_LEN} bytes")]
    TooLong,
    #[error("tenant or device id has a character outside the allowed set")]
    BadCharacter,
}

/// The characters a tenant or device id may contain. The default is dojot's `[A-Za-z0-9_.-]`; an operator may
/// narrow or widen it, but characters that are MQTT topic syntax or invisible are refused whatever the set says.
#[derive(Debug, Clone)]
pub struct IdCharset {
    allowed: [bool; 128],
}

impl Default for IdCharset {
    fn default() -> Self {
        let mut allowed = [false; 128];
        for b in b'a'..=b'z' {
            allowed[b as usize] = true;
        }
        for b in b'A'..=b'Z' {
            allowed[b as usize] = true;
        }
        for b in b'0'..=b'9' {
            allowed[b as usize] = true;
        }
        for b in [b'_', b'.', b'-'] {
            allowed[b as usize] = true;
        }
        Self { allowed }
    }
}

/// Characters that can never be part of an id: topic separators and wildcards, the `$` of system topics, the
/// identity separator itself, and the scoped client-id separator.
const ALWAYS_FORBIDDEN: &[u8] = b"/+#$:|";

impl IdCharset {
    /// Builds a charset from the ASCII characters of `chars`.
    ///
    /// # Errors
    /// A character that is not printable ASCII or is always forbidden (`/ + # $ : |`).
    pub fn from_chars(chars: &str) -> Result<Self, String> {
        let mut allowed = [false; 128];
        for c in chars.chars() {
            if !c.is_ascii_graphic() || ALWAYS_FORBIDDEN.contains(&(c as u8)) {
                return Err(format!("character {c:?} cannot be part of a device id"));
            }
            allowed[c as usize] = true;
        }
        if allowed.iter().all(|a| !a) {
            return Err("the set of device id characters is empty".into());
        }
        Ok(Self { allowed })
    }

    fn accepts(&self, part: &str) -> bool {
        part.bytes().all(|b| b < 128 && self.allowed[b as usize])
    }

    pub fn accepts_char(&self, c: char) -> bool {
        c.is_ascii() && self.allowed[c as usize]
    }
}

/// Parses `tenant:device_id` strictly.
///
/// # Errors
/// The first rule the username breaks.
pub fn parse_device<'a>(username: &'a str, charset: &IdCharset) -> Result<DeviceId<'a>, IdentityError> {
    let (tenant, device) = username.split_once(':').ok_or(IdentityError::ColonCount)?;
    if device.contains(':') {
        return Err(IdentityError::ColonCount);
    }
    if tenant.is_empty() {
        return Err(IdentityError::EmptyTenant);
    }
    if device.is_empty() {
        return Err(IdentityError::EmptyDevice);
    }
    if tenant.len() > MAX_PART_LEN || device.len() > MAX_PART_LEN {
        return Err(IdentityError::TooLong);
    }
    if !charset.accepts(tenant) || !charset.accepts(device) {
        return Err(IdentityError::BadCharacter);
    }
    Ok(DeviceId { tenant, device })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(u: &str) -> Result<DeviceId<'_>, IdentityError> {
        parse_device(u, &IdCharset::default())
    }

    #[test]
    fn accepts_dojot_device() {
        let id = parse("admin:a1998e").unwrap();
        assert_eq!(id.tenant, "admin");
        assert_eq!(id.device, "a1998e");
        assert_eq!(id.to_string(), "admin:a1998e");
        assert!(parse("Ten_ant.1-x:Dev.ice_2-y").is_ok());
    }

    #[test]
    fn colon_rules() {
        assert_eq!(parse("admin"), Err(IdentityError::ColonCount));
        assert_eq!(parse("admin:a:b"), Err(IdentityError::ColonCount));
        assert_eq!(parse("admin::b"), Err(IdentityError::ColonCount));
        assert_eq!(parse(":a1998e"), Err(IdentityError::EmptyTenant));
        assert_eq!(parse("admin:"), Err(IdentityError::EmptyDevice));
        assert_eq!(parse(":"), Err(IdentityError::EmptyTenant));
        assert_eq!(parse(""), Err(IdentityError::ColonCount));
    }

    #[test]
    fn length_limit_is_per_part_in_bytes() {
        let max = "a".repeat(MAX_PART_LEN);
        assert!(parse(&format!("{max}:{max}")).is_ok());
        let long = "a".repeat(MAX_PART_LEN + 1);
        assert_eq!(parse(&format!("{long}:x")), Err(IdentityError::TooLong));
        assert_eq!(parse(&format!("x:{long}")), Err(IdentityError::TooLong));
    }

    #[test]
    fn refuses_topic_syntax_and_invisible_characters() {
        for bad in [
            "ad/min:a",
            "admin:a/b",
            "admin:+",
            "admin:#",
            "$SYS:a",
            "admin:a b",
            "admin:a\tb",
            "admin:a\0",
            "admin:a\u{7f}",
            "admin:a\u{fffd}",
            "admin:é",
            "admin:a|b",
            "admin:a\n",
        ] {
            assert_eq!(parse(bad), Err(IdentityError::BadCharacter), "{bad:?}");
        }
    }

    #[test]
    fn custom_charset() {
        let lower = IdCharset::from_chars("abcdefghijklmnopqrstuvwxyz0123456789").unwrap();
        assert!(parse_device("admin:a1998e", &lower).is_ok());
        assert_eq!(parse_device("Admin:a1998e", &lower), Err(IdentityError::BadCharacter));
        assert!(IdCharset::from_chars("ab/").is_err());
        assert!(IdCharset::from_chars("ab:").is_err());
        assert!(IdCharset::from_chars("a b").is_err());
        assert!(IdCharset::from_chars("").is_err());
        assert!(IdCharset::from_chars("é").is_err());
    }
}
