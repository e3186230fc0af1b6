//! The safe writer: the only way a file from a peer reaches disk. Files and symlinks are
//! made under a temporary name beside their target (`.cloudd-tmp-<random>`) and renamed
//! over it; just before the rename (or a removal) what is there is compared with what the
//! caller expects ([`Expect`]), so a pull never overwrites a local edit made after its
//! scan: a mismatch is [`WriteError::Changed`] and nothing is replaced.
//!
//! Architecture invariant: every path is reached through [`Root`], so a symlink on the
//! way is refused and nothing outside the root is created, replaced or removed; a
//! symlink at the path itself is replaced or removed as a link, never followed. This
//! module decides nothing about merging: it does what it is told, or refuses.

use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io;

use cloud_protocol::teleport::{RelPath, MAX_LINK_TARGET};

use crate::root::{Parent, Root, RootError};
use crate::stat::{FileKind, Stat};
use crate::sys::Dir;

/// Names that start with this are the writer's files in flight: the scanner never
/// reports them.
pub const TEMP_PREFIX: &str = ".cloudd-tmp-";

/// What the caller believes is at a path now; checked just before the path is replaced
/// or removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Nothing.
    Absent,
    /// Exactly this (every field of [`Stat`], so any edit, chmod or replacement since
    /// counts as a change).
    Stat(Stat),
    /// Whatever is there (but a directory is still never replaced by a file).
    Anything,
}

impl Expect {
    fn matches(&self, found: Option<&Stat>) -> bool {
        match (self, found) {
            (Expect::Anything, _) | (Expect::Absent, None) => true,
            (Expect::Stat(expected), Some(found)) => expected == found,
            _ => false,
        }
    }
}

/// Why a write was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The path could not be reached: a symlink or a file on the way, or an IO error.
    #[error(transparent)]
    Root(#[from] RootError),
    #[error("{path} changed since it was scanned, so it was left as it is")]
    Changed { path: RelPath, found: Option<Stat> },
    #[error("{path}: a {found:?} is in the way (remove it first)")]
    Occupied { path: RelPath, found: FileKind },
    #[error("{path}: a symlink target must be 1 to {MAX_LINK_TARGET} bytes without NUL")]
    BadLinkTarget { path: RelPath },
}

impl WriteError {
    /// Whether a symlink on the way refused the operation.
    pub fn is_symlink(&self) -> bool {
        matches!(self, WriteError::Root(RootError::Symlink { .. }))
    }
}

fn io_error(op: &'static str, path: &RelPath, source: io::Error) -> WriteError {
    WriteError::Root(RootError::io(op, path, source))
}

/// A fresh temporary name: a thread's random 64-bit start, then a step of an odd constant
/// per name (a Weyl sequence: no repeat within 2^64 names), so a name costs no system call
/// (a materialise makes 20,000). `O_EXCL` settles the unlikely clash.
fn temp_name() -> OsString {
    thread_local! {
        static NEXT: std::cell::Cell<u64> = std::cell::Cell::new(random_start());
    }
    let n = NEXT.with(|next| {
        let n = next.get();
        next.set(n.wrapping_add(0x9e37_79b9_7f4a_7c15));
        n
    });
    OsString::from(format!("{TEMP_PREFIX}{n:016x}"))
}

/// 64 random bits (the time and the process id if the system has no randomness).
fn random_start() -> u64 {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        bytes = (nanos ^ u64::from(std::process::id())).to_le_bytes();
    }
    u64::from_le_bytes(bytes)
}

/// How many temporary names are tried before giving up (each clash is 2^-64 likely).
const TEMP_ATTEMPTS: usize = 8;

impl Root {
    /// Writes a regular file at `path` (0644, or 0755 when `executable`), its bytes
    /// written by `write` into a temporary file that is then renamed over `path` if what
    /// is there still matches `expect`. Missing parents are created. `write` may call
    /// `sync_all` itself when the caller wants the bytes durable before the rename.
    pub fn put_file(
        &self,
        path: &RelPath,
        executable: bool,
        write: impl FnOnce(&mut File) -> io::Result<()>,
        expect: Expect,
    ) -> Result<(), WriteError> {
        let parent = self.parent_for_put(path)?;
        let dir = parent.dir();
        check_before_put(dir, path, &expect)?;
        let (temp, mut file) = create_temp(dir, path)?;
        let written = write(&mut file).and_then(|()| set_mode(&file, executable));
        drop(file);
        if let Err(e) = written {
            let _ = dir.unlink(&temp, false);
            return Err(io_error("write", path, e));
        }
        replace(dir, &temp, path, &expect)
    }

