//! The scanner on real files in temporary directories: ignore rules, what is and is not
//! content, chunking, the index's reuse and racy rule, and what happens to paths that
//! cannot be read.

#![cfg(unix)]

mod common;

use std::ffi::{CString, OsStr};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::symlink;
use std::path::Path;

use cloud_protocol::teleport::{ContentId, EntryKind, PathError};
use cloud_tree::{plan, scan, Index, ScanOptions, SkipReason};
use common::{age, chmod, file_content, noise, p, paths, write};

fn options() -> ScanOptions {
    ScanOptions::default()
}

fn mkfifo(path: &Path) {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0, "mkfifo");
}

#[test]
fn ignore_rules_and_git_are_honoured() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write(root, ".git/HEAD", b"ref: refs/heads/main\n");
    write(root, ".git/info/exclude", b"excluded.txt\n");
    write(root, ".gitignore", b"*.log\n/target/\n!keep.log\n");
    write(root, ".cloudignore", b"local-only/\n");
    write(root, "src/main.rs", b"fn main() {}\n");
    write(root, "src/debug.log", b"noise");
    write(root, "keep.log", b"kept by a negation");
    write(root, "target/debug/app", b"binary");
    write(root, "excluded.txt", b"info/exclude");
    write(root, "local-only/notes", b"cloudignore");
    write(root, ".env", b"HIDDEN=1\n");
    write(root, ".config/tool.toml", b"x = 1\n");
    // A nested .gitignore, and a nested repository's .git (a pointer file) and a vendored
    // .git directory: never content, at any depth, in any case.
    write(root, "sub/.gitignore", b"generated/\n");
    write(root, "sub/generated/out.rs", b"");
    write(root, "sub/kept.rs", b"");
    write(root, "sub/.git", b"gitdir: ../.git/worktrees/sub\n");
    write(root, "vendor/lib/.git/config", b"[core]\n");
    write(root, "vendor/lib/.GIT/config", b"[core]\n");
    write(root, "vendor/lib/lib.rs", b"");

    let scan = scan(root, &Index::default(), &options()).unwrap();
    assert_eq!(
        paths(&scan.manifest),
        [
            ".cloudignore",
            ".config",
            ".config/tool.toml",
            ".env",
            ".gitignore",
            "keep.log",
            "src",
            "src/main.rs",
            "sub",
            "sub/.gitignore",
            "sub/kept.rs",
            "vendor",
            "vendor/lib",
            "vendor/lib/lib.rs",
        ]
    );
    assert!(scan.skipped.is_empty(), "{:?}", scan.skipped);
    assert!(scan.unreadable.is_empty(), "{:?}", scan.unreadable);
    scan.manifest.check_well_formed().unwrap();
}

#[test]
fn gitignore_applies_outside_a_git_repository() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write(root, ".gitignore", b"node_modules/\n");
    write(root, "node_modules/left-pad/index.js", b"");
    write(root, "index.js", b"");
    let scan = scan(root, &Index::default(), &options()).unwrap();
    assert_eq!(paths(&scan.manifest), [".gitignore", "index.js"]);
}

#[test]
fn symlinks_are_recorded_and_never_followed() {
    let outside = tempfile::tempdir().unwrap();
    write(outside.path(), "secret/key", b"outside the root");
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write(root, "real/file", b"inside");
    symlink(outside.path().join("secret"), root.join("escape")).unwrap();
    symlink("real/file", root.join("relative")).unwrap();
    symlink("missing", root.join("dangling")).unwrap();
    symlink("..", root.join("real/up")).unwrap();

    let scan = scan(root, &Index::default(), &options()).unwrap();
    assert_eq!(
        paths(&scan.manifest),
        [
            "dangling",
            "escape",
            "real",
            "real/file",
            "real/up",
            "relative"
        ]
    );
    let target = |path: &str| match scan.manifest.get(&p(path)) {
        Some(EntryKind::Symlink { target }) => target.clone(),
        other => panic!("{path}: {other:?}"),
    };
    assert_eq!(
        target("escape"),
        outside.path().join("secret").to_str().unwrap()
    );
    assert_eq!(target("relative"), "real/file");
    assert_eq!(target("dangling"), "missing");
    assert_eq!(target("real/up"), "..");
    assert_eq!(scan.stats.symlinks, 4);
}

