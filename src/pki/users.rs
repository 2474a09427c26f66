//! Who may use the PKI HTTP API (`PKI_USERS`) and the JWTs it hands out (HS256, secret kept in the CA directory).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use argon2::{Argon2, PasswordVerifier as _};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::secret::Secret;

/// A user's credential: a plain password, or a PHC string (`$argon2id$…`) so no plain password needs to sit in a
/// configuration file.
#[derive(Clone)]
enum Credential {
    Plain(Secret),
    Argon2(Secret),
}

/// The API's users, from `PKI_USERS`: comma-separated `name:password` or `name:$argon2id$…` pairs.
#[derive(Clone, Default)]
pub struct Users(BTreeMap<String, Credential>);

impl fmt::Debug for Users {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Names only: credentials never reach logs.
        f.debug_tuple("Users").field(&self.0.keys().collect::<Vec<_>>()).finish()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UsersError {
    #[error("entry {0} is not name:password")]
    Malformed(usize),
    #[error("user {0:?} is listed twice")]
    Duplicate(String),
    #[error("the password hash of user {0:?} is not a valid argon2 PHC string")]
    BadHash(String),
}

impl Users {
    /// Parses `PKI_USERS`. An argon2 PHC string has commas in its parameters (`m=19456,t=2,p=1`): a comma-separated
    /// piece without `:` continues the previous entry. Plain passwords therefore cannot contain a comma.
    ///
    /// # Errors
    /// An entry without `:`, an empty name or password, a duplicate name, an unparsable hash.
    pub fn parse(text: &str) -> Result<Self, UsersError> {
        let mut entries: Vec<String> = Vec::new();
        for piece in text.split(',') {
            match entries.last_mut() {
                Some(last) if !piece.contains(':') && last.contains('$') => {
                    last.push(',');
                    last.push_str(piece);
                }
                _ => entries.push(piece.to_string()),
            }
        }
        let mut users = BTreeMap::new();
        for (i, entry) in entries.iter().enumerate().filter(|(_, e)| !e.trim().is_empty()) {
            let (name, password) = entry.trim().split_once(':').ok_or(UsersError::Malformed(i + 1))?;
            if name.is_empty() || password.is_empty() {
                return Err(UsersError::Malformed(i + 1));
            }
            let credential = if password.starts_with("$argon2") {
                argon2::PasswordHash::new(password).map_err(|_| UsersError::BadHash(name.to_string()))?;
                Credential::Argon2(Secret::new(password))
            } else {
                Credential::Plain(Secret::new(password))
            };
            if users.insert(name.to_string(), credential).is_some() {
                return Err(UsersError::Duplicate(name.to_string()));
            }
        }
        Ok(Self(users))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `password` is `name`'s. Unknown users cost a comparison too, so timing does not tell names apart
    /// for plain passwords.
    pub fn check(&self, name: &str, password: &str) -> bool {
        match self.0.get(name) {
            Some(Credential::Plain(secret)) => secret.matches(password),
            Some(Credential::Argon2(hash)) => argon2::PasswordHash::new(hash.expose())
                .is_ok_and(|hash| Argon2::default().verify_password(password.as_bytes(), &hash).is_ok()),
            None => {
                let _ = Secret::new("").matches(password);
                false
            }
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    iat: u64,
    exp: u64,
}

/// Issues and checks the API's tokens.
#[derive(Clone)]
pub(super) struct Tokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    ttl: Duration,
}

impl Tokens {
    pub(super) fn new(secret: &[u8], ttl: Duration) -> Result<Self, jsonwebtoken::errors::Error> {
        Ok(Self { encoding: EncodingKey::from_secret(secret)?, decoding: DecodingKey::from_secret(secret)?, ttl })
    }

    pub(super) fn issue(&self, user: &str) -> Result<String, jsonwebtoken::errors::Error> {
        let now = u64::try_from(chrono::Utc::now().timestamp()).unwrap_or(0);
        let claims = Claims { sub: user.to_string(), iat: now, exp: now.saturating_add(self.ttl.as_secs()) };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
    }

    /// The user a token was issued to, if the token is ours (HS256 only, signature and expiry checked, no leeway).
    pub(super) fn verify(&self, token: &str) -> Option<String> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub"]);
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation).ok().map(|data| data.claims.sub)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use argon2::PasswordHasher as _;

    #[test]
    fn plain_and_hashed_passwords() {
        let hash = Argon2::default().hash_password(b"s3cret").unwrap().to_string();
        assert!(hash.contains(','), "the PHC parameters have commas: {hash}");
        let users = Users::parse(&format!("admin:admin,ops:{hash},x:y")).unwrap();
        assert!(users.check("admin", "admin"));
        assert!(!users.check("admin", "admin2"));
        assert!(users.check("ops", "s3cret"));
        assert!(!users.check("ops", "wrong"));
        assert!(!users.check("ops", &hash), "the hash is not the password");
        assert!(users.check("x", "y"));
        assert!(!users.check("nobody", ""));
        let debug = format!("{users:?}");
        assert!(!debug.contains("admin:admin") && !debug.contains("argon2"), "{debug}");
    }

    #[test]
    fn malformed_users_are_refused() {
        assert_eq!(Users::parse("admin").unwrap_err(), UsersError::Malformed(1));
        assert_eq!(Users::parse("a:b,:c").unwrap_err(), UsersError::Malformed(2));
        assert_eq!(Users::parse("a:b,a:c").unwrap_err(), UsersError::Duplicate("a".into()));
        assert_eq!(Users::parse("a:$argon2id$garbage").unwrap_err(), UsersError::BadHash("a".into()));
        assert!(Users::parse("").unwrap().is_empty());
    }

    #[test]
    fn tokens_are_checked() {
        let tokens = Tokens::new(b"0123456789abcdef0123456789abcdef", Duration::from_secs(60)).unwrap();
        let token = tokens.issue("admin").unwrap();
        assert_eq!(tokens.verify(&token).as_deref(), Some("admin"));
        let other = Tokens::new(b"another secret of thirty-two b..", Duration::from_secs(60)).unwrap();
        assert_eq!(other.verify(&token), None, "another secret");
        let mut tampered = token.clone();
        tampered.insert(tampered.len() - 2, 'A');
        assert_eq!(tokens.verify(&tampered), None);
        // The payload rewritten to another user, signature kept.
        let parts: Vec<&str> = token.split('.').collect();
        let forged = format!("{}.{}.{}", parts[0], base64_url(r#"{"sub":"root","iat":0,"exp":9999999999}"#), parts[2]);
        assert_eq!(tokens.verify(&forged), None);
        // alg=none.
        let none = format!("{}.{}.", base64_url(r#"{"alg":"none","typ":"JWT"}"#), parts[1]);
        assert_eq!(tokens.verify(&none), None);
        let expired = Tokens::new(b"0123456789abcdef0123456789abcdef", Duration::ZERO).unwrap().issue("admin").unwrap();
        std::thread::sleep(Duration::from_millis(1100));
        assert_eq!(tokens.verify(&expired), None);
    }

    fn base64_url(s: &str) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
    }
}