    /// Makes `path` a symlink to `target` (stored as given, never resolved), replacing
    /// what is there if it matches `expect`.
    pub fn put_symlink(
        &self,
        path: &RelPath,
        target: &str,
        expect: Expect,
    ) -> Result<(), WriteError> {
        let target = match CString::new(target) {
            Ok(t) if !target.is_empty() && target.len() <= MAX_LINK_TARGET => t,
            _ => return Err(WriteError::BadLinkTarget { path: path.clone() }),
        };
        let parent = self.parent_for_put(path)?;
        let dir = parent.dir();
        check_before_put(dir, path, &expect)?;
        let mut attempts = 0;
        let temp = loop {
            let temp = temp_name();
            match dir.symlink(&target, &temp) {
                Ok(()) => break temp,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempts < TEMP_ATTEMPTS => {
                    attempts += 1;
                }
                Err(e) => return Err(io_error("create symlink", path, e)),
            }
        };
        replace(dir, &temp, path, &expect)
    }

    /// Makes `path` a directory (0755, less the umask) if it is not one already; missing
    /// parents are created. Anything else at `path` is [`WriteError::Occupied`].
    pub fn put_dir(&self, path: &RelPath) -> Result<(), WriteError> {
        let parent = self.parent_for_put(path)?;
        let dir = parent.dir();
        let name = OsStr::new(path.file_name());
        match dir.mkdir(name, 0o755) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                match dir.stat(name).map_err(|e| io_error("stat", path, e))? {
                    Some(stat) if stat.kind == FileKind::Dir => Ok(()),
                    Some(stat) => Err(WriteError::Occupied {
                        path: path.clone(),
                        found: stat.kind,
                    }),
                    // Removed meanwhile: try once more.
                    None => dir
                        .mkdir(name, 0o755)
                        .map_err(|e| io_error("create directory", path, e)),
                }
            }
            Err(e) => Err(io_error("create directory", path, e)),
        }
    }

    /// Removes `path` (a directory with everything under it; a symlink as a link) if what
    /// is there matches `expect`. Nothing there is fine when `expect` allows it.
    pub fn remove(&self, path: &RelPath, expect: Expect) -> Result<(), WriteError> {
        let Some(parent) = self.parent(path, false)? else {
            return check(None, path, &expect);
        };
        let dir = parent.dir();
        let name = OsStr::new(path.file_name());
        let found = dir.stat(name).map_err(|e| io_error("stat", path, e))?;
        check(found, path, &expect)?;
        match found {
            None => Ok(()),
            Some(stat) if stat.kind == FileKind::Dir => {
                remove_tree(dir, name).map_err(|e| io_error("remove directory", path, e))
            }
            Some(_) => match dir.unlink(name, false) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                result => result.map_err(|e| io_error("remove", path, e)),
            },
        }
    }

    /// Removes the directory `path` only if it is empty (a directory the caller emptied of
    /// what it knew of). Returns false, and leaves it, when something is still in it; nothing
    /// there is fine.
    pub fn remove_empty_dir(&self, path: &RelPath) -> Result<bool, WriteError> {
        let Some(parent) = self.parent(path, false)? else {
            return Ok(true);
        };
        let dir = parent.dir();
        let name = OsStr::new(path.file_name());
        match dir.stat(name).map_err(|e| io_error("stat", path, e))? {
            None => return Ok(true),
            Some(stat) if stat.kind != FileKind::Dir => {
                return Err(WriteError::Occupied {
                    path: path.clone(),
                    found: stat.kind,
                })
            }
            Some(_) => {}
        }
        match dir.unlink(name, true) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc_enotempty()) => Ok(false),
            Err(e) => Err(io_error("remove directory", path, e)),
        }
    }

    /// The parent of a path about to be put, created if missing.
    fn parent_for_put(&self, path: &RelPath) -> Result<Parent<'_>, WriteError> {
        Ok(self
            .parent(path, true)?
            .expect("parents are created when missing"))
    }
}

