//! Bearer tokens: minting, revoking, and checking them against `DATA/tokens.jsonl`.
//!
//! A token is `crt_` followed by 40 random hex digits. Only its blake3 hash is stored, one
//! JSON record per line, in a file only its owner can read (0600). The command-line tool
//! writes the file while a server may be running; the server notices by the file's length,
//! modification time and inode ([`TokenCache`]) and re-reads it, so a revocation takes
//! effect within one check.
//!
//! This module must never put a token (as opposed to its hash) in a log line, an error or
//! a file. Writers serialise on `tokens.lock` so two `cloud-relay token` commands cannot
//! lose each other's records.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::access::Identity;

/// The token file's name inside the data directory.
pub const TOKENS_FILE: &str = "tokens.jsonl";

/// The lock file writers hold while changing the token file.
const LOCK_FILE: &str = "tokens.lock";

/// Every token starts with this, so a leaked one is recognisable by secret scanners.
const TOKEN_PREFIX: &str = "crt_";

/// One line of the token file.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TokenRecord {
    /// blake3 of the whole token, hex.
    hash: String,
    /// Who the token authenticates.
    user: String,
    /// Their org.
    org: String,
    /// Milliseconds since the Unix epoch.
    created_at: u64,
    /// Revoked tokens stay in the file so a revocation is visible and auditable.
    revoked: bool,
}

/// A token operation failed. Messages never contain a token.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The token file or its lock could not be read or written.
    #[error("cannot access the token file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A user or org name is unusable.
    #[error(
        "invalid {what} {value:?}: use 1 to 128 characters without spaces, control characters or `/`"
    )]
    InvalidName {
        /// `user` or `org`.
        what: &'static str,
        /// The refused name.
        value: String,
    },
    /// The system's random source failed.
    #[error("cannot generate a random token: {0}")]
    Random(String),
}

/// The hash under which a token is stored.
pub fn token_hash(token: &str) -> String {
    blake3::hash(token.as_bytes()).to_hex().to_string()
}

/// Mints a token for `user` in `org`, stores its hash and returns it. The caller shows it
/// to the user once; it cannot be recovered afterwards.
pub fn create(data_dir: &Path, user: &str, org: &str) -> Result<String, TokenError> {
    check_name("user", user)?;
    check_name("org", org)?;
    let mut random = [0u8; 20];
    getrandom::fill(&mut random).map_err(|e| TokenError::Random(e.to_string()))?;
    let token = format!("{TOKEN_PREFIX}{}", hex(&random));
    let record = TokenRecord {
        hash: token_hash(&token),
        user: user.to_owned(),
        org: org.to_owned(),
        created_at: crate::now_millis(),
        revoked: false,
    };
    create_dir(data_dir)?;
    let _lock = WriterLock::acquire(data_dir)?;
    let path = data_dir.join(TOKENS_FILE);
    let io = |source| TokenError::Io {
        path: path.clone(),
        source,
    };
    let mut file = open_private(&path, OpenOptions::new().append(true).create(true)).map_err(io)?;
    let mut line = serde_json::to_string(&record).expect("a token record always serialises");
    line.push('\n');
    file.write_all(line.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)?;
    Ok(token)
}

/// Revokes every live token of `user`; returns how many were revoked.
pub fn revoke_user(data_dir: &Path, user: &str) -> Result<usize, TokenError> {
    let path = data_dir.join(TOKENS_FILE);
    if !path.exists() {
        return Ok(0);
    }
    let _lock = WriterLock::acquire(data_dir)?;
    let io = |source| TokenError::Io {
        path: path.clone(),
        source,
    };
    let mut records = read_records(&path).map_err(io)?;
    let mut n_revoked = 0;
    for record in records.iter_mut().filter(|r| r.user == user && !r.revoked) {
        record.revoked = true;
        n_revoked += 1;
    }
    if n_revoked == 0 {
        return Ok(0);
    }
    // Rewrite beside the file and rename over it, so a reader sees either the old file or
    // the new one, never a half-written one.
    let temporary = data_dir.join(format!("{TOKENS_FILE}.tmp"));
    let write = || -> std::io::Result<()> {
        let mut file = open_private(
            &temporary,
            OpenOptions::new().write(true).create(true).truncate(true),
        )?;
        for record in &records {
            let mut line = serde_json::to_string(record).expect("a token record always serialises");
            line.push('\n');
            file.write_all(line.as_bytes())?;
        }
        file.sync_all()?;
        std::fs::rename(&temporary, &path)
    };
    write().map_err(io)?;
    Ok(n_revoked)
}

fn check_name(what: &'static str, value: &str) -> Result<(), TokenError> {
    let ok = !value.is_empty()
        && value.len() <= 128
        // `/` separates the user from the instance id in the relay's dedup key.
        && !value.chars().any(|c| c.is_whitespace() || c.is_control() || c == '/');
    if ok {
        Ok(())
    } else {
        Err(TokenError::InvalidName {
            what,
            value: value.to_owned(),
        })
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Creates the data directory, private to its owner (0700 on Unix) like the relay makes it.
fn create_dir(dir: &Path) -> Result<(), TokenError> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(|source| TokenError::Io {
        path: dir.to_owned(),
        source,
    })
}

/// Opens a file that only its owner may read (0600 on Unix).
fn open_private(path: &Path, options: &mut OpenOptions) -> std::io::Result<File> {
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(options, 0o600);
    options.open(path)
}

/// Parses the token file, skipping lines that are not records (a torn final line from a
/// crash must not lock everyone out).
fn read_records(path: &Path) -> std::io::Result<Vec<TokenRecord>> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut records = Vec::new();
    for line in BufReader::new(file).lines() {
        let line = line?;
        match serde_json::from_str::<TokenRecord>(&line) {
            Ok(record) => records.push(record),
            Err(_) if line.trim().is_empty() => {}
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "skipping an unreadable token record")
            }
        }
    }
    Ok(records)
}

