//! Getting the journal to a state it can write in: at start, from whatever an exit left
//! on disk ([`Journal::open`]), and while running, after a write failed ([`Journal::fail`],
//! then [`Journal::recover`]).
//!
//! **At start.** Leftovers of an exit are removed (`tmp-`, `deleted-`, a spare, an original
//! whose compacted copy exists, an empty generation that is not the newest or that shares
//! its first seq with one holding records), a `void-` file ends its generation where it
//! says, and a fresh generation always takes the records (sled adds a segment to a
//! database each time it opens it, so the journal never writes to a reopened one).
//!
//! **After a failed write.** [`Journal::fail`] stops the journal at once: what was taken
//! but not flushed is refused (its waiters get [`Unavailable`]; none of it was answered
//! `queued`), later appends are refused with the same error, and the generation being
//! written is abandoned: its database is quarantined (sled keeps a failed database's error
//! for good, and may never finish another flush of it), it ends at the last flushed seq,
//! and a `void-FIRST-LAST` file says so on disk at once, because records written after
//! that flush may still reach the disk and must never be sent, even after a restart.
//! Every [`super::RECOVERY_INTERVAL`] the flusher calls [`Journal::recover`]: once the disk has
//! [`RECOVERY_HEADROOM`] free, it starts a fresh generation after the refused seqs (which
//! are never used again, so a late waiter can never mistake a new event for its own), and
//! the abandoned generation is handled as any sealed one: compacted if it still holds
//! events to deliver, deleted once they are acknowledged (and its `void-` file with it).
//!
//! Architecture invariant: everything answered `queued` was flushed before the failure
//! and is still delivered; nothing refused is ever sent; a quarantined database is never
//! flushed or closed.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use cloud_protocol::bridge::Outbound;
use tokio::sync::{watch, Notify};

use super::generations::{
    self, corrupt, decode_u64, delete, generation_dir, io, seq_of, Generation,
    GENERATION_SEGMENT_BYTES,
};
use super::group_commit::flush_bounded;
use super::{Inner, Journal};
use crate::store::StoreError;

/// The key of the store's `meta` tree that keeps the highest acknowledged seq while the
/// journal is being started afresh.
const META_ACKED_KEY: &[u8] = b"journal_acked";
/// How many ranges of refused seqs are remembered for late waiters.
pub(super) const REMEMBERED_REFUSALS: usize = 1024;
/// The free space a recovery attempt waits for: a fresh generation's first segments and
/// sled's other files, and room to spare. Each attempt that fails on a full disk costs a
/// database whose files stay open (quarantined), so none is made without it.
pub const RECOVERY_HEADROOM: u64 = 4 * GENERATION_SEGMENT_BYTES as u64;

/// Why the journal takes no events: what went wrong, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.message())]
pub struct Unavailable {
    /// What went wrong, in a few words.
    problem: String,
    /// The journal's directory.
    dir: PathBuf,
    /// Whether the disk is full (or over quota): the user can free space.
    no_space: bool,
}

impl Unavailable {
    /// Describes `error`, which stopped the journal in `dir`.
    fn new(error: &StoreError, dir: &Path) -> Unavailable {
        let io_error = match error {
            StoreError::Sled {
                source: sled::Error::Io(e),
                ..
            }
            | StoreError::Io { source: e, .. } => Some(e),
            _ => None,
        };
        // sled keeps an error's kind but not its OS code when it passes it on.
        let no_space = io_error.is_some_and(|e| {
            matches!(
                e.kind(),
                std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
            ) || matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
        });
        let problem = match io_error {
            _ if no_space => "no space left on device".to_owned(),
            Some(e) => e.to_string(),
            None => error.to_string(),
        };
        Unavailable {
            problem,
            dir: dir.to_owned(),
            no_space,
        }
    }

    fn message(&self) -> String {
        let dir = self.dir.display();
        if self.no_space {
            format!("cannot queue: no space left on device for {dir}; free some space — cloudd retries by itself")
        } else {
            format!(
                "cannot queue: the journal in {dir} cannot be written ({}); check the disk — cloudd retries by itself",
                self.problem
            )
        }
    }

    /// Whether the disk is full.
    pub fn no_space(&self) -> bool {
        self.no_space
    }
}

/// A journal that cannot write.
#[derive(Debug)]
pub(super) struct Failure {
    /// What appends are told.
    pub(super) unavailable: Unavailable,
    /// The abandoned generation (by first seq).
    generation: u64,
    /// Its `void-` file, while it still has to be made.
    marker: Option<PathBuf>,
    /// When it failed.
    since: std::time::Instant,
    /// Recovery attempts so far.
    attempts: u64,
}