/// `ENOTEMPTY` of this platform (also `EEXIST` on some: checked by the caller's tests).
fn libc_enotempty() -> i32 {
    #[cfg(unix)]
    {
        libc::ENOTEMPTY
    }
    #[cfg(not(unix))]
    {
        145
    }
}

/// Compares what is at `path` (already looked up) with `expect`.
fn check(found: Option<Stat>, path: &RelPath, expect: &Expect) -> Result<(), WriteError> {
    if expect.matches(found.as_ref()) {
        Ok(())
    } else {
        Err(WriteError::Changed {
            path: path.clone(),
            found,
        })
    }
}

/// The early look before writing anything: a directory in the way, or a mismatch.
fn check_before_put(
    dir: &Dir,
    path: &RelPath,
    expect: &Expect,
) -> Result<Option<Stat>, WriteError> {
    let found = dir
        .stat(OsStr::new(path.file_name()))
        .map_err(|e| io_error("stat", path, e))?;
    if let Some(stat) = found.filter(|s| s.kind == FileKind::Dir) {
        return Err(WriteError::Occupied {
            path: path.clone(),
            found: stat.kind,
        });
    }
    check(found, path, expect)?;
    Ok(found)
}

fn create_temp(dir: &Dir, path: &RelPath) -> Result<(OsString, File), WriteError> {
    let mut attempts = 0;
    loop {
        let temp = temp_name();
        match dir.create_new(&temp, 0o600) {
            Ok(file) => return Ok((temp, file)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempts < TEMP_ATTEMPTS => {
                attempts += 1;
            }
            Err(e) => return Err(io_error("create a temporary file for", path, e)),
        }
    }
}

/// 0644 or 0755, whatever the umask: the mode is part of the content.
#[cfg(unix)]
fn set_mode(file: &File, executable: bool) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = if executable { 0o755 } else { 0o644 };
    file.set_permissions(std::fs::Permissions::from_mode(mode))
}

#[cfg(not(unix))]
fn set_mode(_file: &File, _executable: bool) -> io::Result<()> {
    Ok(())
}

/// Renames `temp` over `path` if what is there still matches `expect` (re-checked now,
/// just before the rename); otherwise removes `temp` and reports the change.
fn replace(dir: &Dir, temp: &OsStr, path: &RelPath, expect: &Expect) -> Result<(), WriteError> {
    let result = move_over(dir, temp, dir, path, expect);
    if result.is_err() {
        let _ = dir.unlink(temp, false);
    }
    result
}

/// Renames `from`'s `name` over `path` in `dir` if what is there still matches `expect`
/// (re-checked now, just before the rename). On failure `name` stays where it was.
fn move_over(
    from: &Dir,
    name: &OsStr,
    dir: &Dir,
    path: &RelPath,
    expect: &Expect,
) -> Result<(), WriteError> {
    let target = OsStr::new(path.file_name());
    let found = check_before_put(dir, path, expect)?;
    if *expect == Expect::Absent {
        // Atomic where the system allows: nothing can appear between the check and the
        // rename.
        match from.rename_noreplace(name, dir, target) {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let found = dir.stat(target).ok().flatten();
                return Err(WriteError::Changed {
                    path: path.clone(),
                    found,
                });
            }
            Err(e) => return Err(io_error("rename into place", path, e)),
        }
    }
    debug_assert!(expect.matches(found.as_ref()));
    from.rename(name, dir, target)
        .map_err(|e| io_error("rename into place", path, e))
}

/// A directory of whole files waiting to be moved into a [`Root`] by
/// [`Root::put_staged`]: the relay writes a push's files here as they arrive, so its commit
/// renames them into the workspace instead of writing them then. It must be on the same
/// file system as the roots its files go to (a rename across file systems fails, and the
/// caller writes the file instead).
#[derive(Debug)]
pub struct Staging {
    dir: Dir,
}

