//! What `lstat` says about a path, reduced to the fields teleport compares: kind, size,
//! modification and change times, inode and mode. The scanner keeps one per path in its
//! index (an unchanged `Stat` means the file is not read again), and the writer compares
//! one with what is on disk just before it replaces or removes anything.
//!
//! Architecture invariant: a `Stat` is always taken without following a symlink (`lstat`,
//! `fstat` of a descriptor opened with `O_NOFOLLOW`, or `fstatat` with
//! `AT_SYMLINK_NOFOLLOW`). This module reads metadata only; it never opens a file's
//! contents.

use std::fs::Metadata;
use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// What kind of thing a path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    /// A fifo, socket or device: never content.
    Other,
}

/// The stat fields teleport compares. Two equal `Stat`s of one path mean "not changed"
/// (within the racy-timestamp rule the scanner applies on top).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Stat {
    pub kind: FileKind,
    pub size: u64,
    /// Last modification of the contents, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    /// Last change of the inode (contents, mode, links, rename), nanoseconds since the
    /// Unix epoch. Nobody can set it back, so it catches edits that restore an old mtime.
    pub ctime_ns: i64,
    pub ino: u64,
    /// The full `st_mode`: file type and permission bits.
    pub mode: u32,
}

impl Stat {
    /// `lstat(path)`: never follows a symlink.
    pub fn lstat(path: &Path) -> io::Result<Stat> {
        std::fs::symlink_metadata(path).map(|m| Stat::from_metadata(&m))
    }

    /// From metadata that was taken without following a symlink.
    pub fn from_metadata(metadata: &Metadata) -> Stat {
        let file_type = metadata.file_type();
        let kind = if file_type.is_symlink() {
            FileKind::Symlink
        } else if file_type.is_dir() {
            FileKind::Dir
        } else if file_type.is_file() {
            FileKind::File
        } else {
            FileKind::Other
        };
        platform::from_metadata(kind, metadata)
    }

    /// From a raw `struct stat` (what `fstat` and `fstatat` fill in).
    #[cfg(unix)]
    pub fn from_raw(raw: &libc::stat) -> Stat {
        let kind = match raw.st_mode & libc::S_IFMT {
            libc::S_IFREG => FileKind::File,
            libc::S_IFDIR => FileKind::Dir,
            libc::S_IFLNK => FileKind::Symlink,
            _ => FileKind::Other,
        };
        // The casts widen or keep the platform's field types (they differ between Linux
        // and the BSDs); none of them can lose a bit on the platforms we build for.
        #[allow(clippy::unnecessary_cast)]
        Stat {
            kind,
            size: raw.st_size as u64,
            mtime_ns: nanos(raw.st_mtime as i64, raw.st_mtime_nsec as i64),
            ctime_ns: nanos(raw.st_ctime as i64, raw.st_ctime_nsec as i64),
            ino: raw.st_ino as u64,
            mode: raw.st_mode as u32,
        }
    }

    /// Whether the owner's exec bit is set (what teleport keeps of the permissions).
    pub fn executable(&self) -> bool {
        self.mode & 0o100 != 0
    }
}

/// Seconds and nanoseconds as nanoseconds since the epoch, saturating (a timestamp
/// beyond the year 2262 compares as the largest one).
fn nanos(seconds: i64, nanoseconds: i64) -> i64 {
    seconds
        .saturating_mul(1_000_000_000)
        .saturating_add(nanoseconds)
}

#[cfg(unix)]
mod platform {
    use std::fs::Metadata;
    use std::os::unix::fs::MetadataExt;

    use super::{nanos, FileKind, Stat};

    pub(super) fn from_metadata(kind: FileKind, metadata: &Metadata) -> Stat {
        Stat {
            kind,
            size: metadata.size(),
            mtime_ns: nanos(metadata.mtime(), metadata.mtime_nsec()),
            ctime_ns: nanos(metadata.ctime(), metadata.ctime_nsec()),
            ino: metadata.ino(),
            mode: metadata.mode(),
        }
    }
}

#[cfg(not(unix))]
mod platform {
    use std::fs::Metadata;
    use std::time::UNIX_EPOCH;

    use super::{FileKind, Stat};

    /// Without inodes or a change time, the modification time stands in for both.
    pub(super) fn from_metadata(kind: FileKind, metadata: &Metadata) -> Stat {
        let mtime_ns = metadata
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
        let mode = match kind {
            FileKind::Dir => 0o040_755,
            FileKind::Symlink => 0o120_777,
            _ if metadata.permissions().readonly() => 0o100_444,
            _ => 0o100_644,
        };
        Stat {
            kind,
            size: metadata.len(),
            mtime_ns,
            ctime_ns: mtime_ns,
            ino: 0,
            mode,
        }
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    #[test]
    fn lstat_does_not_follow_links() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"hello").unwrap();
        std::os::unix::fs::symlink("f", dir.path().join("link")).unwrap();
        let f = Stat::lstat(&file).unwrap();
        assert_eq!(f.kind, FileKind::File);
        assert_eq!(f.size, 5);
        let l = Stat::lstat(&dir.path().join("link")).unwrap();
        assert_eq!(l.kind, FileKind::Symlink);
        assert_ne!(l.ino, f.ino);
        assert_eq!(Stat::lstat(dir.path()).unwrap().kind, FileKind::Dir);
    }

    #[test]
    fn postcard_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let stat = Stat::lstat(dir.path()).unwrap();
        let bytes = postcard::to_allocvec(&stat).unwrap();
        assert_eq!(postcard::from_bytes::<Stat>(&bytes).unwrap(), stat);
    }
}
