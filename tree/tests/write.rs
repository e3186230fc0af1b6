//! The safe writer on real directories: symlinks planted anywhere never let a write out
//! of the root, expectations protect local edits, modes and links round-trip.

#![cfg(unix)]

mod common;

use std::io::Write as _;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;

use cloud_protocol::teleport::RelPath;
use cloud_tree::{Expect, FileKind, Root, RootError, Staging, WriteError};
use common::{p, picture, write};
use proptest::prelude::*;

fn put_bytes(
    root: &Root,
    path: &RelPath,
    bytes: &[u8],
    executable: bool,
    expect: Expect,
) -> Result<(), WriteError> {
    root.put_file(path, executable, |file| file.write_all(bytes), expect)
}

/// No writer temporary file is left anywhere under `dir`.
fn no_temp_files(dir: &Path) {
    for path in picture(dir).keys() {
        assert!(!path.contains(".cloudd-tmp-"), "left behind: {path}");
    }
}

#[test]
fn files_keep_their_exec_bit_whatever_the_umask() {
    let dir = tempfile::tempdir().unwrap();
    let root = Root::open(dir.path()).unwrap();
    put_bytes(&root, &p("bin/run"), b"#!/bin/sh\n", true, Expect::Absent).unwrap();
    put_bytes(&root, &p("bin/data"), b"data", false, Expect::Absent).unwrap();
    let mode = |rel: &str| {
        std::fs::symlink_metadata(dir.path().join(rel))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("bin/run"), 0o755);
    assert_eq!(mode("bin/data"), 0o644);
    assert_eq!(
        std::fs::read(dir.path().join("bin/run")).unwrap(),
        b"#!/bin/sh\n"
    );
    // Flipping the bit alone rewrites the mode.
    let stat = root.lstat(&p("bin/run")).unwrap().unwrap();
    assert!(stat.executable());
    put_bytes(
        &root,
        &p("bin/run"),
        b"#!/bin/sh\n",
        false,
        Expect::Stat(stat),
    )
    .unwrap();
    assert_eq!(mode("bin/run"), 0o644);
    no_temp_files(dir.path());
}

#[test]
fn symlinks_are_written_as_links_and_replaced_as_links() {
    let outside = tempfile::tempdir().unwrap();
    write(outside.path(), "target-file", b"outside");
    let before = picture(outside.path());
    let dir = tempfile::tempdir().unwrap();
    let root = Root::open(dir.path()).unwrap();
    let target = outside.path().join("target-file");
    root.put_symlink(&p("a/link"), target.to_str().unwrap(), Expect::Absent)
        .unwrap();
    root.put_symlink(&p("a/rel"), "../a/link", Expect::Absent)
        .unwrap();
    assert_eq!(
        std::fs::read_link(dir.path().join("a/link")).unwrap(),
        target
    );
    assert_eq!(
        std::fs::read_link(dir.path().join("a/rel")).unwrap(),
        Path::new("../a/link")
    );
    let stat = root.lstat(&p("a/link")).unwrap().unwrap();
    assert_eq!(stat.kind, FileKind::Symlink);
    // A file put over the link replaces the link; its target is untouched.
    put_bytes(
        &root,
        &p("a/link"),
        b"now a file",
        false,
        Expect::Stat(stat),
    )
    .unwrap();
    assert_eq!(
        root.lstat(&p("a/link")).unwrap().unwrap().kind,
        FileKind::File
    );
    // Removing a link removes the link.
    root.remove(&p("a/rel"), Expect::Anything).unwrap();
    assert!(root.lstat(&p("a/rel")).unwrap().is_none());
    assert_eq!(picture(outside.path()), before);
    for bad in ["", "a\0b"] {
        assert!(matches!(
            root.put_symlink(&p("bad"), bad, Expect::Anything),
            Err(WriteError::BadLinkTarget { .. })
        ));
    }
    no_temp_files(dir.path());
}

