//! The outbound journal: every event the daemon must deliver to the relay, on disk before
//! anyone is told it is queued, removed only when the relay acknowledges it.
//!
//! **Group commit.** An append takes the next seq and joins the pending group in memory; one
//! flusher task writes each group as a single sled record and flushes it, so appends that
//! arrive together share one write and one `fsync`-class flush (sled's `flush` uses
//! `sync_file_range` on Linux: it survives a killed process, not necessarily a power cut).
//! Up to [`FLUSHES_IN_FLIGHT`] flushes are out at once: a flush covers everything written
//! before it, so `durable` moves to the target of whichever completes.
//! Nobody is told `queued` before the flush covering their event completes, and only
//! flushed entries are ever handed to the bridge, so a seq the relay has seen is never
//! reused after a crash.
//!
//! **Generations.** The journal lives in its own directory (`state/journal/`), as a series
//! of sled databases. Records go to the newest, `g-FIRST` (its first seq, 20 digits); a
//! record's key is `r` + the seq of its last event (big-endian) and its value the
//! postcard-encoded events it holds, consecutive seqs ending there. The newest also keeps
//! the highest acknowledged seq under `acked`. sled never gives back the space of removed
//! entries, and rewrites values as it consolidates its nodes, so the journal manages space
//! a generation at a time:
//!
//! - a new generation starts when the newest has taken [`ROLL_BYTES`], or when the relay
//!   has acknowledged everything and the newest has taken more than [`RESET_BYTES`] (or
//!   anything at all, after [`IDLE_RESET_AFTER`] with nothing appended), and at every
//!   start (sled adds a segment to a database each time it opens it, so the journal never
//!   writes to a reopened one); with nothing to deliver at start, every old generation is
//!   deleted first (the store's `meta` tree keeps the acknowledged seq under
//!   `journal_acked` meanwhile);
//! - a sealed generation that still holds unacknowledged events is compacted: rewritten,
//!   off the async thread, as one record in a fresh database (`c-FIRST-LAST`, built under a
//!   `tmp-` name and renamed into place once flushed), which sled keeps as a single blob
//!   file, so it costs about its live data on disk; while the relay is acknowledging, only
//!   after [`COMPACT_DELAY`] (by then it is usually acknowledged and deleted instead);
//! - a generation the relay has wholly acknowledged is deleted (renamed to `deleted-…`
//!   first, so a deletion cut short by an exit is finished at the next open).
//!
//! **Tail.** The latest entries stay in memory (at most [`TAIL_ENTRIES`]), so the bridge
//! streams fresh events without reading them back; older ones (a backlog, a resend after a
//! reconnect) are read from the generations.
//!
//! Architecture invariant: this module is the only one that touches `state/journal/`, the
//! `journal_acked` key of the store's `meta` tree and the old in-store `journal` tree (which
//! it migrates once). Sequence numbers start at 1,
//! have no gaps, and keep growing across restarts.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use cloud_protocol::bridge::Outbound;
use tokio::sync::{watch, Notify};

use crate::store::StoreError;

/// A new generation starts once the newest has taken this many bytes of records.
pub const ROLL_BYTES: u64 = 512 * 1024;
/// With nothing left to acknowledge, a new generation starts (and the old one is deleted)
/// once the newest has taken this many bytes.
pub const RESET_BYTES: u64 = 64 * 1024;
/// With everything acknowledged and nothing appended for this long, a new generation
/// starts however little the newest holds.
pub const IDLE_RESET_AFTER: Duration = Duration::from_secs(2);
/// How many of the latest entries are kept in memory for the bridge.
pub const TAIL_ENTRIES: usize = 16 * 1024;
/// sled's cache per generation: reads are rare (the tail serves the bridge).
const GENERATION_CACHE_BYTES: u64 = 1024 * 1024;
/// sled's segment size per generation. A value above a quarter of it is a blob file of its
/// own: a compacted generation's one record is; a group's record seldom is.
const GENERATION_SEGMENT_BYTES: usize = 256 * 1024;
/// sled's segment size for a compacted generation: small, because opening a database
/// to read it may add a segment, and its one record is a blob file anyway.
const COMPACTED_SEGMENT_BYTES: usize = 16 * 1024;
/// While the relay is acknowledging, a sealed generation waits this long before it is
/// compacted: it is usually acknowledged (and deleted) well within it.
pub const COMPACT_DELAY: Duration = Duration::from_secs(1);
/// How many flushes may be out at once. While the disk takes one, the next group is
/// written and its flush issued, so requests that arrive during a flush wait for their own
/// flush only, not for the one already out as well (which, on a disk slow to flush, was
/// most of a client's wait).
const FLUSHES_IN_FLIGHT: usize = 4;
/// How long the flusher waits before retrying a failed flush.
const FLUSH_RETRY: Duration = Duration::from_millis(100);
/// How long a deletion waits for sled to let go of a closed database.
const CLOSE_DEADLINE: Duration = Duration::from_secs(10);

/// The key under which the highest acknowledged seq is kept.
const ACKED_KEY: &[u8] = b"acked";
/// The key under which a generation keeps its first seq (absent in a spare).
const FIRST_KEY: &[u8] = b"first";
/// The key of the store's `meta` tree that keeps the highest acknowledged seq while the
/// journal is being started afresh.
const META_ACKED_KEY: &[u8] = b"journal_acked";
/// Record keys: this prefix and the seq of the record's last event, big-endian.
const RECORD_PREFIX: u8 = b'r';

