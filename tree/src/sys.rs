//! Thin, safe wrappers around the `*at` system calls the tree handle needs: every call
//! works relative to an open directory descriptor, and none of them follows a symlink
//! in its last component (`O_NOFOLLOW`, `AT_SYMLINK_NOFOLLOW`, `unlinkat`, `renameat`).
//!
//! Architecture invariant: this module takes names of single components, never paths
//! with a `/`; walking a path component by component is [`crate::root`]'s job. On
//! non-unix platforms reading goes through plain paths and every write operation fails
//! with [`std::io::ErrorKind::Unsupported`].

#[cfg(unix)]
pub(crate) use unix::*;

#[cfg(not(unix))]
pub(crate) use other::*;

#[cfg(unix)]
mod unix {
    use std::ffi::{CStr, CString, OsStr, OsString};
    use std::fs::File;
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    use std::os::unix::fs::OpenOptionsExt;
    use std::path::Path;

    use crate::stat::Stat;

    /// An open directory.
    #[derive(Debug)]
    pub(crate) struct Dir(OwnedFd);

    fn c_name(name: &OsStr) -> io::Result<CString> {
        CString::new(name.as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
    }

    /// Turns a `-1` return into the errno's `io::Error`.
    fn check(result: libc::c_int) -> io::Result<libc::c_int> {
        if result == -1 {
            Err(io::Error::last_os_error())
        } else {
            Ok(result)
        }
    }

    fn owned(fd: RawFd) -> OwnedFd {
        // SAFETY: `fd` was just returned by a successful open call and is owned by nobody
        // else.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }

    /// Whether an error of `openat(.., O_NOFOLLOW ..)` may mean "the last component is a
    /// symlink": Linux says ELOOP, FreeBSD EMLINK, and with `O_DIRECTORY` some systems say
    /// ENOTDIR. The caller looks with `fstatat` to tell which.
    pub(crate) fn maybe_symlink(error: &io::Error) -> bool {
        matches!(
            error.raw_os_error(),
            Some(libc::ELOOP | libc::EMLINK | libc::ENOTDIR)
        )
    }

    /// Whether files created with `mode` get exactly `mode`: the process's umask (read
    /// once, from `/proc/self/status` on Linux) clears none of its bits. False where the
    /// umask cannot be read without changing it: the caller then sets the mode itself.
    pub(crate) fn umask_keeps(mode: libc::mode_t) -> bool {
        static UMASK: std::sync::OnceLock<Option<libc::mode_t>> = std::sync::OnceLock::new();
        let umask = UMASK.get_or_init(|| {
            let status = std::fs::read_to_string("/proc/self/status").ok()?;
            let line = status.lines().find(|l| l.starts_with("Umask:"))?;
            libc::mode_t::from_str_radix(line["Umask:".len()..].trim(), 8).ok()
        });
        umask.is_some_and(|umask| umask & mode == 0)
    }

    /// Opens the directory at `path` (following symlinks: the root is the caller's choice).
    pub(crate) fn open_root(path: &Path) -> io::Result<Dir> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(path)?;
        Ok(Dir(OwnedFd::from(file)))
    }

    impl Dir {
        fn open_at(
            &self,
            name: &OsStr,
            flags: libc::c_int,
            mode: libc::mode_t,
        ) -> io::Result<OwnedFd> {
            let name = c_name(name)?;
            // SAFETY: a valid directory descriptor and a NUL-terminated name.
            let fd = unsafe {
                libc::openat(
                    self.0.as_raw_fd(),
                    name.as_ptr(),
                    flags | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                    libc::c_uint::from(mode),
                )
            };
            check(fd).map(owned)
        }

        /// The subdirectory `name`; fails if it is a symlink (see [`maybe_symlink`]).
        pub(crate) fn open_dir(&self, name: &OsStr) -> io::Result<Dir> {
            self.open_at(name, libc::O_RDONLY | libc::O_DIRECTORY, 0)
                .map(Dir)
        }

        /// `name` for reading; fails if it is a symlink. `O_NONBLOCK` keeps a fifo that
        /// took a file's place from blocking the open (it is refused after `fstat`).
        pub(crate) fn open_read(&self, name: &OsStr) -> io::Result<File> {
            self.open_at(name, libc::O_RDONLY | libc::O_NONBLOCK, 0)
                .map(File::from)
        }

        /// Creates `name`, which must not exist, for writing.
        pub(crate) fn create_new(&self, name: &OsStr, mode: libc::mode_t) -> io::Result<File> {
            self.open_at(name, libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL, mode)
                .map(File::from)
        }

        pub(crate) fn mkdir(&self, name: &OsStr, mode: libc::mode_t) -> io::Result<()> {
            let name = c_name(name)?;
            // SAFETY: as in `open_at`.
            check(unsafe { libc::mkdirat(self.0.as_raw_fd(), name.as_ptr(), mode) })?;
            if umask_keeps(mode) {
                return Ok(());
            }
            // The mode asked for, whatever the process umask (the daemon's is 077 for its
            // own files; a worktree's directories are the user's, like its files). Through
            // a descriptor opened without following links, so a swap cannot redirect it.
            // SAFETY: as in `open_at`; the descriptor is closed by `OwnedFd`.
            let fd = check(unsafe {
                libc::openat(
                    self.0.as_raw_fd(),
                    name.as_ptr(),
                    libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                )
            })?;
            let fd = owned(fd);
            // SAFETY: a valid descriptor.
            check(unsafe { libc::fchmod(fd.as_raw_fd(), mode) }).map(drop)
        }

        /// `fstatat(.., AT_SYMLINK_NOFOLLOW)`; `None` when nothing is there.
        pub(crate) fn stat(&self, name: &OsStr) -> io::Result<Option<Stat>> {
            let name = c_name(name)?;
            let mut raw = std::mem::MaybeUninit::<libc::stat>::uninit();
            // SAFETY: as in `open_at`; `raw` is written by a successful call.
            let result = unsafe {
                libc::fstatat(
                    self.0.as_raw_fd(),
                    name.as_ptr(),
                    raw.as_mut_ptr(),
                    libc::AT_SYMLINK_NOFOLLOW,
                )
            };
            match check(result) {
                // SAFETY: fstatat succeeded, so it filled in `raw`.
                Ok(_) => Ok(Some(Stat::from_raw(unsafe { &raw.assume_init() }))),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e),
            }
        }

        pub(crate) fn symlink(&self, target: &CStr, name: &OsStr) -> io::Result<()> {
            let name = c_name(name)?;
            // SAFETY: as in `open_at`.
            check(unsafe { libc::symlinkat(target.as_ptr(), self.0.as_raw_fd(), name.as_ptr()) })
                .map(drop)
        }

        /// `renameat(from, to)` from this directory to `to_dir` (the same one, or one on
        /// the same file system): replaces `to` (a file or a symlink, never followed).
        pub(crate) fn rename(&self, from: &OsStr, to_dir: &Dir, to: &OsStr) -> io::Result<()> {
            let (from, to) = (c_name(from)?, c_name(to)?);
            // SAFETY: as in `open_at`.
            check(unsafe {
                libc::renameat(
                    self.0.as_raw_fd(),
                    from.as_ptr(),
                    to_dir.0.as_raw_fd(),
                    to.as_ptr(),
                )
            })
            .map(drop)
        }

        /// `linkat(from, to)` from this directory to `to_dir`, never following `from` if it
        /// is a symlink: `to` is a second name of the same file. Never replaces (`to` there
        /// already: `AlreadyExists`).
        pub(crate) fn link(&self, from: &OsStr, to_dir: &Dir, to: &OsStr) -> io::Result<()> {
            let (from, to) = (c_name(from)?, c_name(to)?);
            // SAFETY: as in `open_at`.
            check(unsafe {
                libc::linkat(
                    self.0.as_raw_fd(),
                    from.as_ptr(),
                    to_dir.0.as_raw_fd(),
                    to.as_ptr(),
                    0,
                )
            })
            .map(drop)
        }

        /// Renames `from` to `to` in `to_dir` only if `to` does not exist, atomically
        /// (`RENAME_NOREPLACE`): `Ok(false)` where the system or file system cannot.
        #[cfg(target_os = "linux")]
        pub(crate) fn rename_noreplace(
            &self,
            from: &OsStr,
            to_dir: &Dir,
            to: &OsStr,
        ) -> io::Result<bool> {
            let (from, to) = (c_name(from)?, c_name(to)?);
            // SAFETY: as in `open_at`; renameat2's arguments are two (dirfd, name) pairs
            // and a flag word.
            let result = unsafe {
                libc::syscall(
                    libc::SYS_renameat2,
                    self.0.as_raw_fd(),
                    from.as_ptr(),
                    to_dir.0.as_raw_fd(),
                    to.as_ptr(),
                    libc::RENAME_NOREPLACE,
                )
            };
            if result == 0 {
                return Ok(true);
            }
            let error = io::Error::last_os_error();
            match error.raw_os_error() {
                Some(libc::EINVAL | libc::ENOSYS) => Ok(false),
                _ => Err(error),
            }
        }

        #[cfg(not(target_os = "linux"))]
        pub(crate) fn rename_noreplace(
            &self,
            _from: &OsStr,
            _to_dir: &Dir,
            _to: &OsStr,
        ) -> io::Result<bool> {
            Ok(false)
        }

        /// `unlinkat`: removes a file or a symlink (never its target), or an empty
        /// directory when `dir`.
        pub(crate) fn unlink(&self, name: &OsStr, dir: bool) -> io::Result<()> {
            let name = c_name(name)?;
            let flags = if dir { libc::AT_REMOVEDIR } else { 0 };
            // SAFETY: as in `open_at`.
            check(unsafe { libc::unlinkat(self.0.as_raw_fd(), name.as_ptr(), flags) }).map(drop)
        }

        /// The names in this directory, without `.` and `..`.
        pub(crate) fn names(&self) -> io::Result<Vec<OsString>> {
            // fdopendir takes the descriptor over: give it a duplicate.
            // SAFETY: a valid descriptor.
            let fd = check(unsafe { libc::fcntl(self.0.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) })?;
            // SAFETY: `fd` is ours; on success the DIR owns it and closedir closes it.
            let stream = unsafe { libc::fdopendir(fd) };
            if stream.is_null() {
                let error = io::Error::last_os_error();
                drop(owned(fd));
                return Err(error);
            }
            // Start from the beginning even if the descriptor was read before.
            // SAFETY: a valid DIR stream.
            unsafe { libc::rewinddir(stream) };
            let mut names = Vec::new();
            loop {
                // NULL is the end of the stream (or a read error, which errno would tell;
                // it is not told apart here: a name missed that way makes removing the
                // directory fail with "not empty", never succeed wrongly).
                // SAFETY: a valid DIR stream.
                let entry = unsafe { libc::readdir(stream) };
                if entry.is_null() {
                    break;
                }
                // SAFETY: readdir returned an entry whose d_name is NUL-terminated and
                // valid until the next readdir call; it is copied out at once.
                let name = unsafe { CStr::from_ptr((*entry).d_name.as_ptr()) };
                let bytes = name.to_bytes();
                if bytes != b"." && bytes != b".." {
                    names.push(OsString::from_vec(bytes.to_vec()));
                }
            }
            // SAFETY: the stream is valid and closed once.
            unsafe { libc::closedir(stream) };
            Ok(names)
        }
    }
}

