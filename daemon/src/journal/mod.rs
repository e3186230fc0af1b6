//! The outbound journal: every event the daemon must deliver to the relay, on disk before
//! anyone is told it is queued, removed only when the relay acknowledges it.
//!
//! **Group commit** (`group_commit.rs`). An append takes the next seq and joins the pending
//! group in memory; one flusher task writes each group as a single sled record and flushes
//! it, so appends that arrive together share one write and one `fsync`-class flush (sled's
//! `flush` uses `sync_file_range` on Linux: it survives a killed process, not necessarily a
//! power cut). Up to [`FLUSHES_IN_FLIGHT`] flushes are out at once: a flush covers
//! everything written before it, so `durable` moves to the target of whichever completes
//! (unless the journal failed since it was issued). Nobody is told `queued` before the
//! flush covering their event completes,
//! and only flushed entries are ever handed to the bridge, so a seq the relay has seen is
//! never reused after a crash.
//!
//! **Generations** (`generations.rs`). The journal lives in its own directory
//! (`state/journal/`), as a series of sled databases. Records go to the newest, `g-ID`; a
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
//!   off the async thread, as one record in a fresh database (`c-FIRST-LAST`), which sled
//!   keeps as a single blob file, so it costs about its live data on disk; while the relay
//!   is acknowledging, only after [`COMPACT_DELAY`] (by then it is usually acknowledged and
//!   deleted instead);
//! - a generation the relay has wholly acknowledged is deleted.
//!
//! **Tail.** The latest entries stay in memory (at most [`TAIL_ENTRIES`]), so the bridge
//! streams fresh events without reading them back; older ones (a backlog, a resend after a
//! reconnect) are read from the generations.
//!
//! **A disk that fails** (`recovery.rs`). When a write or a flush fails (a full disk, most
//! often) or a flush takes longer than [`FLUSH_DEADLINE`], the journal refuses new events
//! at once with [`Unavailable`], which says what is wrong and names the journal's
//! directory, and refuses the events taken but not yet flushed the same way: none of them
//! was answered `queued`, and none is ever sent. The generation being written is
//! abandoned, its database never touched again (sled keeps a failed database's error for
//! good, and one can block forever in its next flush). Every [`RECOVERY_INTERVAL`], once
//! the disk has room, the flusher supersedes the abandoned generation (its flushed events
//! rewritten as a compacted one) and starts a fresh generation after the refused seqs,
//! which are never used again; then appends are taken again. Everything answered `queued`
//! was flushed before the failure and is still delivered, once.
//!
//! Architecture invariant: this module is the only one that touches `state/journal/`, the
//! `journal_acked` key of the store's `meta` tree and the old in-store `journal` tree (which
//! it migrates once). Sequence numbers start at 1, keep growing across restarts, and have
//! no gaps but the seqs of refused events. No sled call that can wait on a flush runs on
//! the async thread.

mod generations;
mod group_commit;
mod recovery;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use cloud_protocol::bridge::Outbound;
use tokio::sync::{watch, Notify};

use crate::store::StoreError;
use generations::{Generation, ACKED_KEY};
pub use recovery::Unavailable;

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
/// A flush that has not completed after this long counts as failed: the disk is not
/// answering, and sled may never return from it.
pub const FLUSH_DEADLINE: Duration = Duration::from_secs(10);
/// How often a journal that cannot write checks whether it can again.
pub const RECOVERY_INTERVAL: Duration = Duration::from_secs(1);
/// While the relay is acknowledging, a sealed generation waits this long before it is
/// compacted: it is usually acknowledged (and deleted) well within it.
pub const COMPACT_DELAY: Duration = Duration::from_secs(1);
/// How many flushes may be out at once. While the disk takes one, the next group is
/// written and its flush issued, so requests that arrive during a flush wait for their own
/// flush only, not for the one already out as well (which, on a disk slow to flush, was
/// most of a client's wait).
const FLUSHES_IN_FLIGHT: usize = 4;

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
    /// Set while the journal cannot write: why, and what recovery has done so far.
    failure: Option<recovery::Failure>,
    /// The seqs of refused events (inclusive ranges, oldest first, the last
    /// [`recovery::REMEMBERED_REFUSALS`] of them): they are never sent.
    refused: VecDeque<(u64, u64, Unavailable)>,
    /// Recovery attempts since the journal was opened (for tests of their timing).
    recovery_attempts: u64,
    /// How many times the journal failed: a flush issued before a failure never moves
    /// `durable` after it.
    failures: u64,
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

    /// The first seq of the next record: after the last written one, or after the seqs
    /// refused by a failure (which no record holds).
    fn next_record_first(&self) -> u64 {
        self.next_seq - self.pending.len() as u64
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

    /// Why event `seq` was refused, if it was.
    fn refusal(&self, seq: u64) -> Option<&Unavailable> {
        self.refused
            .iter()
            .rev()
            .find(|(from, to, _)| (*from..=*to).contains(&seq))
            .map(|(_, _, why)| why)
    }
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
    /// The highest seq refused so far (0: none): waiters look up theirs in
    /// `Inner::refused` once it passes their seq.
    refused_up_to: watch::Sender<u64>,
    /// The highest seq the relay acknowledged.
    acked: AtomicU64,
    /// Wakes the flusher (shared with it, so the flusher need not keep the journal alive).
    flush_wanted: Arc<Notify>,
}

