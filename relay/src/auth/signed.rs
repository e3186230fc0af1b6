//! Access tokens: short-lived, signed, verified without any lookup.
//!
//! An access token is `cat_` + the hex of its claims (JSON) + `.` + the hex of a blake3
//! keyed hash of that claims text under the relay's secret. The secret is 32 random bytes
//! in `DATA/auth.secret` (0600), made on first start and kept across restarts, so tokens
//! survive a relay restart. Changing the file invalidates every access token at once.
//!
//! This module never logs a token, its claims' signature, or the secret; a token that
//! fails to verify is refused with a reason that contains none of them.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::access::Scope;
use crate::tokens::{hex, open_private};

/// Every access token starts with this, so a leaked one is recognisable by secret scanners.
pub const ACCESS_PREFIX: &str = "cat_";

/// The longest access token verified; a longer one is refused before any decoding.
pub const MAX_ACCESS_TOKEN: usize = 4096;

/// The secret's file in the data directory.
pub const SECRET_FILE: &str = "auth.secret";

/// What an access token says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user.
    pub user: String,
    /// The org they act in.
    pub org: String,
    /// What the token may do.
    pub scopes: Vec<Scope>,
    /// The hash of the API key the token descends from.
    pub key: String,
    /// The refresh-token family it was issued with.
    pub family: String,
    /// Issued at, milliseconds since the Unix epoch.
    pub iat: u64,
    /// Expires at, milliseconds since the Unix epoch.
    pub exp: u64,
}

/// Why an access token was not accepted (never quoting it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// Not an access token at all, or damaged.
    #[error("malformed access token")]
    Malformed,
    /// Not signed by this relay.
    #[error("access token with an invalid signature")]
    Forged,
    /// Past its lifetime.
    #[error("expired access token")]
    Expired,
}

/// Signs and verifies access tokens with the relay's secret.
pub struct Signer {
    key: [u8; 32],
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").finish_non_exhaustive()
    }
}

/// The secret could not be read or made.
#[derive(Debug, thiserror::Error)]
#[error("cannot use the signing secret {path}: {reason}; fix or remove the file (removing it logs every client out)")]
pub struct SecretError {
    path: PathBuf,
    reason: String,
}

impl Signer {
    /// The signer of the relay whose data is in `data_dir`: its secret is read, or made
    /// (0600) when there is none.
    pub fn open(data_dir: &Path) -> Result<Signer, SecretError> {
        let path = data_dir.join(SECRET_FILE);
        let fail = |reason: String| SecretError {
            path: path.clone(),
            reason,
        };
        let mut options = std::fs::OpenOptions::new();
        match open_private(&path, options.write(true).create_new(true)) {
            Ok(mut file) => {
                let mut key = [0u8; 32];
                getrandom::fill(&mut key).map_err(|e| fail(e.to_string()))?;
                file.write_all(&key).map_err(|e| fail(e.to_string()))?;
                file.sync_all().map_err(|e| fail(e.to_string()))?;
                Ok(Signer { key })
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let mut bytes = Vec::new();
                std::fs::File::open(&path)
                    .and_then(|file| file.take(64).read_to_end(&mut bytes))
                    .map_err(|e| fail(e.to_string()))?;
                let key = <[u8; 32]>::try_from(bytes.as_slice())
                    .map_err(|_| fail(format!("it holds {} bytes, not 32", bytes.len())))?;
                Ok(Signer { key })
            }
            Err(e) => Err(fail(e.to_string())),
        }
    }

    /// The token for `claims`.
    pub fn sign(&self, claims: &Claims) -> String {
        let json = serde_json::to_vec(claims).expect("claims always serialise");
        let body = hex(&json);
        let mac = blake3::keyed_hash(&self.key, body.as_bytes());
        format!("{ACCESS_PREFIX}{body}.{}", mac.to_hex())
    }

    /// The claims of `token` if this relay signed it and it has not expired at `now`.
    pub fn verify(&self, token: &str, now: u64) -> Result<Claims, VerifyError> {
        if token.len() > MAX_ACCESS_TOKEN {
            return Err(VerifyError::Malformed);
        }
        let (body, mac) = token
            .strip_prefix(ACCESS_PREFIX)
            .and_then(|rest| rest.split_once('.'))
            .ok_or(VerifyError::Malformed)?;
        let mac = blake3::Hash::from_hex(mac).map_err(|_| VerifyError::Malformed)?;
        // `Hash`'s equality is constant-time.
        if blake3::keyed_hash(&self.key, body.as_bytes()) != mac {
            return Err(VerifyError::Forged);
        }
        let json = unhex(body).ok_or(VerifyError::Malformed)?;
        let claims: Claims = serde_json::from_slice(&json).map_err(|_| VerifyError::Malformed)?;
        if claims.exp <= now {
            return Err(VerifyError::Expired);
        }
        Ok(claims)
    }
}

/// Lowercase or uppercase hex → bytes; `None` for anything else.
fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    text.as_bytes()
        .chunks(2)
        .map(|pair| {
            let digits = std::str::from_utf8(pair).ok()?;
            u8::from_str_radix(digits, 16).ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn claims(exp: u64) -> Claims {
        Claims {
            user: "alice".into(),
            org: "acme".into(),
            scopes: vec![Scope::SessionsRead],
            key: "k".into(),
            family: "f".into(),
            iat: 1,
            exp,
        }
    }

    #[test]
    fn tokens_verify_until_they_expire_and_only_with_their_secret() {
        let dir = tempfile::tempdir().unwrap();
        let signer = Signer::open(dir.path()).unwrap();
        let token = signer.sign(&claims(1_000));
        assert!(token.starts_with(ACCESS_PREFIX));
        assert_eq!(signer.verify(&token, 999).unwrap(), claims(1_000));
        assert_eq!(signer.verify(&token, 1_000), Err(VerifyError::Expired));
        // The same secret after a restart; another relay's does not verify it.
        assert!(Signer::open(dir.path()).unwrap().verify(&token, 0).is_ok());
        let other = tempfile::tempdir().unwrap();
        assert_eq!(
            Signer::open(other.path()).unwrap().verify(&token, 0),
            Err(VerifyError::Forged)
        );
        // Changed claims (a later expiry) break the signature.
        let forged_body = hex(&serde_json::to_vec(&claims(u64::MAX)).unwrap());
        let mac = token.rsplit_once('.').unwrap().1;
        assert_eq!(
            signer.verify(&format!("{ACCESS_PREFIX}{forged_body}.{mac}"), 0),
            Err(VerifyError::Forged)
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(dir.path().join(SECRET_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn a_damaged_secret_file_is_an_error_not_a_new_secret() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(SECRET_FILE), b"short").unwrap();
        let error = Signer::open(dir.path()).unwrap_err().to_string();
        assert!(error.contains("5 bytes"), "{error}");
    }

    proptest! {
        /// Arbitrary text (and arbitrary text after the prefix) never verifies and never
        /// panics, however long.
        #[test]
        fn arbitrary_tokens_are_refused(text in ".{0,300}", bytes in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let dir = tempfile::tempdir().unwrap();
            let signer = Signer::open(dir.path()).unwrap();
            let prefixed = format!("{ACCESS_PREFIX}{}", String::from_utf8_lossy(&bytes));
            let shaped = format!("{ACCESS_PREFIX}{}.{}", hex(&bytes), "0".repeat(64));
            for token in [&text, &prefixed, &shaped] {
                let verified = signer.verify(token, 0);
                prop_assert!(verified.is_err());
            }
        }
    }
}
