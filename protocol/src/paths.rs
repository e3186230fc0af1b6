//! The one location rule for the daemon's files, used by the daemon and every client.
//!
//! This module reads environment variables and nothing else: it never touches the file
//! system (creating directories and checking their modes is the daemon's job).
//!
//! - `CLOUDD_HOME=DIR` puts everything under DIR: `DIR/run/cloudd.sock`, `DIR/state/`,
//!   `DIR/config/`. Tests and scripts use it to run isolated daemons side by side.
//! - Otherwise the socket is `$XDG_RUNTIME_DIR/cloudd/cloudd.sock` (falling back to a
//!   per-user directory under the temp dir), state is under `$XDG_STATE_HOME/cloudd`
//!   (`~/.local/state/cloudd`) and config under `$XDG_CONFIG_HOME/cloudd`
//!   (`~/.config/cloudd`); on macOS both are under `~/Library/Application Support/cloudd`.
//! - `CLOUDD_SOCKET=PATH` overrides the socket path alone.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The socket's file name inside its directory.
pub const SOCKET_FILE: &str = "cloudd.sock";

/// The launchd label of the agent `cloudctl service install` writes on macOS; the daemon
/// recognises launchd supervision by it.
pub const LAUNCHD_LABEL: &str = "dev.cloudd.agent";

/// Where the daemon's files live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    /// The local socket clients connect to.
    pub socket: PathBuf,
    /// Durable state: the lock file, the journal, the log.
    pub state_dir: PathBuf,
    /// Configuration: `config.toml`, credentials.
    pub config_dir: PathBuf,
    /// Whether `CLOUDD_SOCKET` chose the socket path. The daemon then leaves the mode of an
    /// existing parent directory alone (it may be shared, like `/tmp`) instead of making
    /// its own socket directory 0700.
    pub socket_overridden: bool,
}

/// The environment gave no way to place the daemon's files.
#[derive(Debug, Clone, thiserror::Error)]
#[error("cannot locate cloudd's files: set CLOUDD_HOME or HOME")]
pub struct NoHome;

impl Paths {
    /// Applies the location rule to this process's environment.
    pub fn from_env() -> Result<Paths, NoHome> {
        Paths::from_lookup(|name| std::env::var_os(name).filter(|v| !v.is_empty()))
    }

    /// Applies the location rule to the environment `lookup` describes.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<OsString>) -> Result<Paths, NoHome> {
        let mut paths = match lookup("CLOUDD_HOME") {
            Some(home) => Paths::under_home(Path::new(&home)),
            None => Paths::per_user(&lookup)?,
        };
        if let Some(socket) = lookup("CLOUDD_SOCKET") {
            paths.socket = PathBuf::from(socket);
            paths.socket_overridden = true;
        }
        Ok(paths)
    }

    /// Everything under one directory, as `CLOUDD_HOME` asks.
    pub fn under_home(home: &Path) -> Paths {
        Paths {
            socket: home.join("run").join(SOCKET_FILE),
            state_dir: home.join("state"),
            config_dir: home.join("config"),
            socket_overridden: false,
        }
    }

    fn per_user(lookup: &impl Fn(&str) -> Option<OsString>) -> Result<Paths, NoHome> {
        let home = lookup("HOME").map(PathBuf::from);
        let user = lookup("USER")
            .or_else(|| lookup("USERNAME"))
            .map(|u| u.to_string_lossy().into_owned())
            .unwrap_or_else(|| "user".into());
        let runtime_dir = match lookup("XDG_RUNTIME_DIR") {
            Some(dir) => PathBuf::from(dir).join("cloudd"),
            None => std::env::temp_dir().join(format!("cloudd-{user}")),
        };
        let (state_dir, config_dir) = if cfg!(target_os = "macos") {
            let base = home
                .ok_or(NoHome)?
                .join("Library/Application Support/cloudd");
            (base.clone(), base)
        } else {
            let xdg = |var: &str, fallback: &str| -> Result<PathBuf, NoHome> {
                match lookup(var) {
                    Some(dir) => Ok(PathBuf::from(dir).join("cloudd")),
                    None => Ok(home.clone().ok_or(NoHome)?.join(fallback).join("cloudd")),
                }
            };
            (
                xdg("XDG_STATE_HOME", ".local/state")?,
                xdg("XDG_CONFIG_HOME", ".config")?,
            )
        };
        Ok(Paths {
            socket: runtime_dir.join(SOCKET_FILE),
            state_dir,
            config_dir,
            socket_overridden: false,
        })
    }

    /// The directory holding the socket (created 0700 by the daemon).
    pub fn socket_dir(&self) -> &Path {
        self.socket.parent().unwrap_or(Path::new("."))
    }

    /// The pipe name on Windows: the socket's file name, under `\\.\pipe\`. (On Unix the
    /// socket is [`Paths::socket`] itself.) Turning this into an OS name is the IO side's
    /// job: the daemon's listener and the clients' connect do it.
    pub fn pipe_name(&self) -> String {
        self.socket
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_else(|| SOCKET_FILE.into())
    }

    /// The lock file whose holder is the one daemon of this state directory.
    pub fn lock_file(&self) -> PathBuf {
        self.state_dir.join("cloudd.lock")
    }

    /// The log file of a detached daemon.
    pub fn log_file(&self) -> PathBuf {
        self.state_dir.join("cloudd.log")
    }

    /// The daemon's configuration file.
    pub fn config_file(&self) -> PathBuf {
        self.config_dir.join("config.toml")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| OsString::from(v))
        }
    }

    #[test]
    fn cloudd_home_holds_everything() {
        let paths = Paths::from_lookup(env(&[("CLOUDD_HOME", "/h"), ("HOME", "/u")])).unwrap();
        assert_eq!(paths.socket, Path::new("/h/run/cloudd.sock"));
        assert_eq!(paths.lock_file(), Path::new("/h/state/cloudd.lock"));
        assert_eq!(paths.config_file(), Path::new("/h/config/config.toml"));
    }

    #[test]
    fn cloudd_socket_overrides_the_socket_only() {
        let paths = Paths::from_lookup(env(&[("CLOUDD_HOME", "/h"), ("CLOUDD_SOCKET", "/s.sock")]))
            .unwrap();
        assert_eq!(paths.socket, Path::new("/s.sock"));
        assert_eq!(paths.state_dir, Path::new("/h/state"));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn xdg_locations_by_default() {
        let paths =
            Paths::from_lookup(env(&[("HOME", "/u"), ("XDG_RUNTIME_DIR", "/run/user/7")])).unwrap();
        assert_eq!(paths.socket, Path::new("/run/user/7/cloudd/cloudd.sock"));
        assert_eq!(paths.state_dir, Path::new("/u/.local/state/cloudd"));
        assert_eq!(paths.config_dir, Path::new("/u/.config/cloudd"));
    }

    #[test]
    fn no_home_is_a_clear_error() {
        assert!(Paths::from_lookup(env(&[])).is_err());
    }
}
