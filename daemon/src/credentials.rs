//! The relay the daemon talks to and how it logs in: `credentials.toml` in the config
//! directory (0600), written by `cloudctl login` (the relay and an API key), rewritten by
//! [`crate::auth`] once the key is exchanged (the relay and a refresh token: the key is
//! not kept) and at every refresh, removed by `cloudctl logout`, and re-read at every
//! connect and refresh so a new login is picked up without a restart. Without the file,
//! the daemon runs the relay embedded.
//!
//! A file of the first format (`token = ...`, the relay's bearer token) reads as an API
//! key: it is exchanged and the file rewritten at the next connect.
//!
//! Tokens never reach a log, a status or an error message: [`Credentials`]'s `Debug` hides
//! them.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A relay and how to get access tokens from it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    /// The relay's base URL (`https://host:port`, `wss://...`; plain only on loopback).
    pub relay: String,
    /// An API key still to exchange (`token` in the first format).
    #[serde(default, alias = "token", skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
    /// The refresh token of this machine's login.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<String>,
}

impl Credentials {
    /// A fresh login: `relay` and an API key to exchange.
    pub fn login(relay: String, api_key: String) -> Credentials {
        Credentials {
            relay,
            api_key: Some(api_key),
            refresh_token: None,
        }
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("relay", &self.relay)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field(
                "refresh_token",
                &self.refresh_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// The credentials file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    /// Reading or writing failed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid.
    #[error("invalid credentials file {path}: {message}; run `cloudctl login` again")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong (never the token).
        message: String,
    },
}

/// The credentials file in `config_dir`.
pub fn path(config_dir: &Path) -> PathBuf {
    config_dir.join("credentials.toml")
}

/// Reads the credentials; `None` when there are none (embedded relay).
pub fn load(config_dir: &Path) -> Result<Option<Credentials>, CredentialsError> {
    let path = path(config_dir);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(CredentialsError::Io {
                action: "read",
                path,
                source,
            })
        }
    };
    toml::from_str(&text)
        .map(Some)
        .map_err(|e| CredentialsError::Invalid {
            message: e.message().to_string(),
            path,
        })
}

/// Writes the credentials, readable by this user only.
pub fn save(config_dir: &Path, credentials: &Credentials) -> Result<(), CredentialsError> {
    let path = path(config_dir);
    let io = |action, source| CredentialsError::Io {
        action,
        path: path.clone(),
        source,
    };
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder
        .create(config_dir)
        .map_err(|e| io("create the directory of", e))?;
    let text = toml::to_string(credentials).map_err(|e| CredentialsError::Invalid {
        path: path.clone(),
        message: e.to_string(),
    })?;
    let temporary = path.with_extension("toml.tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    {
        use std::io::Write as _;
        let mut file = options.open(&temporary).map_err(|e| io("write", e))?;
        file.write_all(text.as_bytes())
            .map_err(|e| io("write", e))?;
        file.sync_all().map_err(|e| io("write", e))?;
    }
    std::fs::rename(&temporary, &path).map_err(|e| io("write", e))
}

/// Removes the credentials (back to the embedded relay).
pub fn remove(config_dir: &Path) -> Result<(), CredentialsError> {
    let path = path(config_dir);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(CredentialsError::Io {
            action: "remove",
            path,
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_credentials_are_private_and_the_token_is_never_debug_printed() {
        let dir = tempfile::tempdir().unwrap();
        let credentials = Credentials {
            relay: "https://relay.example".into(),
            api_key: Some("secret-key".into()),
            refresh_token: Some("secret-refresh".into()),
        };
        save(dir.path(), &credentials).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(path(dir.path()))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert_eq!(load(dir.path()).unwrap(), Some(credentials.clone()));
        assert!(!format!("{credentials:?}").contains("secret"));
        remove(dir.path()).unwrap();
        assert_eq!(load(dir.path()).unwrap(), None);
    }

    /// A file written before access tokens (`token = ...`) reads as an API key to exchange.
    #[test]
    fn first_format_files_read_as_an_api_key() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            path(dir.path()),
            "relay = \"http://127.0.0.1:9\"\ntoken = \"crt_old\"\n",
        )
        .unwrap();
        assert_eq!(
            load(dir.path()).unwrap(),
            Some(Credentials::login(
                "http://127.0.0.1:9".into(),
                "crt_old".into()
            ))
        );
    }
}
