//! One generation of the journal: a sled database in its own directory, holding records of
//! consecutive seqs, and what is done to whole directories (compacting, deleting).
//!
//! A generation that takes records is `g-ID`; it keeps its first seq under `first` (absent
//! in a spare) and the highest acknowledged seq under `acked`. A compacted one is
//! `c-FIRST-LAST`: one record in a fresh database, built as `tmp-…` and renamed into place
//! once flushed. A generation being deleted is renamed `deleted-…` first. An empty file
//! `void-FIRST-LAST` says that the generation starting at FIRST failed to write and ends
//! at LAST: what it holds after LAST was refused and is never read.
//!
//! Architecture invariant: nothing here takes sled's process-wide write lock (no
//! `apply_batch`, no transaction: see [`crate::store`]), and a database that returned a
//! write error is [quarantined](quarantine): never flushed or closed again.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cloud_protocol::bridge::Outbound;

use crate::store::StoreError;

/// sled's cache per generation: reads are rare (the tail serves the bridge).
const GENERATION_CACHE_BYTES: u64 = 1024 * 1024;
/// sled's segment size per generation. A value above a quarter of it is a blob file of its
/// own: a compacted generation's one record is; a group's record seldom is.
pub(super) const GENERATION_SEGMENT_BYTES: usize = 256 * 1024;
/// sled's segment size for a compacted generation: small, because opening a database
/// to read it may add a segment, and its one record is a blob file anyway.
const COMPACTED_SEGMENT_BYTES: usize = 16 * 1024;
/// How long a deletion waits for sled to let go of a closed database.
const CLOSE_DEADLINE: Duration = Duration::from_secs(10);

/// The key under which the highest acknowledged seq is kept.
pub(super) const ACKED_KEY: &[u8] = b"acked";
/// The key under which a generation keeps its first seq (absent in a spare).
const FIRST_KEY: &[u8] = b"first";
/// Record keys: this prefix and the seq of the record's last event, big-endian.
const RECORD_PREFIX: u8 = b'r';

pub(super) fn record_key(seq: u64) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = RECORD_PREFIX;
    key[1..].copy_from_slice(&seq.to_be_bytes());
    key
}

/// The seq of a record key; a key of another length is a damaged journal.
pub(super) fn seq_of(key: &[u8]) -> Result<u64, StoreError> {
    key.get(1..)
        .and_then(|seq| <[u8; 8]>::try_from(seq).ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| corrupt(format!("a record key of {} bytes", key.len())))
}

/// The seq of the first of `len` events in a record ending at `last` (seqs start at 1).
fn first_of(last: u64, len: usize) -> Result<u64, StoreError> {
    last.checked_add(1)
        .and_then(|end| end.checked_sub(len as u64))
        .filter(|first| *first > 0)
        .ok_or_else(|| corrupt(format!("a record ending at seq {last} holds {len} events")))
}

pub(super) fn decode_u64(value: &[u8]) -> u64 {
    u64::from_be_bytes(value.try_into().unwrap_or([0; 8]))
}

pub(super) fn corrupt(message: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        what: "journal",
        message: message.to_string(),
    }
}