/// The free space of the file system holding `dir`, if it can be told.
fn available_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt as _;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: all-zero bytes are a valid `statvfs` (integers only).
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `stat` is a valid place to write the answer.
    let status = unsafe { libc::statvfs(path.as_ptr(), &mut stat) };
    // The fields' types differ between platforms (u32 on some).
    #[allow(clippy::useless_conversion)]
    let (blocks, block_size) = (u64::from(stat.f_bavail), u64::from(stat.f_frsize));
    (status == 0).then(|| blocks.saturating_mul(block_size))
}

/// Makes a `void-` file (empty: a file needs no data block, so this works on a full
/// disk).
fn make_marker(path: &Path) -> std::io::Result<()> {
    match std::fs::File::create_new(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
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
        let first_and_last = |rest: &str| {
            rest.split_once('-')
                .and_then(|(first, last)| Some((parse(first)?, last.parse::<u64>().ok()?)))
        };
        let mut voids = Vec::new();
        for (name, path) in &found {
            if name.starts_with("deleted-") || name.starts_with("tmp-") {
                if let Err(e) = std::fs::remove_dir_all(path) {
                    tracing::warn!(dir = %path.display(), "cannot remove a leftover journal directory: {e}");
                }
            } else if let Some((first, last)) = name.strip_prefix("c-").and_then(first_and_last) {
                generations.insert(first, Generation::compacted(path.clone(), last));
            } else if let Some((first, last)) = name.strip_prefix("void-").and_then(first_and_last)
            {
                voids.push((first, last, path.clone()));
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
        // A generation that failed to write ends where its `void-` file says: what it holds
        // after that was refused. A file whose generation is gone (or compacted, which
        // left that out) is not needed any more.
        for (first, last, marker) in voids {
            match generations.get_mut(&first) {
                Some(generation) if !generation.compacted && generation.void_marker.is_none() => {
                    generation.last = generation.last.min(last);
                    generation.void_marker = Some(marker);
                }
                _ => {
                    if let Err(e) = std::fs::remove_file(&marker) {
                        tracing::warn!(file = %marker.display(), "cannot remove a journal marker: {e}");
                    }
                }
            }
        }
        // An empty generation that is not the newest was abandoned by an exit mid-roll
        // (or failed before it held a flushed record).
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
        if last == u64::MAX {
            return Err(corrupt("a seq at the end of the sequence"));
        }
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
        // Checked again: a migrated legacy record may end the sequence.
        if last == u64::MAX {
            return Err(corrupt("a seq at the end of the sequence"));
        }
        let (durable, _) = watch::channel(last);
        let (refused_up_to, _) = watch::channel(0);
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
            failure: None,
            refused: VecDeque::new(),
            recovery_attempts: 0,
            failures: 0,
            last_ack: None,
        };
        delete(inner.take_dead(acked));
        Ok(Arc::new(Journal {
            root: root.to_owned(),
            inner: Mutex::new(inner),
            written: AtomicU64::new(last),
            durable,
            flush_issued: AtomicU64::new(last),
            flushes: Arc::new(tokio::sync::Semaphore::new(super::FLUSHES_IN_FLIGHT)),
            refused_up_to,
            acked: AtomicU64::new(acked),
            flush_wanted: Arc::new(Notify::new()),
        }))
    }

    /// Stops the journal after `error` (a failed write or flush of the newest generation,
    /// or of the one that was to follow it): see the module docs.
    pub(super) fn fail(&self, error: &StoreError) {
        let unavailable = Unavailable::new(error, &self.root);
        let (durable, taken) = {
            let mut inner = self.lock();
            if inner.failure.is_some() {
                return;
            }
            // Flushes still out never move `durable` now: what they cover is refused.
            inner.failures += 1;
            let durable = *self.durable.borrow();
            let taken = inner.next_seq - 1;
            inner.pending.clear();
            while inner.tail.back().is_some_and(|(seq, _)| *seq > durable) {
                inner.tail.pop_back();
            }
            inner.inserted = durable;
            let (&first, newest) = inner
                .generations
                .iter_mut()
                .next_back()
                .expect("a generation");
            newest.quarantine();
            // Records after the last flushed one may reach the disk anyway: the `void-`
            // file keeps them from ever being read, also after a restart.
            let mut marker = None;
            if newest.last > durable {
                newest.last = durable;
                let path = self.root.join(format!("void-{first:020}-{durable:020}"));
                match make_marker(&path) {
                    Ok(()) => newest.void_marker = Some(path),
                    Err(e) => {
                        tracing::warn!(file = %path.display(), "cannot mark where the failed journal generation ends yet: {e}");
                        marker = Some(path);
                    }
                }
            }
            if taken > durable {
                inner
                    .refused
                    .push_back((durable + 1, taken, unavailable.clone()));
                if inner.refused.len() > REMEMBERED_REFUSALS {
                    inner.refused.pop_front();
                }
            }
            inner.failure = Some(Failure {
                unavailable: unavailable.clone(),
                generation: first,
                marker,
                since: std::time::Instant::now(),
                attempts: 0,
            });
            (durable, taken)
        };
        if taken > durable {
            self.refused_up_to
                .send_modify(|up_to| *up_to = (*up_to).max(taken));
        }
        tracing::error!(
            n_refused = taken.saturating_sub(durable),
            "{unavailable} (events not yet flushed were refused; {error})"
        );
    }

    /// One recovery attempt (see the module docs): returns whether the journal takes
    /// events again.
    pub(super) async fn recover(self: &Arc<Journal>) -> bool {
        let attempts = {
            let mut inner = self.lock();
            inner.recovery_attempts += 1;
            let Some(failure) = &mut inner.failure else {
                return true;
            };
            failure.attempts += 1;
            failure.attempts
        };
        let note = |problem: String| {
            // Sparse: attempts 1, 2, 4, 8, … (one a second while the disk stays full).
            if attempts.is_power_of_two() {
                tracing::warn!(attempts, "the journal still cannot write: {problem}");
            }
            false
        };
        if let Some(free) = available_bytes(&self.root) {
            if free < RECOVERY_HEADROOM {
                return note(format!(
                    "{free} bytes free in {}, waiting for {RECOVERY_HEADROOM}",
                    self.root.display()
                ));
            }
        }
        let marker = self.lock().failure.as_ref().and_then(|f| f.marker.clone());
        if let Some(marker) = marker {
            if let Err(e) = make_marker(&marker) {
                return note(format!("cannot create {}: {e}", marker.display()));
            }
            let mut inner = self.lock();
            let Some(failure) = inner.failure.as_mut() else {
                return true;
            };
            let first = failure.generation;
            failure.marker = None;
            if let Some(generation) = inner.generations.get_mut(&first) {
                generation.void_marker = Some(marker);
            }
        }
        let mut generation = match self.fresh_generation().await {
            Ok(generation) => generation,
            Err(e) => return note(e.to_string()),
        };
        // After the refused seqs: they are never used again.
        let first = self.lock().next_seq;
        let activated = match generation.activate(first, self.acked()) {
            Ok(()) => flush_bounded(generation.db()).await,
            Err(e) => Err(e),
        };
        if let Err(e) = activated {
            generation.quarantine();
            generations::delete_later(vec![generation]);
            return note(e.to_string());
        }
        let (since, dead) = {
            let mut inner = self.lock();
            if inner.next_seq != first {
                // The sequence moved meanwhile (`skip_to`): try again with the new one.
                drop(inner);
                generations::delete_later(vec![generation]);
                return false;
            }
            let Some(failure) = inner.failure.take() else {
                drop(inner);
                generations::delete_later(vec![generation]);
                return true;
            };
            let acked = self.acked();
            // The abandoned generation is sealed now: compacted if it holds events to
            // deliver, deleted once they are acknowledged.
            if inner
                .generations
                .get(&failure.generation)
                .is_some_and(|g| g.last > acked)
            {
                inner.compact_wanted.push(failure.generation);
            }
            inner.generations.insert(first, generation);
            // The tail holds consecutive seqs: it starts again after the refused ones.
            // (`durable` stays at the last flushed record: the refused seqs are never
            // covered by a flush of their own, so nothing looks for them.)
            inner.tail.clear();
            inner.reset_wanted = u64::MAX;
            (failure.since, inner.take_dead(acked))
        };
        generations::delete_later(dead);
        self.flush_wanted.notify_one();
        tracing::info!(
            "the journal writes again after {:.1?}; events are taken from seq {first}",
            since.elapsed()
        );
        true
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
        .get(generations::ACKED_KEY)
        .map_err(StoreError::sled("journal"))?
        .map(|v| decode_u64(&v))
        .unwrap_or(0);
    let mut events = Vec::new();
    for item in tree.scan_prefix([b'e']) {
        let (key, value) = item.map_err(StoreError::sled("journal"))?;
        let seq = seq_of(&key)?;
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
