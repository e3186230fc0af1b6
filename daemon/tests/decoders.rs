//! The daemon's decoders of what it stored from the network, fed damaged records up to
//! 64 KiB on disk: the outbound journal's generations and the older in-store journal it
//! migrates, the inbound session log chunks and followed sessions, the session replica,
//! and teleport's links, agreed trees and index entries.
//! A damaged record is an error naming the store (or, where a record cannot be told from a
//! valid one, read as what it says), never a panic; what is read stays within what the
//! daemon relies on (journal seqs between the acknowledged and the last written one, log
//! seqs increasing).
//!
//! The bridge's own decoder of relay messages is fuzzed in `fuzz/` and property-tested in
//! `protocol/tests/decoders.rs`.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cloud_protocol::bridge::Outbound;
use cloud_protocol::session::{Author, LogEntry, SessionEvent};
use cloudd::journal::Journal;
use cloudd::sessions::inbound::Inbound;
use cloudd::sessions::replica::Replica;
use cloudd::store::{self, StoreError};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::json;

/// The largest record fed to a decoder.
const MAX_INPUT: usize = 64 * 1024;

/// How long sled may take to let go of a database after its last handle is dropped.
const DEADLINE: Duration = Duration::from_secs(20);

/// A runner of `cases` cases that keeps no regression file (the cases share a database,
/// so the tests drive the runner themselves).
fn runner(cases: u32) -> TestRunner {
    TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    })
}

fn run<S: Strategy>(cases: u32, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>) {
    if let Err(e) = runner(cases).run(&strategy, test) {
        panic!("{e}");
    }
}

/// Arbitrary bytes up to [`MAX_INPUT`].
fn bytes() -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..=MAX_INPUT)
}

/// A short value: where a record holds a number, its damage is mostly in its length.
fn short() -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..12)
}

/// Eight bytes of seq (mostly from 1 to 20, so records meet; or the largest), or a
/// damaged key tail.
fn seq_tail() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        6 => (1..=20u64).prop_map(|seq| seq.to_be_bytes().to_vec()),
        1 => Just(u64::MAX.to_be_bytes().to_vec()),
        2 => short(),
    ]
}

/// `bytes` cut at `cut` and followed by `noise`.
fn cut(mut bytes: Vec<u8>, cut: Index, noise: Vec<u8>) -> Vec<u8> {
    bytes.truncate(cut.index(bytes.len() + 1));
    bytes.extend(noise);
    bytes
}

/// A journaled event. Built from its JSON form so these tests keep compiling when a
/// variant gains an optional field (serde leaves it `None`).
fn event(text: String) -> Outbound {
    serde_json::from_value(json!({"UserMessage": {"session": "s-1", "text": text}})).unwrap()
}

/// A record of journaled events: valid ones (possibly more than its key allows), cut
/// short or followed by noise, or noise.
fn events_record() -> impl Strategy<Value = Vec<u8>> {
    let valid = vec(vec(any::<u8>(), 0..256), 0..6).prop_map(|texts| {
        let events: Vec<Outbound> = texts
            .into_iter()
            .map(|text| event(String::from_utf8_lossy(&text).into_owned()))
            .collect();
        postcard::to_allocvec(&events).unwrap()
    });
    prop_oneof![
        2 => valid.clone(),
        2 => (valid, any::<Index>(), vec(any::<u8>(), 0..8)).prop_map(|(b, at, n)| cut(b, at, n)),
        1 => bytes(),
    ]
}

/// A chunk of session log entries: valid ones (with any seqs), cut or extended, or noise.
fn log_chunk() -> impl Strategy<Value = Vec<u8>> {
    let valid = vec((any::<u64>(), vec(any::<u8>(), 0..256)), 0..6).prop_map(|entries| {
        let entries: Vec<LogEntry> = entries
            .into_iter()
            .map(|(seq, text)| LogEntry {
                seq: seq % 32,
                at: 1,
                author: Author::Agent,
                event: SessionEvent::Message(String::from_utf8_lossy(&text).into_owned()),
            })
            .collect();
        postcard::to_allocvec(&entries).unwrap()
    });
    prop_oneof![
        2 => valid.clone(),
        2 => (valid, any::<Index>(), vec(any::<u8>(), 0..8)).prop_map(|(b, at, n)| cut(b, at, n)),
        1 => bytes(),
    ]
}