impl Journal {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().expect("journal lock poisoned")
    }

    /// Takes the next seq for `event`, to be written with the next group; pair with
    /// [`Journal::wait_durable`] before telling anyone it is queued. Refused at once while
    /// the journal cannot write.
    pub fn append_unflushed(&self, event: Outbound) -> Result<u64, Unavailable> {
        let seq = {
            let mut inner = self.lock();
            if let Some(failure) = &inner.failure {
                return Err(failure.unavailable.clone());
            }
            let seq = inner.next_seq;
            inner.next_seq += 1;
            inner.pending.push(event);
            self.written.store(seq, Ordering::Release);
            seq
        };
        self.flush_wanted.notify_one();
        Ok(seq)
    }

    /// Waits until every entry up to `seq` is flushed, or `seq` is refused (the journal
    /// could not write it; it is never sent). Never longer than about [`FLUSH_DEADLINE`].
    pub async fn wait_durable(&self, seq: u64) -> Result<(), Unavailable> {
        let mut durable = self.durable.subscribe();
        let mut refused = self.refused_up_to.subscribe();
        loop {
            // `durable` first: a seq is refused before `durable` can pass it (by later
            // events), so one that is durable here and not refused below never will be.
            let flushed = *durable.borrow_and_update() >= seq;
            if *refused.borrow_and_update() >= seq {
                if let Some(why) = self.lock().refusal(seq) {
                    return Err(why.clone());
                }
            }
            if flushed {
                return Ok(());
            }
            // Both senders live in `self`: the wait ends only by one of them moving.
            tokio::select! {
                _ = durable.changed() => {}
                _ = refused.changed() => {}
            }
        }
    }

    /// Why event `seq` was refused, if it was (it is then never sent). Settled once
    /// [`Journal::wait_durable`] has returned for it or a later seq.
    pub fn refusal(&self, seq: u64) -> Option<Unavailable> {
        if *self.refused_up_to.borrow() < seq {
            return None;
        }
        self.lock().refusal(seq).cloned()
    }

    /// Appends `event` and waits until it is on disk. Returns its seq.
    pub async fn append(&self, event: Outbound) -> Result<u64, Unavailable> {
        let seq = self.append_unflushed(event)?;
        self.wait_durable(seq).await?;
        Ok(seq)
    }

    /// Follows the highest durable seq (the bridge sends only durable entries).
    pub fn durable(&self) -> watch::Receiver<u64> {
        self.durable.subscribe()
    }

    /// Why the journal refuses events now, if it does.
    pub fn unavailable(&self) -> Option<Unavailable> {
        self.lock().failure.as_ref().map(|f| f.unavailable.clone())
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
            // which the relay deduplicates. A failed generation is not written again: the
            // one that supersedes it starts with the acknowledged seq.
            if inner.failure.is_none() {
                inner
                    .newest()
                    .db()
                    .insert(ACKED_KEY, &seq.to_be_bytes())
                    .map_err(StoreError::sled("journal"))?;
            }
            let everything = inner.pending.is_empty() && seq >= inner.inserted;
            let reset = everything && inner.newest().bytes >= RESET_BYTES;
            if reset {
                inner.reset_wanted = inner.reset_wanted.min(RESET_BYTES);
            }
            (inner.take_dead(seq), everything)
        };
        generations::delete_later(dead);
        if reset {
            // A reset now, or (below RESET_BYTES) the flusher's idle timer.
            self.flush_wanted.notify_one();
        }
        Ok(())
    }

    /// Moves the sequence past `seq` (everything up to it counts as acknowledged), so new
    /// events never reuse a seq the relay already holds. The flusher's next turn starts a
    /// fresh generation for what comes next, so none holds a gap, and its flush makes the
    /// move durable before any later event can be (a crash before it only makes the relay
    /// acknowledge beyond the journal again).
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
                if inner.failure.is_none() {
                    inner.newest().last = seq;
                }
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

    /// Events taken, not refused, and not yet acknowledged.
    pub fn depth(&self) -> u64 {
        let acked = self.acked();
        let taken = self.written.load(Ordering::Acquire).saturating_sub(acked);
        if *self.refused_up_to.borrow() <= acked {
            return taken;
        }
        let refused: u64 = self
            .lock()
            .refused
            .iter()
            .filter(|(_, to, _)| *to > acked)
            .map(|(from, to, _)| to - (*from).max(acked + 1) + 1)
            .sum();
        taken.saturating_sub(refused)
    }

    /// How many generations the journal has (for tests and status).
    pub fn generations(&self) -> usize {
        self.lock().generations.len()
    }

    /// Recovery attempts since the journal was opened.
    #[cfg(test)]
    fn recovery_attempts(&self) -> u64 {
        self.lock().recovery_attempts
    }
}
