//! Settings shared across a team's machines: the keys, their values' rules, the records the
//! relay keeps (per user and per org, each versioned), and the one precedence rule that
//! turns the layers into the value in effect.
//!
//! Keys are the defaults for new sessions — `visibility` (private, team, public),
//! `network` (none, limited, full), `allowed_domains` (comma-separated host names) and
//! `auto_stop_minutes` (0 = never) — and free-form feature flags, `feature.NAME`.
//!
//! Precedence ([`resolve`]): a command-line flag, then the local `config.toml`, then the
//! user's setting, then the org's, then the built-in default; an org setting that is
//! locked wins over all of them.
//!
//! This module does no IO: it validates, and computes.

use serde::{Deserialize, Serialize};

/// The longest key, in bytes.
pub const MAX_KEY: usize = 128;

/// The longest value, in bytes.
pub const MAX_VALUE: usize = 4096;

/// The most records one user or one org may hold.
pub const MAX_RECORDS: usize = 256;

/// The keys with a meaning of their own (besides `feature.NAME`).
pub const KNOWN_KEYS: [&str; 4] = [
    "visibility",
    "network",
    "allowed_domains",
    "auto_stop_minutes",
];

/// The prefix of a feature flag's key.
pub const FEATURE_PREFIX: &str = "feature.";

/// Whose setting a record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SettingScope {
    /// The user's own, on all their machines.
    User,
    /// Their current org's, for everyone in it.
    Org,
}

/// One stored setting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettingRecord {
    /// Its key.
    pub key: String,
    /// Its value, normalised ([`validate`]).
    pub value: String,
    /// 1 when first written, +1 at every write; a write names the version it replaces.
    pub version: u64,
    /// Org settings only: nothing below overrides it.
    pub locked: bool,
    /// Who wrote it last.
    pub updated_by: String,
    /// When, in milliseconds since the Unix epoch.
    pub updated_at: u64,
}

/// Every setting a daemon may use: its user's and its current org's, sent by the relay after
/// registering and whenever one of them changes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettingsSnapshot {
    /// The org the `org` records belong to.
    pub org_name: String,
    /// The user's settings, by key.
    pub user: Vec<SettingRecord>,
    /// The org's settings, by key.
    pub org: Vec<SettingRecord>,
}

impl SettingsSnapshot {
    /// The record of `key` in `scope`.
    pub fn get(&self, scope: SettingScope, key: &str) -> Option<&SettingRecord> {
        let records = match scope {
            SettingScope::User => &self.user,
            SettingScope::Org => &self.org,
        };
        records.iter().find(|r| r.key == key)
    }

    /// Puts `record` in `scope`, replacing the one of its key.
    pub fn put(&mut self, scope: SettingScope, record: SettingRecord) {
        let records = match scope {
            SettingScope::User => &mut self.user,
            SettingScope::Org => &mut self.org,
        };
        match records.iter_mut().find(|r| r.key == record.key) {
            Some(old) => *old = record,
            None => {
                records.push(record);
                records.sort_by(|a, b| a.key.cmp(&b.key));
            }
        }
    }
}

/// A write asked of the relay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettingWrite {
    /// The user's, or their current org's (org admins only).
    pub scope: SettingScope,
    /// The key.
    pub key: String,
    /// The new value.
    pub value: String,
    /// Lock it (org settings only).
    pub lock: bool,
    /// The version it replaces (0: there is none yet). A write naming another version than
    /// the current one is refused with the current record.
    pub expected_version: u64,
}

/// Why a write was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettingRefusal {
    /// Why, in words, with what to do.
    pub reason: String,
    /// The record as it is now, when the write was stale.
    pub current: Option<SettingRecord>,
}

impl From<String> for SettingRefusal {
    fn from(reason: String) -> SettingRefusal {
        SettingRefusal {
            reason,
            current: None,
        }
    }
}

