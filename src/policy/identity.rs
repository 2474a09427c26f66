//! Who an MQTT username claims to be: a device `tenant:device_id`, the service itself, or nothing we accept.

use std::fmt;

/// Longest tenant or device id part, in bytes (dojot's limit, also keeps Kafka topic names short).
const MAX_PART_LEN: usize = 64;

/// A device identity `tenant:device_id`, borrowed from the username it was parsed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceId<'a> {
    pub tenant: &'a str,
    pub device: &'a str,
}

impl DeviceId<'_> {
    /// `tenant:device_id` as one string, joined without the formatting machinery (`to_string` goes through `fmt`): the
    /// key of every record a device's publish becomes.
    pub fn key(&self) -> String {
        [self.tenant, ":", self.device].concat()
    }
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

/// The characters tenant and device ids may contain, each its own set. Device ids default to dojot's
/// `[A-Za-z0-9_.-]`; tenant ids to `[A-Za-z0-9_-]`, never `.`, since a tenant is the first part of Kafka topic names
/// (`<tenant>.device-data`) and a dot in it would alias another tenant's topics. Characters that are MQTT topic syntax
/// or invisible are refused whatever the sets say.
#[derive(Debug, Clone)]
pub struct IdCharset {
    device: [bool; 128],
    tenant: [bool; 128],
}

/// Default device id characters (dojot's).
const DEFAULT_DEVICE_ID_CHARS: &str = "A-Za-z0-9_.-";
/// Default tenant id characters: the device default without the dot.
const DEFAULT_TENANT_ID_CHARS: &str = "A-Za-z0-9_-";

impl Default for IdCharset {
    fn default() -> Self {
        Self { device: table(DEFAULT_DEVICE_ID_CHARS), tenant: table(DEFAULT_TENANT_ID_CHARS) }
    }
}

/// Characters that can never be part of an id: topic separators and wildcards, the `$` of system topics, the
/// identity separator itself, and the scoped client-id separator.
const ALWAYS_FORBIDDEN: &[u8] = b"/+#$:|";

/// The set `chars` describes, ranges `a-z` included (a `-` first or last is itself); no validation.
fn table(chars: &str) -> [bool; 128] {
    let mut allowed = [false; 128];
    let bytes: Vec<char> = chars.chars().collect();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if i + 2 < bytes.len() && bytes[i + 1] == '-' {
            for r in c..=bytes[i + 2] {
                if r.is_ascii() {
                    allowed[r as usize] = true;
                }
            }
            i += 3;
        } else {
            if c.is_ascii() {
                allowed[c as usize] = true;
            }
            i += 1;
        }
    }
    allowed
}

/// Validates a set: printable ASCII only, nothing always forbidden, not empty.
fn checked_table(chars: &str, what: &str) -> Result<[bool; 128], String> {
    for c in chars.chars() {
        if !c.is_ascii_graphic() || ALWAYS_FORBIDDEN.contains(&(c as u8)) {
            return Err(format!("character {c:?} cannot be part of a {what}"));
        }
    }
    let allowed = table(chars);
    for (b, on) in allowed.iter().enumerate() {
        // A range such as `+-0` spans forbidden characters without naming them.
        if *on && (ALWAYS_FORBIDDEN.contains(&(b as u8)) || !(b as u8).is_ascii_graphic()) {
            return Err(format!("character {:?} cannot be part of a {what}", b as u8 as char));
        }
    }
    if allowed.iter().all(|a| !a) {
        return Err(format!("the set of {what} characters is empty"));
    }
    Ok(allowed)
}

impl IdCharset {
    /// Device id characters from `chars` (ranges such as `a-z` allowed); tenant ids keep their default.
    ///
    /// # Errors
    /// A character that is not printable ASCII or is always forbidden (`/ + # $ : |`), or an empty set.
    pub fn from_chars(chars: &str) -> Result<Self, String> {
        Ok(Self { device: checked_table(chars, "device id")?, ..Self::default() })
    }

    /// The same device set, with tenant id characters from `chars`.
    ///
    /// # Errors
    /// As [`Self::from_chars`], and a `.` (tenant ids are Kafka topic prefixes).
    pub fn with_tenant_chars(self, chars: &str) -> Result<Self, String> {
        let tenant = checked_table(chars, "tenant id")?;
        if tenant[b'.' as usize] {
            return Err("'.' cannot be part of a tenant id: tenants are Kafka topic prefixes".into());
        }
        Ok(Self { tenant, ..self })
    }

    fn accepts(set: &[bool; 128], part: &str) -> bool {
        part.bytes().all(|b| b < 128 && set[b as usize])
    }

    /// Whether `c` may be part of a device id.
    pub fn accepts_char(&self, c: char) -> bool {
        c.is_ascii() && self.device[c as usize]
    }

    /// Whether `tenant` is a tenant id (length aside).
    pub fn accepts_tenant(&self, tenant: &str) -> bool {
        Self::accepts(&self.tenant, tenant)
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
    if !charset.accepts_tenant(tenant) || !IdCharset::accepts(&charset.device, device) {
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
        assert!(parse("Ten_ant-1x:Dev.ice_2-y").is_ok());
    }

    #[test]
    fn the_record_key_is_the_identity_as_displayed() {
        for username in ["admin:a1998e", "Ten_ant-1x:Dev.ice_2-y"] {
            let id = parse(username).unwrap();
            assert_eq!(id.key(), username);
            assert_eq!(id.key(), id.to_string());
        }
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
        assert_eq!(parse_device("admin:A1998e", &lower), Err(IdentityError::BadCharacter));
        assert!(IdCharset::from_chars("ab/").is_err());
        assert!(IdCharset::from_chars("ab:").is_err());
        assert!(IdCharset::from_chars("a b").is_err());
        assert!(IdCharset::from_chars("").is_err());
        assert!(IdCharset::from_chars("é").is_err());
        assert!(IdCharset::from_chars("*-0").is_err(), "a range over '+' and '/'");
        let ranges = IdCharset::from_chars("a-c0-1_-").unwrap();
        assert!(parse_device("admin:ab1_-", &ranges).is_ok());
        assert_eq!(parse_device("admin:abd", &ranges), Err(IdentityError::BadCharacter));
    }

    #[test]
    fn tenants_have_their_own_charset_without_dots() {
        assert_eq!(parse("admin.x:a1998e"), Err(IdentityError::BadCharacter));
        assert!(parse("admin:a1998e.x").is_ok(), "device ids keep the dot");
        let lower = IdCharset::default().with_tenant_chars("a-z").unwrap();
        assert!(parse_device("admin:A1", &lower).is_ok());
        assert_eq!(parse_device("Admin:a1", &lower), Err(IdentityError::BadCharacter));
        assert!(IdCharset::default().with_tenant_chars("a-z.").is_err());
        assert!(IdCharset::default().with_tenant_chars("--/").is_err());
        assert!(IdCharset::default().with_tenant_chars("").is_err());
    }
}
