//! A string that must never reach logs: `Debug` and `Display` print a placeholder.

use std::fmt;

#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value, for the one place that hands it to a client library.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Compares in constant time. Both sides are hashed first so that neither the content nor the length of the
    /// secret leaks through timing.
    pub fn matches(&self, candidate: &str) -> bool {
        let expected = openssl::sha::sha256(self.0.as_bytes());
        let given = openssl::sha::sha256(candidate.as_bytes());
        openssl::memcmp::eq(&expected, &given)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("**REDACTED**")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("**REDACTED**")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self::new(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_printed() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?} {s}"), "**REDACTED** **REDACTED**");
        assert_eq!(format!("{:?}", Some(s)), "Some(**REDACTED**)");
    }

    #[test]
    fn matches_only_the_same_value() {
        let s = Secret::new("hunter2");
        assert!(s.matches("hunter2"));
        assert!(!s.matches("hunter3"));
        assert!(!s.matches("hunter22"));
        assert!(!s.matches(""));
        assert_eq!(s.expose(), "hunter2");
    }
}
