//! The scanner: what a worktree holds, as teleport sees it. It walks with the `ignore`
//! crate under git's rules (`.gitignore` also outside a git repository,
//! `.git/info/exclude`, the user's global excludes) plus `.cloudignore` files; hidden
//! files are content, `.git` never is (at any depth, in any case), symlinks are recorded
//! and never followed, empty directories and the owner's exec bit are kept. A file is
//! read only when the previous [`Index`] cannot vouch for it (see [`Index::reusable`]).
//!
//! A full scan ([`scan`], or [`plan`] then [`Plan::finish`]) makes a new manifest and
//! index; [`rescan_paths`] re-examines only some paths (what a watcher saw change) and
//! reports the changes to apply to the index and the delta of the tree.
//!
//! Ignore rules in a rescan: the same walker, with the same rules, starts at the root
//! and is pruned to the paths asked for and their parent directories. This costs a
//! `readdir` of each parent and re-reads their ignore files, but it cannot disagree with
//! a full scan, which a separate matcher stack could (negations, directory-only
//! patterns, rules of parents). A changed ignore file re-examines its whole directory;
//! a changed `.git/info/exclude` or global excludes file needs a full scan.
//!
//! What goes where: a name that is not a [`RelPath`] (not UTF-8, a backslash, too long)
//! or a special file (fifo, socket, device) is [`Scan::skipped`], with the reason; a path
//! that cannot be read is [`Scan::unreadable`], and its previous entry (if any) is kept,
//! unless it is gone; conflict copies ([`RelPath::is_conflict_copy`]) and the writer's
//! temporary files are never content. Only a root that cannot be opened fails a scan.
//!
//! Hashing runs on up to [`ScanOptions::threads`] scoped threads; the API is synchronous,
//! so callers run it on a blocking pool, never on a runtime thread.
//!
//! Architecture invariant: the scanner only reads. Files are opened through [`Root`]
//! (never through a symlink), and it never descends into a symlink or a `.git`.

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsStr;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use cloud_protocol::teleport::{Delta, EntryKind, Manifest, PathError, RelPath};

use crate::content::{hash_reader, FileContent};
use crate::index::{Index, IndexChange, Indexed};
use crate::root::{open_file_in, Parent, Root, RootError};
use crate::stat::{FileKind, Stat};
use crate::write::TEMP_PREFIX;

/// The per-directory ignore file of teleport's own, with `.gitignore`'s syntax and a
/// higher precedence.
pub const CLOUDIGNORE: &str = ".cloudignore";

/// Files a hashing thread takes at a time: neighbours, so they share a parent directory.
const BATCH: usize = 16;

/// How a scan runs.
#[derive(Debug, Clone)]
pub struct ScanOptions {
    /// Threads that hash files (1: on the caller's thread).
    pub threads: usize,
}

impl Default for ScanOptions {
    fn default() -> ScanOptions {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        ScanOptions {
            threads: cpus.min(4),
        }
    }
}

/// A full scan's result.
#[derive(Debug)]
pub struct Scan {
    pub manifest: Manifest,
    /// The manifest's entries with their stats, stamped with this scan's start: the
    /// `previous` of the next scan.
    pub index: Index,
    pub skipped: Vec<Skipped>,
    pub unreadable: Vec<Unreadable>,
    /// Conflict copies found (never content; `teleport status` lists them).
    pub conflict_copies: Vec<RelPath>,
    pub stats: ScanStats,
}

/// A rescan's result: what changed among the paths asked for.
#[derive(Debug)]
pub struct Rescan {
    /// What to apply to the index ([`Index::apply`]): entries that are new or whose
    /// stat or content changed, and removals.
    pub changes: Vec<IndexChange>,
    /// The tree's changes (content, kind, exec bit, link target), in writer order.
    pub delta: Delta,
    pub skipped: Vec<Skipped>,
    pub unreadable: Vec<Unreadable>,
    pub conflict_copies: Vec<RelPath>,
    /// Counts over the paths re-examined.
    pub stats: ScanStats,
}

/// What a scan did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScanStats {
    /// Files in the result.
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Files read and hashed, and their bytes.
    pub hashed_files: u64,
    pub hashed_bytes: u64,
    /// Files taken from the previous index without being read.
    pub reused_files: u64,
}

/// A path left out of the tree, and why.
#[derive(Debug)]
pub struct Skipped {
    /// Relative to the root (it may not be a valid [`RelPath`]).
    pub path: PathBuf,
    pub reason: SkipReason,
}