#[test]
fn a_file_that_changed_since_the_scan_is_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let root = Root::open(dir.path()).unwrap();
    write(dir.path(), "notes.txt", b"as scanned");
    let scanned = root.lstat(&p("notes.txt")).unwrap().unwrap();
    // A local edit after the scan.
    write(dir.path(), "notes.txt", b"edited locally, same len");
    let error = put_bytes(
        &root,
        &p("notes.txt"),
        b"from the peer",
        false,
        Expect::Stat(scanned),
    )
    .unwrap_err();
    assert!(
        matches!(&error, WriteError::Changed { found: Some(_), .. }),
        "{error}"
    );
    assert_eq!(
        std::fs::read(dir.path().join("notes.txt")).unwrap(),
        b"edited locally, same len"
    );
    let error = root
        .remove(&p("notes.txt"), Expect::Stat(scanned))
        .unwrap_err();
    assert!(matches!(error, WriteError::Changed { .. }));
    assert!(dir.path().join("notes.txt").exists());
    // Expecting nothing where something is, or something where nothing is.
    let error = put_bytes(&root, &p("notes.txt"), b"x", false, Expect::Absent).unwrap_err();
    assert!(matches!(error, WriteError::Changed { .. }));
    let error = put_bytes(&root, &p("other"), b"x", false, Expect::Stat(scanned)).unwrap_err();
    assert!(matches!(error, WriteError::Changed { found: None, .. }));
    assert!(!dir.path().join("other").exists());
    // The current stat is accepted.
    let now = root.lstat(&p("notes.txt")).unwrap().unwrap();
    put_bytes(
        &root,
        &p("notes.txt"),
        b"from the peer",
        false,
        Expect::Stat(now),
    )
    .unwrap();
    assert_eq!(
        std::fs::read(dir.path().join("notes.txt")).unwrap(),
        b"from the peer"
    );
    no_temp_files(dir.path());
}

#[test]
fn an_edit_made_while_the_bytes_arrive_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let root = Root::open(dir.path()).unwrap();
    write(dir.path(), "f", b"v1");
    let scanned = root.lstat(&p("f")).unwrap().unwrap();
    // The expectation is checked again just before the rename, after the bytes are in.
    let error = root
        .put_file(
            &p("f"),
            false,
            |file| {
                std::fs::write(dir.path().join("f"), b"a local edit")?;
                file.write_all(b"from the peer")
            },
            Expect::Stat(scanned),
        )
        .unwrap_err();
    assert!(
        matches!(error, WriteError::Changed { found: Some(_), .. }),
        "{error}"
    );
    assert_eq!(
        std::fs::read(dir.path().join("f")).unwrap(),
        b"a local edit"
    );
    // A file created meanwhile where none was expected.
    let error = root
        .put_file(
            &p("g"),
            false,
            |file| {
                std::fs::write(dir.path().join("g"), b"created locally")?;
                file.write_all(b"from the peer")
            },
            Expect::Absent,
        )
        .unwrap_err();
    assert!(matches!(error, WriteError::Changed { .. }), "{error}");
    assert_eq!(
        std::fs::read(dir.path().join("g")).unwrap(),
        b"created locally"
    );
    no_temp_files(dir.path());
}

#[test]
fn a_failed_write_leaves_the_target_and_no_temporary_file() {
    let dir = tempfile::tempdir().unwrap();
    let root = Root::open(dir.path()).unwrap();
    write(dir.path(), "f", b"before");
    let error = root
        .put_file(
            &p("f"),
            false,
            |file| {
                file.write_all(b"half")?;
                Err(std::io::Error::other("the peer went away"))
            },
            Expect::Anything,
        )
        .unwrap_err();
    assert!(error.to_string().contains("the peer went away"), "{error}");
    assert_eq!(std::fs::read(dir.path().join("f")).unwrap(), b"before");
    no_temp_files(dir.path());
}

#[test]
fn a_directory_is_never_replaced_by_a_file_unless_removed_first() {
    let dir = tempfile::tempdir().unwrap();
    let root = Root::open(dir.path()).unwrap();
    write(dir.path(), "d/inner/file", b"keep");
    for expect in [
        Expect::Anything,
        Expect::Stat(root.lstat(&p("d")).unwrap().unwrap()),
    ] {
        let error = put_bytes(&root, &p("d"), b"x", false, expect).unwrap_err();
        assert!(
            matches!(
                error,
                WriteError::Occupied {
                    found: FileKind::Dir,
                    ..
                }
            ),
            "{error}"
        );
        let error = root.put_symlink(&p("d"), "x", expect).unwrap_err();
        assert!(matches!(error, WriteError::Occupied { .. }));
    }
    assert!(dir.path().join("d/inner/file").exists());
    root.remove(&p("d"), Expect::Anything).unwrap();
    put_bytes(&root, &p("d"), b"x", false, Expect::Absent).unwrap();
    // And a directory is not made where a file is.
    assert!(matches!(
        root.put_dir(&p("d")),
        Err(WriteError::Occupied {
            found: FileKind::File,
            ..
        })
    ));
    root.put_dir(&p("e/f")).unwrap();
    root.put_dir(&p("e/f")).unwrap();
    assert!(dir.path().join("e/f").is_dir());
}

