//! The relay the daemon talks to and how it logs in: written by `cloudctl login` (the
//! relay and an API key) or a device login (the relay and a refresh token), rewritten by
//! [`crate::auth`] once the key is exchanged (the key is not kept) and at every refresh,
//! removed by `cloudctl logout`, and re-read at every connect and refresh so a new login
//! is picked up without a restart. Without credentials, the daemon runs the relay
//! embedded.
//!
//! Where the secrets go ([`Store`]): the OS keychain when one is usable (the Secret
//! Service on Linux, the Keychain on macOS, the Credential Manager on Windows; entry
//! `cloudd` / the config directory's path), else `credentials.toml` in the config
//! directory (0600). `CLOUDD_CREDENTIAL_STORE` = `auto` (the default: the keychain if
//! usable, else the file), `keychain` (fail rather than write the file) or `file`. With
//! the keychain, `credentials.toml` still exists but holds only the relay and
//! `store = "keychain"`, so the daemon knows where to look and `whoami` can say.
//!
//! A file of the first format (`token = ...`, the relay's bearer token) reads as an API
//! key: it is exchanged and the file rewritten at the next connect.
//!
//! Tokens never reach a log, a status or an error message: [`Credentials`]'s `Debug` hides
//! them, and keychain errors are reported without the secret.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A relay and how to get access tokens from it (as stored: `FileRecord` and the
/// keychain's `Secrets`).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The relay's base URL (`https://host:port`, `wss://...`; plain only on loopback).
    pub relay: String,
    /// An API key still to exchange (`token` in the first format).
    pub api_key: Option<String>,
    /// The refresh token of this machine's login.
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

/// Where a login's secrets are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    /// No login (the embedded relay).
    None,
    /// `credentials.toml`, 0600.
    File,
    /// The OS keychain.
    Keychain,
}

impl Store {
    /// Its name, as `whoami` shows it.
    pub fn name(self) -> &'static str {
        match self {
            Store::None => "none",
            Store::File => "file",
            Store::Keychain => "keychain",
        }
    }
}

/// The environment variable that chooses the store.
pub const STORE_VARIABLE: &str = "CLOUDD_CREDENTIAL_STORE";

/// What `CLOUDD_CREDENTIAL_STORE` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Preference {
    Auto,
    File,
    Keychain,
}

fn preference() -> Result<Preference, CredentialsError> {
    match std::env::var(STORE_VARIABLE).as_deref() {
        Err(_) | Ok("") | Ok("auto") => Ok(Preference::Auto),
        Ok("file") => Ok(Preference::File),
        Ok("keychain") => Ok(Preference::Keychain),
        Ok(other) => Err(CredentialsError::Keychain(format!(
            "{STORE_VARIABLE}={other:?} is not a credential store: use auto, keychain or file, then restart cloudd"
        ))),
    }
}

/// What `credentials.toml` holds: the relay, and either the secrets or where they are.
#[derive(Serialize, Deserialize)]
struct FileRecord {
    relay: String,
    #[serde(default, alias = "token", skip_serializing_if = "Option::is_none")]
    api_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refresh_token: Option<String>,
    /// `keychain` when the secrets are in the keychain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    store: Option<String>,
}

/// The secrets as the keychain entry holds them (JSON).
#[derive(Serialize, Deserialize)]
struct Secrets {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    api_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refresh_token: Option<String>,
}

/// The keychain entry's service name.
pub const KEYCHAIN_SERVICE: &str = "cloudd";

/// The keychain entry's account for `config_dir`: its path, so two daemons of one user
/// (two `CLOUDD_HOME`s) keep two logins.
fn account(config_dir: &Path) -> String {
    std::path::absolute(config_dir)
        .unwrap_or_else(|_| config_dir.to_owned())
        .display()
        .to_string()
}

/// The OS keychain, where this build has one. Every call is bounded by [`DEADLINE`]: a
/// keychain that waits for a person (an unlock prompt nobody answers) must not hold the
/// daemon up for longer; past it the call fails (and `auto` falls back to the file).
mod keychain {
    use std::path::Path;
    use std::time::Duration;

    /// The longest a keychain call may take.
    pub const DEADLINE: Duration = Duration::from_secs(5);