/// Waits until sled has let go of the database in `dir` (a moment after its last handle
/// is dropped).
fn wait_closed(dir: &Path) {
    let deadline = Instant::now() + DEADLINE;
    while std::fs::File::open(dir.join("db"))
        .unwrap()
        .try_lock()
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "sled kept {} locked",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A damaged record is reported as a corrupt store entry.
fn check_error(e: StoreError) -> Result<(), TestCaseError> {
    prop_assert!(matches!(e, StoreError::Corrupt { .. }), "{e}");
    prop_assert!(!e.to_string().is_empty());
    Ok(())
}

/// What a journal read gives: events after what was acknowledged, up to what was written.
/// (Damaged records may overlap: their events are then read twice, which the relay's
/// dedup absorbs; telling overlaps apart is not a decoder's job.)
fn check_journal(journal: &Journal) -> Result<(), TestCaseError> {
    let _ = journal.depth();
    match journal.read_after(0, 1000) {
        Ok(events) => {
            for (seq, _) in events {
                prop_assert!(seq > journal.acked() && seq <= journal.last_written());
            }
            Ok(())
        }
        Err(e) => check_error(e),
    }
}

/// A damaged journal generation: its records (key after `r`, value) and the values of its
/// `first` and `acked` keys.
#[derive(Debug, Clone)]
struct DamagedGeneration {
    records: Vec<(Vec<u8>, Vec<u8>)>,
    first: Vec<u8>,
    acked: Option<Vec<u8>>,
}

/// A journal and the directory it is in.
type Opened = (tempfile::TempDir, Result<Arc<Journal>, StoreError>);

/// A journal as the daemon leaves it (one generation, put to use from seq 1), with that
/// generation's records replaced by `damaged`, opened again.
fn open_damaged_generation(damaged: DamagedGeneration) -> Opened {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("journal");
    let db = store::open(&dir.path().join("store")).unwrap();
    drop(Journal::open(&root, &db).unwrap());
    let generation = std::fs::read_dir(&root)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .find(|path| {
            path.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("g-")
        })
        .expect("the journal keeps its records in g- generations");
    wait_closed(&generation);
    // Opened with the segment size it was made with (sled refuses any other). Its `conf`
    // is text and a binary checksum.
    let conf =
        String::from_utf8_lossy(&std::fs::read(generation.join("conf")).unwrap()).into_owned();
    let segment_size: usize = conf
        .lines()
        .find_map(|line| line.strip_prefix("segment_size: "))
        .unwrap()
        .parse()
        .unwrap();
    {
        let raw = sled::Config::new()
            .path(&generation)
            .segment_size(segment_size)
            .open()
            .unwrap();
        raw.insert("first", damaged.first).unwrap();
        if let Some(acked) = damaged.acked {
            raw.insert("acked", acked).unwrap();
        }
        for (tail, value) in damaged.records {
            let mut key = vec![b'r'];
            key.extend(tail);
            raw.insert(key, value).unwrap();
        }
        raw.flush().unwrap();
    }
    wait_closed(&generation);
    let opened = Journal::open(&root, &db);
    (dir, opened)
}

/// The older layout: the store's `journal` tree, `e` and the seq → one event, and `acked`.
fn open_damaged_legacy(events: Vec<(Vec<u8>, Vec<u8>)>, acked: Option<Vec<u8>>) -> Opened {
    let dir = tempfile::tempdir().unwrap();
    let db = store::open(&dir.path().join("store")).unwrap();
    let legacy = db.open_tree("journal").unwrap();
    if let Some(acked) = acked {
        legacy.insert("acked", acked).unwrap();
    }
    for (tail, value) in events {
        let mut key = vec![b'e'];
        key.extend(tail);
        legacy.insert(key, value).unwrap();
    }
    let opened = Journal::open(&dir.path().join("journal"), &db);
    (dir, opened)
}

fn seq(seq: u64) -> Vec<u8> {
    seq.to_be_bytes().to_vec()
}

/// The message of a corrupt-store error.
fn corrupt<T>(result: Result<T, StoreError>) -> String {
    match result {
        Err(e @ StoreError::Corrupt { .. }) => e.to_string(),
        Err(e) => panic!("not a corrupt journal: {e}"),
        Ok(_) => panic!("a damaged journal was read"),
    }
}

/// A valid record of `n` events.
fn record_of(n: usize) -> Vec<u8> {
    let events: Vec<Outbound> = (0..n).map(|i| event(i.to_string())).collect();
    postcard::to_allocvec(&events).unwrap()
}

#[test]
fn damaged_journal_generations_are_errors_not_panics() {
    let strategy = (
        vec((seq_tail(), events_record()), 1..4),
        prop_oneof![2 => Just(seq(1)), 1 => short()],
        proptest::option::of(prop_oneof![short(), Just(seq(u64::MAX))]),
    )
        .prop_map(|(records, first, acked)| DamagedGeneration {
            records,
            first,
            acked,
        });
    run(32, strategy, |damaged| {
        match open_damaged_generation(damaged).1 {
            Ok(journal) => check_journal(&journal),
            Err(e) => check_error(e),
        }
    });
}

#[test]
fn a_damaged_journal_of_an_older_daemon_is_an_error_not_a_panic() {
    let strategy = (
        vec(
            (
                seq_tail(),
                prop_oneof![
                    2 => vec(any::<u8>(), 0..256).prop_map(|text| {
                        postcard::to_allocvec(&event(String::from_utf8_lossy(&text).into_owned())).unwrap()
                    }),
                    1 => bytes(),
                ],
            ),
            1..6,
        ),
        proptest::option::of(short()),
    );
    run(32, strategy, |(events, acked)| {
        match open_damaged_legacy(events, acked).1 {
            Ok(journal) => check_journal(&journal),
            Err(e) => check_error(e),
        }
    });
}

#[test]
fn a_journal_record_key_of_the_wrong_length_is_an_error() {
    let short_key = DamagedGeneration {
        records: vec![(vec![0, 1], record_of(1))],
        first: seq(1),
        acked: None,
    };
    let message = corrupt(open_damaged_generation(short_key).1);
    assert!(message.contains("a record key of 3 bytes"), "{message}");
    let one = postcard::to_allocvec(&event("ls".into())).unwrap();
    let legacy = vec![(seq(1), one.clone()), (vec![2], one)];
    let message = corrupt(open_damaged_legacy(legacy, None).1);
    assert!(message.contains("a record key of 2 bytes"), "{message}");
}

#[test]
fn a_journal_generation_whose_first_seq_is_zero_is_an_error() {
    // A damaged `first` (not 8 bytes) reads as 0, as a zero does.
    for first in [seq(0), vec![1, 2, 3]] {
        let damaged = DamagedGeneration {
            records: vec![],
            first,
            acked: None,
        };
        let message = corrupt(open_damaged_generation(damaged).1);
        assert!(message.contains("first seq is 0"), "{message}");
    }
}

#[test]
fn a_journal_record_holding_more_events_than_its_seq_is_an_error() {
    // Seqs start at 1: a record ending at seq 2 holds at most 2 events.
    let damaged = DamagedGeneration {
        records: vec![(seq(2), record_of(3))],
        first: seq(1),
        acked: None,
    };
    let (_dir, journal) = open_damaged_generation(damaged);
    let message = corrupt(journal.unwrap().read_after(0, 10));
    assert!(
        message.contains("ending at seq 2 holds 3 events"),
        "{message}"
    );
}

#[test]
fn a_journal_seq_at_the_end_of_the_sequence_is_an_error() {
    let record = DamagedGeneration {
        records: vec![(seq(u64::MAX), record_of(1))],
        first: seq(1),
        acked: None,
    };
    let acked = DamagedGeneration {
        records: vec![(seq(1), record_of(1))],
        first: seq(1),
        acked: Some(seq(u64::MAX)),
    };
    for damaged in [record, acked] {
        let message = corrupt(open_damaged_generation(damaged).1);
        assert!(message.contains("end of the sequence"), "{message}");
    }
}

#[test]
fn damaged_session_logs_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let db = store::open(dir.path()).unwrap();
    let strategy = (vec((seq_tail(), log_chunk()), 1..4), short(), 0..24u64);
    run(64, strategy, |(chunks, follows, after)| {
        for tree in ["log", "follows"] {
            db.open_tree(tree).unwrap().clear().unwrap();
        }
        let log = db.open_tree("log").unwrap();
        for (tail, value) in chunks {
            let mut key = b"s-1\0".to_vec();
            key.extend(tail);
            log.insert(key, value).unwrap();
        }
        db.open_tree("follows")
            .unwrap()
            .insert("s-1", follows)
            .unwrap();
        let inbound = match Inbound::open(&db) {
            Ok(inbound) => inbound,
            Err(e) => return check_error(e),
        };
        prop_assert!(inbound.is_followed("s-1").unwrap());
        match inbound.since("s-1", after) {
            Ok(entries) => {
                let mut last = after;
                for entry in entries {
                    prop_assert!(entry.seq > last, "increasing seqs after {after}");
                    last = entry.seq;
                }
                Ok(())
            }
            Err(e) => check_error(e),
        }
    });
}

