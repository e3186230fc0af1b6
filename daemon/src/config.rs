//! The daemon's configuration file: `config.toml` in the config directory.
//!
//! A missing file means the defaults. The file is read at start (an invalid file stops
//! the start with the parse error) and on SIGHUP (an invalid file is reported and the
//! configuration in effect is kept). Its `[settings]` table (local defaults for the shared
//! settings, see [`crate::account`]) is read again whenever a setting is needed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The configuration in effect.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The log filter, in `tracing-subscriber`'s `EnvFilter` syntax (`info`,
    /// `cloudd=debug`, ...). The `CLOUDD_LOG` environment variable takes precedence.
    pub log: Option<String>,
    /// The most clients served at once; further connections are told the daemon is busy.
    pub max_clients: usize,
    /// Send anonymous aggregates (counts only) to the relay, at most every
    /// [`crate::bridge::TELEMETRY_INTERVAL`]. Off unless set: nothing leaves the machine.
    pub telemetry: bool,
    /// Local values of the shared settings (`network = "none"`, `auto_stop_minutes = 30`,
    /// `"feature.x" = "on"`): above the user's and the org's settings, below a flag.
    #[serde(deserialize_with = "settings_table")]
    pub settings: BTreeMap<String, String>,
}

/// Reads `[settings]`: strings, numbers and booleans as their text, arrays of them joined
/// with commas (as `allowed_domains` is written).
fn settings_table<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    let table = BTreeMap::<String, toml::Value>::deserialize(deserializer)?;
    let text = |value: &toml::Value| match value {
        toml::Value::String(text) => Some(text.clone()),
        toml::Value::Integer(n) => Some(n.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        _ => None,
    };
    table
        .into_iter()
        .map(|(key, value)| {
            let value = match &value {
                toml::Value::Array(items) => items
                    .iter()
                    .map(text)
                    .collect::<Option<Vec<_>>>()
                    .map(|v| v.join(",")),
                value => text(value),
            }
            .ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "settings.{key}: use a string, a number, a boolean or a list of strings"
                ))
            })?;
            Ok((key, value))
        })
        .collect()
}

impl Default for Config {
    fn default() -> Config {
        Config {
            log: None,
            max_clients: 1024,
            telemetry: false,
            settings: BTreeMap::new(),
        }
    }
}

/// The configuration file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file exists but could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown keys or wrong types.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said, with the line and column.
        message: String,
    },
    /// A value is out of range.
    #[error("invalid config file {path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Which value and why.
        message: String,
    },
}

impl Config {
    /// Reads `path`; a missing file gives the defaults.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Config::default()),
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })
            }
        };
        let config: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        if config.max_clients == 0 {
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                message: "max_clients must be at least 1".into(),
            });
        }
        let mut config = config;
        for (key, value) in config.settings.iter_mut() {
            *value = cloud_protocol::settings::validate(key, value).map_err(|message| {
                ConfigError::Invalid {
                    path: path.to_owned(),
                    message: format!("[settings]: {message}"),
                }
            })?;
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_file_gives_defaults() {
        let dir = std::env::temp_dir().join(format!("cloudd-config-test-{}", std::process::id()));
        assert_eq!(
            Config::load(&dir.join("nope.toml")).unwrap(),
            Config::default()
        );
    }

    #[test]
    fn unknown_keys_are_refused_with_their_name() {
        let err = toml::from_str::<Config>("lgo = \"debug\"").unwrap_err();
        assert!(err.to_string().contains("lgo"), "{err}");
    }

    #[test]
    fn settings_are_read_as_text_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(
            &path,
            "[settings]\nnetwork = \"NONE\"\nauto_stop_minutes = 30\nallowed_domains = [\"crates.io\", \"x.org\"]\n",
        )
        .unwrap();
        let config = Config::load(&path).unwrap();
        assert_eq!(config.settings["network"], "none");
        assert_eq!(config.settings["auto_stop_minutes"], "30");
        assert_eq!(config.settings["allowed_domains"], "crates.io,x.org");
        std::fs::write(&path, "[settings]\nnetwork = \"sideways\"\n").unwrap();
        assert!(Config::load(&path)
            .unwrap_err()
            .to_string()
            .contains("none, limited, full"));
    }

    #[test]
    fn values_parse() {
        let config: Config = toml::from_str("log = \"debug\"\nmax_clients = 8").unwrap();
        assert_eq!(config.log.as_deref(), Some("debug"));
        assert_eq!(config.max_clients, 8);
    }
}
