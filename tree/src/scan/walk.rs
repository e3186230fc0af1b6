//! The walk: the `ignore` crate's walker set up with teleport's rules, a scope (all, or
//! some paths), and what each path it yields becomes: a found entry, a file left to hash,
//! a skipped path or an unreadable one.
//!
//! Architecture invariant: the walk never follows a symlink, never enters `.git`, and
//! never reads a file's contents (that is [`super::hash`]'s job).

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsStr;
use std::io;
use std::path::{Component, Path};
use std::sync::{Arc, Mutex};

use cloud_protocol::teleport::{EntryKind, PathError, RelPath};

use super::hash::hash_all;
use super::{ScanError, ScanOptions, ScanStats, SkipReason, Skipped, Unreadable, CLOUDIGNORE};
use crate::index::{Index, Indexed};
use crate::root::Root;
use crate::stat::{FileKind, Stat};
use crate::write::TEMP_PREFIX;

/// Which paths a walk visits.
#[derive(Debug)]
pub(super) enum Scope {
    All,
    /// These paths with everything under them, and their parent directories (only to
    /// reach them).
    Paths {
        targets: HashSet<String>,
        parents: HashSet<String>,
    },
}

impl Scope {
    pub(super) fn paths(targets: &[RelPath]) -> Scope {
        let mut parents = HashSet::new();
        for target in targets {
            let text = target.as_str();
            for (at, _) in text.match_indices('/') {
                parents.insert(text[..at].to_owned());
            }
        }
        Scope::Paths {
            targets: targets.iter().map(|t| t.as_str().to_owned()).collect(),
            parents,
        }
    }

    /// Whether `path` is a target or lies under one.
    fn under_target(&self, path: &str) -> bool {
        match self {
            Scope::All => true,
            Scope::Paths { targets, .. } => {
                targets.contains(path)
                    || path
                        .match_indices('/')
                        .any(|(at, _)| targets.contains(&path[..at]))
            }
        }
    }

    fn wants(&self, path: &RelPath) -> bool {
        match self {
            Scope::All => true,
            Scope::Paths { parents, .. } => {
                parents.contains(path.as_str()) || self.under_target(path.as_str())
            }
        }
    }

    /// Whether a child of `parent` (`None`: the root) is in scope, for names that are
    /// not paths.
    fn wants_child_of(&self, parent: Option<&RelPath>) -> bool {
        match (self, parent) {
            (Scope::All, _) => true,
            (_, None) => false,
            (_, Some(parent)) => self.under_target(parent.as_str()),
        }
    }
}

/// The path of `path` under `root`, checked.
fn rel_path(root: &Path, path: &Path) -> Result<RelPath, SkipReason> {
    // What the walker yields is `root` joined with names: the bytes after `root/` are the
    // relative path, and `RelPath::new` checks every component (no `.`, `..`, empty).
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt as _;
        let relative = path
            .as_os_str()
            .as_bytes()
            .strip_prefix(root.as_os_str().as_bytes())
            .and_then(|rest| rest.strip_prefix(b"/"));
        if let Some(relative) = relative {
            let text = std::str::from_utf8(relative).map_err(|_| SkipReason::NotUtf8)?;
            return RelPath::new(text).map_err(SkipReason::BadPath);
        }
    }
    let relative = path.strip_prefix(root).unwrap_or(path);
    let mut text = String::new();
    for component in relative.components() {
        let Component::Normal(name) = component else {
            return Err(SkipReason::BadPath(PathError::DotComponent));
        };
        let name = name.to_str().ok_or(SkipReason::NotUtf8)?;
        if !text.is_empty() {
            text.push('/');
        }
        text.push_str(name);
    }
    RelPath::new(text).map_err(SkipReason::BadPath)
}

/// Names that are never content and never reported: `.git` (a repository, or a
/// worktree's or submodule's pointer file) in any case, and the writer's files in flight.
fn never_content(name: &OsStr) -> bool {
    name.eq_ignore_ascii_case(".git")
        || name
            .to_str()
            .is_some_and(|name| name.starts_with(TEMP_PREFIX))
}