#[test]
fn damaged_replica_sessions_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let db = store::open(dir.path()).unwrap();
    let replica = Replica::open(&db).unwrap();
    run(64, bytes(), |value| {
        let sessions = db.open_tree("sessions").unwrap();
        sessions.clear().unwrap();
        sessions.insert("s-1", value).unwrap();
        match replica.get("s-1") {
            Ok(session) => prop_assert!(session.is_some()),
            Err(e) => check_error(e)?,
        }
        match replica.list() {
            Ok(list) => prop_assert_eq!(list.len(), 1),
            Err(e) => check_error(e)?,
        }
        Ok(())
    });
}

/// Damaged teleport records (links, agreed trees, index entries), written straight into
/// the store's `teleport` tree: reading them back is an error, or drops an index entry
/// (the file is hashed again), never a panic.
#[test]
fn damaged_teleport_records_are_errors_not_panics() {
    use cloudd::teleport::worktrees::Worktrees;
    let dir = tempfile::tempdir().unwrap();
    let teleport = cloudd::teleport::db::TeleportDb::open(&dir.path().join("teleport")).unwrap();
    let worktrees = Worktrees::new(teleport.clone());
    let tree = teleport.tree().unwrap();
    let root = "/home/ann/src/app";
    let key = |prefix: u8, path: Option<&str>| {
        let mut key = vec![prefix, 0];
        key.extend_from_slice(root.as_bytes());
        if let Some(path) = path {
            key.push(0);
            key.extend_from_slice(path.as_bytes());
        }
        key
    };
    run(
        64,
        (
            bytes(),
            prop_oneof![Just("a"), Just("src/lib.rs"), Just("../x"), Just("")],
        ),
        |(value, path)| {
            tree.clear().unwrap();
            tree.insert(key(b'w', None), value.clone()).unwrap();
            tree.insert(key(b'm', Some(path)), value.clone()).unwrap();
            tree.insert(key(b'i', Some(path)), value.clone()).unwrap();
            tree.insert(key(b's', None), value).unwrap();
            if let Err(e) = worktrees.get(root) {
                check_error(e)?;
            }
            if let Err(e) = worktrees.list() {
                check_error(e)?;
            }
            if let Err(e) = worktrees.base(root) {
                check_error(e)?;
            }
            match worktrees.index(root) {
                Ok(index) => prop_assert!(index.len() <= 1),
                Err(e) => check_error(e)?,
            }
            Ok(())
        },
    );
}
