//! The index's encoding: what the daemon stores in sled must come back as it was, and no
//! bytes (a torn write, another version's layout) may make decoding panic.

#![cfg(unix)]

mod common;

use std::os::unix::fs::symlink;

use cloud_protocol::teleport::{ContentId, EntryKind, WHOLE_FILE_MAX};
use cloud_tree::index::{INDEX_FORMAT, MAX_INDEXED_BYTES};
use cloud_tree::{scan, FileKind, Index, IndexError, Indexed, ScanOptions, Stat};
use common::{noise, p, write};
use proptest::prelude::*;

fn stat(kind: FileKind) -> Stat {
    Stat {
        kind,
        size: 1,
        mtime_ns: 2,
        ctime_ns: 3,
        ino: 4,
        mode: 0o100_644,
    }
}

#[test]
fn a_scanned_index_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a/b", b"small");
    write(dir.path(), "big", &noise(3, 2 * 1024 * 1024));
    symlink("a/b", dir.path().join("link")).unwrap();
    let scanned = scan(dir.path(), &Index::default(), &ScanOptions::default()).unwrap();
    let bytes = scanned.index.encode();
    assert_eq!(bytes[0], INDEX_FORMAT);
    let decoded = Index::decode(&bytes).unwrap();
    assert_eq!(decoded, scanned.index);
    assert_eq!(decoded.scanned_at_ns(), scanned.index.scanned_at_ns());
    for (path, indexed) in scanned.index.iter() {
        assert_eq!(&Indexed::decode(path, &indexed.encode()).unwrap(), indexed);
    }
}

#[test]
fn bad_indexes_are_refused() {
    assert_eq!(Index::decode(&[]), Err(IndexError::Empty));
    assert_eq!(
        Index::decode(&[INDEX_FORMAT + 1, 0, 0]),
        Err(IndexError::Format(INDEX_FORMAT + 1))
    );
    let mut bytes = Index::default().encode();
    bytes.push(0);
    assert!(matches!(Index::decode(&bytes), Err(IndexError::Decode(_))));
    assert!(matches!(
        Indexed::decode(&p("x"), &vec![INDEX_FORMAT; MAX_INDEXED_BYTES + 1]),
        Err(IndexError::TooLarge(_))
    ));
    // A file too large to be one blob, without chunks; a stat that disagrees.
    let mut index = Index::new(5);
    let oversized = EntryKind::File {
        executable: false,
        size: WHOLE_FILE_MAX + 1,
        content: ContentId::of(b""),
        chunks: Vec::new(),
    };
    index.insert(
        p("f"),
        Indexed {
            stat: stat(FileKind::File),
            kind: oversized,
        },
    );
    assert!(matches!(
        Index::decode(&index.encode()),
        Err(IndexError::Invalid { .. })
    ));
    let mut index = Index::new(5);
    index.insert(
        p("d"),
        Indexed {
            stat: stat(FileKind::File),
            kind: EntryKind::Dir,
        },
    );
    assert!(matches!(
        Index::decode(&index.encode()),
        Err(IndexError::Invalid { .. })
    ));
}

fn indexed() -> impl Strategy<Value = Indexed> {
    let stat = (
        any::<u64>(),
        any::<i64>(),
        any::<i64>(),
        any::<u64>(),
        any::<u32>(),
    );
    prop_oneof![
        Just(EntryKind::Dir),
        ("[a-z./]{1,40}").prop_map(|target| EntryKind::Symlink { target }),
        (any::<bool>(), 0..=WHOLE_FILE_MAX, any::<[u8; 32]>()).prop_map(
            |(executable, size, id)| {
                EntryKind::File {
                    executable,
                    size,
                    content: ContentId(id),
                    chunks: Vec::new(),
                }
            }
        ),
    ]
    .prop_flat_map(move |kind| {
        stat.prop_map(move |(size, mtime_ns, ctime_ns, ino, mode)| {
            let kind_of_stat = match kind {
                EntryKind::Dir => FileKind::Dir,
                EntryKind::File { .. } => FileKind::File,
                EntryKind::Symlink { .. } => FileKind::Symlink,
            };
            Indexed {
                stat: Stat {
                    kind: kind_of_stat,
                    size,
                    mtime_ns,
                    ctime_ns,
                    ino,
                    mode,
                },
                kind: kind.clone(),
            }
        })
    })
}

proptest! {
    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..65_536)) {
        let _ = Index::decode(&bytes);
        let _ = Indexed::decode(&p("x"), &bytes);
        // Past the format byte too.
        let mut framed = vec![INDEX_FORMAT];
        framed.extend_from_slice(&bytes);
        let _ = Index::decode(&framed);
        let _ = Indexed::decode(&p("x"), &framed);
    }

    #[test]
    fn indexes_round_trip(
        stamp in any::<i64>(),
        entries in prop::collection::btree_map("[a-z]{1,8}(/[a-z]{1,8}){0,3}", indexed(), 0..40),
    ) {
        let mut index = Index::new(stamp);
        for (path, indexed) in entries {
            index.insert(p(&path), indexed);
        }
        let bytes = index.encode();
        prop_assert_eq!(Index::decode(&bytes).unwrap(), index.clone());
        // Any cut short fails cleanly.
        for cut in [0, 1, bytes.len() / 2, bytes.len().saturating_sub(1)] {
            if cut < bytes.len() {
                prop_assert!(Index::decode(&bytes[..cut]).is_err());
            }
        }
    }
}
