//! The users' and orgs' settings (see [`cloud_protocol::settings`]): kept in
//! `DATA/settings.json` (0600), written whole beside it and renamed over it at every
//! change, so a crash leaves the old file or the new one.
//!
//! Every record carries a version; a write names the version it replaces and is refused
//! with the current record when that is not the one stored (two machines writing at once:
//! the second is told what the first wrote). A user writes their own settings; only an
//! admin of an org (by [`crate::orgs`], or a key with the `admin` scope) writes or locks the
//! org's. Each change bumps [`Settings::subscribe`], and every bridge connection sends its
//! daemon the settings of its user and org again when they changed.
//!
//! This module does not decide precedence (the daemon resolves the layers; the core only
//! applies an org's locked `visibility` and `network` to every session created or shared
//! in it, whatever the client sent) and holds no token.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use cloud_protocol::settings::{
    validate, SettingRecord, SettingRefusal, SettingScope, SettingWrite, SettingsSnapshot,
    MAX_RECORDS,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::orgs::Role;
use crate::tokens::open_private;

/// The settings file's name in the data directory.
pub const SETTINGS_FILE: &str = "settings.json";

/// The largest settings file read.
const MAX_FILE: u64 = 64 * 1024 * 1024;

/// Every record, by user or org, then by key.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Stored {
    users: BTreeMap<String, BTreeMap<String, SettingRecord>>,
    orgs: BTreeMap<String, BTreeMap<String, SettingRecord>>,
}

/// The relay's settings.
#[derive(Debug)]
pub struct Settings {
    path: PathBuf,
    stored: Mutex<Stored>,
    /// Bumped after every change is on disk.
    changes: watch::Sender<u64>,
}

/// Who writes, as far as settings care.
#[derive(Debug, Clone, Copy)]
pub struct Writer<'a> {
    /// The user.
    pub user: &'a str,
    /// The org they act in.
    pub org: &'a str,
    /// Their role in it (none: no longer a member).
    pub role: Option<Role>,
    /// Whether their key has the `admin` scope.
    pub operator: bool,
}