/// The exclusive lock writers hold; released when dropped.
struct WriterLock {
    /// Kept open: the lock lives as long as this descriptor.
    _file: File,
}

impl WriterLock {
    fn acquire(data_dir: &Path) -> Result<WriterLock, TokenError> {
        let path = data_dir.join(LOCK_FILE);
        let io = |source| TokenError::Io {
            path: path.clone(),
            source,
        };
        let file = open_private(&path, OpenOptions::new().write(true).create(true)).map_err(io)?;
        file.lock().map_err(io)?;
        Ok(WriterLock { _file: file })
    }
}

/// What identifies a version of the token file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct FileStamp {
    len: u64,
    modified: Option<std::time::SystemTime>,
    inode: u64,
    exists: bool,
}

impl FileStamp {
    fn of(path: &Path) -> FileStamp {
        match std::fs::metadata(path) {
            Ok(metadata) => FileStamp {
                len: metadata.len(),
                modified: metadata.modified().ok(),
                #[cfg(unix)]
                inode: std::os::unix::fs::MetadataExt::ino(&metadata),
                #[cfg(not(unix))]
                inode: 0,
                exists: true,
            },
            Err(_) => FileStamp::default(),
        }
    }
}

/// The server's view of the token file, re-read whenever the file changes.
#[derive(Debug)]
pub(crate) struct TokenCache {
    /// `DATA/tokens.jsonl`.
    path: PathBuf,
    /// The stamp of the file as last read, and its live tokens by hash.
    state: Mutex<(FileStamp, HashMap<String, Identity>)>,
    /// Bumped at every re-read, so open connections re-check their own token.
    generation: tokio::sync::watch::Sender<u64>,
}

impl TokenCache {
    /// A cache over `DATA/tokens.jsonl`, read now.
    pub(crate) fn open(data_dir: &Path) -> TokenCache {
        let cache = TokenCache {
            path: data_dir.join(TOKENS_FILE),
            state: Mutex::new((
                FileStamp {
                    // Never matches a real stamp, so the first refresh reads the file.
                    len: u64::MAX,
                    ..FileStamp::default()
                },
                HashMap::new(),
            )),
            generation: tokio::sync::watch::channel(0).0,
        };
        cache.refresh();
        cache
    }

    /// Re-reads the file when its stamp changed; returns whether it did.
    pub(crate) fn refresh(&self) -> bool {
        let stamp = FileStamp::of(&self.path);
        if self.state.lock().unwrap().0 == stamp {
            return false;
        }
        let records = match read_records(&self.path) {
            Ok(records) => records,
            Err(e) => {
                // Keep the last good view: an unreadable file is more likely a transient
                // problem than a reason to lock every user out or let revoked ones in.
                tracing::warn!(path = %self.path.display(), error = %e, "cannot read the token file");
                return false;
            }
        };
        let live: HashMap<String, Identity> = records
            .into_iter()
            .filter(|r| !r.revoked)
            .map(|r| {
                (
                    r.hash.clone(),
                    Identity {
                        user: r.user,
                        org: r.org,
                        token_hash: r.hash,
                    },
                )
            })
            .collect();
        tracing::debug!(n_live_tokens = live.len(), "token file re-read");
        *self.state.lock().unwrap() = (stamp, live);
        self.generation.send_modify(|generation| *generation += 1);
        true
    }

    /// A receiver that changes whenever the file was re-read.
    pub(crate) fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// The identity a bearer token authenticates, if it is live.
    pub(crate) fn authenticate(&self, token: &str) -> Option<Identity> {
        self.refresh();
        self.state
            .lock()
            .unwrap()
            .1
            .get(&token_hash(token))
            .cloned()
    }

    /// Whether the token with this hash is still live (checked by open connections).
    pub(crate) fn is_live(&self, hash: &str) -> bool {
        self.state.lock().unwrap().1.contains_key(hash)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_stored_hashed_and_can_be_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let token = create(dir.path(), "alice", "acme").unwrap();
        assert!(token.starts_with("crt_") && token.len() == 44);
        let text = std::fs::read_to_string(dir.path().join(TOKENS_FILE)).unwrap();
        assert!(!text.contains(&token));
        assert!(text.contains(&token_hash(&token)));
        let cache = TokenCache::open(dir.path());
        assert_eq!(cache.authenticate(&token).unwrap().user, "alice");
        assert!(cache.authenticate("crt_nope").is_none());
        assert_eq!(revoke_user(dir.path(), "alice").unwrap(), 1);
        assert!(cache.authenticate(&token).is_none());
        assert_eq!(revoke_user(dir.path(), "alice").unwrap(), 0);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(dir.path().join(TOKENS_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn bad_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(create(dir.path(), "", "acme").is_err());
        assert!(create(dir.path(), "a b", "acme").is_err());
        // A `/` would let user `a` + instance `b/c` collide with user `a/b` + instance `c`.
        assert!(create(dir.path(), "a/b", "acme").is_err());
    }
}
