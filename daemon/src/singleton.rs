//! One daemon per state directory: an exclusive lock on `cloudd.lock`, held for the
//! daemon's life, with the holder's pid written inside.
//!
//! The kernel releases the lock when the holder dies, however it dies, so a `kill -9`
//! never leaves a stale lock behind. Whoever holds the lock owns the socket path and may
//! remove a socket file left there by a dead predecessor.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The held lock. Dropping it releases the lock.
#[derive(Debug)]
pub struct InstanceLock {
    /// Kept open: the lock lives as long as this descriptor.
    _file: File,
    /// Where it is, for messages.
    path: PathBuf,
}

/// The lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another daemon holds it.
    #[error("another cloudd is already running (pid {}); stop it with `cloudctl down`", pid.map(|p| p.to_string()).unwrap_or_else(|| "unknown".into()))]
    HeldBy {
        /// The holder's pid, when it could be read.
        pid: Option<u32>,
    },
    /// The lock file could not be opened or locked.
    #[error("cannot lock {path}: {source}")]
    Io {
        /// The lock file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

impl InstanceLock {
    /// Takes the lock at `path` without waiting, and writes this process's pid into it.
    pub fn acquire(path: &Path) -> Result<InstanceLock, LockError> {
        let io = |source| LockError::Io {
            path: path.to_owned(),
            source,
        };
        let mut options = OpenOptions::new();
        options.read(true).write(true).create(true).truncate(false);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(path).map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(LockError::HeldBy {
                    pid: read_pid(&mut file),
                })
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        file.set_len(0).map_err(io)?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        file.flush().map_err(io)?;
        Ok(InstanceLock {
            _file: file,
            path: path.to_owned(),
        })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The pid in the lock file, if one can be read.
fn read_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.seek(SeekFrom::Start(0)).ok()?;
    file.read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

/// The pid of the daemon holding the lock at `path`, or `None` when no daemon holds it.
pub fn holder(path: &Path) -> Option<u32> {
    let mut file = File::open(path).ok()?;
    match file.try_lock_shared() {
        Ok(()) => None,
        Err(_) => read_pid(&mut file),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_acquire_names_the_holder() {
        let dir = std::env::temp_dir().join(format!("cloudd-lock-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cloudd.lock");
        let lock = InstanceLock::acquire(&path).unwrap();
        match InstanceLock::acquire(&path) {
            Err(LockError::HeldBy { pid }) => assert_eq!(pid, Some(std::process::id())),
            other => panic!("expected HeldBy, got {other:?}"),
        }
        assert_eq!(holder(&path), Some(std::process::id()));
        drop(lock);
        assert_eq!(holder(&path), None);
        InstanceLock::acquire(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
