//! Writing a pull into a worktree: the three-way merge's changes, file by file, through the
//! safe writer (temp file + rename, no symlink ever followed, nothing outside the root),
//! each re-checked against the scan just before it replaces anything, so a local edit made
//! after the scan is never overwritten: the session's version goes beside it instead.
//!
//! Blocking: runs on the blocking pool. This module must never decide what changes (that
//! is the merge in `cloud_protocol::teleport`) and never talks to the relay.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::Path;

use cloud_protocol::teleport::{Change, ContentId, EntryKind, Merge, RelPath};
use cloud_tree::{Expect, FileKind, Index, Root, WriteError};

use super::TeleportError;

/// What a pull wrote.
#[derive(Debug, Default)]
pub struct Applied {
    /// Paths written or removed (the worktree's side now matches the session's there).
    pub changed: u64,
    /// Every path touched, conflict copies included, to rescan.
    pub touched: Vec<RelPath>,
    /// Paths changed on both sides, each with what was done.
    pub conflicts: Vec<String>,
    /// The conflict copies written (the session's versions beside local ones).
    pub copies: Vec<RelPath>,
    /// What could not be done, each with why.
    pub problems: Vec<String>,
    /// The paths whose change could not be written (a symlink or a file in the way, an IO
    /// error): they are not agreed on, so the next pull tries them again and a push does
    /// not take their absence for a local change.
    pub failed: Vec<RelPath>,
}

/// What the index says is at `path` now, as the writer's expectation.
fn expectation(index: &Index, path: &RelPath) -> Expect {
    match index.get(path) {
        Some(indexed) => Expect::Stat(indexed.stat),
        None => Expect::Absent,
    }
}

/// The bytes of a file entry, from `blobs`.
fn contents<'a>(
    kind: &EntryKind,
    blobs: &'a HashMap<ContentId, Vec<u8>>,
) -> Result<Vec<&'a [u8]>, TeleportError> {
    let mut parts = Vec::new();
    for id in kind.blobs() {
        let bytes = blobs
            .get(&id)
            .ok_or_else(|| TeleportError::Local(format!("blob {id} was not fetched")))?;
        parts.push(bytes.as_slice());
    }
    Ok(parts)
}

/// Writes `kind` at `path`; a file's bytes come from `blobs` (a blob that is not there is
/// a problem reported by name, nothing is written).
fn put(
    root: &Root,
    path: &RelPath,
    kind: &EntryKind,
    expect: Expect,
    blobs: &HashMap<ContentId, Vec<u8>>,
) -> Result<Result<(), WriteError>, TeleportError> {
    Ok(match kind {
        EntryKind::Dir => root.put_dir(path),
        EntryKind::Symlink { target } => root.put_symlink(path, target, expect),
        EntryKind::File { executable, .. } => {
            let parts = contents(kind, blobs)?;
            root.put_file(
                path,
                *executable,
                |file| {
                    for part in &parts {
                        file.write_all(part)?;
                    }
                    Ok(())
                },
                expect,
            )
        }
    })
}