impl Settings {
    /// The settings of the relay whose data is in `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Settings, String> {
        let path = data_dir.join(SETTINGS_FILE);
        let stored = match std::fs::File::open(&path) {
            Ok(file) => {
                let mut text = Vec::new();
                file.take(MAX_FILE)
                    .read_to_end(&mut text)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                serde_json::from_slice(&text).map_err(|e| {
                    format!(
                        "cannot read {}: {e}; fix the file or move it away (the settings start empty)",
                        path.display()
                    )
                })?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Stored::default(),
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        Ok(Settings {
            path,
            stored: Mutex::new(stored),
            changes: watch::channel(0).0,
        })
    }

    /// A receiver that changes whenever a setting changed.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The settings of `user` and of `org`.
    pub fn snapshot(&self, user: &str, org: &str) -> SettingsSnapshot {
        let stored = self.stored.lock().unwrap();
        let records = |map: Option<&BTreeMap<String, SettingRecord>>| {
            map.map(|m| m.values().cloned().collect())
                .unwrap_or_default()
        };
        SettingsSnapshot {
            org_name: org.to_owned(),
            user: records(stored.users.get(user)),
            org: records(stored.orgs.get(org)),
        }
    }

    /// The value of `org`'s setting `key` if the org locked it.
    pub fn locked(&self, org: &str, key: &str) -> Option<String> {
        let stored = self.stored.lock().unwrap();
        let record = stored.orgs.get(org)?.get(key)?;
        record.locked.then(|| record.value.clone())
    }

    /// Writes a setting for `writer` (blocking: it writes the file).
    pub fn write(
        &self,
        writer: Writer<'_>,
        write: SettingWrite,
    ) -> Result<SettingRecord, SettingRefusal> {
        let refuse = |reason: String| SettingRefusal {
            reason,
            current: None,
        };
        let value = validate(&write.key, &write.value).map_err(refuse)?;
        let Some(role) = writer.role else {
            return Err(refuse(format!(
                "you are no longer a member of org {}: switch with `cloudctl org switch ORG`",
                writer.org
            )));
        };
        match write.scope {
            SettingScope::User if write.lock => {
                return Err(refuse(
                    "only org settings can be locked: add --org (org admins only)".into(),
                ))
            }
            SettingScope::Org if role != Role::Admin && !writer.operator => {
                return Err(refuse(format!(
                    "only admins of org {org} may change its settings: ask one, or the relay's operator (`cloud-relay org add-member {org} {user} --role admin`)",
                    org = writer.org,
                    user = writer.user
                )))
            }
            _ => {}
        }
        let mut stored = self.stored.lock().unwrap();
        let map = match write.scope {
            SettingScope::User => stored.users.entry(writer.user.to_owned()).or_default(),
            SettingScope::Org => stored.orgs.entry(writer.org.to_owned()).or_default(),
        };
        let current = map.get(&write.key).cloned();
        let current_version = current.as_ref().map_or(0, |r| r.version);
        if current_version != write.expected_version {
            let reason = match &current {
                Some(record) => format!(
                    "{} was changed meanwhile: it is now {:?} (version {}, by {}); write again with `--if-version {}` to replace it",
                    write.key, record.value, record.version, record.updated_by, record.version
                ),
                None => format!(
                    "{} is not set (version 0); write again with `--if-version 0`",
                    write.key
                ),
            };
            return Err(SettingRefusal { reason, current });
        }
        if current.is_none() && map.len() >= MAX_RECORDS {
            return Err(refuse(format!(
                "at most {MAX_RECORDS} settings per user or org; change an existing one"
            )));
        }
        let record = SettingRecord {
            key: write.key.clone(),
            value,
            version: current_version + 1,
            locked: write.scope == SettingScope::Org && write.lock,
            updated_by: writer.user.to_owned(),
            updated_at: crate::now_millis(),
        };
        map.insert(write.key.clone(), record.clone());
        if let Err(e) = self.save(&stored) {
            // Memory must not claim what the disk does not hold.
            let map = match write.scope {
                SettingScope::User => stored.users.get_mut(writer.user),
                SettingScope::Org => stored.orgs.get_mut(writer.org),
            }
            .expect("inserted above");
            match current {
                Some(current) => map.insert(write.key, current),
                None => map.remove(&write.key),
            };
            tracing::error!(path = %self.path.display(), error = %e, "cannot store the settings");
            return Err(refuse(format!(
                "the relay could not store the setting ({e}); try again"
            )));
        }
        drop(stored);
        self.changes.send_modify(|n| *n += 1);
        Ok(record)
    }

    /// Writes every record beside the file, then renames it over the file.
    fn save(&self, stored: &Stored) -> std::io::Result<()> {
        let temporary = self.path.with_extension("json.tmp");
        let text = serde_json::to_vec(stored).expect("settings always serialise");
        let mut file = open_private(
            &temporary,
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true),
        )?;
        file.write_all(&text)?;
        file.sync_all()?;
        std::fs::rename(&temporary, &self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any bytes as the settings file: opened or refused with a message naming the
        /// file, never a panic.
        #[test]
        fn arbitrary_settings_files_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..8192)) {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join(SETTINGS_FILE), &bytes).unwrap();
            match Settings::open(dir.path()) {
                Ok(settings) => drop(settings.snapshot("alice", "acme")),
                Err(message) => prop_assert!(message.contains(SETTINGS_FILE)),
            }
        }
    }

    fn writer(role: Role) -> Writer<'static> {
        Writer {
            user: "alice",
            org: "acme",
            role: Some(role),
            operator: false,
        }
    }

    fn write(scope: SettingScope, value: &str, lock: bool, expected: u64) -> SettingWrite {
        SettingWrite {
            scope,
            key: "network".into(),
            value: value.into(),
            lock,
            expected_version: expected,
        }
    }

    #[test]
    fn versions_are_checked_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let settings = Settings::open(dir.path()).unwrap();
        let mut changes = settings.subscribe();
        let first = settings
            .write(
                writer(Role::Member),
                write(SettingScope::User, "full", false, 0),
            )
            .unwrap();
        assert_eq!((first.version, first.value.as_str()), (1, "full"));
        assert!(changes.has_changed().unwrap());
        changes.mark_unchanged();
        // A stale write is refused with the current record.
        let refused = settings
            .write(
                writer(Role::Member),
                write(SettingScope::User, "none", false, 0),
            )
            .unwrap_err();
        assert_eq!(refused.current, Some(first.clone()));
        assert!(
            refused.reason.contains("--if-version 1"),
            "{}",
            refused.reason
        );
        assert!(!changes.has_changed().unwrap());
        settings
            .write(
                writer(Role::Member),
                write(SettingScope::User, "none", false, 1),
            )
            .unwrap();
        drop(settings);
        let settings = Settings::open(dir.path()).unwrap();
        let snapshot = settings.snapshot("alice", "acme");
        assert_eq!(snapshot.user[0].version, 2);
        assert_eq!(snapshot.user[0].value, "none");
        assert!(snapshot.org.is_empty());
        assert!(settings.snapshot("bob", "acme").user.is_empty());
    }

    #[test]
    fn only_org_admins_write_and_lock_org_settings() {
        let dir = tempfile::tempdir().unwrap();
        let settings = Settings::open(dir.path()).unwrap();
        let refused = settings
            .write(
                writer(Role::Member),
                write(SettingScope::Org, "none", true, 0),
            )
            .unwrap_err();
        assert!(refused.reason.contains("only admins"), "{}", refused.reason);
        let refused = settings
            .write(
                writer(Role::Admin),
                write(SettingScope::User, "none", true, 0),
            )
            .unwrap_err();
        assert!(refused.reason.contains("--org"), "{}", refused.reason);
        let record = settings
            .write(
                writer(Role::Admin),
                write(SettingScope::Org, "none", true, 0),
            )
            .unwrap();
        assert!(record.locked);
        assert!(settings
            .write(
                writer(Role::Admin),
                write(SettingScope::Org, "sideways", false, 1)
            )
            .unwrap_err()
            .reason
            .contains("none, limited, full"));
        let mut removed = writer(Role::Admin);
        removed.role = None;
        assert!(settings
            .write(removed, write(SettingScope::User, "full", false, 0))
            .is_err());
    }
}
