//! Who the daemon works as beyond the login: the org it acts in (the current org, chosen
//! with `cloudctl org switch`), the orgs the relay last said the user belongs to, and its
//! copy of the user's and the current org's settings, pushed by the relay. All three are
//! kept in the store's `account` tree, so `org list`, `settings get` and `session create`
//! work while the relay is unreachable and after a restart.
//!
//! [`Account::effective`] is where the settings' layers meet: it reads the local
//! `config.toml`'s `[settings]`, this copy and the built-in defaults, and resolves them with
//! [`cloud_protocol::settings::resolve`].
//!
//! This module never talks to the network, and never holds a token.

use std::collections::BTreeMap;
use std::sync::Mutex;

use cloud_protocol::settings::{
    default_value, resolve, Layers, SettingScope, SettingView, SettingsSnapshot, Source, KNOWN_KEYS,
};

use crate::store::StoreError;

/// The account's state.
#[derive(Debug, Default, Clone)]
struct State {
    current_org: Option<String>,
    orgs: Vec<String>,
    settings: SettingsSnapshot,
}

/// The daemon's account: current org, known orgs, settings copy.
#[derive(Debug)]
pub struct Account {
    tree: sled::Tree,
    state: Mutex<State>,
}

fn json<T: serde::de::DeserializeOwned + Default>(tree: &sled::Tree, key: &str) -> T {
    tree.get(key)
        .ok()
        .flatten()
        .and_then(|value| serde_json::from_slice(&value).ok())
        .unwrap_or_default()
}

impl Account {
    /// The account stored in `db`.
    pub fn open(db: &sled::Db) -> Result<Account, StoreError> {
        let tree = db
            .open_tree("account")
            .map_err(StoreError::sled("account"))?;
        let state = State {
            current_org: json(&tree, "current_org"),
            orgs: json(&tree, "orgs"),
            settings: json(&tree, "settings"),
        };
        Ok(Account {
            tree,
            state: Mutex::new(state),
        })
    }

    fn store<T: serde::Serialize>(&self, key: &str, value: &T) {
        let bytes = serde_json::to_vec(value).expect("account values serialise");
        if let Err(e) = self
            .tree
            .insert(key, bytes)
            .and_then(|_| self.tree.flush().map(drop))
        {
            tracing::error!("cannot store the account's {key}: {e}");
        }
    }

    /// The org chosen with `org switch` (none: the login's default).
    pub fn current_org(&self) -> Option<String> {
        self.state.lock().unwrap().current_org.clone()
    }

    /// Remembers the current org.
    pub fn set_current_org(&self, org: Option<String>) {
        self.state.lock().unwrap().current_org.clone_from(&org);
        self.store("current_org", &org);
    }

    /// The orgs the relay last said the user belongs to.
    pub fn orgs(&self) -> Vec<String> {
        self.state.lock().unwrap().orgs.clone()
    }

    /// Remembers the user's orgs (from a token answer).
    pub fn set_orgs(&self, orgs: Vec<String>) {
        let changed = {
            let mut state = self.state.lock().unwrap();
            let changed = state.orgs != orgs;
            state.orgs.clone_from(&orgs);
            changed
        };
        if changed {
            self.store("orgs", &orgs);
        }
    }

    /// The settings copy.
    pub fn settings(&self) -> SettingsSnapshot {
        self.state.lock().unwrap().settings.clone()
    }

    /// Replaces the settings copy (the relay sent it).
    pub fn set_settings(&self, settings: SettingsSnapshot) {
        self.state.lock().unwrap().settings.clone_from(&settings);
        self.store("settings", &settings);
    }

    /// Puts one record in the copy (a write the relay just accepted).
    pub fn put_setting(
        &self,
        scope: SettingScope,
        record: cloud_protocol::settings::SettingRecord,
    ) {
        let settings = {
            let mut state = self.state.lock().unwrap();
            state.settings.put(scope, record);
            state.settings.clone()
        };
        self.store("settings", &settings);
    }
}

/// The value in effect of `key` given a command-line `flag` and the local `config`
/// settings, over the copy `settings`; `None` for a key no layer sets.
pub fn effective(
    key: &str,
    flag: Option<&str>,
    config: &BTreeMap<String, String>,
    settings: &SettingsSnapshot,
) -> Option<SettingView> {
    let user = settings.get(SettingScope::User, key);
    let org = settings.get(SettingScope::Org, key);
    let (value, source) = resolve(&Layers {
        flag,
        config: config.get(key).map(String::as_str),
        user,
        org,
        default: default_value(key),
    })?;
    let record = match source {
        Source::User => user,
        Source::Org | Source::OrgLocked => org,
        _ => None,
    };
    Some(SettingView {
        key: key.to_owned(),
        value: value.to_owned(),
        source,
        version: record.map_or(0, |r| r.version),
        locked: org.is_some_and(|r| r.locked),
    })
}

/// Every key some layer sets: the known ones, then the feature flags, by name.
pub fn keys(config: &BTreeMap<String, String>, settings: &SettingsSnapshot) -> Vec<String> {
    let mut keys: Vec<String> = KNOWN_KEYS.iter().map(|k| k.to_string()).collect();
    let mut features: Vec<String> = config
        .keys()
        .chain(settings.user.iter().map(|r| &r.key))
        .chain(settings.org.iter().map(|r| &r.key))
        .filter(|k| !KNOWN_KEYS.contains(&k.as_str()))
        .cloned()
        .collect();
    features.sort();
    features.dedup();
    keys.extend(features);
    keys
}
