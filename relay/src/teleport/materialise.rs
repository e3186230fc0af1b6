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
use super::staging::SessionStage;

/// Below this many files a delta is written on the calling thread alone.
const PARALLEL_ABOVE: usize = 256;
/// At most this many threads write one delta's files.
const MAX_WRITERS: usize = 4;

/// Writes `delta` into the workspace at `workspace` (created if missing). Returns the
/// paths it could not write, each with why (the rest is written).
///
/// Removals go first, in the delta's order, on the calling thread; then the directories,
/// files and symlinks, split into runs of neighbouring paths written by up to
/// [`MAX_WRITERS`] threads at once (each its own [`Root`], so each keeps its own open
/// directories). A well-formed delta never puts a file where another put makes a
/// directory, so the runs never put the same path; a directory a run needs before the one
/// that puts it got to it is made on the way (`put_dir` takes one that is there).
pub fn materialise(
    workspace: &Path,
    delta: &Delta,
    blobs: &BlobStore,
    org: &str,
    staged: Option<&SessionStage>,
) -> Result<Vec<String>, String> {
    let began = std::time::Instant::now();
    std::fs::create_dir_all(workspace)
        .map_err(|e| format!("cannot create the workspace {}: {e}", workspace.display()))?;
    let root = Root::open(workspace).map_err(|e| e.to_string())?;
    let mut problems = Vec::new();
    let mut puts = Vec::new();
    for change in &delta.changes {
        match change {
            Change::Remove(path) => {
                if let Err(e) = root.remove(path, Expect::Anything) {
                    problems.push(format!("{path}: {e}"));
                }
            }
            Change::Put(entry) => puts.push(entry),
        }
    }
    tracing::debug!(
        removals = delta.changes.len() - puts.len(),
        "removed in {:?}",
        began.elapsed()
    );
    let writers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(MAX_WRITERS);
    if puts.len() <= PARALLEL_ABOVE || writers == 1 {
        for entry in puts {
            if let Err(e) = put(&root, &entry.path, &entry.kind, blobs, org, staged) {
                problems.push(format!("{}: {e}", entry.path));
            }
        }
        return Ok(problems);
    }
    let run = puts.len().div_ceil(writers);
    let found: Vec<Result<Vec<String>, String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = puts
            .chunks(run)
            .map(|entries| {
                scope.spawn(move || {
                    let root = Root::open(workspace).map_err(|e| e.to_string())?;
                    let mut problems = Vec::new();
                    for entry in entries {
                        if let Err(e) = put(&root, &entry.path, &entry.kind, blobs, org, staged) {
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
    staged: Option<&SessionStage>,
) -> Result<(), String> {
    if let (
        Some(stage),
        EntryKind::File {
            executable,
            content,
            chunks,
            ..
        },
    ) = (staged, kind)
    {
        // A whole file the upload staged: moved in, not written (written from the store
        // if the move fails).
        if chunks.is_empty() {
            if let Some(name) = stage.take(content) {
                let moved = replacing_a_dir(root, path, || {
                    root.put_staged(path, *executable, stage.staging(), &name, Expect::Anything)
                });
                match moved {
                    Ok(()) => return Ok(()),
                    Err(_) => stage.put_back(*content),
                }
            }
        }
    }
    match kind {
        EntryKind::Dir => root.put_dir(path).map_err(|e| e.to_string()),
        EntryKind::Symlink { target } => replacing_a_dir(root, path, || {
            // Whatever else is in the way (a file the agent made) is replaced, as the
            // version says.
            root.put_symlink(path, target, Expect::Anything)
        }),
        EntryKind::File { executable, .. } => {
            let ids = kind.blobs();
            let mut missing = None;
            replacing_a_dir(root, path, || {
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
            })
            .map_err(|e| match missing {
                Some(id) => format!("blob {id} is not in the store"),
                None => e,
            })
        }
    }
}

/// Runs `put`; if a directory is where it puts (one the agent made), removes the directory
/// and runs it again. The writer refuses a directory in the way before it writes anything,
/// so the common case costs no extra look.
fn replacing_a_dir(
    root: &Root,
    path: &RelPath,
    mut put: impl FnMut() -> Result<(), cloud_tree::WriteError>,
) -> Result<(), String> {
    match put() {
        Err(cloud_tree::WriteError::Occupied {
            found: cloud_tree::FileKind::Dir,
            ..
        }) => {
            root.remove(path, Expect::Anything)
                .map_err(|e| e.to_string())?;
            put().map_err(|e| e.to_string())
        }
        other => other.map_err(|e| e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloud_protocol::blobs::Blob;
    use cloud_protocol::teleport::{ContentId, Entry};

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    fn file(path: &str, bytes: &[u8], executable: bool) -> Change {
        Change::Put(Entry {
            path: p(path),
            kind: EntryKind::File {
                executable,
                size: bytes.len() as u64,
                content: ContentId::of(bytes),
                chunks: Vec::new(),
            },
        })
    }

    #[test]
    fn a_file_or_symlink_replaces_a_directory_the_agent_left_in_its_way() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::new(dir.path().join("blobs"));
        let (a, b) = (b"first".as_slice(), b"#!/bin/sh\n".as_slice());
        blobs
            .put(
                "org",
                &[a, b]
                    .iter()
                    .map(|bytes| Blob {
                        id: ContentId::of(bytes),
                        bytes: bytes.to_vec(),
                    })
                    .collect::<Vec<_>>(),
            )
            .unwrap();
        let workspace = dir.path().join("ws");
        for at in ["a/x", "run/y", "link/z"] {
            std::fs::create_dir_all(workspace.join(at)).unwrap();
            std::fs::write(workspace.join(at).join("f"), "agent").unwrap();
        }
        let delta = Delta {
            changes: vec![
                file("a", a, false),
                file("run", b, true),
                Change::Put(Entry {
                    path: p("link"),
                    kind: EntryKind::Symlink { target: "a".into() },
                }),
            ],
        };
        let problems = materialise(&workspace, &delta, &blobs, "org", None).unwrap();
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(std::fs::read(workspace.join("a")).unwrap(), a);
        assert_eq!(std::fs::read(workspace.join("run")).unwrap(), b);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |name| {
                std::fs::metadata(workspace.join(name))
                    .unwrap()
                    .permissions()
                    .mode()
                    & 0o777
            };
            assert_eq!((mode("a"), mode("run")), (0o644, 0o755));
        }
        assert_eq!(
            std::fs::read_link(workspace.join("link")).unwrap(),
            std::path::Path::new("a")
        );
    }
}