impl Staging {
    /// Opens the directory at `path` (created, 0700, if missing).
    pub fn open(path: &std::path::Path) -> io::Result<Staging> {
        std::fs::create_dir_all(path)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))?;
        }
        Ok(Staging {
            dir: crate::sys::open_root(path)?,
        })
    }

    /// Writes `bytes` as the new file `name` (one plain name, no `/`), mode 0644. `Ok(false)`
    /// when a file of that name is already there (it is left as it is); a file cut short
    /// by an error is removed.
    pub fn write(&self, name: &str, bytes: &[u8]) -> io::Result<bool> {
        use std::io::Write as _;
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a staged file's name must be one plain component",
            ));
        }
        let name = OsStr::new(name);
        let mut file = match self.dir.create_new(name, 0o644) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(false),
            Err(e) => return Err(e),
        };
        // The mode asked for, unless the umask took bits of it (a `fchmod` per file is
        // 20,000 system calls in a first push).
        let written = file
            .write_all(bytes)
            .and_then(|()| match crate::sys::umask_keeps(0o644) {
                true => Ok(()),
                false => set_mode(&file, false),
            });
        drop(file);
        if let Err(e) = written {
            let _ = self.dir.unlink(name, false);
            return Err(e);
        }
        Ok(true)
    }

    /// Removes the staged file `name`, if it is there.
    pub fn remove(&self, name: &str) -> io::Result<()> {
        match self.dir.unlink(OsStr::new(name), false) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

impl Root {
    /// Puts the staged file `name` of `staging` at `path` (0644, or 0755 when
    /// `executable`), replacing what is there if it matches `expect`, as
    /// [`Root::put_file`] would write it. Missing parents are created.
    ///
    /// Where nothing is at `path` the file is linked there and its staged name stays (the
    /// caller removes it, [`Staging::remove`]): renames between directories are serialised
    /// across the whole file system by the kernel's rename lock, links are not, so a
    /// commit's writers link in parallel (20,000 files: 0.07–0.08 s linked by two threads,
    /// 0.12–0.17 s renamed). Over a file, it is renamed. On failure the staged file stays
    /// in `staging`.
    pub fn put_staged(
        &self,
        path: &RelPath,
        executable: bool,
        staging: &Staging,
        name: &str,
        expect: Expect,
    ) -> Result<(), WriteError> {
        let parent = self.parent_for_put(path)?;
        let dir = parent.dir();
        let name = OsStr::new(name);
        if executable {
            // Through a descriptor opened without following links.
            let file = staging
                .dir
                .open_read(name)
                .map_err(|e| io_error("open the staged file for", path, e))?;
            set_mode(&file, true).map_err(|e| io_error("set the mode of", path, e))?;
        }
        if matches!(expect, Expect::Absent | Expect::Anything) {
            // Linked without a look first: a link never replaces, so it succeeds only
            // where nothing is, which both expectations allow.
            let target = OsStr::new(path.file_name());
            match staging.dir.link(name, dir, target) {
                Ok(()) => return Ok(()),
                // Something is there: what `expect` says of it decides, below.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_error("link into place", path, e)),
            }
        }
        move_over(&staging.dir, name, dir, path, &expect)
    }
}

/// Removes the directory `name` in `dir` and everything under it, never following a
/// symlink (each level is opened with `O_NOFOLLOW`; links are unlinked as links).
fn remove_tree(dir: &Dir, name: &OsStr) -> io::Result<()> {
    let sub = match dir.open_dir(name) {
        Ok(sub) => sub,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        // Replaced by something else meanwhile: remove that instead, as a file or link.
        Err(e) if crate::sys::maybe_symlink(&e) => return dir.unlink(name, false),
        Err(e) => return Err(e),
    };
    for child in sub.names()? {
        match sub.stat(&child)? {
            Some(stat) if stat.kind == FileKind::Dir => remove_tree(&sub, &child)?,
            Some(_) => match sub.unlink(&child, false) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            },
            None => {}
        }
    }
    drop(sub);
    match dir.unlink(name, true) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        result => result,
    }
}