#[cfg(unix)]
fn special_kind(file_type: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if file_type.is_fifo() {
        "fifo"
    } else if file_type.is_socket() {
        "socket"
    } else if file_type.is_block_device() {
        "block device"
    } else if file_type.is_char_device() {
        "character device"
    } else {
        "special file"
    }
}

#[cfg(not(unix))]
fn special_kind(_file_type: &std::fs::FileType) -> &'static str {
    "special file"
}

/// What the walker's filter set aside (it runs inside the walker, so it reports here).
#[derive(Debug, Default)]
struct Filtered {
    skipped: Vec<Skipped>,
    conflict_copies: Vec<RelPath>,
}

/// A walk in progress: what was found, what is left to hash.
#[derive(Debug)]
pub(super) struct Walk<'a> {
    pub(super) root: Root,
    pub(super) previous: &'a Index,
    /// When the walk started, nanoseconds since the Unix epoch.
    pub(super) started_ns: i64,
    pub(super) found: BTreeMap<RelPath, Indexed>,
    /// Files to read, with the stat the walk saw.
    pub(super) pending: Vec<(RelPath, Stat)>,
    pub(super) skipped: Vec<Skipped>,
    pub(super) unreadable: Vec<Unreadable>,
    pub(super) conflict_copies: Vec<RelPath>,
    pub(super) stats: ScanStats,
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// What one path the walker yielded became (worked out on the walker's threads).
enum Visited {
    Found(RelPath, Indexed),
    /// A file the index vouched for.
    Reused(RelPath, Indexed),
    /// A file to read, with the stat the walk saw.
    Pending(RelPath, Stat),
    Skipped(Skipped),
    Unreadable(Unreadable),
    /// The walker's own error (merged on the calling thread, which may fail the walk).
    Error(ignore::Error),
}

/// One walker thread's results, handed over when the thread's visitor is dropped.
struct Collector<'s> {
    root_dir: &'s Path,
    previous: &'s Index,
    local: Vec<Visited>,
    out: &'s Mutex<Vec<Vec<Visited>>>,
}

impl Collector<'_> {
    fn take(&mut self, result: Result<ignore::DirEntry, ignore::Error>) {
        match result {
            Ok(entry) if entry.depth() == 0 => {}
            Ok(entry) => {
                if let Some(visited) = visit(self.root_dir, self.previous, entry.path()) {
                    self.local.push(visited);
                }
            }
            Err(error) => self.local.push(Visited::Error(error)),
        }
    }
}

impl Drop for Collector<'_> {
    fn drop(&mut self) {
        let local = std::mem::take(&mut self.local);
        self.out
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(local);
    }
}

/// One path the walker yielded (already filtered: in scope, a valid path).
fn visit(root_dir: &Path, previous: &Index, path: &Path) -> Option<Visited> {
    let rel = rel_path(root_dir, path).ok()?;
    let skip = |reason| {
        Visited::Skipped(Skipped {
            path: path.strip_prefix(root_dir).unwrap_or(path).to_path_buf(),
            reason,
        })
    };
    let metadata = match std::fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(error) => return Some(Visited::Unreadable(Unreadable { path: rel, error })),
    };
    let stat = Stat::from_metadata(&metadata);
    Some(match stat.kind {
        FileKind::Dir => Visited::Found(
            rel,
            Indexed {
                stat,
                kind: EntryKind::Dir,
            },
        ),
        FileKind::Symlink => match std::fs::read_link(path) {
            Err(error) => Visited::Unreadable(Unreadable { path: rel, error }),
            Ok(target) => match target.into_os_string().into_string() {
                Err(_) => skip(SkipReason::LinkTargetNotUtf8),
                Ok(target) => {
                    let kind = EntryKind::Symlink { target };
                    match kind.validate() {
                        Ok(()) => Visited::Found(rel, Indexed { stat, kind }),
                        Err(reason) => skip(SkipReason::BadLinkTarget(reason)),
                    }
                }
            },
        },
        FileKind::File => match previous.reusable(&rel, &stat) {
            Some(kind) => {
                let kind = kind.clone();
                Visited::Reused(rel, Indexed { stat, kind })
            }
            None => Visited::Pending(rel, stat),
        },
        FileKind::Other => skip(SkipReason::Special(special_kind(&metadata.file_type()))),
    })
}

