//! The flusher: writes each pending group as one record of the newest generation and
//! issues its flush (up to [`FLUSHES_IN_FLIGHT`](super::FLUSHES_IN_FLIGHT) at once), starts new generations when one
//! is due, and has sealed ones compacted.
//!
//! Architecture invariant: nobody learns that an event is durable before the flush that
//! covers it completes, and no flush is awaited without a deadline ([`FLUSH_DEADLINE`]).
//! While the journal cannot write, the flusher does nothing but try to
//! [recover](super::recovery) every [`RECOVERY_INTERVAL`].

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::generations::{self, corrupt, generation_dir, Generation};
use super::{
    Journal, COMPACT_DELAY, FLUSH_DEADLINE, IDLE_RESET_AFTER, RECOVERY_INTERVAL, ROLL_BYTES,
    TAIL_ENTRIES,
};
use crate::store::StoreError;

/// Flushes `db` on a blocking thread, failing if sled has not finished after
/// [`FLUSH_DEADLINE`]. A flush left behind keeps its thread; it is nudged once (a later
/// flush wakes flushes that missed the error that ended theirs).
///
/// Not with sled's `flush_async`: that runs the flush on sled's thread pool, which wakes
/// all seven of its idle threads for each task it is given (and the flush's write is
/// another), once per group.
pub(super) async fn flush_bounded(db: &sled::Db) -> Result<(), StoreError> {
    let started = std::time::Instant::now();
    let flushing = db.clone();
    let flush = tokio::task::spawn_blocking(move || flushing.flush());
    tokio::pin!(flush);
    loop {
        match tokio::time::timeout(FLUSH_DEADLINE, &mut flush).await {
            Ok(Ok(flushed)) => {
                return flushed
                    .map(drop)
                    .map_err(StoreError::sled("flushing the journal"))
            }
            Ok(Err(e)) => {
                return Err(StoreError::Io {
                    what: "flushing the journal",
                    source: std::io::Error::other(format!("the flush did not complete: {e}")),
                })
            }
            // The runtime's clock ran ahead of the wall clock (it is paused in tests).
            Err(_) if started.elapsed() < FLUSH_DEADLINE => {}
            Err(_) => {
                let nudged = db.clone();
                // A thread of its own: this flush may never return either.
                let _ = std::thread::Builder::new()
                    .name("journal nudge".into())
                    .spawn(move || {
                        let _ = nudged.flush();
                        std::mem::forget(nudged);
                    });
                return Err(StoreError::Io {
                    what: "flushing the journal",
                    source: std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("the disk did not complete a flush within {FLUSH_DEADLINE:?}"),
                    ),
                });
            }
        }
    }
}