pub(super) fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> StoreError {
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

/// Makes sure `db` is never flushed or closed again, by leaking one reference to it.
///
/// sled 0.34 can leave a database unable to complete any flush after a failed write: a
/// blob that cannot be written (a full disk) leaves its log buffer waiting for a writer
/// that never finishes, and every later flush, including the one sled makes when the last
/// reference is dropped, waits forever while holding sled's process-wide read lock (which
/// then blocks every writer and, behind it, every reader of every sled database in the
/// process). Its files stay open until the process exits, so the space it holds comes back
/// only then.
pub(super) fn quarantine(db: &sled::Db) {
    std::mem::forget(db.clone());
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

/// Deletes a generation's directory: renamed to `deleted-…`, then removed. Unless its
/// database was quarantined (it stays open), the database is closed first.
pub(super) fn remove_generation_dir(dir: &Path, quarantined: bool) {
    if !quarantined {
        wait_closed(dir);
    }
    let Some(name) = dir.file_name().and_then(|n| n.to_str()) else {
        return;
    };
    let doomed = dir.with_file_name(format!("deleted-{name}"));
    let removed = std::fs::rename(dir, &doomed).and_then(|()| std::fs::remove_dir_all(&doomed));
    if let Err(e) = removed {
        tracing::warn!(dir = %dir.display(), "cannot delete a journal generation: {e}");
    }
}

/// One generation: a sled database holding records of consecutive seqs.
#[derive(Debug)]
pub(super) struct Generation {
    pub(super) dir: PathBuf,
    /// Its database while open: the newest always is; a compacted one only while read.
    pub(super) db: Option<sled::Db>,
    /// The seq of its last event (its first seq − 1 while empty).
    pub(super) last: u64,
    /// Bytes of records written to it since it was opened (or found on disk).
    pub(super) bytes: u64,
    /// Whether it is compacted (one record).
    pub(super) compacted: bool,
    /// Whether its database was quarantined after a failed write.
    pub(super) quarantined: bool,
    /// The `void-FIRST-LAST` file that ends it at `last`, after a failed write; removed
    /// with it.
    pub(super) void_marker: Option<PathBuf>,
    /// A compacted generation's events, decoded while it is being read.
    pub(super) decoded: Option<Vec<Outbound>>,
}

impl Generation {
    /// Opens (creating) a generation that takes records (`g-ID`). Returns its first seq
    /// too, `None` for one never put to use (a spare).
    pub(super) fn open(dir: PathBuf) -> Result<(Option<u64>, Generation), StoreError> {
        let db = open_db(&dir, GENERATION_SEGMENT_BYTES)?;
        let first = db
            .get(FIRST_KEY)
            .map_err(StoreError::sled("journal"))?
            .map(|v| decode_u64(&v));
        if first == Some(0) {
            return Err(corrupt("a generation whose first seq is 0"));
        }
        let last = db
            .scan_prefix([RECORD_PREFIX])
            .next_back()
            .transpose()
            .map_err(StoreError::sled("journal"))?
            .map(|(key, _)| seq_of(&key))
            .transpose()?
            .unwrap_or(first.unwrap_or(1) - 1);
        let bytes = db.size_on_disk().unwrap_or(0);
        let generation = Generation {
            dir,
            db: Some(db),
            last,
            bytes,
            compacted: false,
            quarantined: false,
            void_marker: None,
            decoded: None,
        };
        Ok((first, generation))
    }

    /// Creates a fresh generation in `dir` (a spare: no `first` yet). What sled made of a
    /// directory it could not open (a full disk) is removed: nothing holds it.
    pub(super) fn create(dir: PathBuf) -> Result<Generation, StoreError> {
        match Generation::open(dir.clone()) {
            Ok((_, generation)) => Ok(generation),
            Err(e) => {
                if let Err(removing) = std::fs::remove_dir_all(&dir) {
                    tracing::warn!(dir = %dir.display(), "cannot remove a journal generation that failed to open: {removing}");
                }
                Err(e)
            }
        }
    }

    /// Puts a fresh generation to use from seq `first`, with `acked` in it (not flushed).
    /// `first` goes in last: a generation without it is a spare, whatever else it holds.
    pub(super) fn activate(&mut self, first: u64, acked: u64) -> Result<(), StoreError> {
        let db = self.db();
        let inserted = db
            .insert(ACKED_KEY, &acked.to_be_bytes())
            .and_then(|_| db.insert(FIRST_KEY, &first.to_be_bytes()));
        if let Err(e) = inserted {
            self.quarantine();
            return Err(StoreError::sled("journal")(e));
        }
        self.last = first - 1;
        self.bytes = 0;
        Ok(())
    }

    /// A compacted generation found on disk or just built (`c-FIRST-LAST`), left closed.
    pub(super) fn compacted(dir: PathBuf, last: u64) -> Generation {
        Generation {
            dir,
            db: None,
            last,
            bytes: 0,
            compacted: true,
            quarantined: false,
            void_marker: None,
            decoded: None,
        }
    }

    pub(super) fn db(&self) -> &sled::Db {
        self.db
            .as_ref()
            .expect("a generation that takes records is open")
    }

    /// Never flushes or closes its database again (see [`quarantine`]).
    pub(super) fn quarantine(&mut self) {
        if let Some(db) = &self.db {
            if !self.quarantined {
                quarantine(db);
            }
        }
        self.quarantined = true;
    }

    pub(super) fn acked(&self) -> Result<u64, StoreError> {
        let Some(db) = &self.db else {
            return Ok(0);
        };
        Ok(db
            .get(ACKED_KEY)
            .map_err(StoreError::sled("journal"))?
            .map(|v| decode_u64(&v))
            .unwrap_or(0))
    }

    /// Appends the events ending at `last` as one record. A failed write quarantines the
    /// database.
    pub(super) fn write(&mut self, last: u64, record: &[u8]) -> Result<(), StoreError> {
        if let Err(e) = self.db().insert(record_key(last), record) {
            self.quarantine();
            return Err(StoreError::sled("journal")(e));
        }
        self.last = last;
        self.bytes += record.len() as u64 + 9;
        Ok(())
    }

    /// Every event it holds, in order, from its first seq.
    pub(super) fn all_events(db: &sled::Db) -> Result<Vec<Outbound>, StoreError> {
        let mut events = Vec::new();
        for item in db.scan_prefix([RECORD_PREFIX]) {
            let (_, value) = item.map_err(StoreError::sled("journal"))?;
            let record: Vec<Outbound> = postcard::from_bytes(&value).map_err(corrupt)?;
            events.extend(record);
        }
        Ok(events)
    }

    /// The events after `after` and up to `until`, appended to `out` up to `limit`.
    pub(super) fn read(
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
            let first = first_of(self.last, events.len())?;
            for (seq, event) in (first..).zip(events) {
                if !push(seq, event) {
                    break;
                }
            }
            return Ok(());
        }
        for item in self.db().range(record_key(after + 1)..) {
            let (key, value) = item.map_err(StoreError::sled("journal"))?;
            let last = seq_of(&key)?;
            // Never past `last` of a generation: a failed one may hold records written
            // after its last flushed one, which were refused.
            if last > self.last {
                break;
            }
            let events: Vec<Outbound> = postcard::from_bytes(&value).map_err(corrupt)?;
            let first = first_of(last, events.len())?;
            for (seq, event) in (first..).zip(&events) {
                if !push(seq, event) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}

/// Deletes generations: their databases closed (unless quarantined), then their
/// directories.
pub(super) fn delete(dead: Vec<Generation>) {
    for generation in dead {
        let Generation {
            dir,
            db,
            quarantined,
            void_marker,
            ..
        } = generation;
        drop(db);
        remove_generation_dir(&dir, quarantined);
        // Only once the generation is gone: until then it says where it ends.
        if let Some(marker) = void_marker {
            if let Err(e) = std::fs::remove_file(&marker) {
                tracing::warn!(file = %marker.display(), "cannot remove a journal marker: {e}");
            }
        }
    }
}

/// Deletes generations off the async thread when there is a runtime (closing a sled
/// database flushes it), at once otherwise.
pub(super) fn delete_later(dead: Vec<Generation>) {
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
/// database under `root`, and returns its directory. Records past `last` (refused, in a
/// generation that failed) are left out.
pub(super) fn compact(
    root: &Path,
    db: &sled::Db,
    first: u64,
    last: u64,
) -> Result<PathBuf, StoreError> {
    let mut events = Generation::all_events(db)?;
    let expected = last + 1 - first;
    if (events.len() as u64) < expected {
        return Err(corrupt(format!(
            "generation {first} holds {} events, not {expected}",
            events.len(),
        )));
    }
    events.truncate(expected as usize);
    write_compacted(root, &events, first, last)
}

/// Writes `events` (seqs `first..=last`) as one record in a fresh database under `root`
/// (`tmp-c-FIRST`, renamed `c-FIRST-LAST` once flushed), and returns its directory.
pub(super) fn write_compacted(
    root: &Path,
    events: &[Outbound],
    first: u64,
    last: u64,
) -> Result<PathBuf, StoreError> {
    debug_assert_eq!(events.len() as u64, last + 1 - first);
    let record = postcard::to_allocvec(events).map_err(corrupt)?;
    let building = root.join(format!("tmp-c-{first:020}"));
    if building.exists() {
        std::fs::remove_dir_all(&building).map_err(io("removing a half-built generation"))?;
    }
    let compacted = open_db(&building, COMPACTED_SEGMENT_BYTES)?;
    let written = compacted
        .insert(record_key(last), record)
        .map_err(StoreError::sled("journal"))
        .and_then(|_| {
            compacted
                .flush()
                .map_err(StoreError::sled("flushing a compacted generation"))
        });
    if let Err(e) = written {
        quarantine(&compacted);
        drop(compacted);
        remove_generation_dir(&building, true);
        return Err(e);
    }
    drop(compacted);
    wait_closed(&building);
    let done = root.join(format!("c-{first:020}-{last:020}"));
    std::fs::rename(&building, &done).map_err(io("naming a compacted generation"))?;
    Ok(done)
}

pub(super) fn generation_dir(root: &Path, id: u64) -> PathBuf {
    root.join(format!("g-{id:020}"))
}
