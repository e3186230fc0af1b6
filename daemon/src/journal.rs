//! The outbound journal: every event the daemon must deliver to the relay, on disk before
//! anyone is told it is queued, removed only when the relay acknowledges it.
//!
//! Appends are group-committed: an append writes its entry at once and then waits for a
//! flush that covers it; one flusher task runs flushes back to back, so appends that arrive
//! together share one `fsync`-class flush (sled's `flush` uses `sync_file_range` on Linux:
//! it survives a killed process, not necessarily a power cut). Only flushed entries are
//! ever handed to the bridge, so a sequence number the relay has seen is never reused after
//! a crash.
//!
//! Architecture invariant: this module is the only one that touches the `journal` tree.
//! Sequence numbers start at 1, have no gaps, and keep growing across restarts.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cloud_protocol::bridge::Outbound;
use tokio::sync::{watch, Notify};

use crate::store::StoreError;

/// The key under which the highest acknowledged seq is kept.
const ACKED_KEY: &[u8] = b"acked";
/// Entry keys: this prefix and the seq, big-endian, so they sort in order.
const ENTRY_PREFIX: u8 = b'e';

fn entry_key(seq: u64) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = ENTRY_PREFIX;
    key[1..].copy_from_slice(&seq.to_be_bytes());
    key
}

fn seq_of(key: &[u8]) -> u64 {
    u64::from_be_bytes(key[1..9].try_into().expect("9-byte entry key"))
}

/// The outbound journal.
#[derive(Debug)]
pub struct Journal {
    /// The store (for flushes).
    db: sled::Db,
    /// The `journal` tree.
    tree: sled::Tree,
    /// Serialises "take the next seq and write it", so entries are written in seq order.
    next_seq: Mutex<u64>,
    /// The highest seq written (not necessarily flushed).
    written: AtomicU64,
    /// The highest seq covered by a completed flush.
    durable: watch::Sender<u64>,
    /// The highest seq the relay acknowledged (everything up to it is trimmed).
    acked: AtomicU64,
    /// Wakes the flusher (shared with it, so the flusher need not keep the journal alive).
    flush_wanted: Arc<Notify>,
}

impl Journal {
    /// Opens the journal in `db`, resuming its sequence.
    pub fn open(db: &sled::Db) -> Result<Arc<Journal>, StoreError> {
        let tree = db
            .open_tree("journal")
            .map_err(StoreError::sled("journal"))?;
        let acked = tree
            .get(ACKED_KEY)
            .map_err(StoreError::sled("journal"))?
            .map(|v| u64::from_be_bytes(v.as_ref().try_into().unwrap_or([0; 8])))
            .unwrap_or(0);
        let last_entry = tree
            .scan_prefix([ENTRY_PREFIX])
            .next_back()
            .transpose()
            .map_err(StoreError::sled("journal"))?
            .map(|(key, _)| seq_of(&key))
            .unwrap_or(0);
        let last = last_entry.max(acked);
        let (durable, _) = watch::channel(last);
        Ok(Arc::new(Journal {
            db: db.clone(),
            tree,
            next_seq: Mutex::new(last.saturating_add(1)),
            written: AtomicU64::new(last),
            durable,
            acked: AtomicU64::new(acked),
            flush_wanted: Arc::new(Notify::new()),
        }))
    }