#[cfg(not(unix))]
mod other {
    use std::ffi::{CStr, OsStr, OsString};
    use std::fs::File;
    use std::io;
    use std::path::{Path, PathBuf};

    use crate::stat::Stat;

    /// A directory, by path: reads work (without the unix guarantees), writes do not.
    #[derive(Debug)]
    pub(crate) struct Dir(PathBuf);

    fn unsupported() -> io::Error {
        io::Error::new(
            io::ErrorKind::Unsupported,
            "writing a tree is only supported on unix",
        )
    }

    pub(crate) fn maybe_symlink(_error: &io::Error) -> bool {
        false
    }

    pub(crate) fn umask_keeps(_mode: u32) -> bool {
        false
    }

    pub(crate) fn open_root(path: &Path) -> io::Result<Dir> {
        if std::fs::metadata(path)?.is_dir() {
            Ok(Dir(path.to_path_buf()))
        } else {
            Err(io::Error::new(io::ErrorKind::Other, "not a directory"))
        }
    }

    impl Dir {
        pub(crate) fn open_dir(&self, name: &OsStr) -> io::Result<Dir> {
            let path = self.0.join(name);
            let metadata = std::fs::symlink_metadata(&path)?;
            if metadata.is_dir() {
                Ok(Dir(path))
            } else {
                Err(io::Error::new(io::ErrorKind::Other, "not a directory"))
            }
        }

