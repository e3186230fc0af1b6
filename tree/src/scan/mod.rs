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
//! temporary files are never content. Only a root that cannot be opened or listed fails
//! a scan.
//!
//! The walk (ignore's parallel walker: listing, stat, the index's say) and the hashing each
//! run on up to [`ScanOptions::threads`] threads; the API is synchronous,
//! so callers run it on a blocking pool, never on a runtime thread.
//!
//! Architecture invariant: the scanner only reads. Files are opened through [`crate::Root`]
//! (never through a symlink), and it never descends into a symlink or a `.git`.

mod hash;
mod rescan;
mod walk;

use std::io;
use std::path::{Path, PathBuf};

use cloud_protocol::teleport::{Delta, Manifest, PathError, RelPath};

use crate::index::{Index, IndexChange};
use crate::root::RootError;

pub use rescan::{rescan_paths, rescan_targets};
use walk::{Scope, Walk};

/// The per-directory ignore file of teleport's own, with `.gitignore`'s syntax and a
/// higher precedence.
pub const CLOUDIGNORE: &str = ".cloudignore";

/// How a scan runs.
#[derive(Debug, Clone)]
pub struct ScanOptions {
    /// Threads that walk the tree, and threads that hash files (1: hashing on the
    /// caller's thread).
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
    Ok(plan(root, previous, options)?.finish(options))
}

/// The first half of a scan: the walk is done (every path stat'ed, the index consulted),
/// the hashing is not. [`Plan::pending`] tells how much is left to read.
#[derive(Debug)]
pub struct Plan<'a> {
    walk: Walk<'a>,
}

/// Walks the tree at `root` on [`ScanOptions::threads`] threads (see [`scan`]);
/// [`Plan::finish`] hashes.
pub fn plan<'a>(
    root: &Path,
    previous: &'a Index,
    options: &ScanOptions,
) -> Result<Plan<'a>, ScanError> {
    Ok(Plan {
        walk: Walk::run(root, previous, Scope::All, options.threads)?,
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
        let index = Index::from_entries(walk.started_ns, std::mem::take(&mut walk.found));
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
