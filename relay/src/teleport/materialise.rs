//! Materialising a version: writing a committed delta into the session's workspace,
//! through the safe writer (every path a `RelPath`, reached component by component, never
//! through a symlink; files written to a temp name and renamed), with file contents from
//! the blob store.
//!
//! Blocking: runs on the blocking pool. This module must never decide what a version holds
//! (that is `snapshots`) and never writes outside the workspace's root.

use std::io::Write as _;
use std::path::Path;

use cloud_protocol::teleport::{Change, Delta, EntryKind, RelPath};
use cloud_tree::{Expect, Root};

use super::blobs::BlobStore;

/// Below this many files a delta is written on the calling thread alone.
const PARALLEL_ABOVE: usize = 256;
/// At most this many threads write one delta's files.
const MAX_WRITERS: usize = 4;

/// Writes `delta` into the workspace at `workspace` (created if missing). Returns the
/// paths it could not write, each with why (the rest is written).
///
/// Removals and directories go first, in the delta's order, on the calling thread; then
/// the files and symlinks, split into runs of neighbouring paths written by up to
/// [`MAX_WRITERS`] threads at once (each its own [`Root`], so each keeps its own open
/// directories). A well-formed delta never puts a file where another put makes a
/// directory, so the runs never touch the same path.
pub fn materialise(
    workspace: &Path,
    delta: &Delta,
    blobs: &BlobStore,
    org: &str,
) -> Result<Vec<String>, String> {
    std::fs::create_dir_all(workspace)
        .map_err(|e| format!("cannot create the workspace {}: {e}", workspace.display()))?;
    let root = Root::open(workspace).map_err(|e| e.to_string())?;
    let mut problems = Vec::new();
    let mut leaves = Vec::new();
    for change in &delta.changes {
        let result = match change {
            Change::Remove(path) => root
                .remove(path, Expect::Anything)
                .map_err(|e| e.to_string()),
            Change::Put(entry) if entry.kind == EntryKind::Dir => {
                put(&root, &entry.path, &entry.kind, blobs, org)
            }
            Change::Put(entry) => {
                leaves.push(entry);
                continue;
            }
        };
        if let Err(e) = result {
            problems.push(format!("{}: {e}", change.path()));
        }
    }
    let writers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(MAX_WRITERS);
    if leaves.len() <= PARALLEL_ABOVE || writers == 1 {
        for entry in leaves {
            if let Err(e) = put(&root, &entry.path, &entry.kind, blobs, org) {
                problems.push(format!("{}: {e}", entry.path));
            }
        }
        return Ok(problems);
    }
    let run = leaves.len().div_ceil(writers);
    let found: Vec<Result<Vec<String>, String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = leaves
            .chunks(run)
            .map(|entries| {
                scope.spawn(move || {
                    let root = Root::open(workspace).map_err(|e| e.to_string())?;
                    let mut problems = Vec::new();
                    for entry in entries {
                        if let Err(e) = put(&root, &entry.path, &entry.kind, blobs, org) {
                            problems.push(format!("{}: {e}", entry.path));
                        }
                    }
                    Ok(problems)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("a writing thread panicked".to_owned()))
            })
            .collect()
    });
    for result in found {
        problems.extend(result?);
    }
    Ok(problems)
}

fn put(
    root: &Root,
    path: &RelPath,
    kind: &EntryKind,
    blobs: &BlobStore,
    org: &str,
) -> Result<(), String> {
    match kind {
        EntryKind::Dir => root.put_dir(path).map_err(|e| e.to_string()),
        EntryKind::Symlink { target } => {
            // Whatever is in the way (a file the agent made) is replaced, as the version
            // says; a directory is removed first.
            if let Ok(Some(stat)) = root.lstat(path) {
                if stat.kind == cloud_tree::FileKind::Dir {
                    root.remove(path, Expect::Anything)
                        .map_err(|e| e.to_string())?;
                }
            }
            root.put_symlink(path, target, Expect::Anything)
                .map_err(|e| e.to_string())
        }
        EntryKind::File { executable, .. } => {
            if let Ok(Some(stat)) = root.lstat(path) {
                if stat.kind == cloud_tree::FileKind::Dir {
                    root.remove(path, Expect::Anything)
                        .map_err(|e| e.to_string())?;
                }
            }
            let ids = kind.blobs();
            let mut missing = None;
            root.put_file(
                path,
                *executable,
                |file| {
                    for id in &ids {
                        match blobs.get(org, id) {
                            Ok(Some(bytes)) => file.write_all(&bytes)?,
                            Ok(None) => {
                                missing = Some(*id);
                                return Err(std::io::Error::other("a blob is missing"));
                            }
                            Err(e) => return Err(std::io::Error::other(e.to_string())),
                        }
                    }
                    Ok(())
                },
                Expect::Anything,
            )
            .map_err(|e| match missing {
                Some(id) => format!("blob {id} is not in the store"),
                None => e.to_string(),
            })
        }
    }
}