    /// Runs `call` on a thread of its own and waits for it up to [`DEADLINE`] (a call
    /// still running then is left to finish on its own).
    #[cfg(any(target_os = "linux", target_os = "macos", windows))]
    fn bounded<T: Send + 'static>(
        call: impl FnOnce() -> Result<T, String> + Send + 'static,
    ) -> Result<T, String> {
        let (answer, answered) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("keychain".into())
            .spawn(move || {
                let _ = answer.send(call());
            })
            .map_err(|e| format!("cannot start a thread for the keychain: {e}"))?;
        answered.recv_timeout(DEADLINE).unwrap_or_else(|_| {
            Err(format!(
                "the keychain did not answer within {}s (locked, waiting for a password?)",
                DEADLINE.as_secs()
            ))
        })
    }

    #[cfg(any(target_os = "linux", target_os = "macos", windows))]
    fn entry(account: &str) -> Result<keyring::Entry, String> {
        keyring::Entry::new(super::KEYCHAIN_SERVICE, account).map_err(|e| e.to_string())
    }

    /// The secret stored for `config_dir`; `Ok(None)` when there is none.
    #[cfg(any(target_os = "linux", target_os = "macos", windows))]
    pub fn get(config_dir: &Path) -> Result<Option<String>, String> {
        let account = super::account(config_dir);
        bounded(move || match entry(&account)?.get_password() {
            Ok(secret) => Ok(Some(secret)),
            Err(keyring::Error::NoEntry) => Ok(None),
            Err(e) => Err(e.to_string()),
        })
    }

    /// Stores `secret` for `config_dir`.
    #[cfg(any(target_os = "linux", target_os = "macos", windows))]
    pub fn set(config_dir: &Path, secret: &str) -> Result<(), String> {
        let account = super::account(config_dir);
        let secret = secret.to_owned();
        bounded(move || {
            entry(&account)?
                .set_password(&secret)
                .map_err(|e| e.to_string())
        })
    }

    /// Removes the secret for `config_dir`, if any.
    #[cfg(any(target_os = "linux", target_os = "macos", windows))]
    pub fn delete(config_dir: &Path) -> Result<(), String> {
        let account = super::account(config_dir);
        bounded(move || match entry(&account)?.delete_credential() {
            Ok(()) | Err(keyring::Error::NoEntry) => Ok(()),
            Err(e) => Err(e.to_string()),
        })
    }

    #[cfg(not(any(target_os = "linux", target_os = "macos", windows)))]
    const NONE: &str = "this build has no keychain support on this platform";

    #[cfg(not(any(target_os = "linux", target_os = "macos", windows)))]
    pub fn get(_: &Path) -> Result<Option<String>, String> {
        Err(NONE.into())
    }

    #[cfg(not(any(target_os = "linux", target_os = "macos", windows)))]
    pub fn set(_: &Path, _: &str) -> Result<(), String> {
        Err(NONE.into())
    }

    #[cfg(not(any(target_os = "linux", target_os = "macos", windows)))]
    pub fn delete(_: &Path) -> Result<(), String> {
        Ok(())
    }
}

/// The credentials file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    /// The keychain could not be used (the message never holds the secret).
    #[error("{0}")]
    Keychain(String),
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
    let record: FileRecord = toml::from_str(&text).map_err(|e| CredentialsError::Invalid {
        message: e.message().to_string(),
        path: path.clone(),
    })?;
    if record.store.as_deref() != Some("keychain") {
        return Ok(Some(Credentials {
            relay: record.relay,
            api_key: record.api_key,
            refresh_token: record.refresh_token,
        }));
    }
    let secret = keychain::get(config_dir)
        .map_err(|e| {
            CredentialsError::Keychain(format!(
                "cannot read the login from the keychain ({e}): unlock the keychain and try again, or run `cloudctl login` again"
            ))
        })?
        .ok_or_else(|| {
            CredentialsError::Keychain(
                "the keychain has no login for this daemon (removed?): run `cloudctl login` again"
                    .into(),
            )
        })?;
    let secrets = parse_secrets(&secret)?;
    Ok(Some(Credentials {
        relay: record.relay,
        api_key: secrets.api_key,
        refresh_token: secrets.refresh_token,
    }))
}

/// The longest keychain secret read: the login is two tokens.
const MAX_SECRET: usize = 64 * 1024;