impl<'a> Walk<'a> {
    /// Walks `root_dir` on `threads` threads (at least one): every path stat'ed, the
    /// index consulted. The results do not depend on the threads' timing: what is listed
    /// is sorted by path.
    pub(super) fn run(
        root_dir: &Path,
        previous: &'a Index,
        scope: Scope,
        threads: usize,
    ) -> Result<Walk<'a>, ScanError> {
        let started_ns = now_ns();
        let root = Root::open(root_dir)?;
        let mut walk = Walk {
            root,
            previous,
            started_ns,
            found: BTreeMap::new(),
            pending: Vec::new(),
            skipped: Vec::new(),
            unreadable: Vec::new(),
            conflict_copies: Vec::new(),
            stats: ScanStats::default(),
        };
        let scope = Arc::new(scope);
        let filtered = Arc::new(Mutex::new(Filtered::default()));
        let out = Mutex::new(Vec::new());
        walker(root_dir, Arc::clone(&scope), Arc::clone(&filtered), threads).run(|| {
            let mut collector = Collector {
                root_dir,
                previous,
                local: Vec::new(),
                out: &out,
            };
            Box::new(move |result| {
                collector.take(result);
                ignore::WalkState::Continue
            })
        });
        for visited in out
            .into_inner()
            .unwrap_or_else(|e| e.into_inner())
            .into_iter()
            .flatten()
        {
            match visited {
                Visited::Found(path, indexed) => {
                    walk.found.insert(path, indexed);
                }
                Visited::Reused(path, indexed) => {
                    walk.stats.reused_files += 1;
                    walk.found.insert(path, indexed);
                }
                Visited::Pending(path, stat) => walk.pending.push((path, stat)),
                Visited::Skipped(skipped) => walk.skipped.push(skipped),
                Visited::Unreadable(unreadable) => walk.unreadable.push(unreadable),
                Visited::Error(error) => walk.walk_error(root_dir, &scope, error)?,
            }
        }
        let filtered = std::mem::take(&mut *filtered.lock().unwrap_or_else(|e| e.into_inner()));
        walk.skipped.extend(filtered.skipped);
        walk.conflict_copies = filtered.conflict_copies;
        walk.pending.sort_by(|a, b| a.0.cmp(&b.0));
        walk.skipped.sort_by(|a, b| a.path.cmp(&b.path));
        walk.unreadable.sort_by(|a, b| a.path.cmp(&b.path));
        walk.conflict_copies.sort();
        Ok(walk)
    }

    /// An error from the walker: a directory that cannot be listed is unreadable (its
    /// previous contents stay); the root itself failing fails the scan; the rest (an
    /// ignore file with a bad pattern) is logged.
    fn walk_error(
        &mut self,
        root_dir: &Path,
        scope: &Scope,
        error: ignore::Error,
    ) -> Result<(), ScanError> {
        let path = error_path(&error).map(Path::to_path_buf);
        let is_io = error.io_error().is_some();
        match (path, is_io) {
            (Some(path), true) => {
                let source = error
                    .into_io_error()
                    .unwrap_or_else(|| io::Error::other("unreadable"));
                if path == root_dir {
                    return Err(ScanError::List {
                        root: root_dir.to_path_buf(),
                        source,
                    });
                }
                match rel_path(root_dir, &path) {
                    Ok(rel) if scope.wants(&rel) => self.unreadable.push(Unreadable {
                        path: rel,
                        error: source,
                    }),
                    Ok(_) => {}
                    Err(_) => {
                        tracing::warn!(path = %path.display(), error = %source, "while scanning")
                    }
                }
            }
            _ => tracing::warn!(root = %root_dir.display(), %error, "while scanning"),
        }
        Ok(())
    }

    /// Hashes what is pending, then keeps the previous entries of what was unreadable.
    pub(super) fn hash(&mut self, options: &ScanOptions) {
        let pending = std::mem::take(&mut self.pending);
        let results = hash_all(&self.root, &pending, options.threads);
        for ((path, _), result) in pending.into_iter().zip(results) {
            match result {
                Ok((stat, content)) => {
                    self.stats.hashed_files += 1;
                    self.stats.hashed_bytes += content.size;
                    let kind = content.into_kind(stat.executable());
                    self.found.insert(path, Indexed { stat, kind });
                }
                Err(error) => self.unreadable.push(Unreadable { path, error }),
            }
        }
        for unreadable in &self.unreadable {
            if unreadable.error.kind() == io::ErrorKind::NotFound {
                continue;
            }
            for (path, indexed) in self.previous.under(&unreadable.path) {
                if !self.found.contains_key(path) {
                    self.found.insert(path.clone(), indexed.clone());
                }
            }
        }
        for indexed in self.found.values() {
            match indexed.kind {
                EntryKind::Dir => self.stats.dirs += 1,
                EntryKind::File { .. } => self.stats.files += 1,
                EntryKind::Symlink { .. } => self.stats.symlinks += 1,
            }
        }
    }
}