fn record_key(seq: u64) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = RECORD_PREFIX;
    key[1..].copy_from_slice(&seq.to_be_bytes());
    key
}

fn seq_of(key: &[u8]) -> u64 {
    u64::from_be_bytes(key[1..9].try_into().expect("9-byte record key"))
}

fn decode_u64(value: &[u8]) -> u64 {
    u64::from_be_bytes(value.try_into().unwrap_or([0; 8]))
}

fn corrupt(message: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        what: "journal",
        message: message.to_string(),
    }
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> StoreError {
    move |source| StoreError::Io { what, source }
}

fn open_db(dir: &Path, segment_size: usize) -> Result<sled::Db, StoreError> {
    sled::Config::new()
        .path(dir)
        .cache_capacity(GENERATION_CACHE_BYTES)
        .segment_size(segment_size)
        .mode(sled::Mode::LowSpace)
        // The flusher flushes every group; no background flusher thread is needed.
        .flush_every_ms(None)
        .open()
        .map_err(StoreError::sled("opening a journal generation"))
}

/// Waits (with a deadline) until sled has really let go of the database in `dir`: it does
/// when its last internal reference drops, which may write a snapshot into the directory.
fn wait_closed(dir: &Path) {
    let deadline = std::time::Instant::now() + CLOSE_DEADLINE;
    loop {
        let free = match std::fs::File::open(dir.join("db")) {
            Ok(file) => !matches!(file.try_lock(), Err(std::fs::TryLockError::WouldBlock)),
            Err(_) => true,
        };
        if free || std::time::Instant::now() > deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Deletes a generation's directory, its database closed first: renamed to `deleted-…`,
/// then removed.
fn remove_generation_dir(dir: &Path) {
    wait_closed(dir);
    let Some(name) = dir.file_name().and_then(|n| n.to_str()) else {
        return;
    };
    let doomed = dir.with_file_name(format!("deleted-{name}"));
    let removed = std::fs::rename(dir, &doomed).and_then(|()| std::fs::remove_dir_all(&doomed));
    if let Err(e) = removed {
        tracing::warn!(dir = %dir.display(), "cannot delete an acknowledged journal generation: {e}");
    }
}

/// One generation: a sled database holding records of consecutive seqs.
#[derive(Debug)]
struct Generation {
    dir: PathBuf,
    /// Its database while open: the newest always is; a compacted one only while read.
    db: Option<sled::Db>,
    /// The seq of its last event (its first seq − 1 while empty).
    last: u64,
    /// Bytes of records written to it since it was opened (or found on disk).
    bytes: u64,
    /// Whether it is compacted (one record).
    compacted: bool,
    /// A compacted generation's events, decoded while it is being read.
    decoded: Option<Vec<Outbound>>,
}

impl Generation {
    /// Opens (creating) a generation that takes records (`g-ID`). Returns its first seq
    /// too, `None` for one never put to use (a spare).
    fn open(dir: PathBuf) -> Result<(Option<u64>, Generation), StoreError> {
        let db = open_db(&dir, GENERATION_SEGMENT_BYTES)?;
        let first = db
            .get(FIRST_KEY)
            .map_err(StoreError::sled("journal"))?
            .map(|v| decode_u64(&v));
        let last = db
            .scan_prefix([RECORD_PREFIX])
            .next_back()
            .transpose()
            .map_err(StoreError::sled("journal"))?
            .map(|(key, _)| seq_of(&key))
            .unwrap_or(first.unwrap_or(1) - 1);
        let bytes = db.size_on_disk().unwrap_or(0);
        let generation = Generation {
            dir,
            db: Some(db),
            last,
            bytes,
            compacted: false,
            decoded: None,
        };
        Ok((first, generation))
    }

    /// Puts a fresh generation to use from seq `first`, with `acked` in it (not flushed).
    fn activate(&mut self, first: u64, acked: u64) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        batch.insert(FIRST_KEY, &first.to_be_bytes());
        batch.insert(ACKED_KEY, &acked.to_be_bytes());
        self.db()
            .apply_batch(batch)
            .map_err(StoreError::sled("journal"))?;
        self.last = first - 1;
        self.bytes = 0;
        Ok(())
    }

    /// A compacted generation found on disk (`c-FIRST-LAST`), left closed.
    fn compacted(dir: PathBuf, last: u64) -> Generation {
        Generation {
            dir,
            db: None,
            last,
            bytes: 0,
            compacted: true,
            decoded: None,
        }
    }

    fn db(&self) -> &sled::Db {
        self.db
            .as_ref()
            .expect("a generation that takes records is open")
    }

    fn acked(&self) -> Result<u64, StoreError> {
        let Some(db) = &self.db else {
            return Ok(0);
        };
        Ok(db
            .get(ACKED_KEY)
            .map_err(StoreError::sled("journal"))?
            .map(|v| decode_u64(&v))
            .unwrap_or(0))
    }

    /// Appends the events ending at `last` as one record.
    fn write(&mut self, last: u64, record: &[u8]) -> Result<(), StoreError> {
        self.db()
            .insert(record_key(last), record)
            .map_err(StoreError::sled("journal"))?;
        self.last = last;
        self.bytes += record.len() as u64 + 9;
        Ok(())
    }

    /// Every event it holds, in order, from its first seq.
    fn all_events(db: &sled::Db) -> Result<Vec<Outbound>, StoreError> {
        let mut events = Vec::new();
        for item in db.scan_prefix([RECORD_PREFIX]) {
            let (_, value) = item.map_err(StoreError::sled("journal"))?;
            let record: Vec<Outbound> = postcard::from_bytes(&value).map_err(corrupt)?;
            events.extend(record);
        }
        Ok(events)
    }

    /// The events after `after` and up to `until`, appended to `out` up to `limit`.
    fn read(
        &mut self,
        after: u64,
        until: u64,
        limit: usize,
        out: &mut Vec<(u64, Outbound)>,
    ) -> Result<(), StoreError> {
        let mut push = |seq: u64, event: &Outbound| {
            if seq > until || out.len() >= limit {
                return false;
            }
            if seq > after {
                out.push((seq, event.clone()));
            }
            true
        };
        if self.compacted {
            if self.decoded.is_none() {
                let db = open_db(&self.dir, COMPACTED_SEGMENT_BYTES)?;
                self.decoded = Some(Generation::all_events(&db)?);
            }
            let events = self.decoded.as_deref().unwrap_or_default();
            let first = self.last + 1 - events.len() as u64;
            for (seq, event) in (first..).zip(events) {
                if !push(seq, event) {
                    break;
                }
            }
            return Ok(());
        }
        for item in self.db().range(record_key(after + 1)..) {
            let (key, value) = item.map_err(StoreError::sled("journal"))?;
            let last = seq_of(&key);
            let events: Vec<Outbound> = postcard::from_bytes(&value).map_err(corrupt)?;
            let first = last + 1 - events.len() as u64;
            for (seq, event) in (first..).zip(&events) {
                if !push(seq, event) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}

/// The mutable part of the journal.
#[derive(Debug)]
struct Inner {
    /// The seq the next append takes.
    next_seq: u64,
    /// Appended events not yet written to a generation: seqs `next_seq - pending.len()..`.
    pending: Vec<Outbound>,
    /// The highest seq written to a generation (flushed or not).
    inserted: u64,
    /// The generations by first seq; never empty; the newest takes records.
    generations: BTreeMap<u64, Generation>,
    /// The latest written entries, consecutive, ending at `inserted`.
    tail: VecDeque<(u64, Outbound)>,
    /// Start a fresh generation at the flusher's next turn if the newest has taken at
    /// least this many bytes (`u64::MAX`: no).
    reset_wanted: u64,
    /// Sealed generations (by first seq) to compact.
    compact_wanted: Vec<u64>,
    /// A generation opened ahead of time, so starting one costs no open on the flusher.
    spare: Option<Generation>,
    /// Whether a spare is being opened.
    spare_opening: bool,
    /// The id of the next generation directory.
    next_id: u64,
    /// When the relay last acknowledged something new.
    last_ack: Option<tokio::time::Instant>,
}

impl Inner {
    fn newest(&mut self) -> &mut Generation {
        self.generations
            .values_mut()
            .next_back()
            .expect("the journal always has a generation")
    }

    /// Whether the newest generation holds no record yet.
    fn newest_is_empty(&self) -> bool {
        let (first, newest) = self.generations.iter().next_back().expect("a generation");
        newest.last < *first
    }

    /// Removes the generations (but the newest) wholly acknowledged by `acked`.
    fn take_dead(&mut self, acked: u64) -> Vec<Generation> {
        let newest = *self.generations.keys().next_back().expect("a generation");
        let dead: Vec<u64> = self
            .generations
            .iter()
            .filter(|(first, generation)| **first != newest && generation.last <= acked)
            .map(|(first, _)| *first)
            .collect();
        dead.iter()
            .filter_map(|first| self.generations.remove(first))
            .collect()
    }
}

/// Deletes generations: their databases closed, then their directories.
fn delete(dead: Vec<Generation>) {
    for generation in dead {
        let Generation { dir, db, .. } = generation;
        drop(db);
        remove_generation_dir(&dir);
    }
}

/// Deletes generations off the async thread when there is a runtime (closing a sled
/// database flushes it), at once otherwise.
fn delete_later(dead: Vec<Generation>) {
    if dead.is_empty() {
        return;
    }
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            runtime.spawn_blocking(move || delete(dead));
        }
        Err(_) => delete(dead),
    }
}

/// Rewrites the sealed generation `db` (seqs `first..=last`) as one record in a fresh
/// database under `root`, and returns its directory.
fn compact(root: &Path, db: &sled::Db, first: u64, last: u64) -> Result<PathBuf, StoreError> {
    let events = Generation::all_events(db)?;
    if events.len() as u64 != last + 1 - first {
        return Err(corrupt(format!(
            "generation {first} holds {} events, not {}",
            events.len(),
            last + 1 - first
        )));
    }
    let record = postcard::to_allocvec(&events).map_err(corrupt)?;
    let building = root.join(format!("tmp-c-{first:020}"));
    if building.exists() {
        std::fs::remove_dir_all(&building).map_err(io("removing a half-built generation"))?;
    }
    let compacted = open_db(&building, COMPACTED_SEGMENT_BYTES)?;
    compacted
        .insert(record_key(last), record)
        .map_err(StoreError::sled("journal"))?;
    compacted
        .flush()
        .map_err(StoreError::sled("flushing a compacted generation"))?;
    drop(compacted);
    wait_closed(&building);
    let done = root.join(format!("c-{first:020}-{last:020}"));
    std::fs::rename(&building, &done).map_err(io("naming a compacted generation"))?;
    Ok(done)
}

fn generation_dir(root: &Path, id: u64) -> PathBuf {
    root.join(format!("g-{id:020}"))
}

/// The outbound journal.
#[derive(Debug)]
pub struct Journal {
    /// `state/journal/`.
    root: PathBuf,
    inner: Mutex<Inner>,
    /// The highest seq taken by an append (not necessarily written or flushed).
    written: AtomicU64,
    /// The highest seq covered by a completed flush.
    durable: watch::Sender<u64>,
    /// The highest seq a flush was issued for, completed or not.
    flush_issued: AtomicU64,
    /// Flushes out (at most [`FLUSHES_IN_FLIGHT`]).
    flushes: Arc<tokio::sync::Semaphore>,
    /// The highest seq the relay acknowledged.
    acked: AtomicU64,
    /// Wakes the flusher (shared with it, so the flusher need not keep the journal alive).
    flush_wanted: Arc<Notify>,
}

impl Journal {
    /// Opens the journal in `root` (creating it), resuming its sequence. Events left in the
    /// old `journal` tree of `store` (an older daemon's layout) are moved into it first.
    pub fn open(root: &Path, store: &sled::Db) -> Result<Arc<Journal>, StoreError> {
        std::fs::create_dir_all(root).map_err(io("creating the journal directory"))?;
        let mut generations = BTreeMap::new();
        let mut sealed = Vec::new();
        let listing = std::fs::read_dir(root).map_err(io("listing the journal directory"))?;
        let mut found = Vec::new();
        for item in listing {
            let item = item.map_err(io("listing the journal directory"))?;
            found.push((item.file_name().to_string_lossy().into_owned(), item.path()));
        }
        found.sort();
        let parse = |digits: &str| digits.parse::<u64>().ok().filter(|n| *n > 0);
        for (name, path) in &found {
            if name.starts_with("deleted-") || name.starts_with("tmp-") {
                if let Err(e) = std::fs::remove_dir_all(path) {
                    tracing::warn!(dir = %path.display(), "cannot remove a leftover journal directory: {e}");
                }
            } else if let Some((first, last)) = name
                .strip_prefix("c-")
                .and_then(|rest| rest.split_once('-'))
                .and_then(|(first, last)| Some((parse(first)?, parse(last)?)))
            {
                generations.insert(first, Generation::compacted(path.clone(), last));
            }
        }
        let mut next_id = 1;
        for (name, path) in &found {
            let Some(id) = name.strip_prefix("g-").and_then(parse) else {
                continue;
            };
            next_id = next_id.max(id + 1);
            let (first, generation) = Generation::open(path.clone())?;
            let doomed = match first {
                // A spare, never put to use.
                None => generation,
                Some(first) => match generations.remove(&first) {
                    None => {
                        generations.insert(first, generation);
                        continue;
                    }
                    // Compacted before an exit that left the original behind.
                    Some(compacted) if compacted.compacted => {
                        generations.insert(first, compacted);
                        generation
                    }
                    // Two with one first seq (a replaced or abandoned one survived an
                    // exit): keep the one holding more; the other must be empty.
                    Some(other) => {
                        let (kept, doomed) = if generation.last > other.last {
                            (generation, other)
                        } else {
                            (other, generation)
                        };
                        generations.insert(first, kept);
                        if doomed.last >= first {
                            tracing::error!(dir = %doomed.dir.display(), "two journal generations hold records from seq {first}; keeping the longer one and leaving this one on disk");
                            continue;
                        }
                        doomed
                    }
                },
            };
            delete(vec![doomed]);
        }
        // An empty generation that is not the newest was abandoned by an exit mid-roll.
        let newest_first = generations.keys().next_back().copied();
        let abandoned: Vec<u64> = generations
            .iter()
            .filter(|(first, g)| Some(**first) != newest_first && !g.compacted && g.last < **first)
            .map(|(first, _)| *first)
            .collect();
        for first in abandoned {
            delete(generations.remove(&first).into_iter().collect());
        }
        let mut acked = 0;
        for generation in generations.values() {
            acked = acked.max(generation.acked()?);
        }
        // A generation is deleted only once wholly acknowledged.
        if let Some(first) = generations.keys().next() {
            acked = acked.max(first - 1);
        }
        let mut last = generations
            .values()
            .map(|g| g.last)
            .max()
            .unwrap_or(0)
            .max(acked);
        let meta = store.open_tree("meta").map_err(StoreError::sled("meta"))?;
        if let Some(saved) = meta.get(META_ACKED_KEY).map_err(StoreError::sled("meta"))? {
            acked = acked.max(decode_u64(&saved));
        }
        let (legacy_acked, legacy) = migrate_legacy(store, last)?;
        acked = acked.max(legacy_acked);
        last = last.max(acked);
        if acked >= last && legacy.is_empty() && !generations.is_empty() {
            // Nothing to deliver: start afresh, so what was trimmed is given back now (sled
            // also adds a segment to a database each time it opens it). The sequence is
            // kept in the store while no generation holds it.
            meta.insert(META_ACKED_KEY, &acked.to_be_bytes())
                .map_err(StoreError::sled("meta"))?;
            store.flush().map_err(StoreError::sled("meta"))?;
            delete(std::mem::take(&mut generations).into_values().collect());
        }
        // Always a fresh generation to take records: sled adds a segment to a database
        // each time it opens it, so the one that took records before the exit is sealed
        // (and compacted, if it holds events to deliver) rather than written to again. An
        // empty one is replaced (deleted once the fresh one, which takes its first seq and
        // the sequence, is durable).
        let replaced = match generations.last_key_value() {
            Some((first, newest)) if !newest.compacted && newest.last < *first => {
                generations.pop_last().map(|(_, g)| g)
            }
            _ => None,
        };
        {
            let first = legacy.first().map(|(seq, _)| *seq).unwrap_or(last + 1);
            let (_, mut generation) = Generation::open(generation_dir(root, next_id))?;
            next_id += 1;
            generation.activate(first, acked)?;
            if let Some(&(record_last, _)) = legacy.last() {
                let events: Vec<Outbound> = legacy.into_iter().map(|(_, e)| e).collect();
                let record = postcard::to_allocvec(&events).map_err(corrupt)?;
                generation.write(record_last, &record)?;
            }
            generation
                .db()
                .flush()
                .map_err(StoreError::sled("journal"))?;
            last = last.max(generation.last);
            generations.insert(first, generation);
            delete(replaced.into_iter().collect());
            if store
                .tree_names()
                .iter()
                .any(|name| name.as_ref() == b"journal")
            {
                store
                    .drop_tree("journal")
                    .map_err(StoreError::sled("journal"))?;
            }
        }
        // Sealed generations not compacted yet (an exit came first).
        let newest = *generations.keys().next_back().expect("a generation");
        for (first, generation) in &generations {
            if *first != newest && !generation.compacted && generation.last > acked {
                sealed.push(*first);
            }
        }
        let (durable, _) = watch::channel(last);
        let mut inner = Inner {
            next_seq: last + 1,
            pending: Vec::new(),
            inserted: last,
            generations,
            tail: VecDeque::new(),
            reset_wanted: u64::MAX,
            compact_wanted: sealed,
            spare: None,
            spare_opening: false,
            next_id,
            last_ack: None,
        };
        delete(inner.take_dead(acked));
        Ok(Arc::new(Journal {
            root: root.to_owned(),
            inner: Mutex::new(inner),
            written: AtomicU64::new(last),
            durable,
            acked: AtomicU64::new(acked),
            flush_wanted: Arc::new(Notify::new()),
            flush_issued: AtomicU64::new(last),
            flushes: Arc::new(tokio::sync::Semaphore::new(FLUSHES_IN_FLIGHT)),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().expect("journal lock poisoned")
    }

    /// Runs the flusher until the journal is dropped. Spawn it once. It holds only a weak
    /// reference, so dropping the journal closes its databases.
    pub async fn run_flusher(self: Arc<Journal>) {
        let wake = Arc::clone(&self.flush_wanted);
        if !self.lock().compact_wanted.is_empty() {
            wake.notify_one();
        }
        let journal = Arc::downgrade(&self);
        drop(self);
        loop {
            // Idle with everything acknowledged but records in the newest generation: start
            // afresh after a while, however little it holds.
            let idle_reset = journal.upgrade().is_some_and(|j| j.idle_reset_possible());
            if idle_reset {
                if tokio::time::timeout(IDLE_RESET_AFTER, wake.notified())
                    .await
                    .is_err()
                {
                    let Some(journal) = journal.upgrade() else {
                        return;
                    };
                    if journal.idle_reset_possible() {
                        journal.lock().reset_wanted = 1;
                    }
                }
            } else {
                wake.notified().await;
            }
            // Let every client whose requests have arrived append them first (a yielded
            // task runs after the other ready ones and a poll of the sockets), so they share
            // this group's write and flush rather than each paying for one.
            tokio::task::yield_now().await;
            let Some(journal) = journal.upgrade() else {
                return;
            };
            if let Err(e) = journal.flush_turn().await {
                tracing::error!("journal write failed; retrying: {e}");
                wake.notify_one();
                drop(journal);
                tokio::time::sleep(FLUSH_RETRY).await;
            }
        }
    }

    /// Whether everything is acknowledged while the newest generation holds records.
    fn idle_reset_possible(&self) -> bool {
        let inner = self.lock();
        inner.pending.is_empty() && self.acked() >= inner.inserted && !inner.newest_is_empty()
    }

    /// One turn of the flusher: start a new generation if one is due, write the pending
    /// group as one record, flush it, publish it as durable; start due compactions.
    async fn flush_turn(self: &Arc<Journal>) -> Result<(), StoreError> {
        let roll = {
            let mut inner = self.lock();
            let bytes = inner.newest().bytes;
            // An empty generation is never replaced (the new one would have its name).
            let due =
                !inner.newest_is_empty() && (bytes >= ROLL_BYTES || bytes >= inner.reset_wanted);
            inner.reset_wanted = u64::MAX;
            due.then(|| inner.inserted + 1)
        };
        if let Some(first) = roll {
            self.start_generation(first).await?;
        }
        self.prepare_spare();
        let (db, target, compactions) = {
            let mut inner = self.lock();
            if !inner.pending.is_empty() {
                let last = inner.next_seq - 1;
                let record = postcard::to_allocvec(&inner.pending).map_err(corrupt)?;
                inner.newest().write(last, &record)?;
                let first = last + 1 - inner.pending.len() as u64;
                let pending = std::mem::take(&mut inner.pending);
                inner.tail.extend((first..).zip(pending));
                let excess = inner.tail.len().saturating_sub(TAIL_ENTRIES);
                inner.tail.drain(..excess);
                inner.inserted = last;
            }
            let compactions = std::mem::take(&mut inner.compact_wanted);
            (inner.newest().db().clone(), inner.inserted, compactions)
        };
        if !compactions.is_empty() {
            // While the relay acknowledges, what was just sealed is usually acknowledged, and
            // deleted, within moments: compacting it at once would write a copy only to
            // delete it. It waits; a relay that is away or falling behind leaves it
            // unacknowledged, and it is compacted then.
            let acknowledging = self
                .lock()
                .last_ack
                .is_some_and(|at| at.elapsed() < COMPACT_DELAY);
            let journal = Arc::downgrade(self);
            tokio::spawn(async move {
                if acknowledging {
                    tokio::time::sleep(COMPACT_DELAY).await;
                }
                for first in compactions {
                    let Some(journal) = journal.upgrade() else {
                        return;
                    };
                    tokio::spawn(journal.compact_generation(first));
                }
            });
        }
        if target <= self.flush_issued.load(Ordering::Acquire) {
            return Ok(());
        }
        let permit = Arc::clone(&self.flushes)
            .acquire_owned()
            .await
            .expect("the flush semaphore is never closed");
        self.flush_issued.fetch_max(target, Ordering::AcqRel);
        // The flush runs on its own: the flusher takes the next group meanwhile. A flush
        // covers everything written before it (sled's stable prefix), so `durable` may move
        // to its target whichever flush completes first.
        let journal = Arc::downgrade(self);
        let wake = Arc::clone(&self.flush_wanted);
        tokio::spawn(async move {
            // On a blocking thread, not with sled's `flush_async`: that runs the flush on
            // sled's thread pool, which wakes all seven of its idle threads for each task it
            // is given (and the flush's write is another), once per group.
            let flushed = tokio::task::spawn_blocking(move || db.flush()).await;
            drop(permit);
            let Some(journal) = journal.upgrade() else {
                return;
            };
            let error = match flushed {
                Ok(Ok(_)) => {
                    journal.durable.send_if_modified(|durable| {
                        let advanced = target > *durable;
                        *durable = (*durable).max(target);
                        advanced
                    });
                    return;
                }
                Ok(Err(e)) => StoreError::sled("flushing the journal")(e),
                Err(e) => io("flushing the journal")(std::io::Error::other(e)),
            };
            tracing::error!("journal flush failed; retrying: {error}");
            // Issued again by the next turn.
            journal
                .flush_issued
                .store(*journal.durable.borrow(), Ordering::Release);
            drop(journal);
            tokio::time::sleep(FLUSH_RETRY).await;
            wake.notify_one();
        });
        Ok(())
    }

    /// Opens the next spare generation in the background, unless one is ready or coming.
    fn prepare_spare(self: &Arc<Journal>) {
        let dir = {
            let mut inner = self.lock();
            if inner.spare.is_some() || inner.spare_opening {
                return;
            }
            inner.spare_opening = true;
            let id = inner.next_id;
            inner.next_id += 1;
            generation_dir(&self.root, id)
        };
        let journal = Arc::downgrade(self);
        tokio::spawn(async move {
            let opened = tokio::task::spawn_blocking(move || Generation::open(dir)).await;
            let Some(journal) = journal.upgrade() else {
                return;
            };
            let mut inner = journal.lock();
            inner.spare_opening = false;
            match opened {
                Ok(Ok((_, spare))) => inner.spare = Some(spare),
                Ok(Err(e)) => tracing::warn!("cannot open a spare journal generation: {e}"),
                Err(e) => tracing::warn!("opening a spare journal generation panicked: {e}"),
            }
        });
    }

    /// Makes a fresh generation (the spare, or one opened now) the newest from seq `first`,
    /// with the current `acked` in it, flushed; deletes the generations that are wholly
    /// acknowledged and has the one it sealed compacted if it still holds events to
    /// deliver.
    async fn start_generation(self: &Arc<Journal>, first: u64) -> Result<(), StoreError> {
        // What the sealed generation holds must be on disk before `durable` can pass it:
        // only the newest is flushed from now on.
        let sealing = self.lock().newest().db().clone();
        sealing
            .flush_async()
            .await
            .map_err(StoreError::sled("flushing the journal"))?;
        let spare = self.lock().spare.take();
        let mut generation = match spare {
            Some(spare) => spare,
            None => {
                let dir = {
                    let mut inner = self.lock();
                    let id = inner.next_id;
                    inner.next_id += 1;
                    generation_dir(&self.root, id)
                };
                tokio::task::spawn_blocking(move || Generation::open(dir))
                    .await
                    .map_err(|e| corrupt(format!("opening a journal generation panicked: {e}")))??
                    .1
            }
        };
        // Durable before anything older is deleted: it holds the sequence from now on. A
        // generation activated and then abandoned is deleted (and one an exit leaves behind
        // is, at the next open).
        let activated = match generation.activate(first, self.acked()) {
            Ok(()) => generation
                .db()
                .flush_async()
                .await
                .map(|_| ())
                .map_err(StoreError::sled("flushing the journal")),
            Err(e) => Err(e),
        };
        if let Err(e) = activated {
            delete_later(vec![generation]);
            return Err(e);
        }
        let dead = {
            let mut inner = self.lock();
            if inner.inserted + 1 != first {
                // The sequence moved meanwhile (`skip_to`): keep the current generation
                // rather than leave a gap.
                drop(inner);
                delete_later(vec![generation]);
                return Ok(());
            }
            let sealed = *inner.generations.keys().next_back().expect("a generation");
            inner.generations.insert(first, generation);
            let dead = inner.take_dead(self.acked());
            if inner.generations.contains_key(&sealed) {
                inner.compact_wanted.push(sealed);
            }
            dead
        };
        delete_later(dead);
        Ok(())
    }

    /// Compacts the sealed generation starting at `first` (see the module docs).
    async fn compact_generation(self: Arc<Journal>, first: u64) {
        let source = {
            let inner = self.lock();
            inner
                .generations
                .get(&first)
                .filter(|g| !g.compacted)
                .and_then(|g| Some((g.db.clone()?, g.last)))
        };
        let Some((db, last)) = source else {
            return;
        };
        let root = self.root.clone();
        let built = tokio::task::spawn_blocking(move || compact(&root, &db, first, last)).await;
        let dir = match built {
            Ok(Ok(dir)) => dir,
            Ok(Err(e)) => {
                tracing::warn!(
                    "cannot compact journal generation {first}; keeping it as it is: {e}"
                );
                return;
            }
            Err(e) => {
                tracing::warn!("compacting journal generation {first} panicked: {e}");
                return;
            }
        };
        let replaced = {
            let mut inner = self.lock();
            match inner.generations.get_mut(&first) {
                Some(generation) if !generation.compacted => {
                    let original = Generation {
                        dir: std::mem::replace(&mut generation.dir, dir),
                        db: generation.db.take(),
                        last,
                        bytes: 0,
                        compacted: false,
                        decoded: None,
                    };
                    generation.compacted = true;
                    original
                }
                // Acknowledged (and deleted) meanwhile: the copy is not needed.
                _ => Generation::compacted(dir, last),
            }
        };
        delete_later(vec![replaced]);
    }

    /// Takes the next seq for `event`, to be written with the next group; pair with
    /// [`Journal::wait_durable`] before telling anyone it is queued.
    pub fn append_unflushed(&self, event: Outbound) -> Result<u64, StoreError> {
        let seq = {
            let mut inner = self.lock();
            let seq = inner.next_seq;
            inner.next_seq += 1;
            inner.pending.push(event);
            self.written.store(seq, Ordering::Release);
            seq
        };
        self.flush_wanted.notify_one();
        Ok(seq)
    }

    /// Waits until every entry up to `seq` is flushed.
    pub async fn wait_durable(&self, seq: u64) {
        let mut durable = self.durable.subscribe();
        // The sender lives in `self`, so the wait ends only by reaching `seq`.
        let _ = durable.wait_for(|d| *d >= seq).await;
    }

    /// Appends `event` and waits until it is on disk. Returns its seq.
    pub async fn append(&self, event: Outbound) -> Result<u64, StoreError> {
        let seq = self.append_unflushed(event)?;
        self.wait_durable(seq).await;
        Ok(seq)
    }

    /// Follows the highest durable seq (the bridge sends only durable entries).
    pub fn durable(&self) -> watch::Receiver<u64> {
        self.durable.subscribe()
    }

    /// The durable, unacknowledged entries after `after`, at most `limit` of them, in order.
    pub fn read_after(&self, after: u64, limit: usize) -> Result<Vec<(u64, Outbound)>, StoreError> {
        let mut entries = Vec::new();
        self.for_each_after(after, limit, |seq, event| {
            entries.push((seq, event.clone()));
        })?;
        Ok(entries)
    }

    /// Calls `each` with the durable, unacknowledged entries after `after`, at most `limit`
    /// of them, in order, without copying those still in the tail (the bridge encodes them
    /// from here). `each` runs under the journal's lock: it must not call the journal.
    pub fn for_each_after(
        &self,
        after: u64,
        limit: usize,
        mut each: impl FnMut(u64, &Outbound),
    ) -> Result<(), StoreError> {
        let durable = *self.durable.borrow();
        let after = after.max(self.acked());
        if after >= durable || limit == 0 {
            return Ok(());
        }
        let mut inner = self.lock();
        if let Some(&(front, _)) = inner.tail.front() {
            if front <= after + 1 {
                let start = usize::try_from(after + 1 - front).unwrap_or(usize::MAX);
                for (seq, event) in inner
                    .tail
                    .iter()
                    .skip(start)
                    .take_while(|(seq, _)| *seq <= durable)
                    .take(limit)
                {
                    each(*seq, event);
                }
                return Ok(());
            }
        }
        let mut entries = Vec::new();
        for generation in inner.generations.values_mut() {
            if generation.last <= after {
                // Read past: a compacted generation's decoded events are not needed again.
                generation.decoded = None;
                continue;
            }
            if entries.len() >= limit {
                break;
            }
            generation.read(after, durable, limit, &mut entries)?;
        }
        drop(inner);
        for (seq, event) in &entries {
            each(*seq, event);
        }
        Ok(())
    }

    /// The relay has everything up to `seq`: forget it. Acks never go backwards.
    pub fn trim(&self, seq: u64) -> Result<(), StoreError> {
        let previous = self.acked.fetch_max(seq, Ordering::AcqRel);
        if seq <= previous {
            return Ok(());
        }
        let (dead, reset) = {
            let mut inner = self.lock();
            inner.last_ack = Some(tokio::time::Instant::now());
            while inner.tail.front().is_some_and(|(s, _)| *s <= seq) {
                inner.tail.pop_front();
            }
            // Not flushed here: losing a trim to a crash only resends acknowledged events,
            // which the relay deduplicates.
            inner
                .newest()
                .db()
                .insert(ACKED_KEY, &seq.to_be_bytes())
                .map_err(StoreError::sled("journal"))?;
            let everything = inner.pending.is_empty() && seq >= inner.inserted;
            let reset = everything && inner.newest().bytes >= RESET_BYTES;
            if reset {
                inner.reset_wanted = inner.reset_wanted.min(RESET_BYTES);
            }
            (inner.take_dead(seq), everything)
        };
        delete_later(dead);
        if reset {
            // A reset now, or (below RESET_BYTES) the flusher's idle timer.
            self.flush_wanted.notify_one();
        }
        Ok(())
    }

    /// Moves the sequence past `seq` (everything up to it counts as acknowledged), so new
    /// events never reuse a seq the relay already holds. The move is flushed at once (a
    /// crash must not bring the sequence back below `seq`), and the next records go to a
    /// fresh generation, so none holds a gap.
    pub fn skip_to(&self, seq: u64) -> Result<(), StoreError> {
        let skipped = {
            let mut inner = self.lock();
            let skipped = inner.next_seq <= seq;
            if skipped {
                // Anything pending is covered by the relay's ack.
                inner.pending.clear();
                inner.tail.clear();
                inner.next_seq = seq.saturating_add(1);
                inner.inserted = seq;
                inner.newest().last = seq;
                inner.reset_wanted = 0;
                self.written.fetch_max(seq, Ordering::AcqRel);
                self.durable.send_if_modified(|durable| {
                    let advanced = seq > *durable;
                    *durable = (*durable).max(seq);
                    advanced
                });
            }
            skipped
        };
        self.trim(seq)?;
        if skipped {
            let newest = self.lock().newest().db().clone();
            newest
                .flush()
                .map_err(StoreError::sled("flushing the journal"))?;
            self.flush_wanted.notify_one();
        }
        Ok(())
    }

    /// The highest seq taken so far.
    pub fn last_written(&self) -> u64 {
        self.written.load(Ordering::Acquire)
    }

    /// The highest acknowledged seq.
    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::Acquire)
    }

    /// Events taken but not yet acknowledged.
    pub fn depth(&self) -> u64 {
        self.written
            .load(Ordering::Acquire)
            .saturating_sub(self.acked())
    }

    /// How many generations the journal has (for tests and status).
    pub fn generations(&self) -> usize {
        self.lock().generations.len()
    }
}

/// Reads what an older daemon left in the store's `journal` tree: its `acked` seq and its
/// unacknowledged events after `after`. The tree is dropped by the caller once they are
/// safely in a generation.
fn migrate_legacy(store: &sled::Db, after: u64) -> Result<(u64, Vec<(u64, Outbound)>), StoreError> {
    if !store
        .tree_names()
        .iter()
        .any(|name| name.as_ref() == b"journal")
    {
        return Ok((0, Vec::new()));
    }
    let tree = store
        .open_tree("journal")
        .map_err(StoreError::sled("journal"))?;
    let acked = tree
        .get(ACKED_KEY)
        .map_err(StoreError::sled("journal"))?
        .map(|v| decode_u64(&v))
        .unwrap_or(0);
    let mut events = Vec::new();
    for item in tree.scan_prefix([b'e']) {
        let (key, value) = item.map_err(StoreError::sled("journal"))?;
        let seq = seq_of(&key);
        if seq > acked.max(after) {
            events.push((seq, postcard::from_bytes(&value).map_err(corrupt)?));
        }
    }
    // Keep only a gapless run (the old journal had no gaps; be strict anyway).
    let mut run = Vec::new();
    for (seq, event) in events {
        if run
            .last()
            .is_none_or(|(last, _): &(u64, Outbound)| seq == last + 1)
        {
            run.push((seq, event));
        } else {
            tracing::warn!(
                seq,
                "the old journal has a gap; events after it are dropped"
            );
            break;
        }
    }
    Ok((acked, run))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(n: usize) -> Outbound {
        Outbound::UserMessage {
            session: "s-1".into(),
            text: format!("message {n}"),
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
        journal.wait_durable(seq).await;
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
            journal.wait_durable(last).await;
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
                Generation::open(dir.path().join("journal").join("g-00000000000000000099"))
                    .unwrap();
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
}