/// The keychain entry's text, as the secrets (never quoted in the error).
fn parse_secrets(secret: &str) -> Result<Secrets, CredentialsError> {
    let damaged = || {
        CredentialsError::Keychain(
            "the keychain's login for this daemon is damaged: run `cloudctl login` again".into(),
        )
    };
    if secret.len() > MAX_SECRET {
        return Err(damaged());
    }
    serde_json::from_str(secret).map_err(|_| damaged())
}

/// Where the login is kept now, and which file or keychain entry.
pub fn store_in_use(config_dir: &Path) -> (Store, String) {
    let path = path(config_dir);
    let record = std::fs::read_to_string(&path)
        .ok()
        .and_then(|text| toml::from_str::<FileRecord>(&text).ok());
    match record {
        None => (Store::None, String::new()),
        Some(record) if record.store.as_deref() == Some("keychain") => (
            Store::Keychain,
            format!("{KEYCHAIN_SERVICE} / {}", account(config_dir)),
        ),
        Some(_) => (Store::File, path.display().to_string()),
    }
}

/// Writes the credentials: into the keychain when one is usable (and the file names it),
/// else into the file, readable by this user only.
pub fn save(config_dir: &Path, credentials: &Credentials) -> Result<(), CredentialsError> {
    save_with(preference()?, config_dir, credentials)
}

fn save_with(
    preference: Preference,
    config_dir: &Path,
    credentials: &Credentials,
) -> Result<(), CredentialsError> {
    let (before, _) = store_in_use(config_dir);
    if preference != Preference::File {
        let secrets = serde_json::to_string(&Secrets {
            api_key: credentials.api_key.clone(),
            refresh_token: credentials.refresh_token.clone(),
        })
        .expect("secrets always serialise");
        match keychain::set(config_dir, &secrets) {
            Ok(()) => {
                return write_file(
                    config_dir,
                    &FileRecord {
                        relay: credentials.relay.clone(),
                        api_key: None,
                        refresh_token: None,
                        store: Some("keychain".into()),
                    },
                );
            }
            Err(e) if preference == Preference::Keychain => {
                return Err(CredentialsError::Keychain(format!(
                    "cannot store the login in the keychain ({e}): unlock the keychain, or set {STORE_VARIABLE}=file and restart cloudd"
                )))
            }
            Err(e) => {
                tracing::info!("no usable keychain ({e}); keeping the login in the credentials file");
            }
        }
    }
    write_file(
        config_dir,
        &FileRecord {
            relay: credentials.relay.clone(),
            api_key: credentials.api_key.clone(),
            refresh_token: credentials.refresh_token.clone(),
            store: None,
        },
    )?;
    // A login kept in the keychain before is not left behind there.
    if before == Store::Keychain {
        if let Err(e) = keychain::delete(config_dir) {
            tracing::warn!("cannot remove the previous login from the keychain ({e}); remove the entry {KEYCHAIN_SERVICE} / {} by hand", account(config_dir));
        }
    }
    Ok(())
}

fn write_file(config_dir: &Path, record: &FileRecord) -> Result<(), CredentialsError> {
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
    let text = toml::to_string(record).map_err(|e| CredentialsError::Invalid {
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

/// Removes the credentials, from the keychain too (back to the embedded relay).
pub fn remove(config_dir: &Path) -> Result<(), CredentialsError> {
    let (store, _) = store_in_use(config_dir);
    let path = path(config_dir);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(CredentialsError::Io {
                action: "remove",
                path,
                source,
            })
        }
    }
    if store == Store::Keychain {
        keychain::delete(config_dir).map_err(|e| {
            CredentialsError::Keychain(format!(
                "logged out, but cannot remove the login from the keychain ({e}): remove the entry {KEYCHAIN_SERVICE} / {} by hand",
                account(config_dir)
            ))
        })?;
    }
    Ok(())
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
        // The file store, whatever keychain this machine has.
        save_with(Preference::File, dir.path(), &credentials).unwrap();
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

    proptest::proptest! {
        /// Any text as the keychain's entry: the secrets or an error that quotes none of it.
        #[test]
        fn an_arbitrary_keychain_entry_never_panics(text in ".{0,512}") {
            if let Err(e) = parse_secrets(&text) {
                let message = e.to_string();
                proptest::prop_assert!(text.len() < 8 || !message.contains(text.as_str()));
            }
        }
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