/// Why a path is left out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SkipReason {
    #[error("its name is not UTF-8")]
    NotUtf8,
    #[error("{0}")]
    BadPath(PathError),
    #[error("it is a {0}, which teleport does not carry")]
    Special(&'static str),
    #[error("it is a symlink whose target is not UTF-8")]
    LinkTargetNotUtf8,
    #[error("it is a symlink with an invalid target: {0}")]
    BadLinkTarget(String),
}

/// A path that could not be read. Its previous entry stays in the result, unless the
/// error says it is gone ([`io::ErrorKind::NotFound`]).
#[derive(Debug)]
pub struct Unreadable {
    pub path: RelPath,
    pub error: io::Error,
}

/// Why a scan could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("cannot scan the tree: {0}")]
    Root(#[from] RootError),
    #[error("cannot list the tree root {root}: {source}")]
    List { root: PathBuf, source: io::Error },
}

/// Scans the tree at `root`, reading only what `previous` cannot vouch for.
pub fn scan(root: &Path, previous: &Index, options: &ScanOptions) -> Result<Scan, ScanError> {
    Ok(plan(root, previous)?.finish(options))
}

/// The first half of a scan: the walk is done (every path stat'ed, the index consulted),
/// the hashing is not. [`Plan::pending`] tells how much is left to read.
#[derive(Debug)]
pub struct Plan<'a> {
    walk: Walk<'a>,
}

/// Walks the tree at `root` (see [`scan`]); [`Plan::finish`] hashes.
pub fn plan<'a>(root: &Path, previous: &'a Index) -> Result<Plan<'a>, ScanError> {
    Ok(Plan {
        walk: Walk::run(root, previous, Scope::All)?,
    })
}

impl Plan<'_> {
    /// The files left to hash, and their bytes (as stat saw them).
    pub fn pending(&self) -> (u64, u64) {
        let bytes = self.walk.pending.iter().map(|(_, stat)| stat.size).sum();
        (self.walk.pending.len() as u64, bytes)
    }

    /// Hashes what is pending and makes the scan.
    pub fn finish(self, options: &ScanOptions) -> Scan {
        let mut walk = self.walk;
        walk.hash(options);
        let mut index = Index::new(walk.started_ns);
        for (path, indexed) in std::mem::take(&mut walk.found) {
            index.insert(path, indexed);
        }
        let manifest = index.manifest();
        tracing::debug!(root = %walk.root.path().display(), stats = ?walk.stats, "scanned");
        Scan {
            manifest,
            index,
            skipped: walk.skipped,
            unreadable: walk.unreadable,
            conflict_copies: walk.conflict_copies,
            stats: walk.stats,
        }
    }
}

/// Re-examines `paths` of the tree at `root` (and their parent directories; everything
/// under a path that is a directory), against `index`. A path that is gone is removed
/// with everything under it. `index`'s scan stamp stays: files hashed here stay racy
/// until the next full scan, which hashes them once more.
pub fn rescan_paths(
    root: &Path,
    paths: &[RelPath],
    index: &Index,
    options: &ScanOptions,
) -> Result<Rescan, ScanError> {
    // A changed ignore file changes what its whole directory holds.
    let mut targets: Vec<Option<RelPath>> = paths
        .iter()
        .map(|path| match path.file_name() {
            ".gitignore" | CLOUDIGNORE => path.parent(),
            _ => Some(path.clone()),
        })
        .collect();
    targets.sort();
    targets.dedup();
    let targets: Option<Vec<RelPath>> = targets.into_iter().collect();
    let scope = match &targets {
        None => Scope::All,
        Some(targets) => Scope::paths(targets),
    };
    let mut walk = Walk::run(root, index, scope)?;
    walk.hash(options);

    // What the answer covers: each target's subtree, widened to the topmost parent that
    // is no longer a directory (everything under it is gone).
    let covered: Vec<RelPath> = match &targets {
        None => Vec::new(),
        Some(targets) => {
            let mut covered: Vec<RelPath> = targets
                .iter()
                .map(|target| {
                    ancestors(target)
                        .find(|a| !matches!(walk.found.get(a), Some(i) if i.kind == EntryKind::Dir))
                        .unwrap_or_else(|| target.clone())
                })
                .collect();
            covered.sort();
            let mut topmost: Vec<RelPath> = Vec::new();
            for path in covered {
                if !topmost.last().is_some_and(|top| path.starts_with(top)) {
                    topmost.push(path);
                }
            }
            topmost
        }
    };
    let old_entries: Vec<(&RelPath, &Indexed)> = match targets {
        None => index.iter().collect(),
        Some(_) => covered.iter().flat_map(|top| index.under(top)).collect(),
    };

    let mut old = Manifest::new();
    let mut removed = Vec::new();
    for (path, indexed) in &old_entries {
        old.insert((*path).clone(), indexed.kind.clone());
        if !walk.found.contains_key(*path) {
            removed.push((*path).clone());
        }
    }
    // Parents re-examined on the way are in `found` too: compare them as well.
    for path in walk.found.keys() {
        if let Some(indexed) = index.get(path) {
            old.insert(path.clone(), indexed.kind.clone());
        }
    }
    let mut changes = Vec::new();
    removed.sort();
    for path in removed {
        let under_removed =
            matches!(changes.last(), Some(IndexChange::Remove(top)) if path.starts_with(top));
        if !under_removed {
            changes.push(IndexChange::Remove(path));
        }
    }
    let mut new = Manifest::new();
    for (path, indexed) in &walk.found {
        new.insert(path.clone(), indexed.kind.clone());
        if index.get(path) != Some(indexed) {
            changes.push(IndexChange::Put(path.clone(), indexed.clone()));
        }
    }
    let delta = old.diff(&new);
    tracing::debug!(root = %root.display(), paths = paths.len(), changes = changes.len(), "rescanned");
    Ok(Rescan {
        changes,
        delta,
        skipped: walk.skipped,
        unreadable: walk.unreadable,
        conflict_copies: walk.conflict_copies,
        stats: walk.stats,
    })
}

