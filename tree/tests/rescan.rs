//! Rescans of some paths (what the watcher will ask for): applied to the index, they
//! must give what a full scan gives, under the same ignore rules.

#![cfg(unix)]

mod common;

use std::os::unix::fs::symlink;
use std::path::Path;

use cloud_protocol::teleport::{Change, EntryKind};
use cloud_tree::{rescan_paths, scan, Index, IndexChange, Rescan, ScanOptions};
use common::{age, p, write};

/// Rescans `paths`, checks that the index with the changes applied, and the old tree with
/// the delta applied, are what a full scan sees now; returns the rescan and the index.
fn rescan_matches_a_full_scan(root: &Path, index: &Index, paths: &[&str]) -> (Rescan, Index) {
    let paths: Vec<_> = paths.iter().map(|path| p(path)).collect();
    let rescan = rescan_paths(root, &paths, index, &ScanOptions::default()).unwrap();
    let mut updated = index.clone();
    updated.apply(&rescan.changes);
    let full = scan(root, &Index::default(), &ScanOptions::default()).unwrap();
    assert_eq!(
        updated.manifest(),
        full.manifest,
        "the index after the rescan"
    );
    let entries: Vec<_> = updated.iter().collect();
    let full_entries: Vec<_> = full.index.iter().collect();
    assert_eq!(entries, full_entries, "the stats after the rescan");
    let mut tree = index.manifest();
    tree.apply(&rescan.delta);
    assert_eq!(tree, full.manifest, "the tree with the delta applied");
    rescan.delta.validate().unwrap();
    (rescan, updated)
}

fn first_scan(root: &Path) -> Index {
    scan(root, &Index::default(), &ScanOptions::default())
        .unwrap()
        .index
}

#[test]
fn a_rescan_of_the_changed_paths_gives_what_a_full_scan_gives() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for name in [
        "src/a.rs",
        "src/b.rs",
        "old/x",
        "old/y/z",
        "f",
        "gone/child",
        "gone/deeper/more",
        "untouched/file",
    ] {
        write(root, name, name.as_bytes());
        age(root, name);
    }
    let index = first_scan(root);

    write(root, "src/a.rs", b"edited");
    write(root, "new/deep/file.txt", b"new");
    std::fs::remove_file(root.join("src/b.rs")).unwrap();
    std::fs::remove_dir_all(root.join("old")).unwrap();
    write(root, "old", b"a file where a directory was");
    std::fs::remove_file(root.join("f")).unwrap();
    write(root, "f/g", b"a directory where a file was");
    symlink("src", root.join("link")).unwrap();
    std::fs::remove_dir_all(root.join("gone")).unwrap();

    // The watcher may report only the deepest path of a change ("gone/child", "f/g"):
    // parents are re-examined too.
    let (rescan, _) = rescan_matches_a_full_scan(
        root,
        &index,
        &[
            "src/a.rs",
            "new/deep/file.txt",
            "src/b.rs",
            "old",
            "f/g",
            "link",
            "gone/child",
        ],
    );
    // Removals first, each only once at the top of what went.
    let removed: Vec<&str> = rescan
        .changes
        .iter()
        .filter_map(|c| match c {
            IndexChange::Remove(path) => Some(path.as_str()),
            IndexChange::Put(..) => None,
        })
        .collect();
    assert_eq!(removed, ["gone", "old/x", "old/y", "src/b.rs"]);
    assert!(rescan.changes.iter().all(
        |c| !matches!(c, IndexChange::Put(path, _) if path.as_str().starts_with("untouched"))
    ));
    assert!(matches!(rescan.delta.changes[0], Change::Remove(_)));
}

#[test]
fn rescans_follow_the_ignore_rules() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write(root, ".gitignore", b"*.log\nbuild/\n");
    write(root, "sub/.cloudignore", b"private\n");
    write(root, "sub/kept", b"");
    let index = first_scan(root);

    // New files that are ignored: nothing changes.
    write(root, "x.log", b"");
    write(root, "build/out/bin", b"");
    write(root, "sub/private", b"");
    write(root, "sub/y.log", b"");
    let (rescan, index) = rescan_matches_a_full_scan(
        root,
        &index,
        &[
            "x.log",
            "build/out/bin",
            "build",
            "sub/private",
            "sub/y.log",
        ],
    );
    // Only a parent's stat changed (it holds new names).
    assert!(
        rescan
            .changes
            .iter()
            .all(|c| matches!(c, IndexChange::Put(_, i) if i.kind == EntryKind::Dir)),
        "{:?}",
        rescan.changes
    );
    assert!(rescan.delta.is_empty(), "{:?}", rescan.delta);

    // An edited ignore file re-examines its directory: what it no longer ignores comes
    // in, what it now ignores goes.
    write(root, ".gitignore", b"build/\nsub/kept\n");
    let (rescan, index) = rescan_matches_a_full_scan(root, &index, &[".gitignore"]);
    let puts: Vec<&str> = rescan
        .delta
        .changes
        .iter()
        .filter_map(|c| match c {
            Change::Put(entry) => Some(entry.path.as_str()),
            Change::Remove(_) => None,
        })
        .collect();
    assert_eq!(puts, [".gitignore", "sub/y.log", "x.log"]);
    assert!(rescan
        .delta
        .changes
        .contains(&Change::Remove(p("sub/kept"))));

    write(root, "sub/.cloudignore", b"");
    let (rescan, _) = rescan_matches_a_full_scan(root, &index, &["sub/.cloudignore"]);
    assert!(rescan
        .delta
        .changes
        .iter()
        .any(|c| matches!(c, Change::Put(e) if e.path.as_str() == "sub/private")));
}

#[test]
fn a_new_directory_is_walked_and_unchanged_files_are_not_read() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for i in 0..10 {
        let name = format!("lib/f{i}");
        write(root, &name, &[i as u8; 10]);
        age(root, &name);
    }
    let index = first_scan(root);
    write(root, "lib/nested/new/one", b"1");
    write(root, "lib/nested/two", b"2");
    let (rescan, _) = rescan_matches_a_full_scan(root, &index, &["lib"]);
    assert_eq!(rescan.stats.reused_files, 10);
    assert_eq!(rescan.stats.hashed_files, 2);
    assert_eq!(rescan.stats.dirs, 3);
    let kinds: Vec<(&str, bool)> = rescan
        .delta
        .changes
        .iter()
        .map(|c| match c {
            Change::Put(e) => (e.path.as_str(), e.kind == EntryKind::Dir),
            Change::Remove(path) => panic!("removed {path}"),
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("lib/nested", true),
            ("lib/nested/new", true),
            ("lib/nested/new/one", false),
            ("lib/nested/two", false)
        ]
    );
}

#[test]
fn a_path_that_was_never_there_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write(root, "a", b"");
    let index = first_scan(root);
    let (rescan, _) = rescan_matches_a_full_scan(root, &index, &["missing/deeper", "b"]);
    assert!(rescan.changes.is_empty());
    assert!(rescan.delta.is_empty());
}