        pub(crate) fn open_read(&self, name: &OsStr) -> io::Result<File> {
            let path = self.0.join(name);
            if std::fs::symlink_metadata(&path)?.file_type().is_symlink() {
                return Err(io::Error::new(io::ErrorKind::Other, "a symlink"));
            }
            File::open(path)
        }

        pub(crate) fn create_new(&self, _name: &OsStr, _mode: u32) -> io::Result<File> {
            Err(unsupported())
        }

        pub(crate) fn mkdir(&self, _name: &OsStr, _mode: u32) -> io::Result<()> {
            Err(unsupported())
        }

        pub(crate) fn stat(&self, name: &OsStr) -> io::Result<Option<Stat>> {
            match Stat::lstat(&self.0.join(name)) {
                Ok(stat) => Ok(Some(stat)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e),
            }
        }

        pub(crate) fn symlink(&self, _target: &CStr, _name: &OsStr) -> io::Result<()> {
            Err(unsupported())
        }

        pub(crate) fn rename(&self, _from: &OsStr, _to_dir: &Dir, _to: &OsStr) -> io::Result<()> {
            Err(unsupported())
        }

        pub(crate) fn link(&self, _from: &OsStr, _to_dir: &Dir, _to: &OsStr) -> io::Result<()> {
            Err(unsupported())
        }

        pub(crate) fn rename_noreplace(
            &self,
            _from: &OsStr,
            _to_dir: &Dir,
            _to: &OsStr,
        ) -> io::Result<bool> {
            Err(unsupported())
        }

        pub(crate) fn unlink(&self, _name: &OsStr, _dir: bool) -> io::Result<()> {
            Err(unsupported())
        }

        pub(crate) fn names(&self) -> io::Result<Vec<OsString>> {
            std::fs::read_dir(&self.0)?
                .map(|entry| entry.map(|e| e.file_name()))
                .collect()
        }
    }
}