#[test]
fn exec_bits_and_empty_directories_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write(root, "run.sh", b"#!/bin/sh\n");
    chmod(root, "run.sh", 0o755);
    write(root, "owner-only-x", b"");
    chmod(root, "owner-only-x", 0o700);
    write(root, "plain.txt", b"text");
    chmod(root, "plain.txt", 0o644);
    std::fs::create_dir_all(root.join("empty/nested/deeper")).unwrap();
    std::fs::create_dir(root.join("also-empty")).unwrap();

    let scan = scan(root, &Index::default(), &options()).unwrap();
    let executable = |path: &str| match scan.manifest.get(&p(path)) {
        Some(EntryKind::File { executable, .. }) => *executable,
        other => panic!("{path}: {other:?}"),
    };
    assert!(executable("run.sh"));
    assert!(executable("owner-only-x"));
    assert!(!executable("plain.txt"));
    for empty in ["also-empty", "empty", "empty/nested", "empty/nested/deeper"] {
        assert_eq!(
            scan.manifest.get(&p(empty)),
            Some(&EntryKind::Dir),
            "{empty}"
        );
    }
    assert_eq!(scan.stats.dirs, 4);
    assert_eq!(scan.stats.files, 3);
}

#[test]
fn a_large_file_is_chunked_and_an_edit_moves_few_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let mut bytes = noise(6, 6 * 1024 * 1024);
    write(root, "big.bin", &bytes);
    write(root, "small.bin", &noise(7, 1024 * 1024));

    let first = scan(root, &Index::default(), &options()).unwrap();
    let chunks = |scan: &cloud_tree::Scan, len: usize| match scan.manifest.get(&p("big.bin")) {
        Some(
            kind @ EntryKind::File {
                chunks,
                content,
                size,
                ..
            },
        ) => {
            kind.validate().unwrap();
            assert_eq!(*size, len as u64);
            (*content, chunks.clone())
        }
        other => panic!("{other:?}"),
    };
    let (content, before) = chunks(&first, bytes.len());
    assert_eq!(content, ContentId::of(&bytes));
    assert!(before.len() >= 24, "{} chunks", before.len());
    // Exactly WHOLE_FILE_MAX bytes is still one blob.
    match first.manifest.get(&p("small.bin")) {
        Some(EntryKind::File { chunks, .. }) => assert!(chunks.is_empty()),
        other => panic!("{other:?}"),
    }

    // Overwrite 100 bytes in the middle, and insert 10 a little further on.
    let middle = bytes.len() / 2;
    bytes[middle..middle + 100].copy_from_slice(&[0xAA; 100]);
    bytes.splice(middle + 200_000..middle + 200_000, [0x55; 10]);
    write(root, "big.bin", &bytes);
    let second = scan(root, &first.index, &options()).unwrap();
    let (content, after) = chunks(&second, bytes.len());
    assert_eq!(content, ContentId::of(&bytes));
    let old: std::collections::HashSet<ContentId> = before.iter().map(|c| c.id).collect();
    let new_ids = after.iter().filter(|c| !old.contains(&c.id)).count();
    assert!(
        (1..=6).contains(&new_ids),
        "{new_ids} of {} chunks are new",
        after.len()
    );
}