/// The walker: git's ignore rules and `.cloudignore`, hidden files included, links not
/// followed, `.git` and the writer's temporary files pruned, only `scope` visited, on
/// `threads` threads.
fn walker(
    root: &Path,
    scope: Arc<Scope>,
    filtered: Arc<Mutex<Filtered>>,
    threads: usize,
) -> ignore::WalkParallel {
    let mut builder = ignore::WalkBuilder::new(root);
    builder
        // No hidden-file filter, no `.ignore` files, no rules from above the root.
        .standard_filters(false)
        .git_ignore(true)
        .git_exclude(true)
        .git_global(true)
        .require_git(false)
        .add_custom_ignore_filename(CLOUDIGNORE)
        .follow_links(false)
        .threads(threads.max(1));
    let root = root.to_path_buf();
    builder.filter_entry(move |entry| {
        if never_content(entry.file_name()) {
            return false;
        }
        let record = |f: &mut dyn FnMut(&mut Filtered)| {
            f(&mut filtered.lock().unwrap_or_else(|e| e.into_inner()));
        };
        match rel_path(&root, entry.path()) {
            Ok(rel) => {
                if !scope.wants(&rel) {
                    return false;
                }
                if rel.is_conflict_copy() {
                    record(&mut |f| f.conflict_copies.push(rel.clone()));
                    return false;
                }
                true
            }
            Err(reason) => {
                let parent = entry
                    .path()
                    .parent()
                    .filter(|p| *p != root)
                    .and_then(|p| rel_path(&root, p).ok());
                if scope.wants_child_of(parent.as_ref()) {
                    let path = entry.path().strip_prefix(&root).unwrap_or(entry.path());
                    record(&mut |f| {
                        f.skipped.push(Skipped {
                            path: path.to_path_buf(),
                            reason: reason.clone(),
                        })
                    });
                }
                false
            }
        }
    });
    builder.build_parallel()
}

/// The path an `ignore` error is about, if it says.
fn error_path(error: &ignore::Error) -> Option<&Path> {
    match error {
        ignore::Error::WithPath { path, .. } => Some(path),
        ignore::Error::WithDepth { err, .. } | ignore::Error::WithLineNumber { err, .. } => {
            error_path(err)
        }
        ignore::Error::Partial(errors) => errors.iter().find_map(error_path),
        _ => None,
    }
}
