//! API keys: minting, revoking, and checking them against `DATA/tokens.jsonl`.
//!
//! An API key is long-lived: a user, the orgs they act in (the first is the default), its
//! scopes and an optional expiry. Clients exchange it for short-lived access tokens
//! ([`crate::auth`]); scripts may also send it as a bearer token directly.
//!
//! A key is `crt_` followed by 40 random hex digits. Only its blake3 hash is stored, one
//! JSON record per line, in a file only its owner can read (0600). Records of the first
//! format (`org` instead of `orgs`, no scopes, no expiry) still load: they become keys for
//! that one org with `sessions:read` and `sessions:write`, and are rewritten in the
//! current format the next time the file is rewritten. The command-line tool
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

use crate::access::Scope;

/// The token file's name inside the data directory.
pub const TOKENS_FILE: &str = "tokens.jsonl";

/// The lock file writers hold while changing the token file.
const LOCK_FILE: &str = "tokens.lock";

/// Every token starts with this, so a leaked one is recognisable by secret scanners.
const TOKEN_PREFIX: &str = "crt_";

/// One line of the token file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(try_from = "StoredRecord")]
struct TokenRecord {
    /// blake3 of the whole key, hex.
    hash: String,
    /// Who the key authenticates.
    user: String,
    /// The orgs they act in, the default first; never empty.
    orgs: Vec<String>,
    /// What the key may do.
    scopes: Vec<Scope>,
    /// Milliseconds since the Unix epoch.
    created_at: u64,
    /// When the key stops working, in milliseconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires_at: Option<u64>,
    /// Revoked keys stay in the file so a revocation is visible and auditable.
    revoked: bool,
}

/// A record as stored, in either format: the first had one `org` and no scopes.
#[derive(Deserialize)]
struct StoredRecord {
    hash: String,
    user: String,
    #[serde(default)]
    org: Option<String>,
    #[serde(default)]
    orgs: Vec<String>,
    #[serde(default)]
    scopes: Option<Vec<Scope>>,
    created_at: u64,
    #[serde(default)]
    expires_at: Option<u64>,
    revoked: bool,
}

impl TryFrom<StoredRecord> for TokenRecord {
    type Error = &'static str;

    fn try_from(stored: StoredRecord) -> Result<TokenRecord, &'static str> {
        let mut orgs = stored.orgs;
        if orgs.is_empty() {
            orgs.extend(stored.org);
        }
        if orgs.is_empty() {
            return Err("a key record without an org");
        }
        Ok(TokenRecord {
            hash: stored.hash,
            user: stored.user,
            orgs,
            // What every key of the first format could do.
            scopes: stored
                .scopes
                .unwrap_or_else(|| vec![Scope::SessionsRead, Scope::SessionsWrite]),
            created_at: stored.created_at,
            expires_at: stored.expires_at,
            revoked: stored.revoked,
        })
    }
}

/// What a new API key stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewKey {
    /// The user it authenticates.
    pub user: String,
    /// The orgs they act in, the default first.
    pub orgs: Vec<String>,
    /// What it may do.
    pub scopes: Vec<Scope>,
    /// When it stops working, in milliseconds since the Unix epoch.
    pub expires_at: Option<u64>,
}

impl NewKey {
    /// A key for `user` in `org` that may read and write sessions, without expiry.
    pub fn new(user: &str, org: &str) -> NewKey {
        NewKey {
            user: user.to_owned(),
            orgs: vec![org.to_owned()],
            scopes: vec![Scope::SessionsRead, Scope::SessionsWrite],
            expires_at: None,
        }
    }
}

/// A live API key, as the server sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ApiKey {
    /// Its hash.
    pub hash: String,
    /// Who it authenticates.
    pub user: String,
    /// Their orgs, the default first.
    pub orgs: Vec<String>,
    /// What it may do.
    pub scopes: Vec<Scope>,
    /// When it stops working.
    pub expires_at: Option<u64>,
}

impl ApiKey {
    fn is_expired(&self, now: u64) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }
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
    /// A key needs at least one org and one scope.
    #[error("an API key needs at least one --org and one --scope")]
    Incomplete,
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

