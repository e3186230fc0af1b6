//! A tree's root as an open directory, and the one way to reach a path under it: each
//! parent component opened with `openat(.., O_NOFOLLOW | O_DIRECTORY)` from the root's
//! descriptor, so a symlink anywhere on the way is refused with [`RootError::Symlink`]
//! and nothing outside the root is ever read or written through this handle.
//!
//! The writer ([`crate::write`]) adds the operations that change the tree; reading a
//! blob ([`crate::content::read_blob`]) and the scanner's hashing open files through
//! [`Root::open_file`].
//!
//! The directories on the way to the last path reached are kept open (one chain), so
//! reaching the next path in the same directory, or a nearby one, opens only the
//! components that differ: writing or reading a tree in path order costs about one
//! `openat` per directory, not one per component per file. A chain lives as long as its
//! `Root`, which callers open per operation.
//!
//! Architecture invariant: no path string is ever handed to the operating system whole;
//! only single components, relative to a descriptor this module opened without
//! following a symlink. This module never changes anything on disk except creating
//! missing parent directories when asked to.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use cloud_protocol::teleport::RelPath;

use crate::stat::{FileKind, Stat};
use crate::sys::{self, Dir};

/// Why a path under a root could not be reached or opened.
#[derive(Debug, thiserror::Error)]
pub enum RootError {
    #[error("cannot open the tree root {dir}: {source}")]
    Open { dir: PathBuf, source: io::Error },
    #[error("{path} is a symlink: teleport never reads or writes through one (move it away to let the change through)")]
    Symlink { path: RelPath },
    #[error("{path} is not a directory, but a path goes through it")]
    NotADirectory { path: RelPath },
    #[error("{path} is not a regular file")]
    NotAFile { path: RelPath },
    #[error("cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: RelPath,
        source: io::Error,
    },
    #[error("changing a tree is only supported on unix")]
    Unsupported,
}

impl RootError {
    pub(crate) fn io(op: &'static str, path: &RelPath, source: io::Error) -> RootError {
        if source.kind() == io::ErrorKind::Unsupported {
            return RootError::Unsupported;
        }
        RootError::Io {
            op,
            path: path.clone(),
            source,
        }
    }
}

/// A tree's root directory, held open. Every operation takes a [`RelPath`] and reaches
/// it from this descriptor, component by component, never through a symlink.
#[derive(Debug)]
pub struct Root {
    /// Where the root was opened, for messages; never used to reach a path under it.
    dir: PathBuf,
    fd: Dir,
    /// The directories opened on the way to the last path reached, outermost first: each
    /// the component's name and the directory, opened from the one before it.
    chain: Mutex<Vec<(String, Arc<Dir>)>>,
}

/// The directory that holds a path's last component, opened safely.
#[derive(Debug)]
pub(crate) struct Parent<'a> {
    /// `None` for a path at the top: its parent is the root itself.
    opened: Option<Arc<Dir>>,
    root: &'a Dir,
}

impl Parent<'_> {
    pub(crate) fn dir(&self) -> &Dir {
        self.opened.as_deref().unwrap_or(self.root)
    }
}

/// The first `n` components of `path`, as a path.
fn prefix(path: &RelPath, n: usize) -> RelPath {
    let text = path.as_str();
    let end = text
        .match_indices('/')
        .nth(n - 1)
        .map_or(text.len(), |(at, _)| at);
    RelPath::new(&text[..end]).expect("a prefix of a checked path is checked")
}

impl Root {
    /// Opens `dir` (which may itself be reached through symlinks: it is the caller's
    /// choice) as the root of a tree.
    pub fn open(dir: &Path) -> Result<Root, RootError> {
        let fd = sys::open_root(dir).map_err(|source| RootError::Open {
            dir: dir.to_path_buf(),
            source,
        })?;
        Ok(Root {
            dir: dir.to_path_buf(),
            fd,
            chain: Mutex::new(Vec::new()),
        })
    }

