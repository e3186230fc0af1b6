//! The journal through its API, on real sled databases: group commit, generations,
//! compaction, the start after an exit, and a disk that fills up (a small tmpfs: those
//! tests run as root, as CI does).

use std::ffi::CString;
use std::io::Write as _;
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::*;

fn message(n: usize) -> Outbound {
    Outbound::UserMessage {
        session: "s-1".into(),
        text: format!("message {n}"),
        key: None,
    }
}

/// Opens the store in `dir`.
fn store(dir: &Path) -> sled::Db {
    crate::store::open(&dir.join("store")).unwrap()
}

/// Opens the journal in `dir` with its flusher, once a previous instance has let go of
/// its generations (with a deadline: sled's threads may hold a lock for a moment).
async fn reopen(dir: &Path, store: &sled::Db) -> Arc<Journal> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        match Journal::open(&dir.join("journal"), store) {
            Ok(journal) => {
                tokio::spawn(Arc::clone(&journal).run_flusher());
                return journal;
            }
            Err(e) if std::time::Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("the journal stayed locked: {e}"),
        }
    }
}

#[tokio::test]
async fn appends_are_durable_ordered_and_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let db = store(dir.path());
    {
        let journal = reopen(dir.path(), &db).await;
        // Concurrent appends share flushes and still come out in seq order.
        let mut tasks = Vec::new();
        for n in 0..100 {
            let journal = Arc::clone(&journal);
            tasks.push(tokio::spawn(async move {
                journal.append(message(n)).await.unwrap()
            }));
        }
        let mut seqs = Vec::new();
        for task in tasks {
            seqs.push(task.await.unwrap());
        }
        seqs.sort();
        assert_eq!(seqs, (1..=100).collect::<Vec<_>>());
        let entries = journal.read_after(0, 1000).unwrap();
        assert_eq!(entries.len(), 100);
        assert!(entries.windows(2).all(|w| w[0].0 + 1 == w[1].0));
        journal.trim(40).unwrap();
        assert_eq!(journal.depth(), 60);
        assert_eq!(journal.read_after(0, 1000).unwrap()[0].0, 41);
        journal.append(message(0)).await.unwrap(); // flushes the trim too
    }
    let journal = reopen(dir.path(), &db).await;
    assert_eq!(journal.acked(), 40);
    let entries = journal.read_after(40, 1000).unwrap();
    assert_eq!(entries.len(), 61);
    assert_eq!(entries[0], (41, message(40)));
    assert_eq!(journal.read_after(99, 1).unwrap(), [(100, message(99))]);
    // The sequence continues after the highest ever written, even once all is trimmed.
    journal.trim(101).unwrap();
    assert_eq!(journal.append(message(0)).await.unwrap(), 102);
}

#[tokio::test]
async fn only_durable_entries_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let db = store(dir.path());
    let journal = Journal::open(&dir.path().join("journal"), &db).unwrap();
    // No flusher yet: the entry is taken but not durable.
    let seq = journal.append_unflushed(message(1)).unwrap();
    assert!(journal.read_after(0, 10).unwrap().is_empty());
    tokio::spawn(Arc::clone(&journal).run_flusher());
    journal.wait_durable(seq).await.unwrap();
    assert_eq!(journal.read_after(0, 10).unwrap().len(), 1);
}

