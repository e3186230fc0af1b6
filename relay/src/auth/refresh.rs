//! Refresh tokens: stored hashed, in families, rotated at every use.
//!
//! Exchanging an API key starts a family; each refresh marks the token it was given used
//! and issues the family's next one. A used token presented again means two holders have
//! it (one of them a thief): the whole family is revoked, so neither can refresh again and
//! the access tokens issued with it stop working ([`RefreshStore::family_revoked`]).
//!
//! `DATA/refresh.jsonl` (0600) is a log of changes — issued, used, family revoked — each
//! flushed to disk before the answer goes out, read back at start and then compacted
//! (expired tokens and their families' revocations dropped). A token is `crf_` + 40 random
//! hex digits; only its blake3 hash is stored. This module never logs a token.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::access::Scope;
use crate::tokens::{open_private, random_token, token_hash};

/// Every refresh token starts with this.
pub const REFRESH_PREFIX: &str = "crf_";

/// The log's name in the data directory.
pub const REFRESH_FILE: &str = "refresh.jsonl";

/// How long a refresh token may wait to be used.
pub const REFRESH_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);

/// A log line longer than this is damage, not a record.
const MAX_LINE: usize = 64 * 1024;

/// What a family of refresh tokens grants, fixed when its API key was exchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// The user.
    pub user: String,
    /// The org they act in.
    pub org: String,
    /// What its access tokens may do.
    pub scopes: Vec<Scope>,
    /// The hash of the API key exchanged.
    pub key: String,
    /// The family's id.
    pub family: String,
    /// The machine's name, as it gave it when it logged in (empty when it gave none).
    #[serde(default)]
    pub name: String,
    /// When the login started, milliseconds since the Unix epoch (0: before this was kept).
    #[serde(default)]
    pub created_at: u64,
}

/// A login (a family), as `cloudctl device list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Family {
    /// Its id.
    pub id: String,
    /// The machine's name.
    pub name: String,
    /// The org it acts in.
    pub org: String,
    /// When it started.
    pub created_at: u64,
    /// When it was last refreshed (or started).
    pub last_used_at: u64,
}

/// One refresh token, as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    hash: String,
    grant: Grant,
    expires_at: u64,
    used: bool,
}

/// One line of the log.
#[derive(Debug, Serialize, Deserialize)]
enum Change {
    Issued(Record),
    Used { hash: String },
    FamilyRevoked { family: String, expires_at: u64 },
}

/// Why a refresh token was not accepted (never quoting it).
#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    /// Unknown, expired, or of a revoked family.
    #[error("unknown, expired or revoked refresh token")]
    Invalid,
    /// Used before: its family is now revoked.
    #[error("refresh token used twice: every token of this login is now revoked")]
    Reused {
        /// The revoked family.
        family: String,
    },
    /// The log could not be written.
    #[error("cannot write {path}: {source}")]
    Io {
        /// The log.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The random source failed.
    #[error("cannot generate a token: {0}")]
    Random(String),
}

#[derive(Debug)]
struct State {
    file: File,
    tokens: HashMap<String, Record>,
    /// Revoked families, with when their last token would have expired.
    revoked: HashMap<String, u64>,
}

/// The relay's refresh tokens.
#[derive(Debug)]
pub struct RefreshStore {
    path: PathBuf,
    state: Mutex<State>,
}

