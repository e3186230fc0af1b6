//! A tree scanned, then rebuilt in an empty directory by the writer from its blobs (read
//! back with `read_blob`), scans the same: what a push followed by a pull into an empty
//! directory must do.

#![cfg(unix)]

mod common;

use std::io::Write as _;
use std::os::unix::fs::symlink;

use cloud_protocol::teleport::{ContentId, EntryKind};
use cloud_tree::{
    blob_locations, read_blob, scan, ContentError, Expect, Index, Root, RootError, ScanOptions,
};
use common::{chmod, noise, p, picture, write};

#[test]
fn a_tree_rebuilt_from_its_blobs_scans_the_same() {
    let source = tempfile::tempdir().unwrap();
    let src = source.path();
    write(src, "src/main.rs", b"fn main() {}\n");
    write(src, "src/deep/er/mod.rs", b"pub mod x;\n");
    write(src, "bin/run.sh", b"#!/bin/sh\necho hi\n");
    chmod(src, "bin/run.sh", 0o755);
    write(src, "assets/big.bin", &noise(1, 6 * 1024 * 1024));
    // The same bytes twice (one blob), an empty file, a hidden one.
    write(src, "assets/copy-of-main.rs", b"fn main() {}\n");
    write(src, "empty-file", b"");
    write(src, ".hidden/config", b"x = 1\n");
    std::fs::create_dir_all(src.join("empty/dir")).unwrap();
    symlink("src/main.rs", src.join("link")).unwrap();
    symlink("nowhere", src.join("src/dangling")).unwrap();
    symlink("/etc", src.join("abs")).unwrap();

    let options = ScanOptions::default();
    let scanned = scan(src, &Index::default(), &options).unwrap();
    let locations = blob_locations(&scanned.manifest);
    let source_root = Root::open(src).unwrap();

    let target = tempfile::tempdir().unwrap();
    let dst = Root::open(target.path()).unwrap();
    for (path, kind) in scanned.manifest.iter() {
        match kind {
            EntryKind::Dir => dst.put_dir(path).unwrap(),
            EntryKind::Symlink { target } => dst.put_symlink(path, target, Expect::Absent).unwrap(),
            EntryKind::File { executable, .. } => {
                let blobs = kind.blobs();
                dst.put_file(
                    path,
                    *executable,
                    |file| {
                        for id in blobs {
                            let at = &locations[&id];
                            let bytes = read_blob(&source_root, &at.path, at.offset, at.len, id)
                                .map_err(std::io::Error::other)?;
                            file.write_all(&bytes)?;
                        }
                        Ok(())
                    },
                    Expect::Absent,
                )
                .unwrap();
            }
        }
    }
    let rebuilt = scan(target.path(), &Index::default(), &options).unwrap();
    assert_eq!(rebuilt.manifest, scanned.manifest);
    assert!(rebuilt.manifest.len() >= 16);
    // Byte for byte, modes and links included.
    assert_eq!(picture(target.path()), picture(src));
}

#[test]
fn reading_a_blob_of_a_file_that_changed_fails() {
    let dir = tempfile::tempdir().unwrap();
    let root_dir = dir.path();
    let mut big = noise(2, 3 * 1024 * 1024);
    write(root_dir, "big", &big);
    write(root_dir, "small", b"0123456789");
    let scanned = scan(root_dir, &Index::default(), &ScanOptions::default()).unwrap();
    let locations = blob_locations(&scanned.manifest);
    let root = Root::open(root_dir).unwrap();
    let small = ContentId::of(b"0123456789");
    assert_eq!(
        read_blob(&root, &p("small"), 0, 10, small).unwrap(),
        b"0123456789"
    );

    // Same size, other bytes.
    write(root_dir, "small", b"9876543210");
    assert!(matches!(
        read_blob(&root, &p("small"), 0, 10, small),
        Err(ContentError::Changed { .. })
    ));
    // Shorter than the blob.
    write(root_dir, "small", b"012");
    assert!(matches!(
        read_blob(&root, &p("small"), 0, 10, small),
        Err(ContentError::Changed { .. })
    ));
    // A chunk in the middle of a large file.
    let (id, at) = locations
        .iter()
        .find(|(_, at)| at.path == p("big") && at.offset > 0)
        .unwrap();
    assert_eq!(
        read_blob(&root, &at.path, at.offset, at.len, *id)
            .unwrap()
            .len(),
        at.len as usize
    );
    big[at.offset as usize] ^= 1;
    write(root_dir, "big", &big);
    assert!(matches!(
        read_blob(&root, &at.path, at.offset, at.len, *id),
        Err(ContentError::Changed { .. })
    ));
    // Now a symlink to a file with the blob's bytes: never followed.
    write(root_dir, "elsewhere", b"0123456789");
    std::fs::remove_file(root_dir.join("small")).unwrap();
    symlink("elsewhere", root_dir.join("small")).unwrap();
    assert!(matches!(
        read_blob(&root, &p("small"), 0, 10, small),
        Err(ContentError::Root(RootError::Symlink { .. }))
    ));
}