#[tokio::test]
async fn generations_roll_and_acknowledged_ones_are_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let db = store(dir.path());
    let journal = reopen(dir.path(), &db).await;
    let text = "x".repeat(1000);
    let event = |n: usize| Outbound::UserMessage {
        session: "s-1".into(),
        text: format!("{n} {text}"),
        key: None,
    };
    // Enough for several generations, in groups.
    let total = 3 * (ROLL_BYTES as usize) / 1000 + 500;
    let mut n = 0;
    while n < total {
        let mut last = 0;
        for _ in 0..100 {
            n += 1;
            last = journal.append_unflushed(event(n)).unwrap();
        }
        journal.wait_durable(last).await.unwrap();
    }
    assert!(journal.generations() >= 3, "{}", journal.generations());
    // The sealed generations, all unacknowledged, are compacted.
    let names = || {
        let mut names: Vec<String> = std::fs::read_dir(dir.path().join("journal"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while names().iter().filter(|n| n.starts_with("c-")).count() + 1 < journal.generations()
        || names()
            .iter()
            .any(|n| !n.starts_with("c-") && !n.starts_with("g-"))
        // (Besides the newest, a `g-` may be the spare.)
        || names().iter().filter(|n| n.starts_with("g-")).count() > 2
    {
        assert!(
            std::time::Instant::now() < deadline,
            "not compacted: {:?}",
            names()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Reopened, the tail is empty: everything is read from the generations (compacted
    // and not), across their boundaries.
    close(journal).await;
    let journal = reopen(dir.path(), &db).await;
    let all = {
        let mut all = Vec::new();
        let mut after = 0;
        loop {
            let batch = journal.read_after(after, 512).unwrap();
            let Some(&(last, _)) = batch.last() else {
                break;
            };
            all.extend(batch);
            after = last;
        }
        all
    };
    assert_eq!(all.len(), n);
    assert!(all
        .iter()
        .zip(1..)
        .all(|((seq, e), k)| *seq == k && *e == event(k as usize)));
    let dirs = || {
        std::fs::read_dir(dir.path().join("journal"))
            .unwrap()
            .count()
    };
    let wait_for = |what: &str, done: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    let before = dirs();
    journal.trim((n / 2) as u64).unwrap();
    wait_for("acknowledged generations are deleted", &|| dirs() < before);
    assert_eq!(
        journal.read_after((n / 2) as u64, 1).unwrap()[0].0,
        (n / 2 + 1) as u64
    );
    // Everything acknowledged: the next turn starts a fresh generation.
    journal.trim(n as u64).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while journal.generations() != 1 || dirs() > 2 {
        assert!(std::time::Instant::now() < deadline, "no reset: {}", dirs());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(journal.depth(), 0);
    close(journal).await;
    let journal = reopen(dir.path(), &db).await;
    assert_eq!(journal.acked(), n as u64);
    assert_eq!(journal.append(event(0)).await.unwrap(), n as u64 + 1);
}

#[tokio::test]
async fn the_old_in_store_journal_is_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let db = store(dir.path());
    {
        let tree = db.open_tree("journal").unwrap();
        tree.insert(ACKED_KEY, &2u64.to_be_bytes()).unwrap();
        for seq in 1..=5u64 {
            let mut key = [b'e'; 9];
            key[1..].copy_from_slice(&seq.to_be_bytes());
            tree.insert(key, postcard::to_allocvec(&message(seq as usize)).unwrap())
                .unwrap();
        }
        db.flush().unwrap();
    }
    let journal = reopen(dir.path(), &db).await;
    assert_eq!(journal.acked(), 2);
    assert_eq!(
        journal.read_after(2, 10).unwrap(),
        [(3, message(3)), (4, message(4)), (5, message(5))]
    );
    assert!(!db.tree_names().iter().any(|n| n.as_ref() == b"journal"));
    assert_eq!(journal.append(message(6)).await.unwrap(), 6);
}

#[tokio::test]
async fn an_idle_journal_with_everything_acknowledged_starts_afresh() {
    let dir = tempfile::tempdir().unwrap();
    let db = store(dir.path());
    let journal = reopen(dir.path(), &db).await;
    let generation_dirs = || {
        let mut names: Vec<String> = std::fs::read_dir(dir.path().join("journal"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("g-"))
            .collect();
        names.sort();
        names
    };
    let first = generation_dirs()[0].clone();
    for n in 0..3 {
        journal.append(message(n)).await.unwrap();
    }
    journal.trim(3).unwrap();
    // Far below RESET_BYTES, so only the idle timer starts a fresh generation.
    let deadline = std::time::Instant::now() + IDLE_RESET_AFTER + Duration::from_secs(20);
    while generation_dirs().contains(&first) {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}",
            generation_dirs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(journal.generations(), 1);
    assert_eq!(journal.append(message(4)).await.unwrap(), 4);
    assert_eq!(journal.read_after(3, 10).unwrap(), [(4, message(4))]);
}

/// Drops `journal` once its background tasks (compactions) are done with it, so the
/// next open does not race them.
async fn close(journal: Arc<Journal>) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while Arc::strong_count(&journal) > 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the journal stayed in use"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn an_empty_generation_surviving_beside_the_one_that_took_records_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let db = store(dir.path());
    let journal = reopen(dir.path(), &db).await;
    for n in 1..=3 {
        journal.append(message(n)).await.unwrap();
    }
    close(journal).await;
    // An empty generation with the same first seq (one replaced or abandoned whose
    // deletion an exit cut short), with a higher id.
    let survivor = dir.path().join("journal").join("g-00000000000000000098");
    {
        let (_, mut empty) = Generation::open(survivor.clone()).unwrap();
        empty.activate(1, 0).unwrap();
        empty.db().flush().unwrap();
    }
    let journal = reopen(dir.path(), &db).await;
    assert_eq!(
        journal.read_after(0, 100).unwrap(),
        [(1, message(1)), (2, message(2)), (3, message(3))]
    );
    assert_eq!(journal.append(message(4)).await.unwrap(), 4);
    assert!(!survivor.exists());
}

#[tokio::test]
async fn an_abandoned_generation_inside_a_range_hides_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = store(dir.path());
    let journal = reopen(dir.path(), &db).await;
    for n in 1..=5 {
        journal.append(message(n)).await.unwrap();
    }
    close(journal).await;
    let journal = reopen(dir.path(), &db).await;
    for n in 6..=7 {
        journal.append(message(n)).await.unwrap();
    }
    close(journal).await;
    // What an exit can leave behind mid-roll: activated from seq 3, flushed, empty.
    {
        let (_, mut abandoned) =
            Generation::open(dir.path().join("journal").join("g-00000000000000000099")).unwrap();
        abandoned.activate(3, 0).unwrap();
        abandoned.db().flush().unwrap();
    }
    let journal = reopen(dir.path(), &db).await;
    let seqs: Vec<u64> = journal
        .read_after(2, 100)
        .unwrap()
        .iter()
        .map(|(seq, _)| *seq)
        .collect();
    assert_eq!(seqs, [3, 4, 5, 6, 7]);
    assert!(!dir
        .path()
        .join("journal")
        .join("g-00000000000000000099")
        .exists());
}

#[tokio::test]
async fn a_skip_ahead_survives_a_restart_and_leaves_no_gap() {
    let dir = tempfile::tempdir().unwrap();
    let db = store(dir.path());
    let journal = reopen(dir.path(), &db).await;
    for n in 1..=3 {
        journal.append(message(n)).await.unwrap();
    }
    // The relay holds more of this instance than the journal wrote.
    journal.skip_to(500).unwrap();
    assert_eq!(journal.append(message(501)).await.unwrap(), 501);
    // The next records went to a fresh generation (no gap in one).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let firsts = || {
        journal
            .lock()
            .generations
            .keys()
            .copied()
            .collect::<Vec<_>>()
    };
    while firsts() != [501] {
        assert!(std::time::Instant::now() < deadline, "{:?}", firsts());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    close(journal).await;
    let journal = reopen(dir.path(), &db).await;
    assert_eq!(journal.read_after(0, 10).unwrap(), [(501, message(501))]);
    assert_eq!(journal.append(message(502)).await.unwrap(), 502);
}

/// A tmpfs of a few MiB on a fresh temp dir, to fill up; unmounted when dropped.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: u64) -> SmallDisk {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(
            euid, 0,
            "this test mounts a small tmpfs to fill it up: run it as root (CI does)"
        );
        let dir = tempfile::tempdir().unwrap();
        let target = CString::new(dir.path().as_os_str().as_bytes()).unwrap();
        let options = CString::new(format!("size={size}")).unwrap();
        // SAFETY: every pointer is a NUL-terminated string that outlives the call.
        let status = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                options.as_ptr().cast(),
            )
        };
        assert_eq!(
            status,
            0,
            "cannot mount a tmpfs: {}",
            std::io::Error::last_os_error()
        );
        SmallDisk { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Takes every free byte with one file, and returns its path.
    fn fill(&self) -> std::path::PathBuf {
        let path = self.path().join("filler");
        let mut file = std::fs::File::create(&path).unwrap();
        for size in [1 << 16, 1 << 12, 1] {
            let chunk = vec![0u8; size];
            while file.write_all(&chunk).is_ok() {}
        }
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let target = CString::new(self.dir.path().as_os_str().as_bytes()).unwrap();
        // Lazily: the quarantined databases of a failed journal keep files open.
        // SAFETY: `target` is a NUL-terminated path.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

fn large(n: usize) -> Outbound {
    Outbound::UserMessage {
        session: "s-1".into(),
        text: format!("{n} {}", "x".repeat(3000)),
        key: None,
    }
}

/// Appends groups of events until one is refused; returns what was answered (seq and
/// event) and what was refused (seq and why).
async fn append_until_refused(
    journal: &Journal,
    mut n: usize,
) -> (Vec<(u64, Outbound)>, Vec<(u64, Unavailable)>) {
    let mut answered = Vec::new();
    let mut refused = Vec::new();
    while refused.is_empty() {
        assert!(n < 100_000, "the disk never filled up");
        let mut group = Vec::new();
        for _ in 0..20 {
            n += 1;
            group.push((journal.append_unflushed(large(n)).unwrap(), large(n)));
        }
        for (seq, event) in group {
            match journal.wait_durable(seq).await {
                Ok(()) => answered.push((seq, event)),
                Err(why) => refused.push((seq, why)),
            }
        }
    }
    (answered, refused)
}

/// Everything the journal would send, from the start.
fn everything(journal: &Journal) -> Vec<(u64, Outbound)> {
    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let batch = journal.read_after(after, 512).unwrap();
        let Some(&(last, _)) = batch.last() else {
            return all;
        };
        all.extend(batch);
        after = last;
    }
}

#[tokio::test(start_paused = true)]
async fn a_full_disk_refuses_at_once_and_the_journal_recovers_when_space_returns() {
    let disk = SmallDisk::mount(4 << 20);
    let dir = tempfile::tempdir().unwrap();
    let db = store(dir.path());
    let root = disk.path().join("journal");
    let journal = Journal::open(&root, &db).unwrap();
    tokio::spawn(Arc::clone(&journal).run_flusher());
    let mut answered = Vec::new();
    for n in 0..10 {
        answered.push((journal.append(message(n)).await.unwrap(), message(n)));
    }
    let filler = disk.fill();
    let (more, refused) = append_until_refused(&journal, 0).await;
    answered.extend(more);

    // The events of the group whose flush failed were refused, with the disk and the path.
    let why = refused[0].1.clone();
    assert!(why.no_space(), "{why}");
    let message_text = why.to_string();
    assert!(
        message_text.starts_with("cannot queue: no space left on device for ")
            && message_text.contains(&root.display().to_string())
            && message_text.contains("free some space"),
        "{message_text}"
    );
    assert!(refused.iter().all(|(_, w)| *w == why));
    // From then on, appends are refused at once, and nothing waits.
    assert_eq!(journal.append_unflushed(message(0)), Err(why.clone()));
    assert_eq!(journal.unavailable(), Some(why.clone()));

    // While the disk stays full, recovery is tried once per interval, not in a loop.
    let attempts = journal.recovery_attempts();
    tokio::time::sleep(RECOVERY_INTERVAL * 5).await;
    let tried = journal.recovery_attempts() - attempts;
    assert!((4..=6).contains(&tried), "{tried} attempts in 5 intervals");
    assert!(journal.unavailable().is_some());

    // Space comes back: the next attempt succeeds, and events are taken again, after the
    // refused seqs.
    std::fs::remove_file(filler).unwrap();
    let attempts = journal.recovery_attempts();
    while journal.unavailable().is_some() {
        tokio::time::sleep(RECOVERY_INTERVAL / 10).await;
    }
    assert_eq!(journal.recovery_attempts(), attempts + 1);
    // The flusher's next turns publish nothing new: `durable` never points at a refused
    // seq, which no record holds (the bridge reads up to it).
    tokio::time::sleep(RECOVERY_INTERVAL).await;
    let last_answered = answered.last().unwrap().0;
    assert_eq!(*journal.durable().borrow(), last_answered);
    assert!(journal.read_after(last_answered, 10).unwrap().is_empty());
    let last_refused = refused.last().unwrap().0;
    let seq = journal.append(message(1000)).await.unwrap();
    assert!(seq > last_refused, "{seq} reuses a refused seq");
    answered.push((seq, message(1000)));
    // A late waiter for a refused event is still told so.
    assert_eq!(journal.wait_durable(refused[0].0).await, Err(why));

    // Everything answered, and nothing else, in order; also after a restart.
    assert_eq!(everything(&journal), answered);
    assert_eq!(journal.depth(), answered.len() as u64);
    close(journal).await;
    let journal = reopen(disk.path(), &db).await;
    assert_eq!(everything(&journal), answered);
    assert!(journal.append(message(1001)).await.unwrap() > seq);
}

#[tokio::test]
async fn a_failed_generation_ends_where_its_void_file_says() {
    let dir = tempfile::tempdir().unwrap();
    let db = store(dir.path());
    let journal = reopen(dir.path(), &db).await;
    for n in 1..=5 {
        journal.append(message(n)).await.unwrap();
    }
    let first = *journal.lock().generations.keys().next_back().unwrap();
    close(journal).await;
    // What a failure leaves: records 4 and 5 were written after the last flush that
    // succeeded, and refused.
    let marker = dir
        .path()
        .join("journal")
        .join(format!("void-{first:020}-{:020}", 3));
    std::fs::File::create(&marker).unwrap();
    let journal = reopen(dir.path(), &db).await;
    assert_eq!(
        everything(&journal),
        [(1, message(1)), (2, message(2)), (3, message(3))]
    );
    // Refused seqs were never sent, so after a restart they may be taken again.
    assert_eq!(journal.append(message(40)).await.unwrap(), 4);
    // The failed generation is compacted without them, and its marker goes with it.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while marker.exists() {
        assert!(std::time::Instant::now() < deadline, "the marker stayed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    close(journal).await;
    let journal = reopen(dir.path(), &db).await;
    assert_eq!(
        everything(&journal),
        [
            (1, message(1)),
            (2, message(2)),
            (3, message(3)),
            (4, message(40))
        ]
    );
}