#[test]
fn unchanged_files_are_not_read_again() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for i in 0..40 {
        let name = format!("d{}/f{i}", i % 4);
        write(root, &name, &noise(i, 100 + i as usize));
        age(root, &name);
    }
    let first = scan(root, &Index::default(), &options()).unwrap();
    assert_eq!(first.stats.hashed_files, 40);
    assert_eq!(first.stats.reused_files, 0);

    let second = scan(root, &first.index, &options()).unwrap();
    assert_eq!(second.stats.reused_files, 40);
    assert_eq!(second.stats.hashed_files, 0);
    assert_eq!(second.manifest, first.manifest);

    // An edit is seen (and only the edited file is read); so is a chmod, which changes
    // the stat and the exec bit but not the bytes.
    write(root, "d1/f5", b"edited");
    chmod(root, "d2/f6", 0o755);
    let third = scan(root, &second.index, &options()).unwrap();
    assert_eq!(third.stats.hashed_files, 2);
    assert_eq!(third.stats.reused_files, 38);
    assert_eq!(
        file_content(&third.manifest, "d1/f5"),
        Some(ContentId::of(b"edited"))
    );
    assert!(matches!(
        third.manifest.get(&p("d2/f6")),
        Some(EntryKind::File {
            executable: true,
            ..
        })
    ));
}

#[test]
fn a_racy_file_is_hashed_again() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write(root, "racy", b"version 1");
    write(root, "old", b"version 1");
    age(root, "old");
    let first = scan(root, &Index::default(), &options()).unwrap();

    // An edit within the timestamp tick of the scan's own reading leaves every stat
    // field as it was: stand for it with an index that has the same stats but stale
    // content ids.
    let stale = EntryKind::File {
        executable: false,
        size: 9,
        content: ContentId::of(b"version 0"),
        chunks: Vec::new(),
    };
    let mut index = first.index.clone();
    for path in ["racy", "old"] {
        let mut indexed = index.get(&p(path)).unwrap().clone();
        indexed.kind = stale.clone();
        index.insert(p(path), indexed);
    }
    let second = scan(root, &index, &options()).unwrap();
    // `racy`'s mtime is not older than the previous scan's start: it is read again.
    assert_eq!(
        file_content(&second.manifest, "racy"),
        Some(ContentId::of(b"version 1"))
    );
    // `old` is trusted (which is why the racy rule matters).
    assert_eq!(
        file_content(&second.manifest, "old"),
        Some(ContentId::of(b"version 0"))
    );
    assert_eq!(second.stats.hashed_files, 1);
    assert_eq!(second.stats.reused_files, 1);
}

#[test]
fn special_files_and_invalid_names_are_skipped_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write(root, "normal", b"");
    mkfifo(&root.join("pipe"));
    let _listener = std::os::unix::net::UnixListener::bind(root.join("sock")).unwrap();
    write(root, "back\\slash", b"");
    let not_utf8 = OsStr::from_bytes(b"caf\xe9");
    std::fs::write(root.join(not_utf8), b"").unwrap();
    // A directory with a bad name is reported once, not with everything in it.
    std::fs::create_dir(root.join(OsStr::from_bytes(b"dir\xff"))).unwrap();
    std::fs::write(root.join(OsStr::from_bytes(b"dir\xff")).join("a"), b"").unwrap();
    std::fs::write(root.join(OsStr::from_bytes(b"dir\xff")).join("b"), b"").unwrap();
    write(root, "src/lib.cloud-conflict-v3.rs", b"theirs");
    write(root, "src/lib.rs", b"mine");
    write(
        root,
        "src/.cloudd-tmp-0123456789abcdef",
        b"a write in flight",
    );

    let scan = scan(root, &Index::default(), &options()).unwrap();
    assert_eq!(paths(&scan.manifest), ["normal", "src", "src/lib.rs"]);
    let mut skipped: Vec<(Vec<u8>, SkipReason)> = scan
        .skipped
        .iter()
        .map(|s| (s.path.as_os_str().as_bytes().to_vec(), s.reason.clone()))
        .collect();
    skipped.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        skipped,
        [
            (
                b"back\\slash".to_vec(),
                SkipReason::BadPath(PathError::Backslash)
            ),
            (b"caf\xe9".to_vec(), SkipReason::NotUtf8),
            (b"dir\xff".to_vec(), SkipReason::NotUtf8),
            (b"pipe".to_vec(), SkipReason::Special("fifo")),
            (b"sock".to_vec(), SkipReason::Special("socket")),
        ]
    );
    assert_eq!(scan.conflict_copies, [p("src/lib.cloud-conflict-v3.rs")]);
}

