//! Org membership: who belongs to which org, with which role, in `DATA/members.jsonl`.
//!
//! An API key names the orgs its user was given when it was minted; `cloud-relay org
//! add-member|remove-member` changes that afterwards. The file is a log of changes, one
//! JSON record per line (`{"org", "user", "role", "removed", "at"}`); for each org and user
//! the last record wins over the key's list. So a user's orgs are the key's orgs plus the
//! orgs they were added to, minus the orgs they were removed from ([`Members::orgs_of`]).
//!
//! Like the token file, it is written by the command-line tool while a server may run
//! (serialised on the same `tokens.lock`), and the server re-reads it when its stamp
//! changes ([`Members::refresh`]): at every authentication and twice a second, so a removal
//! reaches new requests at once and open connections within one check.
//!
//! This module never decides what a role may do (the settings module does) and never
//! holds a token.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::tokens::{check_name, create_dir, open_private, FileStamp, TokenError, WriterLock};

/// The membership file's name inside the data directory.
pub const MEMBERS_FILE: &str = "members.jsonl";

/// A line longer than this is damage, not a record.
const MAX_LINE: usize = 4096;

/// What a member may do in an org.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Use the org: its sessions, its settings.
    Member,
    /// Also change and lock the org's settings.
    Admin,
}

/// One line of the membership file.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct MemberRecord {
    org: String,
    user: String,
    role: Role,
    removed: bool,
    /// Milliseconds since the Unix epoch.
    at: u64,
}

/// Adds `user` to `org` with `role` (or changes their role).
pub fn add_member(data_dir: &Path, org: &str, user: &str, role: Role) -> Result<(), TokenError> {
    append(data_dir, org, user, role, false)
}

/// Removes `user` from `org` (also when their API key names it).
pub fn remove_member(data_dir: &Path, org: &str, user: &str) -> Result<(), TokenError> {
    append(data_dir, org, user, Role::Member, true)
}

fn append(
    data_dir: &Path,
    org: &str,
    user: &str,
    role: Role,
    removed: bool,
) -> Result<(), TokenError> {
    check_name("org", org)?;
    check_name("user", user)?;
    create_dir(data_dir)?;
    let _lock = WriterLock::acquire(data_dir)?;
    let path = data_dir.join(MEMBERS_FILE);
    let io = |source| TokenError::Io {
        path: path.clone(),
        source,
    };
    let record = MemberRecord {
        org: org.to_owned(),
        user: user.to_owned(),
        role,
        removed,
        at: crate::now_millis(),
    };
    let mut line = serde_json::to_string(&record).expect("a member record always serialises");
    line.push('\n');
    let mut file = open_private(&path, OpenOptions::new().append(true).create(true)).map_err(io)?;
    file.write_all(line.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)
}

/// The last record of each (org, user), by user then org.
type Table = HashMap<String, HashMap<String, (Role, bool)>>;

/// Reads the file; unreadable lines are skipped (a torn last line must not lock anyone out).
fn read(path: &Path) -> std::io::Result<Table> {
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Table::new()),
        Err(e) => return Err(e),
    };
    let mut table = Table::new();
    for line in BufReader::new(file).split(b'\n') {
        let line = line?;
        if line.len() > MAX_LINE {
            continue;
        }
        if let Ok(record) = serde_json::from_slice::<MemberRecord>(&line) {
            table
                .entry(record.user)
                .or_default()
                .insert(record.org, (record.role, record.removed));
        }
    }
    Ok(table)
}

/// The server's view of the membership file.
#[derive(Debug)]
pub struct Members {
    path: PathBuf,
    state: Mutex<(FileStamp, Table)>,
}

impl Members {
    /// The membership of the relay whose data is in `data_dir`, read now.
    pub fn open(data_dir: &Path) -> Members {
        let members = Members {
            path: data_dir.join(MEMBERS_FILE),
            state: Mutex::new((FileStamp::unread(), Table::new())),
        };
        members.refresh();
        members
    }

    /// Re-reads the file when it changed; returns whether it did.
    pub fn refresh(&self) -> bool {
        let stamp = FileStamp::of(&self.path);
        if self.state.lock().unwrap().0 == stamp {
            return false;
        }
        match read(&self.path) {
            Ok(table) => {
                *self.state.lock().unwrap() = (stamp, table);
                true
            }
            Err(e) => {
                // Keep the last good view, as for the token file.
                tracing::warn!(path = %self.path.display(), error = %e, "cannot read the membership file");
                false
            }
        }
    }

    /// The orgs of `user` whose key names `key_orgs`, with their roles: the key's orgs in
    /// its order (the default first), then the orgs they were added to, by name; without
    /// the orgs they were removed from.
    pub fn orgs_of(&self, user: &str, key_orgs: &[String]) -> Vec<(String, Role)> {
        let state = self.state.lock().unwrap();
        let records = state.1.get(user);
        let record = |org: &str| records.and_then(|r| r.get(org)).copied();
        let mut orgs: Vec<(String, Role)> = key_orgs
            .iter()
            .filter_map(|org| match record(org) {
                Some((_, true)) => None,
                Some((role, false)) => Some((org.clone(), role)),
                None => Some((org.clone(), Role::Member)),
            })
            .collect();
        let mut added: Vec<(String, Role)> = records
            .into_iter()
            .flatten()
            .filter(|(org, (_, removed))| !removed && !key_orgs.contains(org))
            .map(|(org, (role, _))| (org.clone(), *role))
            .collect();
        added.sort_by(|a, b| a.0.cmp(&b.0));
        orgs.extend(added);
        orgs
    }

    /// The role of `user` in `org`, if they belong to it.
    pub fn role(&self, user: &str, org: &str, key_orgs: &[String]) -> Option<Role> {
        self.orgs_of(user, key_orgs)
            .into_iter()
            .find(|(o, _)| o == org)
            .map(|(_, role)| role)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any bytes as the membership file: read without a panic, and a line that is not
        /// a record (or is too long) is skipped.
        #[test]
        fn arbitrary_membership_files_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..8192)) {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join(MEMBERS_FILE), &bytes).unwrap();
            let members = Members::open(dir.path());
            let _ = members.orgs_of("alice", &["acme".to_owned()]);
        }
    }

    #[test]
    fn membership_follows_the_last_record_over_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let members = Members::open(dir.path());
        let key = vec!["acme".to_owned()];
        assert_eq!(
            members.orgs_of("alice", &key),
            [("acme".to_owned(), Role::Member)]
        );
        add_member(dir.path(), "beta", "alice", Role::Admin).unwrap();
        add_member(dir.path(), "acme", "alice", Role::Admin).unwrap();
        // Another user's records do not count.
        add_member(dir.path(), "gamma", "bob", Role::Member).unwrap();
        assert!(members.refresh());
        assert_eq!(
            members.orgs_of("alice", &key),
            [
                ("acme".to_owned(), Role::Admin),
                ("beta".to_owned(), Role::Admin)
            ]
        );
        remove_member(dir.path(), "acme", "alice").unwrap();
        members.refresh();
        assert_eq!(
            members.orgs_of("alice", &key),
            [("beta".to_owned(), Role::Admin)]
        );
        assert_eq!(members.role("alice", "acme", &key), None);
        add_member(dir.path(), "acme", "alice", Role::Member).unwrap();
        members.refresh();
        assert_eq!(members.role("alice", "acme", &key), Some(Role::Member));
        assert!(add_member(dir.path(), "a b", "alice", Role::Member).is_err());
    }
}