/// Where the value in effect comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// A command-line flag.
    Flag,
    /// The local `config.toml`.
    Config,
    /// The user's setting.
    User,
    /// The org's setting.
    Org,
    /// The org's locked setting, which overrides everything.
    OrgLocked,
    /// The built-in default.
    Default,
}

impl Source {
    /// Its name, as `settings get` prints it.
    pub fn name(self) -> &'static str {
        match self {
            Source::Flag => "flag",
            Source::Config => "config",
            Source::User => "user",
            Source::Org => "org",
            Source::OrgLocked => "org (locked)",
            Source::Default => "default",
        }
    }
}

/// Every layer a setting may come from, highest first.
#[derive(Debug, Clone, Copy, Default)]
pub struct Layers<'a> {
    /// A command-line flag.
    pub flag: Option<&'a str>,
    /// The local `config.toml`.
    pub config: Option<&'a str>,
    /// The user's record.
    pub user: Option<&'a SettingRecord>,
    /// The org's record.
    pub org: Option<&'a SettingRecord>,
    /// The built-in default.
    pub default: Option<&'a str>,
}

/// The value in effect and where it comes from, or `None` when no layer has one. A locked
/// org record wins; otherwise the first layer that has a value, in the order of
/// [`Layers`]'s fields.
pub fn resolve<'a>(layers: &Layers<'a>) -> Option<(&'a str, Source)> {
    if let Some(org) = layers.org.filter(|r| r.locked) {
        return Some((org.value.as_str(), Source::OrgLocked));
    }
    layers
        .flag
        .map(|v| (v, Source::Flag))
        .or(layers.config.map(|v| (v, Source::Config)))
        .or(layers.user.map(|r| (r.value.as_str(), Source::User)))
        .or(layers.org.map(|r| (r.value.as_str(), Source::Org)))
        .or(layers.default.map(|v| (v, Source::Default)))
}

/// The built-in default of `key`.
pub fn default_value(key: &str) -> Option<&'static str> {
    match key {
        "visibility" => Some("private"),
        // Limited, not none: the built-in agent cannot yet enforce `none`.
        "network" => Some("limited"),
        "allowed_domains" => Some(""),
        "auto_stop_minutes" => Some("30"),
        _ => None,
    }
}

/// Checks `key` and `value` and returns the value normalised, or why they are refused
/// (with what is accepted).
pub fn validate(key: &str, value: &str) -> Result<String, String> {
    if value.len() > MAX_VALUE {
        return Err(format!(
            "the value of {key} is longer than {MAX_VALUE} bytes; shorten it"
        ));
    }
    let value = value.trim();
    match key {
        "visibility" => one_of(key, value, &["private", "team", "public"]),
        "network" => one_of(key, value, &["none", "limited", "full"]),
        "allowed_domains" => {
            let mut domains = Vec::new();
            for domain in value.split(',').map(str::trim).filter(|d| !d.is_empty()) {
                let ok = domain.len() <= 253
                    && domain
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '*'));
                if !ok {
                    return Err(format!(
                        "invalid domain {domain:?} in allowed_domains: use host names separated by commas, e.g. crates.io,*.npmjs.org"
                    ));
                }
                domains.push(domain.to_ascii_lowercase());
            }
            Ok(domains.join(","))
        }
        "auto_stop_minutes" => match value.parse::<u32>() {
            Ok(minutes) if minutes <= 7 * 24 * 60 => Ok(minutes.to_string()),
            _ => Err(format!(
                "invalid auto_stop_minutes {value:?}: use a number of minutes from 0 (never) to 10080 (a week)"
            )),
        },
        _ => {
            let name = key.strip_prefix(FEATURE_PREFIX).unwrap_or("");
            let ok = !name.is_empty()
                && key.len() <= MAX_KEY
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
            if !ok {
                return Err(format!(
                    "unknown setting {key:?}: use one of {}, or feature.NAME (letters, digits, `_`, `-`, `.`) for a feature flag",
                    KNOWN_KEYS.join(", ")
                ));
            }
            if value.chars().any(char::is_control) {
                return Err(format!(
                    "the value of {key} has control characters; remove them"
                ));
            }
            Ok(value.to_owned())
        }
    }
}