#[test]
fn unreadable_files_are_reported_and_the_scan_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for name in [
        "a/vanishes",
        "a/becomes-a-fifo",
        "a/becomes-a-dir",
        "a/fine",
        "b/fine",
    ] {
        write(root, name, name.as_bytes());
    }
    let first = scan(root, &Index::default(), &options()).unwrap();

    // Every file was written just now, so every one is racy and waits to be read. Between
    // the walk and the reading, three change under the scanner's feet.
    let planned = plan(root, &first.index, &options()).unwrap();
    assert_eq!(planned.pending().0, 5);
    std::fs::remove_file(root.join("a/vanishes")).unwrap();
    std::fs::remove_file(root.join("a/becomes-a-fifo")).unwrap();
    mkfifo(&root.join("a/becomes-a-fifo"));
    std::fs::remove_file(root.join("a/becomes-a-dir")).unwrap();
    std::fs::create_dir(root.join("a/becomes-a-dir")).unwrap();
    let second = planned.finish(&options());

    let mut unreadable: Vec<(String, bool)> = second
        .unreadable
        .iter()
        .map(|u| {
            (
                u.path.to_string(),
                u.error.kind() == io::ErrorKind::NotFound,
            )
        })
        .collect();
    unreadable.sort();
    assert_eq!(
        unreadable,
        [
            ("a/becomes-a-dir".to_owned(), false),
            ("a/becomes-a-fifo".to_owned(), false),
            ("a/vanishes".to_owned(), true),
        ]
    );
    // The rest went on; what could not be read keeps its previous entry, what is gone is
    // gone.
    assert_eq!(
        paths(&second.manifest),
        [
            "a",
            "a/becomes-a-dir",
            "a/becomes-a-fifo",
            "a/fine",
            "b",
            "b/fine"
        ]
    );
    for path in ["a/becomes-a-dir", "a/becomes-a-fifo"] {
        assert_eq!(
            second.manifest.get(&p(path)),
            first.manifest.get(&p(path)),
            "{path}"
        );
    }
    assert_eq!(
        file_content(&second.manifest, "b/fine"),
        Some(ContentId::of(b"b/fine"))
    );
    assert_eq!(second.stats.hashed_files, 2);
}

#[test]
fn a_missing_root_fails_the_scan() {
    let dir = tempfile::tempdir().unwrap();
    let error = scan(&dir.path().join("nope"), &Index::default(), &options()).unwrap_err();
    assert!(error.to_string().contains("nope"), "{error}");
}

#[test]
fn a_walk_on_several_threads_finds_what_one_thread_finds() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write(root, ".gitignore", b"*.log\nbuild/\n");
    for d in 0..40 {
        for f in 0..15 {
            write(
                root,
                &format!("d{d}/sub{}/f{f}.txt", f % 3),
                format!("{d}/{f}").as_bytes(),
            );
        }
        write(root, &format!("d{d}/x.log"), b"ignored");
        write(root, &format!("d{d}/build/out"), b"ignored");
        write(
            root,
            &format!("d{d}/n.cloud-conflict-v3.txt"),
            b"a conflict copy",
        );
    }
    std::fs::create_dir_all(root.join("empty/dir")).unwrap();
    symlink("d1/sub0/f0.txt", root.join("link")).unwrap();
    symlink("/etc/passwd", root.join("escaping")).unwrap();
    mkfifo(&root.join("d7/fifo"));

    let one = scan(root, &Index::default(), &ScanOptions { threads: 1 }).unwrap();
    for threads in [2, 4] {
        let many = scan(root, &Index::default(), &ScanOptions { threads }).unwrap();
        assert_eq!(many.manifest, one.manifest, "{threads} threads");
        assert_eq!(format!("{:?}", many.skipped), format!("{:?}", one.skipped));
        assert_eq!(many.conflict_copies, one.conflict_copies);
        assert_eq!(many.manifest.len(), one.manifest.len());
    }
    assert_eq!(one.conflict_copies.len(), 40);
    assert!(one.manifest.len() > 40 * 15);
    assert!(
        !one.skipped.is_empty(),
        "the fifo and the escaping link are skipped"
    );
}