/// The proper ancestors of `path`, topmost first, then `path` itself.
fn ancestors(path: &RelPath) -> impl Iterator<Item = RelPath> + '_ {
    let text = path.as_str();
    text.match_indices('/')
        .map(move |(at, _)| &text[..at])
        .chain(std::iter::once(text))
        .map(|prefix| RelPath::new(prefix).expect("a prefix of a checked path is checked"))
}

/// Which paths a walk visits.
#[derive(Debug)]
enum Scope {
    All,
    /// These paths with everything under them, and their parent directories (only to
    /// reach them).
    Paths {
        targets: HashSet<String>,
        parents: HashSet<String>,
    },
}

impl Scope {
    fn paths(targets: &[RelPath]) -> Scope {
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
struct Walk<'a> {
    root: Root,
    previous: &'a Index,
    /// When the walk started, nanoseconds since the Unix epoch.
    started_ns: i64,
    found: BTreeMap<RelPath, Indexed>,
    /// Files to read, with the stat the walk saw.
    pending: Vec<(RelPath, Stat)>,
    skipped: Vec<Skipped>,
    unreadable: Vec<Unreadable>,
    conflict_copies: Vec<RelPath>,
    stats: ScanStats,
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

impl<'a> Walk<'a> {
    fn run(root_dir: &Path, previous: &'a Index, scope: Scope) -> Result<Walk<'a>, ScanError> {
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
        for result in walker(root_dir, Arc::clone(&scope), Arc::clone(&filtered)) {
            match result {
                Ok(entry) if entry.depth() == 0 => {}
                Ok(entry) => walk.visit(root_dir, entry.path()),
                Err(error) => walk.walk_error(root_dir, &scope, error)?,
            }
        }
        let filtered = std::mem::take(&mut *filtered.lock().unwrap_or_else(|e| e.into_inner()));
        walk.skipped.extend(filtered.skipped);
        walk.conflict_copies = filtered.conflict_copies;
        Ok(walk)
    }

    /// One path the walker yielded (already filtered: in scope, a valid path).
    fn visit(&mut self, root_dir: &Path, path: &Path) {
        let Ok(rel) = rel_path(root_dir, path) else {
            return;
        };
        let metadata = match std::fs::symlink_metadata(path) {
            Ok(metadata) => metadata,
            Err(error) => {
                self.unreadable.push(Unreadable { path: rel, error });
                return;
            }
        };
        let stat = Stat::from_metadata(&metadata);
        match stat.kind {
            FileKind::Dir => {
                self.found.insert(
                    rel,
                    Indexed {
                        stat,
                        kind: EntryKind::Dir,
                    },
                );
            }
            FileKind::Symlink => match std::fs::read_link(path) {
                Err(error) => self.unreadable.push(Unreadable { path: rel, error }),
                Ok(target) => match target.into_os_string().into_string() {
                    Err(_) => self.skip(root_dir, path, SkipReason::LinkTargetNotUtf8),
                    Ok(target) => {
                        let kind = EntryKind::Symlink { target };
                        match kind.validate() {
                            Ok(()) => {
                                self.found.insert(rel, Indexed { stat, kind });
                            }
                            Err(reason) => {
                                self.skip(root_dir, path, SkipReason::BadLinkTarget(reason))
                            }
                        }
                    }
                },
            },
            FileKind::File => match self.previous.reusable(&rel, &stat) {
                Some(kind) => {
                    self.stats.reused_files += 1;
                    let kind = kind.clone();
                    self.found.insert(rel, Indexed { stat, kind });
                }
                None => self.pending.push((rel, stat)),
            },
            FileKind::Other => {
                let reason = SkipReason::Special(special_kind(&metadata.file_type()));
                self.skip(root_dir, path, reason);
            }
        }
    }

    fn skip(&mut self, root_dir: &Path, path: &Path, reason: SkipReason) {
        self.skipped.push(Skipped {
            path: path.strip_prefix(root_dir).unwrap_or(path).to_path_buf(),
            reason,
        });
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
    fn hash(&mut self, options: &ScanOptions) {
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
/// followed, `.git` and the writer's temporary files pruned, only `scope` visited.
fn walker(root: &Path, scope: Arc<Scope>, filtered: Arc<Mutex<Filtered>>) -> ignore::Walk {
    let mut builder = ignore::WalkBuilder::new(root);
    builder
        // No hidden-file filter, no `.ignore` files, no rules from above the root.
        .standard_filters(false)
        .git_ignore(true)
        .git_exclude(true)
        .git_global(true)
        .require_git(false)
        .add_custom_ignore_filename(CLOUDIGNORE)
        .follow_links(false);
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
    builder.build()
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

type Hashed = io::Result<(Stat, FileContent)>;

/// Hashes `pending` on up to `threads` threads; results in `pending`'s order.
fn hash_all(root: &Root, pending: &[(RelPath, Stat)], threads: usize) -> Vec<Hashed> {
    let threads = threads.max(1).min(pending.len().div_ceil(BATCH));
    if threads <= 1 {
        let mut hasher = Hasher::new(root);
        return pending.iter().map(|(path, _)| hasher.hash(path)).collect();
    }
    let next = AtomicUsize::new(0);
    let mut results: Vec<Option<Hashed>> = Vec::new();
    results.resize_with(pending.len(), || None);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                let next = &next;
                std::thread::Builder::new()
                    .name("cloud-tree-hash".into())
                    .spawn_scoped(scope, move || take_batches(root, pending, next))
            })
            .collect();
        for worker in workers {
            let done = match worker {
                Ok(handle) => handle
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
                // No thread could be started: what is left is hashed here.
                Err(_) => take_batches(root, pending, &next),
            };
            for (i, result) in done {
                results[i] = Some(result);
            }
        }
    });
    results
        .into_iter()
        .map(|r| r.expect("every pending file is hashed once"))
        .collect()
}

/// A hashing thread's loop: takes batches of neighbours until none is left.
fn take_batches(
    root: &Root,
    pending: &[(RelPath, Stat)],
    next: &AtomicUsize,
) -> Vec<(usize, Hashed)> {
    let mut hasher = Hasher::new(root);
    let mut done = Vec::new();
    loop {
        let start = next.fetch_add(BATCH, Ordering::Relaxed);
        if start >= pending.len() {
            return done;
        }
        let end = (start + BATCH).min(pending.len());
        for (i, (path, _)) in pending[start..end].iter().enumerate() {
            done.push((start + i, hasher.hash(path)));
        }
    }
}

/// Opens and hashes files under a root, keeping the last parent directory open (files
/// come in walk order, so neighbours share it).
struct Hasher<'r> {
    root: &'r Root,
    parent: Option<(Option<RelPath>, Parent<'r>)>,
}

impl<'r> Hasher<'r> {
    fn new(root: &'r Root) -> Hasher<'r> {
        Hasher { root, parent: None }
    }

    /// The file's stat (from its descriptor, before reading) and content.
    fn hash(&mut self, path: &RelPath) -> Hashed {
        let parent_path = path.parent();
        let cached = matches!(&self.parent, Some((p, _)) if *p == parent_path);
        if !cached {
            self.parent = None;
            match self.root.parent(path, false) {
                Ok(Some(parent)) => self.parent = Some((parent_path, parent)),
                Ok(None) => return Err(io::Error::from(io::ErrorKind::NotFound)),
                Err(e) => return Err(into_io(e)),
            }
        }
        let (_, parent) = self.parent.as_ref().expect("opened above");
        let file = open_file_in(parent.dir(), path).map_err(into_io)?;
        let metadata = file.metadata()?;
        let stat = Stat::from_metadata(&metadata);
        let content = hash_reader(&file, stat.size)?;
        Ok((stat, content))
    }
}

/// An error reaching a file, as the `io::Error` an [`Unreadable`] carries (its kind
/// kept where there is one).
fn into_io(error: RootError) -> io::Error {
    match error {
        RootError::Io { source, .. } | RootError::Open { source, .. } => source,
        other => io::Error::other(other.to_string()),
    }
}