fn one_of(key: &str, value: &str, allowed: &[&str]) -> Result<String, String> {
    let lower = value.to_ascii_lowercase();
    if allowed.contains(&lower.as_str()) {
        Ok(lower)
    } else {
        Err(format!(
            "invalid {key} {value:?}: use {}",
            allowed.join(", ")
        ))
    }
}

/// A setting as `settings get` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettingView {
    /// The key.
    pub key: String,
    /// The value in effect (or, for `--org`, the org's).
    pub value: String,
    /// Where it comes from.
    pub source: Source,
    /// The version of the record it comes from (0: not a stored record).
    pub version: u64,
    /// Whether the org locked it.
    pub locked: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(value: &str, locked: bool) -> SettingRecord {
        SettingRecord {
            key: "network".into(),
            value: value.into(),
            version: 1,
            locked,
            updated_by: "admin".into(),
            updated_at: 0,
        }
    }

    /// Every combination of present and absent layers, with and without a lock: the lock
    /// wins, else the highest present layer, else nothing.
    #[test]
    fn precedence_over_every_combination() {
        let user = record("user", false);
        for mask in 0u32..32 {
            for locked in [false, true] {
                let org = record("org", locked);
                let layers = Layers {
                    flag: (mask & 1 != 0).then_some("flag"),
                    config: (mask & 2 != 0).then_some("config"),
                    user: (mask & 4 != 0).then_some(&user),
                    org: (mask & 8 != 0).then_some(&org),
                    default: (mask & 16 != 0).then_some("default"),
                };
                let expected = if mask & 8 != 0 && locked {
                    Some(("org", Source::OrgLocked))
                } else if mask & 1 != 0 {
                    Some(("flag", Source::Flag))
                } else if mask & 2 != 0 {
                    Some(("config", Source::Config))
                } else if mask & 4 != 0 {
                    Some(("user", Source::User))
                } else if mask & 8 != 0 {
                    Some(("org", Source::Org))
                } else if mask & 16 != 0 {
                    Some(("default", Source::Default))
                } else {
                    None
                };
                assert_eq!(
                    resolve(&layers),
                    expected,
                    "mask {mask:05b}, locked {locked}"
                );
            }
        }
    }

    #[test]
    fn values_are_checked_and_normalised() {
        assert_eq!(validate("visibility", " Team ").unwrap(), "team");
        assert!(validate("visibility", "everyone")
            .unwrap_err()
            .contains("private, team, public"));
        assert_eq!(validate("network", "NONE").unwrap(), "none");
        assert_eq!(
            validate("allowed_domains", "Crates.io, *.npmjs.org,").unwrap(),
            "crates.io,*.npmjs.org"
        );
        assert!(validate("allowed_domains", "a b").is_err());
        assert_eq!(validate("auto_stop_minutes", "30").unwrap(), "30");
        assert!(validate("auto_stop_minutes", "-1").is_err());
        assert!(validate("auto_stop_minutes", "99999").is_err());
        assert_eq!(validate("feature.fast-path", "on").unwrap(), "on");
        assert!(validate("feature.", "on").is_err());
        assert!(validate("colour", "red")
            .unwrap_err()
            .contains("feature.NAME"));
        assert!(validate("feature.x", &"x".repeat(MAX_VALUE + 1)).is_err());
        for key in KNOWN_KEYS {
            let default = default_value(key).unwrap();
            assert_eq!(validate(key, default).unwrap(), default, "{key}");
        }
    }

    #[test]
    fn snapshots_replace_records_by_key() {
        let mut snapshot = SettingsSnapshot::default();
        snapshot.put(SettingScope::Org, record("none", true));
        snapshot.put(SettingScope::Org, record("full", false));
        assert_eq!(snapshot.org.len(), 1);
        assert_eq!(
            snapshot.get(SettingScope::Org, "network").unwrap().value,
            "full"
        );
        assert!(snapshot.get(SettingScope::User, "network").is_none());
    }
}