/// Applies `merge` (the session's changes at `version`) to the worktree at `root`, whose
/// scan is `index`.
pub fn apply(
    root: &str,
    index: &Index,
    merge: &Merge,
    version: u64,
    blobs: &HashMap<ContentId, Vec<u8>>,
) -> Result<Applied, TeleportError> {
    let writer = Root::open(Path::new(root)).map_err(|e| TeleportError::Local(e.to_string()))?;
    let mut applied = Applied::default();
    let mut beside = Vec::new();
    for change in &merge.apply.changes {
        match change {
            Change::Remove(path) => {
                // What the scan knew of, deepest first; a directory only once empty.
                let mut known: Vec<(&RelPath, FileKind, Expect)> = index
                    .under(path)
                    .map(|(p, ix)| (p, ix.stat.kind, Expect::Stat(ix.stat)))
                    .collect();
                known.reverse();
                for (p, kind, expect) in known {
                    applied.touched.push(p.clone());
                    let removed = if kind == FileKind::Dir {
                        writer.remove_empty_dir(p).map(|empty| {
                            if !empty {
                                applied.problems.push(format!(
                                    "{p}: kept (the session removed it; it holds files this side added)"
                                ));
                            }
                        })
                    } else {
                        writer.remove(p, expect)
                    };
                    match removed {
                        Ok(()) => applied.changed += 1,
                        Err(WriteError::Changed { .. }) => applied.conflicts.push(format!(
                            "{p}: changed here while the session removed it; kept"
                        )),
                        Err(e) => {
                            applied.problems.push(format!("{p}: {e}"));
                            applied.failed.push(p.clone());
                        }
                    }
                }
            }
            Change::Put(entry) => {
                let path = &entry.path;
                applied.touched.push(path.clone());
                match put(&writer, path, &entry.kind, expectation(index, path), blobs)? {
                    Ok(()) => applied.changed += 1,
                    // Edited here after the scan: both versions are kept.
                    Err(WriteError::Changed { .. }) => {
                        beside.push((path.clone(), entry.kind.clone()))
                    }
                    Err(e) => {
                        applied.problems.push(format!("{path}: {e}"));
                        applied.failed.push(path.clone());
                    }
                }
            }
        }
    }
    for (path, kind) in &merge.conflicts {
        match kind {
            Some(kind @ (EntryKind::File { .. } | EntryKind::Symlink { .. })) => {
                beside.push((path.clone(), kind.clone()));
            }
            Some(EntryKind::Dir) => applied.conflicts.push(format!(
                "{path}: a directory in the session, something else here; kept"
            )),
            None => applied.conflicts.push(format!(
                "{path}: removed in the session, changed here; kept"
            )),
        }
    }
    for (path, kind) in beside {
        let copy = match path.conflict_name(version) {
            Ok(copy) => copy,
            Err(e) => {
                applied.problems.push(format!(
                    "{path}: changed on both sides, and no conflict name fits: {e}"
                ));
                continue;
            }
        };
        applied.touched.push(copy.clone());
        match put(&writer, &copy, &kind, Expect::Anything, blobs)? {
            Ok(()) => {
                applied.conflicts.push(format!(
                    "{path}: changed on both sides; the session's version is {copy}"
                ));
                applied.copies.push(copy);
            }
            Err(e) => {
                applied.problems.push(format!("{copy}: {e}"));
                applied.failed.push(path.clone());
            }
        }
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloud_protocol::teleport::{Delta, Entry};

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    /// What a hostile relay could send once paths are checked (`..` and absolute paths do
    /// not decode at all): a symlink out of the root, then writes through it. Nothing
    /// lands outside; the writes through the link are reported by name.
    #[test]
    fn a_hostile_tree_writes_nothing_outside_the_root() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let bytes = b"pwned".to_vec();
        let id = ContentId::of(&bytes);
        let file = EntryKind::File {
            executable: true,
            size: bytes.len() as u64,
            content: id,
            chunks: Vec::new(),
        };
        let put = |path: &str, kind: EntryKind| {
            Change::Put(Entry {
                path: p(path),
                kind,
            })
        };
        let merge = Merge {
            apply: Delta {
                changes: vec![
                    put(
                        "evil",
                        EntryKind::Symlink {
                            target: outside.path().display().to_string(),
                        },
                    ),
                    put("evil/pwned", file.clone()),
                    put("evil/deeper/pwned", file.clone()),
                    Change::Remove(p("evil/victim")),
                    put("ok.txt", file),
                ],
            },
            conflicts: Vec::new(),
        };
        std::fs::write(outside.path().join("victim"), "still here").unwrap();
        let blobs = HashMap::from([(id, bytes)]);
        let applied = apply(
            root.path().to_str().unwrap(),
            &Index::default(),
            &merge,
            2,
            &blobs,
        )
        .unwrap();
        let outside_now: Vec<_> = std::fs::read_dir(outside.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(outside_now, vec![std::ffi::OsString::from("victim")]);
        assert_eq!(
            std::fs::read_to_string(outside.path().join("victim")).unwrap(),
            "still here"
        );
        for name in ["evil/pwned", "evil/deeper/pwned"] {
            assert!(
                applied
                    .problems
                    .iter()
                    .any(|problem| problem.starts_with(name)),
                "{name} is reported: {:?}",
                applied.problems
            );
            assert!(applied.failed.contains(&p(name)));
        }
        // The rest went on; the link itself is a link, as the tree says.
        assert_eq!(std::fs::read(root.path().join("ok.txt")).unwrap(), b"pwned");
        assert!(std::fs::symlink_metadata(root.path().join("evil"))
            .unwrap()
            .file_type()
            .is_symlink());
    }
}