#[test]
fn removing_a_directory_never_follows_links_inside_it() {
    let outside = tempfile::tempdir().unwrap();
    write(outside.path(), "precious/file", b"outside");
    let before = picture(outside.path());
    let dir = tempfile::tempdir().unwrap();
    let root = Root::open(dir.path()).unwrap();
    write(dir.path(), "d/a/b/file", b"");
    symlink(
        outside.path().join("precious"),
        dir.path().join("d/a/escape"),
    )
    .unwrap();
    symlink("/", dir.path().join("d/slash")).unwrap();
    symlink("..", dir.path().join("d/a/b/up")).unwrap();
    root.remove(&p("d"), Expect::Anything).unwrap();
    assert!(!dir.path().join("d").exists());
    assert_eq!(picture(outside.path()), before);
    // Removing what is not there is fine when nothing was expected.
    root.remove(&p("d/a"), Expect::Absent).unwrap();
    root.remove(&p("nothing"), Expect::Anything).unwrap();
}

/// Names the random paths are made of; the outside sentinel directory is `zq2`, so a
/// write that escaped through `..` would land in it.
const NAMES: [&str; 3] = ["zq1", "zq2", "zq3"];

fn rel_path() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(NAMES.to_vec()), 1..4).prop_map(|c| c.join("/"))
}

#[derive(Debug, Clone)]
enum LinkTarget {
    /// The sentinel directory, by absolute path.
    Sentinel,
    /// The directory holding both the root and the sentinel.
    Up,
    /// `../zq2`, the sentinel by a relative path.
    UpSentinel,
    Slash,
    /// The root itself (still a symlink on the way).
    Dot,
}

#[derive(Debug, Clone)]
enum Op {
    File(String, Vec<u8>, bool),
    Symlink(String, String),
    Dir(String),
    Remove(String),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (
            rel_path(),
            prop::collection::vec(any::<u8>(), 0..64),
            any::<bool>()
        )
            .prop_map(|(p, b, x)| Op::File(p, b, x)),
        (rel_path(), prop::sample::select(vec!["zq1", "../zq2", "/"]))
            .prop_map(|(p, t)| Op::Symlink(p, t.to_owned())),
        rel_path().prop_map(Op::Dir),
        rel_path().prop_map(Op::Remove),
    ]
}

fn link_target() -> impl Strategy<Value = LinkTarget> {
    prop_oneof![
        Just(LinkTarget::Sentinel),
        Just(LinkTarget::Up),
        Just(LinkTarget::UpSentinel),
        Just(LinkTarget::Slash),
        Just(LinkTarget::Dot),
    ]
}

/// What the test itself sees on the way to `rel` (with `lstat`, one prefix at a time):
/// the first symlink or non-directory among its parents.
#[derive(Debug, PartialEq)]
enum OnTheWay {
    Clear,
    Symlink,
    NotADirectory,
}