impl RefreshStore {
    /// Reads the log in `data_dir` (compacting it), or starts an empty one.
    pub fn open(data_dir: &Path, now: u64) -> std::io::Result<RefreshStore> {
        let path = data_dir.join(REFRESH_FILE);
        let mut tokens = HashMap::new();
        let mut revoked = HashMap::new();
        match File::open(&path) {
            Ok(file) => {
                for line in BufReader::new(file).split(b'\n') {
                    let line = line?;
                    if line.len() > MAX_LINE {
                        continue;
                    }
                    // A torn last line from a crash is skipped, not fatal.
                    match serde_json::from_slice::<Change>(&line) {
                        Ok(Change::Issued(record)) => {
                            tokens.insert(record.hash.clone(), record);
                        }
                        Ok(Change::Used { hash }) => {
                            if let Some(record) = tokens.get_mut(&hash) {
                                record.used = true;
                            }
                        }
                        Ok(Change::FamilyRevoked { family, expires_at }) => {
                            revoked.insert(family, expires_at);
                        }
                        Err(_) => {}
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        tokens.retain(|_, record| {
            record.expires_at > now && !revoked.contains_key(&record.grant.family)
        });
        revoked.retain(|_, expires_at| *expires_at > now);
        // Compact: what is still needed, beside the log, then renamed over it.
        let temporary = data_dir.join(format!("{REFRESH_FILE}.tmp"));
        {
            let mut file = open_private(
                &temporary,
                std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true),
            )?;
            let mut text = Vec::new();
            for record in tokens.values() {
                line(&mut text, &Change::Issued(record.clone()));
            }
            for (family, expires_at) in &revoked {
                line(
                    &mut text,
                    &Change::FamilyRevoked {
                        family: family.clone(),
                        expires_at: *expires_at,
                    },
                );
            }
            file.write_all(&text)?;
            file.sync_all()?;
        }
        std::fs::rename(&temporary, &path)?;
        let file = open_private(&path, std::fs::OpenOptions::new().append(true))?;
        Ok(RefreshStore {
            path,
            state: Mutex::new(State {
                file,
                tokens,
                revoked,
            }),
        })
    }

    /// Starts a new family for `grant` (its `family` is filled in); returns its first token.
    pub fn start_family(
        &self,
        mut grant: Grant,
        now: u64,
    ) -> Result<(Grant, String), RefreshError> {
        grant.family = random_token("fam_").map_err(|e| RefreshError::Random(e.to_string()))?;
        grant.created_at = now;
        let mut state = self.state.lock().unwrap();
        let (record, token) = new_token(grant.clone(), now)?;
        let mut text = Vec::new();
        line(&mut text, &Change::Issued(record.clone()));
        self.append(&mut state, &text)?;
        state.tokens.insert(record.hash.clone(), record);
        Ok((grant, token))
    }

    /// Uses `token`: returns what its family grants and the family's next token. A token
    /// used before revokes its family.
    pub fn rotate(&self, token: &str, now: u64) -> Result<(Grant, String), RefreshError> {
        let hash = token_hash(token);
        let mut state = self.state.lock().unwrap();
        let Some(record) = state.tokens.get(&hash).cloned() else {
            return Err(RefreshError::Invalid);
        };
        let family = record.grant.family.clone();
        if state.revoked.contains_key(&family) || record.expires_at <= now {
            return Err(RefreshError::Invalid);
        }
        if record.used {
            let expires_at = state
                .tokens
                .values()
                .filter(|r| r.grant.family == family)
                .map(|r| r.expires_at)
                .max()
                .unwrap_or(record.expires_at);
            let mut text = Vec::new();
            line(
                &mut text,
                &Change::FamilyRevoked {
                    family: family.clone(),
                    expires_at,
                },
            );
            self.append(&mut state, &text)?;
            state.revoked.insert(family.clone(), expires_at);
            state.tokens.retain(|_, r| r.grant.family != family);
            tracing::warn!(user = %record.grant.user, "a refresh token was used twice: its whole family is revoked");
            return Err(RefreshError::Reused { family });
        }
        let (next, token) = new_token(record.grant.clone(), now)?;
        let mut text = Vec::new();
        line(&mut text, &Change::Used { hash: hash.clone() });
        line(&mut text, &Change::Issued(next.clone()));
        self.append(&mut state, &text)?;
        state.tokens.get_mut(&hash).expect("looked up above").used = true;
        state.tokens.insert(next.hash.clone(), next);
        Ok((record.grant, token))
    }

    /// What `token`'s family grants, if it could be rotated now (known, unused, unexpired,
    /// its family not revoked), without using it.
    pub fn peek(&self, token: &str, now: u64) -> Option<Grant> {
        let state = self.state.lock().unwrap();
        let record = state.tokens.get(&token_hash(token))?;
        let usable = !record.used
            && record.expires_at > now
            && !state.revoked.contains_key(&record.grant.family);
        usable.then(|| record.grant.clone())
    }

    /// The live logins of `user`, oldest first.
    pub fn families(&self, user: &str) -> Vec<Family> {
        let state = self.state.lock().unwrap();
        let mut families: HashMap<&str, Family> = HashMap::new();
        for record in state.tokens.values() {
            let grant = &record.grant;
            if grant.user != user || state.revoked.contains_key(&grant.family) {
                continue;
            }
            // A token is issued when its family is started or refreshed.
            let issued = record
                .expires_at
                .saturating_sub(REFRESH_LIFETIME.as_millis() as u64);
            let family = families.entry(&grant.family).or_insert_with(|| Family {
                id: grant.family.clone(),
                name: grant.name.clone(),
                org: grant.org.clone(),
                created_at: grant.created_at,
                last_used_at: issued,
            });
            family.last_used_at = family.last_used_at.max(issued);
        }
        let mut families: Vec<Family> = families.into_values().collect();
        families.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        families
    }

    /// Revokes the login of `user` whose id is `id` (or starts with it, when only one
    /// does); returns it.
    pub fn revoke_family(&self, user: &str, id: &str) -> Result<Option<Family>, RefreshError> {
        let matching: Vec<Family> = self
            .families(user)
            .into_iter()
            .filter(|f| !id.is_empty() && f.id.starts_with(id))
            .collect();
        let [family] = matching.as_slice() else {
            return Ok(None);
        };
        let mut state = self.state.lock().unwrap();
        let expires_at = state
            .tokens
            .values()
            .filter(|r| r.grant.family == family.id)
            .map(|r| r.expires_at)
            .max()
            .unwrap_or(0);
        let mut text = Vec::new();
        line(
            &mut text,
            &Change::FamilyRevoked {
                family: family.id.clone(),
                expires_at,
            },
        );
        self.append(&mut state, &text)?;
        state.revoked.insert(family.id.clone(), expires_at);
        state.tokens.retain(|_, r| r.grant.family != family.id);
        Ok(Some(family.clone()))
    }

    /// Whether `family` was revoked.
    pub fn family_revoked(&self, family: &str) -> bool {
        self.state.lock().unwrap().revoked.contains_key(family)
    }

    /// Appends `text` to the log and flushes it to disk.
    fn append(&self, state: &mut State, text: &[u8]) -> Result<(), RefreshError> {
        let io = |source| RefreshError::Io {
            path: self.path.clone(),
            source,
        };
        state.file.write_all(text).map_err(io)?;
        state.file.sync_data().map_err(io)
    }
}

fn new_token(grant: Grant, now: u64) -> Result<(Record, String), RefreshError> {
    let token = random_token(REFRESH_PREFIX).map_err(|e| RefreshError::Random(e.to_string()))?;
    let record = Record {
        hash: token_hash(&token),
        grant,
        expires_at: now + REFRESH_LIFETIME.as_millis() as u64,
        used: false,
    };
    Ok((record, token))
}

fn line(text: &mut Vec<u8>, change: &Change) {
    serde_json::to_writer(&mut *text, change).expect("a change always serialises");
    text.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant() -> Grant {
        Grant {
            user: "alice".into(),
            org: "acme".into(),
            scopes: vec![Scope::SessionsRead],
            key: "k".into(),
            family: String::new(),
            name: "laptop".into(),
            created_at: 0,
        }
    }

    #[test]
    fn refresh_tokens_rotate_and_a_reused_one_revokes_its_family_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let store = RefreshStore::open(dir.path(), 0).unwrap();
        let (grant, first) = store.start_family(grant(), 0).unwrap();
        assert!(first.starts_with(REFRESH_PREFIX));
        let (again, second) = store.rotate(&first, 1).unwrap();
        assert_eq!(again, grant);
        let (_, third) = store.rotate(&second, 2).unwrap();
        let text = std::fs::read_to_string(dir.path().join(REFRESH_FILE)).unwrap();
        for token in [&first, &second, &third] {
            assert!(!text.contains(token.as_str()), "stored hashed only");
        }
        // A restart keeps what was used.
        drop(store);
        let store = RefreshStore::open(dir.path(), 3).unwrap();
        assert!(matches!(
            store.rotate(&first, 3),
            Err(RefreshError::Reused { .. })
        ));
        assert!(store.family_revoked(&grant.family));
        // The latest token of the family is revoked too, also after a restart.
        assert!(matches!(
            store.rotate(&third, 4),
            Err(RefreshError::Invalid)
        ));
        drop(store);
        let store = RefreshStore::open(dir.path(), 5).unwrap();
        assert!(store.family_revoked(&grant.family));
        assert!(matches!(
            store.rotate(&third, 5),
            Err(RefreshError::Invalid)
        ));
        // Another family is untouched.
        let (_, other) = store.start_family(super::tests::grant(), 6).unwrap();
        assert!(store.rotate(&other, 7).is_ok());
    }

    /// A user's logins are listed with their names and last use, and one revoked by its
    /// id's prefix is gone from the list and cannot refresh; another user's are neither
    /// listed nor revocable.
    #[test]
    fn families_are_listed_and_revoked_by_their_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = RefreshStore::open(dir.path(), 0).unwrap();
        let (desk, first) = store.start_family(grant(), 1_000).unwrap();
        let (laptop, other) = store
            .start_family(
                Grant {
                    name: "desk".into(),
                    ..grant()
                },
                2_000,
            )
            .unwrap();
        let (_, _) = store
            .start_family(
                Grant {
                    user: "bob".into(),
                    ..grant()
                },
                3_000,
            )
            .unwrap();
        store.rotate(&first, 5_000).unwrap();
        let families = store.families("alice");
        assert_eq!(families.len(), 2);
        assert_eq!(families[0].id, desk.family);
        assert_eq!(
            (families[0].created_at, families[0].last_used_at),
            (1_000, 5_000)
        );
        assert_eq!(families[1].name, "desk");
        assert!(store
            .revoke_family("bob", &laptop.family)
            .unwrap()
            .is_none());
        // "fam_" alone is a prefix of both: not one login.
        assert!(store.revoke_family("alice", "fam_").unwrap().is_none());
        let revoked = store
            .revoke_family("alice", &laptop.family[..12])
            .unwrap()
            .unwrap();
        assert_eq!(revoked.id, laptop.family);
        assert!(matches!(
            store.rotate(&other, 6_000),
            Err(RefreshError::Invalid)
        ));
        assert_eq!(store.families("alice").len(), 1);
        // Kept across a restart.
        drop(store);
        let store = RefreshStore::open(dir.path(), 7_000).unwrap();
        assert_eq!(store.families("alice").len(), 1);
        assert!(store.family_revoked(&laptop.family));
    }

    #[test]
    fn expired_and_unknown_tokens_are_invalid() {
        let dir = tempfile::tempdir().unwrap();
        let store = RefreshStore::open(dir.path(), 0).unwrap();
        let (_, token) = store.start_family(grant(), 0).unwrap();
        let later = REFRESH_LIFETIME.as_millis() as u64;
        assert!(matches!(
            store.rotate(&token, later),
            Err(RefreshError::Invalid)
        ));
        assert!(matches!(
            store.rotate("crf_nope", 0),
            Err(RefreshError::Invalid)
        ));
    }
}
