//! Rescanning some paths: the walker pruned to them and their parents, then the answer
//! as changes to the index and a delta of the tree. What a path's parents turned into
//! widens the answer: a parent that is no longer a directory takes everything under it.
//!
//! Architecture invariant: a rescan never reports a path outside what it was asked
//! about, its parents, and (for a changed ignore file) that file's directory.

use std::path::Path;

use cloud_protocol::teleport::{EntryKind, Manifest, RelPath};

use super::walk::{Scope, Walk};
use super::{Rescan, ScanError, ScanOptions, CLOUDIGNORE};
use crate::index::{Index, IndexChange, Indexed};

/// What a rescan of `paths` answers for, sorted and without repeats: each path, or the
/// directory of a changed ignore file (which changes what its whole directory holds).
/// `None`: the whole tree (an ignore file at the root).
pub fn rescan_targets(paths: &[RelPath]) -> Option<Vec<RelPath>> {
    let mut targets: Vec<Option<RelPath>> = paths
        .iter()
        .map(|path| match path.file_name() {
            ".gitignore" | CLOUDIGNORE => path.parent(),
            _ => Some(path.clone()),
        })
        .collect();
    targets.sort();
    targets.dedup();
    targets.into_iter().collect()
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
    let targets = rescan_targets(paths);
    let scope = match &targets {
        None => Scope::All,
        Some(targets) => Scope::paths(targets),
    };
    let mut walk = Walk::run(root, index, scope, options.threads)?;
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