fn on_the_way(root: &Path, rel: &str) -> OnTheWay {
    let components: Vec<&str> = rel.split('/').collect();
    let mut path = root.to_path_buf();
    for name in &components[..components.len() - 1] {
        path.push(name);
        match std::fs::symlink_metadata(&path) {
            Err(_) => return OnTheWay::Clear,
            Ok(m) if m.file_type().is_symlink() => return OnTheWay::Symlink,
            Ok(m) if !m.is_dir() => return OnTheWay::NotADirectory,
            Ok(_) => {}
        }
    }
    OnTheWay::Clear
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn nothing_outside_the_root_ever_changes(
        links in prop::collection::vec((rel_path(), link_target()), 1..6),
        dirs in prop::collection::vec(rel_path(), 0..4),
        ops in prop::collection::vec(op(), 1..24),
    ) {
        let base = tempfile::tempdir().unwrap();
        let root_dir = base.path().join("root");
        let sentinel = base.path().join("zq2");
        std::fs::create_dir(&root_dir).unwrap();
        write(&sentinel, "zq1", b"sentinel");
        write(&sentinel, "zq3/zq1", b"deeper sentinel");
        symlink("/", sentinel.join("zq3/zq2")).unwrap();
        for name in NAMES {
            prop_assume!(!Path::new("/").join(name).exists());
        }
        // Real directories, then symlinks planted wherever nothing odd is on the way.
        for rel in &dirs {
            if on_the_way(&root_dir, rel) == OnTheWay::Clear
                && std::fs::symlink_metadata(root_dir.join(rel)).is_err()
            {
                std::fs::create_dir_all(root_dir.join(rel)).unwrap();
            }
        }
        for (rel, target) in &links {
            let path = root_dir.join(rel);
            if on_the_way(&root_dir, rel) != OnTheWay::Clear || std::fs::symlink_metadata(&path).is_ok() {
                continue;
            }
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            let target = match target {
                LinkTarget::Sentinel => sentinel.clone(),
                LinkTarget::Up => "..".into(),
                LinkTarget::UpSentinel => "../zq2".into(),
                LinkTarget::Slash => "/".into(),
                LinkTarget::Dot => ".".into(),
            };
            symlink(target, &path).unwrap();
        }
        let outside_before = picture(base.path());
        let sentinel_before = picture(&sentinel);

        let root = Root::open(&root_dir).unwrap();
        for op in &ops {
            let (rel, result) = match op {
                Op::File(rel, bytes, executable) => {
                    (rel, put_bytes(&root, &p(rel), bytes, *executable, Expect::Anything))
                }
                Op::Symlink(rel, target) => (rel, root.put_symlink(&p(rel), target, Expect::Anything)),
                Op::Dir(rel) => (rel, root.put_dir(&p(rel))),
                Op::Remove(rel) => (rel, root.remove(&p(rel), Expect::Anything)),
            };
            // What the test sees before the operation decides what must happen; the
            // operation has run, so look at the parents, which it does not change when
            // it fails and only creates (as directories) when it succeeds.
            let path = root_dir.join(rel);
            match (&result, op) {
                (Err(e), _) if e.is_symlink() => {
                    prop_assert_eq!(on_the_way(&root_dir, rel), OnTheWay::Symlink);
                }
                (Err(WriteError::Root(RootError::NotADirectory { .. })), _) => {
                    prop_assert_eq!(on_the_way(&root_dir, rel), OnTheWay::NotADirectory);
                }
                (Err(WriteError::Occupied { .. }), _) => {
                    prop_assert_eq!(on_the_way(&root_dir, rel), OnTheWay::Clear);
                }
                (Err(e), _) => prop_assert!(false, "{op:?}: {e}"),
                (Ok(()), Op::File(_, bytes, executable)) => {
                    prop_assert_eq!(on_the_way(&root_dir, rel), OnTheWay::Clear);
                    prop_assert_eq!(&std::fs::read(&path).unwrap(), bytes);
                    let mode = std::fs::symlink_metadata(&path).unwrap().permissions().mode();
                    prop_assert_eq!(mode & 0o777, if *executable { 0o755 } else { 0o644 });
                }
                (Ok(()), Op::Symlink(_, target)) => {
                    prop_assert_eq!(on_the_way(&root_dir, rel), OnTheWay::Clear);
                    prop_assert_eq!(std::fs::read_link(&path).unwrap(), Path::new(target));
                }
                (Ok(()), Op::Dir(_)) => {
                    prop_assert!(std::fs::symlink_metadata(&path).unwrap().is_dir());
                }
                (Ok(()), Op::Remove(_)) => {
                    prop_assert!(std::fs::symlink_metadata(&path).is_err());
                }
            }
            // A failed operation through a symlink must not have created anything.
            if result.as_ref().is_err_and(|e| e.is_symlink()) {
                prop_assert!(on_the_way(&root_dir, rel) == OnTheWay::Symlink);
            }
        }

        // Byte for byte, nothing outside the root changed.
        prop_assert_eq!(picture(&sentinel), sentinel_before);
        let outside = |picture: std::collections::BTreeMap<String, common::Node>| {
            picture
                .into_iter()
                .filter(|(path, _)| !path.starts_with("root/") && path != "root")
                .collect::<std::collections::BTreeMap<_, _>>()
        };
        prop_assert_eq!(outside(picture(base.path())), outside(outside_before));
        for name in NAMES {
            prop_assert!(!Path::new("/").join(name).exists());
        }
        no_temp_files(base.path());
    }
}