impl Journal {
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
            let Some(state) = journal.upgrade().map(|j| {
                let failed = j.lock().failure.is_some();
                (failed, !failed && j.idle_reset_possible())
            }) else {
                return;
            };
            match state {
                (true, _) => {
                    tokio::time::sleep(RECOVERY_INTERVAL).await;
                    let Some(journal) = journal.upgrade() else {
                        return;
                    };
                    journal.recover().await;
                    continue;
                }
                // Idle with everything acknowledged but records in the newest generation:
                // start afresh after a while, however little it holds.
                (false, true) => {
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
                }
                (false, false) => wake.notified().await,
            }
            // Let every client whose requests have arrived append them first (a yielded
            // task runs after the other ready ones and a poll of the sockets), so they share
            // this group's write and flush rather than each paying for one.
            tokio::task::yield_now().await;
            let Some(journal) = journal.upgrade() else {
                return;
            };
            if journal.lock().failure.is_some() {
                continue;
            }
            if let Err(e) = journal.flush_turn().await {
                journal.fail(&e);
            }
        }
    }

    /// Whether everything is acknowledged while the newest generation holds records.
    fn idle_reset_possible(&self) -> bool {
        let inner = self.lock();
        inner.pending.is_empty() && self.acked() >= inner.inserted && !inner.newest_is_empty()
    }

    /// One turn of the flusher: start a new generation if one is due, write the pending
    /// group as one record and issue its flush, which publishes it as durable when it
    /// completes (or stops the journal if it fails); start due compactions.
    async fn flush_turn(self: &Arc<Journal>) -> Result<(), StoreError> {
        let roll = {
            let mut inner = self.lock();
            // A flush still out may have failed since the flusher looked.
            if inner.failure.is_some() {
                return Ok(());
            }
            let bytes = inner.newest().bytes;
            // An empty generation is never replaced (the new one would have its name).
            let due =
                !inner.newest_is_empty() && (bytes >= ROLL_BYTES || bytes >= inner.reset_wanted);
            inner.reset_wanted = u64::MAX;
            due.then(|| inner.next_record_first())
        };
        if let Some(first) = roll {
            self.start_generation(first).await?;
        }
        self.prepare_spare();
        let (db, target, compactions) = {
            let mut inner = self.lock();
            if inner.failure.is_some() {
                return Ok(());
            }
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
        let failures = {
            let inner = self.lock();
            if inner.failure.is_some() {
                // Failed while waiting for a permit (a flush out failed): nothing to issue.
                return Ok(());
            }
            inner.failures
        };
        self.flush_issued.fetch_max(target, Ordering::AcqRel);
        // The flush runs on its own: the flusher takes the next group meanwhile. A flush
        // covers everything written before it (sled's stable prefix), so `durable` may move
        // to its target whichever flush completes first.
        let journal = Arc::downgrade(self);
        tokio::spawn(async move {
            let flushed = flush_bounded(&db).await;
            drop(permit);
            let Some(journal) = journal.upgrade() else {
                return;
            };
            match flushed {
                Ok(()) => {
                    let inner = journal.lock();
                    // A failure since it was issued refused what it covers: it must never
                    // be sent.
                    if inner.failures == failures {
                        journal.durable.send_if_modified(|durable| {
                            let advanced = target > *durable;
                            *durable = (*durable).max(target);
                            advanced
                        });
                    }
                }
                Err(e) => {
                    journal.fail(&e);
                    // The flusher may be waiting for appends, which are refused now: it
                    // goes on to recovery.
                    journal.flush_wanted.notify_one();
                }
            }
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
            let opened = tokio::task::spawn_blocking(move || Generation::create(dir)).await;
            let Some(journal) = journal.upgrade() else {
                return;
            };
            let mut inner = journal.lock();
            inner.spare_opening = false;
            match opened {
                Ok(Ok(spare)) => inner.spare = Some(spare),
                Ok(Err(e)) => tracing::warn!("cannot open a spare journal generation: {e}"),
                Err(e) => tracing::warn!("opening a spare journal generation panicked: {e}"),
            }
        });
    }

    /// A fresh generation: the spare, or one opened now (off the async thread).
    pub(super) async fn fresh_generation(&self) -> Result<Generation, StoreError> {
        if let Some(spare) = self.lock().spare.take() {
            return Ok(spare);
        }
        let dir = {
            let mut inner = self.lock();
            let id = inner.next_id;
            inner.next_id += 1;
            generation_dir(&self.root, id)
        };
        tokio::task::spawn_blocking(move || Generation::create(dir))
            .await
            .map_err(|e| corrupt(format!("opening a journal generation panicked: {e}")))?
    }

    /// Makes a fresh generation the newest from seq `first`, with the current `acked` in
    /// it, flushed; deletes the generations that are wholly acknowledged and has the one
    /// it sealed compacted if it still holds events to deliver.
    async fn start_generation(self: &Arc<Journal>, first: u64) -> Result<(), StoreError> {
        // What the sealed generation holds must be on disk before `durable` can pass it:
        // only the newest is flushed from now on.
        let sealing = self.lock().newest().db().clone();
        flush_bounded(&sealing).await?;
        let mut generation = self.fresh_generation().await?;
        // Durable before anything older is deleted: it holds the sequence from now on. A
        // generation activated and then abandoned is deleted (and one an exit leaves behind
        // is, at the next open).
        let activated = match generation.activate(first, self.acked()) {
            Ok(()) => flush_bounded(generation.db()).await,
            Err(e) => Err(e),
        };
        if let Err(e) = activated {
            generation.quarantine();
            generations::delete_later(vec![generation]);
            return Err(e);
        }
        let dead = {
            let mut inner = self.lock();
            if inner.failure.is_some() {
                // A flush still out failed meanwhile: recovery starts the next generation.
                drop(inner);
                generations::delete_later(vec![generation]);
                return Ok(());
            }
            if inner.next_record_first() != first {
                // The sequence moved meanwhile (`skip_to`): keep the current generation
                // rather than leave a gap.
                drop(inner);
                generations::delete_later(vec![generation]);
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
        generations::delete_later(dead);
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
        let built =
            tokio::task::spawn_blocking(move || generations::compact(&root, &db, first, last))
                .await;
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
                        quarantined: generation.quarantined,
                        void_marker: generation.void_marker.take(),
                        decoded: None,
                    };
                    generation.compacted = true;
                    generation.quarantined = false;
                    original
                }
                // Acknowledged (and deleted) meanwhile: the copy is not needed.
                _ => Generation::compacted(dir, last),
            }
        };
        generations::delete_later(vec![replaced]);
    }
}