/// Mints an API key, stores its hash and returns it. The caller shows it to the user once;
/// it cannot be recovered afterwards.
pub fn create(data_dir: &Path, key: &NewKey) -> Result<String, TokenError> {
    check_name("user", &key.user)?;
    if key.orgs.is_empty() || key.scopes.is_empty() {
        return Err(TokenError::Incomplete);
    }
    for org in &key.orgs {
        check_name("org", org)?;
    }
    let token = random_token(TOKEN_PREFIX)?;
    let record = TokenRecord {
        hash: token_hash(&token),
        user: key.user.clone(),
        orgs: key.orgs.clone(),
        scopes: key.scopes.clone(),
        created_at: crate::now_millis(),
        expires_at: key.expires_at,
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

pub(crate) fn check_name(what: &'static str, value: &str) -> Result<(), TokenError> {
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

/// `prefix` and 40 random hex digits.
pub(crate) fn random_token(prefix: &str) -> Result<String, TokenError> {
    let mut random = [0u8; 20];
    getrandom::fill(&mut random).map_err(|e| TokenError::Random(e.to_string()))?;
    Ok(format!("{prefix}{}", hex(&random)))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Creates the data directory, private to its owner (0700 on Unix) like the relay makes it.
pub(crate) fn create_dir(dir: &Path) -> Result<(), TokenError> {
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
pub(crate) fn open_private(path: &Path, options: &mut OpenOptions) -> std::io::Result<File> {
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

/// The exclusive lock writers of the token and membership files hold; released when
/// dropped.
pub(crate) struct WriterLock {
    /// Kept open: the lock lives as long as this descriptor.
    _file: File,
}

impl WriterLock {
    pub(crate) fn acquire(data_dir: &Path) -> Result<WriterLock, TokenError> {
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

/// What identifies a version of a file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct FileStamp {
    len: u64,
    modified: Option<std::time::SystemTime>,
    inode: u64,
    exists: bool,
}

impl FileStamp {
    /// A stamp that never matches a real one, so the first check reads the file.
    pub(crate) fn unread() -> FileStamp {
        FileStamp {
            len: u64::MAX,
            ..FileStamp::default()
        }
    }

    pub(crate) fn of(path: &Path) -> FileStamp {
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
    /// The stamp of the file as last read, and its unrevoked keys by hash.
    state: Mutex<(FileStamp, HashMap<String, ApiKey>)>,
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
        let live: HashMap<String, ApiKey> = records
            .into_iter()
            .filter(|r| !r.revoked)
            .map(|r| {
                (
                    r.hash.clone(),
                    ApiKey {
                        hash: r.hash,
                        user: r.user,
                        orgs: r.orgs,
                        scopes: r.scopes,
                        expires_at: r.expires_at,
                    },
                )
            })
            .collect();
        tracing::debug!(n_live_tokens = live.len(), "token file re-read");
        *self.state.lock().unwrap() = (stamp, live);
        self.notify();
        true
    }

    /// Tells open connections to re-check their credentials.
    pub(crate) fn notify(&self) {
        self.generation.send_modify(|generation| *generation += 1);
    }

    /// A receiver that changes whenever the file was re-read.
    pub(crate) fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// The key `token` is, if it is live (not revoked, not expired).
    pub(crate) fn authenticate(&self, token: &str) -> Option<ApiKey> {
        self.refresh();
        self.live(&token_hash(token))
    }

    /// The key with this hash, if it is still live (checked by open connections and for
    /// every access token, whose key may have been revoked since).
    pub(crate) fn live(&self, hash: &str) -> Option<ApiKey> {
        let state = self.state.lock().unwrap();
        state
            .1
            .get(hash)
            .filter(|key| !key.is_expired(crate::now_millis()))
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_stored_hashed_and_can_be_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let token = create(dir.path(), &NewKey::new("alice", "acme")).unwrap();
        assert!(token.starts_with("crt_") && token.len() == 44);
        let text = std::fs::read_to_string(dir.path().join(TOKENS_FILE)).unwrap();
        assert!(!text.contains(&token));
        assert!(text.contains(&token_hash(&token)));
        let cache = TokenCache::open(dir.path());
        let key = cache.authenticate(&token).unwrap();
        assert_eq!(
            (key.user.as_str(), key.orgs.as_slice()),
            ("alice", &["acme".to_owned()][..])
        );
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
        assert!(create(dir.path(), &NewKey::new("", "acme")).is_err());
        assert!(create(dir.path(), &NewKey::new("a b", "acme")).is_err());
        // A `/` would let user `a` + instance `b/c` collide with user `a/b` + instance `c`.
        assert!(create(dir.path(), &NewKey::new("a/b", "acme")).is_err());
        let mut no_scope = NewKey::new("alice", "acme");
        no_scope.scopes.clear();
        assert!(create(dir.path(), &no_scope).is_err());
    }

    #[test]
    fn expired_keys_do_not_authenticate() {
        let dir = tempfile::tempdir().unwrap();
        let mut key = NewKey::new("alice", "acme");
        key.expires_at = Some(crate::now_millis() - 1);
        let token = create(dir.path(), &key).unwrap();
        assert!(TokenCache::open(dir.path()).authenticate(&token).is_none());
    }

    /// A key minted before keys had scopes, several orgs and an expiry still works, as a
    /// read-write key for its one org, and survives the file being rewritten.
    #[test]
    fn first_format_records_still_authenticate_and_are_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let old = "crt_00112233445566778899aabbccddeeff00112233";
        let line = format!(
            "{{\"hash\":\"{}\",\"user\":\"alice\",\"org\":\"acme\",\"created_at\":1,\"revoked\":false}}\n",
            token_hash(old)
        );
        std::fs::write(dir.path().join(TOKENS_FILE), line).unwrap();
        let cache = TokenCache::open(dir.path());
        let key = cache.authenticate(old).unwrap();
        assert_eq!(key.orgs, ["acme"]);
        assert_eq!(key.scopes, [Scope::SessionsRead, Scope::SessionsWrite]);
        // A rewrite (revoking someone else) writes the current format.
        create(dir.path(), &NewKey::new("bob", "acme")).unwrap();
        assert_eq!(revoke_user(dir.path(), "bob").unwrap(), 1);
        let text = std::fs::read_to_string(dir.path().join(TOKENS_FILE)).unwrap();
        assert!(
            text.lines().next().unwrap().contains("\"orgs\":[\"acme\"]"),
            "{text}"
        );
        assert!(!text.contains("\"org\":"), "{text}");
        assert_eq!(cache.authenticate(old).unwrap().scopes.len(), 2);
    }
}