#[test]
fn a_symlink_on_the_way_is_refused_for_every_operation() {
    let outside = tempfile::tempdir().unwrap();
    let before = picture(outside.path());
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("real")).unwrap();
    symlink(outside.path(), dir.path().join("real/link")).unwrap();
    let root = Root::open(dir.path()).unwrap();
    let path = p("real/link/deeper/file");
    let staged = tempfile::tempdir().unwrap();
    let staging = Staging::open(staged.path()).unwrap();
    assert!(staging.write("blob", b"x").unwrap());
    let errors = [
        put_bytes(&root, &path, b"x", false, Expect::Anything).unwrap_err(),
        root.put_staged(&path, false, &staging, "blob", Expect::Anything)
            .unwrap_err(),
        root.put_symlink(&path, "/etc/passwd", Expect::Anything)
            .unwrap_err(),
        root.put_dir(&path).unwrap_err(),
        root.remove(&p("real/link/x"), Expect::Anything)
            .unwrap_err(),
    ];
    for error in errors {
        match error {
            WriteError::Root(RootError::Symlink { path }) => assert_eq!(path, p("real/link")),
            other => panic!("{other}"),
        }
    }
    assert!(matches!(root.lstat(&path), Err(RootError::Symlink { .. })));
    assert!(matches!(
        root.open_file(&p("real/link/x")),
        Err(RootError::Symlink { .. })
    ));
    assert_eq!(picture(outside.path()), before);
}

/// A staged file moves in as `put_file` would write it, under the same expectation: a
/// local edit made since the scan is kept, and the staged file stays where it was for the
/// caller to write the file another way or remove it. Where nothing was, it is linked in
/// (the staged name stays for the caller to remove); over a file, renamed.
#[test]
fn a_staged_file_moves_in_only_over_what_was_expected_and_stays_staged_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let root = Root::open(dir.path()).unwrap();
    let staged = tempfile::tempdir().unwrap();
    let staging = Staging::open(staged.path()).unwrap();
    assert!(staging.write("one", b"from the session").unwrap());
    assert!(
        !staging.write("one", b"again").unwrap(),
        "an existing name is left"
    );
    assert!(staging.write("a/b", b"x").is_err());

    put_bytes(&root, &p("src/kept"), b"local", false, Expect::Absent).unwrap();
    let error = root
        .put_staged(&p("src/kept"), false, &staging, "one", Expect::Absent)
        .unwrap_err();
    assert!(matches!(error, WriteError::Changed { .. }), "{error}");
    assert_eq!(
        std::fs::read(dir.path().join("src/kept")).unwrap(),
        b"local"
    );
    assert_eq!(
        std::fs::read(staged.path().join("one")).unwrap(),
        b"from the session"
    );

    root.put_staged(&p("src/new/run"), true, &staging, "one", Expect::Absent)
        .unwrap();
    let moved = dir.path().join("src/new/run");
    assert_eq!(std::fs::read(&moved).unwrap(), b"from the session");
    assert_eq!(
        std::fs::metadata(&moved).unwrap().permissions().mode() & 0o777,
        0o755
    );
    use std::os::unix::fs::MetadataExt;
    let inode = |path: &std::path::Path| std::fs::metadata(path).unwrap().ino();
    assert_eq!(inode(&staged.path().join("one")), inode(&moved), "linked");
    staging.remove("one").unwrap();
    staging.remove("one").unwrap();
    assert_eq!(std::fs::read(&moved).unwrap(), b"from the session");

    // Over a file: renamed, the staged name gone.
    assert!(staging.write("two", b"newer").unwrap());
    root.put_staged(&p("src/kept"), false, &staging, "two", Expect::Anything)
        .unwrap();
    assert_eq!(
        std::fs::read(dir.path().join("src/kept")).unwrap(),
        b"newer"
    );
    assert!(!staged.path().join("two").exists());
    no_temp_files(dir.path());
}

#[test]
fn only_an_empty_directory_is_removed_by_remove_empty_dir() {
    let dir = tempfile::tempdir().unwrap();
    let root = Root::open(dir.path()).unwrap();
    root.put_dir(&p("d/e")).unwrap();
    put_bytes(&root, &p("d/e/kept"), b"local work", false, Expect::Absent).unwrap();
    assert!(!root.remove_empty_dir(&p("d/e")).unwrap());
    assert_eq!(
        std::fs::read(dir.path().join("d/e/kept")).unwrap(),
        b"local work"
    );
    std::fs::remove_file(dir.path().join("d/e/kept")).unwrap();
    assert!(root.remove_empty_dir(&p("d/e")).unwrap());
    assert!(!dir.path().join("d/e").exists());
    // Nothing there is fine; a file is not a directory.
    assert!(root.remove_empty_dir(&p("d/e")).unwrap());
    put_bytes(&root, &p("d/f"), b"x", false, Expect::Absent).unwrap();
    assert!(root.remove_empty_dir(&p("d/f")).is_err());
}