    /// Runs the flusher until the journal is dropped. Spawn it once. It holds only a weak
    /// reference, so dropping the journal closes the store.
    pub async fn run_flusher(self: Arc<Journal>) {
        let wake = Arc::clone(&self.flush_wanted);
        let journal = Arc::downgrade(&self);
        drop(self);
        loop {
            wake.notified().await;
            let Some(journal) = journal.upgrade() else {
                return;
            };
            let target = journal.written.load(Ordering::Acquire);
            if target <= *journal.durable.borrow() {
                continue;
            }
            match journal.db.flush_async().await {
                Ok(_) => {
                    journal.durable.send_if_modified(|durable| {
                        let advanced = target > *durable;
                        *durable = (*durable).max(target);
                        advanced
                    });
                }
                Err(e) => {
                    tracing::error!(error = %e, "journal flush failed; retrying");
                    wake.notify_one();
                    drop(journal);
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Writes `event` and returns its seq without waiting for the flush; pair with
    /// [`Journal::wait_durable`] before telling anyone it is queued.
    pub fn append_unflushed(&self, event: &Outbound) -> Result<u64, StoreError> {
        let bytes = postcard::to_allocvec(event).map_err(|e| StoreError::Corrupt {
            what: "journal",
            message: e.to_string(),
        })?;
        let seq = {
            let mut next = self.next_seq.lock().expect("journal lock poisoned");
            let seq = *next;
            self.tree
                .insert(entry_key(seq), bytes)
                .map_err(StoreError::sled("journal"))?;
            *next += 1;
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

    /// Writes `event` and waits until it is on disk. Returns its seq.
    pub async fn append(&self, event: &Outbound) -> Result<u64, StoreError> {
        let seq = self.append_unflushed(event)?;
        self.wait_durable(seq).await;
        Ok(seq)
    }

    /// Follows the highest durable seq (the bridge sends only durable entries).
    pub fn durable(&self) -> watch::Receiver<u64> {
        self.durable.subscribe()
    }

    /// The durable entries after `after`, at most `limit` of them, in order.
    pub fn read_after(&self, after: u64, limit: usize) -> Result<Vec<(u64, Outbound)>, StoreError> {
        let durable = *self.durable.borrow();
        let mut entries = Vec::new();
        for item in self.tree.range(entry_key(after + 1)..=entry_key(durable)) {
            let (key, value) = item.map_err(StoreError::sled("journal"))?;
            let event = postcard::from_bytes(&value).map_err(|e| StoreError::Corrupt {
                what: "journal",
                message: e.to_string(),
            })?;
            entries.push((seq_of(&key), event));
            if entries.len() >= limit {
                break;
            }
        }
        Ok(entries)
    }

    /// The relay has everything up to `seq`: remove it. Acks never go backwards.
    pub fn trim(&self, seq: u64) -> Result<(), StoreError> {
        let previous = self.acked.fetch_max(seq, Ordering::AcqRel);
        if seq <= previous {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        for item in self.tree.range(entry_key(previous + 1)..=entry_key(seq)) {
            let (key, _) = item.map_err(StoreError::sled("journal"))?;
            batch.remove(key);
        }
        batch.insert(ACKED_KEY, &seq.to_be_bytes());
        // Not flushed here: losing a trim to a crash only resends acknowledged events,
        // which the relay deduplicates.
        self.tree
            .apply_batch(batch)
            .map_err(StoreError::sled("journal"))
    }

    /// Moves the sequence past `seq` (everything up to it counts as acknowledged), so new
    /// events never reuse a seq the relay already holds.
    pub fn skip_to(&self, seq: u64) -> Result<(), StoreError> {
        let mut next = self.next_seq.lock().expect("journal lock poisoned");
        if *next <= seq {
            *next = seq.saturating_add(1);
            self.written.fetch_max(seq, Ordering::AcqRel);
            self.durable.send_if_modified(|durable| {
                let advanced = seq > *durable;
                *durable = (*durable).max(seq);
                advanced
            });
        }
        drop(next);
        self.trim(seq)
    }

    /// The highest seq written so far.
    pub fn last_written(&self) -> u64 {
        self.written.load(Ordering::Acquire)
    }

    /// The highest acknowledged seq.
    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::Acquire)
    }

    /// Events written but not yet acknowledged.
    pub fn depth(&self) -> u64 {
        self.written
            .load(Ordering::Acquire)
            .saturating_sub(self.acked())
    }
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

    #[tokio::test]
    async fn appends_are_durable_ordered_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = crate::store::open(dir.path()).unwrap();
            let journal = Journal::open(&db).unwrap();
            let flusher = tokio::spawn(Arc::clone(&journal).run_flusher());
            // Concurrent appends share flushes and still come out in seq order.
            let mut tasks = Vec::new();
            for n in 0..100 {
                let journal = Arc::clone(&journal);
                tasks.push(tokio::spawn(async move {
                    journal.append(&message(n)).await.unwrap()
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
            db.flush().unwrap();
            drop(journal);
            flusher.abort();
            let _ = flusher.await;
        }
        // sled's own background threads (its flush pool) may still hold the store's lock
        // for a moment after the last handle is dropped: wait for it, with a deadline.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let db = loop {
            match crate::store::open(dir.path()) {
                Ok(db) => break db,
                Err(e) if std::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                Err(e) => panic!("the store stayed locked: {e}"),
            }
        };
        let journal = Journal::open(&db).unwrap();
        tokio::spawn(Arc::clone(&journal).run_flusher());
        assert_eq!(journal.acked(), 40);
        assert_eq!(journal.read_after(40, 1000).unwrap().len(), 60);
        // The sequence continues after the highest ever written, even once all is trimmed.
        journal.trim(100).unwrap();
        assert_eq!(journal.append(&message(0)).await.unwrap(), 101);
    }

    #[tokio::test]
    async fn only_durable_entries_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::store::open(dir.path()).unwrap();
        let journal = Journal::open(&db).unwrap();
        // No flusher yet: the entry is written but not durable.
        let seq = journal.append_unflushed(&message(1)).unwrap();
        assert!(journal.read_after(0, 10).unwrap().is_empty());
        tokio::spawn(Arc::clone(&journal).run_flusher());
        journal.wait_durable(seq).await;
        assert_eq!(journal.read_after(0, 10).unwrap().len(), 1);
    }
}