    /// Where the root was opened.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Opens the directory that holds `path`'s last component: `Ok(None)` when a parent
    /// is missing and `create` is false; missing parents are made (0755) when it is true.
    pub(crate) fn parent(
        &self,
        path: &RelPath,
        create: bool,
    ) -> Result<Option<Parent<'_>>, RootError> {
        let components: Vec<&str> = path.components().collect();
        let parents = &components[..components.len() - 1];
        let mut chain = self.chain.lock().unwrap_or_else(|e| e.into_inner());
        // Keep what the last path shares with this one; open the rest from there.
        let shared = chain
            .iter()
            .zip(parents)
            .take_while(|((open, _), name)| open == *name)
            .count();
        chain.truncate(shared);
        for (i, name) in parents.iter().enumerate().skip(shared) {
            let os_name = OsStr::new(name);
            let current: &Dir = chain.last().map_or(&self.fd, |(_, dir)| dir);
            let next = match current.open_dir(os_name) {
                Ok(dir) => dir,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if !create {
                        return Ok(None);
                    }
                    match current.mkdir(os_name, 0o755) {
                        Ok(()) => {}
                        // Made by someone else meanwhile: open what is there now.
                        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                        Err(e) => {
                            return Err(RootError::io("create directory", &prefix(path, i + 1), e))
                        }
                    }
                    current
                        .open_dir(os_name)
                        .map_err(|e| classify(current, os_name, &prefix(path, i + 1), e))?
                }
                Err(e) => return Err(classify(current, os_name, &prefix(path, i + 1), e)),
            };
            chain.push(((*name).to_owned(), Arc::new(next)));
        }
        Ok(Some(Parent {
            opened: chain.last().map(|(_, dir)| Arc::clone(dir)),
            root: &self.fd,
        }))
    }

    /// What is at `path` now, without following a symlink: `None` when nothing is there
    /// (or a parent is missing). A symlink on the way is an error.
    pub fn lstat(&self, path: &RelPath) -> Result<Option<Stat>, RootError> {
        let Some(parent) = self.parent(path, false)? else {
            return Ok(None);
        };
        parent
            .dir()
            .stat(OsStr::new(path.file_name()))
            .map_err(|e| RootError::io("stat", path, e))
    }

    /// Opens the regular file at `path` for reading, refusing a symlink anywhere on the
    /// way or at the end, and anything that is not a regular file.
    pub fn open_file(&self, path: &RelPath) -> Result<File, RootError> {
        let Some(parent) = self.parent(path, false)? else {
            return Err(RootError::io(
                "open",
                path,
                io::Error::from(io::ErrorKind::NotFound),
            ));
        };
        open_file_in(parent.dir(), path)
    }
}

/// Opens `path`'s last component in `dir` (its parent) for reading: a regular file only.
pub(crate) fn open_file_in(dir: &Dir, path: &RelPath) -> Result<File, RootError> {
    let name = OsStr::new(path.file_name());
    let file = dir
        .open_read(name)
        .map_err(|e| classify(dir, name, path, e))?;
    let metadata = file
        .metadata()
        .map_err(|e| RootError::io("stat", path, e))?;
    if !metadata.is_file() {
        return Err(RootError::NotAFile { path: path.clone() });
    }
    Ok(file)
}

/// Turns a failed `openat(.., O_NOFOLLOW ..)` into the error it means: a symlink, or a
/// non-directory where a directory was needed, is told apart with `fstatat`.
fn classify(dir: &Dir, name: &OsStr, path: &RelPath, error: io::Error) -> RootError {
    if sys::maybe_symlink(&error) {
        match dir.stat(name) {
            Ok(Some(stat)) if stat.kind == FileKind::Symlink => {
                return RootError::Symlink { path: path.clone() };
            }
            Ok(Some(stat))
                if stat.kind != FileKind::Dir && error.kind() == io::ErrorKind::NotADirectory =>
            {
                return RootError::NotADirectory { path: path.clone() };
            }
            _ => {}
        }
    }
    RootError::io("open", path, error)
}
