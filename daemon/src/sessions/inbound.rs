//! What the relay sent about followed sessions: a bounded copy of each session's log, so
//! `attach --since SEQ` replays what happened while no client watched, and the set of
//! followed sessions, rejoined after every reconnect from the last sequence stored.
//!
//! Entries are taken one at a time ([`Inbound::store`]) and written in chunks: the bridge's
//! reader calls [`Inbound::commit`] after each burst of messages it reads, which writes each
//! session's new entries as sled records of about 6 KiB (key: the session, a NUL and the
//! chunk's last seq, big-endian; value: the postcard-encoded entries) and its last seq under
//! `follows`.
//! Entries not yet committed are served from memory. A crash loses at most the uncommitted
//! burst, and the stored last seq never runs ahead of the stored chunks, so the rejoin
//! after a restart asks the relay for exactly what is missing.
//!
//! Architecture invariant: this module is the only one that touches the `log` and
//! `follows` trees (and drops the `inbound` tree of the older one-entry-per-key layout).
//! Entries are stored in sequence order without duplicates, and the last seq stored never
//! runs ahead of the stored chunks. It never talks to the network: joining and leaving are
//! the bridge's, on the handlers' word.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use cloud_protocol::session::LogEntry;

use crate::store::StoreError;

/// How many entries are kept per session; older chunks are dropped.
pub const KEEP_PER_SESSION: u64 = 10_000;

fn chunk_key(session: &str, seq: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(session.len() + 9);
    key.extend_from_slice(session.as_bytes());
    key.push(0);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

fn prefix(session: &str) -> Vec<u8> {
    let mut key = session.as_bytes().to_vec();
    key.push(0);
    key
}

fn seq_of_key(key: &[u8]) -> u64 {
    key.len()
        .checked_sub(8)
        .and_then(|at| key[at..].try_into().ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

fn decode_seq(value: &[u8]) -> u64 {
    u64::from_be_bytes(value.try_into().unwrap_or([0; 8]))
}

fn corrupt(message: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        what: "inbound",
        message: message.to_string(),
    }
}

/// A chunk takes no more entries once it holds about this many bytes. sled rewrites a
/// whole leaf (up to 17 keys) as one log record, and writes any record over a quarter of a
/// segment (128 KiB) to a file of its own, on the thread that writes: a burst stored as
/// one large chunk made the daemon's loop create a file every few rewrites of its leaf.
const CHUNK_BYTES: usize = 6 * 1024;

/// About how many bytes `entry` takes encoded (its strings and a bound on the rest).
fn encoded_len(entry: &LogEntry) -> usize {
    entry.approx_len()
}

/// A followed session, in memory.
#[derive(Debug, Default)]
struct Followed {
    /// The last seq taken (committed or not).
    last: u64,
    /// Entries taken and not yet committed, in order, all after the stored ones.
    pending: Vec<LogEntry>,
}

/// The inbound logs and the followed sessions.
#[derive(Debug, Clone)]
pub struct Inbound {
    /// Chunks of session log entries by (session, last seq).
    chunks: sled::Tree,
    /// Followed sessions → the last seq stored (durable copy).
    follows: sled::Tree,
    /// The same, in memory, with what is not committed yet: consulted on every send and
    /// every entry, so it must not cost a store read each time.
    followed: Arc<Mutex<HashMap<String, Followed>>>,
}

impl Inbound {
    /// Opens the trees.
    pub fn open(db: &sled::Db) -> Result<Inbound, StoreError> {
        let follows = db
            .open_tree("follows")
            .map_err(StoreError::sled("follows"))?;
        let chunks = db.open_tree("log").map_err(StoreError::sled("log"))?;
        // The older layout's copies are dropped; the relay replays them on the next join.
        let legacy = db
            .tree_names()
            .iter()
            .any(|name| name.as_ref() == b"inbound");
        if legacy {
            db.drop_tree("inbound")
                .map_err(StoreError::sled("inbound"))?;
        }
        let mut followed = HashMap::new();
        for item in follows.iter() {
            let (key, value) = item.map_err(StoreError::sled("follows"))?;
            let session = String::from_utf8_lossy(&key).into_owned();
            let mut last = if legacy { 0 } else { decode_seq(&value) };
            // A chunk written just before a crash that lost its `follows` update.
            if let Some(item) = chunks.scan_prefix(prefix(&session)).next_back() {
                let (chunk, _) = item.map_err(StoreError::sled("log"))?;
                last = last.max(seq_of_key(&chunk));
            }
            followed.insert(
                session,
                Followed {
                    last,
                    pending: Vec::new(),
                },
            );
        }
        Ok(Inbound {
            chunks,
            follows,
            followed: Arc::new(Mutex::new(followed)),
        })
    }

    fn map(&self) -> MutexGuard<'_, HashMap<String, Followed>> {
        self.followed.lock().expect("follows lock poisoned")
    }

    /// Starts following `session` (idempotent).
    pub fn follow(&self, session: &str) -> Result<(), StoreError> {
        let mut followed = self.map();
        if followed.contains_key(session) {
            return Ok(());
        }
        self.follows
            .insert(session, &0u64.to_be_bytes())
            .map_err(StoreError::sled("follows"))?;
        followed.insert(session.to_owned(), Followed::default());
        Ok(())
    }

    /// Stops following `session` and forgets its log.
    pub fn forget(&self, session: &str) -> Result<(), StoreError> {
        self.map().remove(session);
        self.follows
            .remove(session)
            .map_err(StoreError::sled("follows"))?;
        self.remove_chunks(session, u64::MAX)
    }

    /// Removes the chunks of `session` whose last seq is at most `up_to`, oldest first and
    /// one at a time: not a batch (see [`crate::store`]: sled writes out its buffer before
    /// and after every batch, and these need no atomicity); what an exit leaves is removed
    /// the next time.
    fn remove_chunks(&self, session: &str, up_to: u64) -> Result<(), StoreError> {
        for item in self
            .chunks
            .range(chunk_key(session, 0)..=chunk_key(session, up_to))
            .keys()
        {
            let key = item.map_err(StoreError::sled("log"))?;
            self.chunks.remove(key).map_err(StoreError::sled("log"))?;
        }
        Ok(())
    }

    /// Every followed session with the last seq taken for it.
    pub fn followed(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let mut followed: Vec<(String, u64)> = self
            .map()
            .iter()
            .map(|(s, f)| (s.clone(), f.last))
            .collect();
        followed.sort();
        Ok(followed)
    }

    /// Whether `session` is followed.
    pub fn is_followed(&self, session: &str) -> Result<bool, StoreError> {
        Ok(self.map().contains_key(session))
    }

    /// The last seq taken for `session` (0 when none).
    pub fn last_seq(&self, session: &str) -> Result<u64, StoreError> {
        Ok(self.map().get(session).map(|f| f.last).unwrap_or(0))
    }

    /// Takes `entry` of a followed session if it is new; returns whether it was. An entry
    /// at or below the last seq taken is a duplicate (a replay after a reconnect) and is
    /// skipped, and so is anything for a session no longer followed. It is written at the
    /// next [`Inbound::commit`].
    pub fn store(&self, session: &str, entry: LogEntry) -> Result<bool, StoreError> {
        let mut followed = self.map();
        // A late entry of a session no longer followed must not bring it back.
        let Some(follow) = followed.get_mut(session) else {
            return Ok(false);
        };
        if entry.seq <= follow.last {
            return Ok(false);
        }
        follow.last = entry.seq;
        follow.pending.push(entry);
        Ok(true)
    }

    /// Writes the entries taken since the last commit, in chunks of about [`CHUNK_BYTES`], and
    /// drops
    /// chunks beyond [`KEEP_PER_SESSION`].
    pub fn commit(&self) -> Result<(), StoreError> {
        let mut followed = self.map();
        for (session, follow) in followed.iter_mut() {
            let Some(last) = follow.pending.last().map(|e| e.seq) else {
                continue;
            };
            let first = follow.pending[0].seq;
            // Chunks of about CHUNK_BYTES, one insert each, in order (not a batch: sled writes
            // its buffer out before and after every batch). A crash between two loses the
            // later ones only, which the relay sends again (the last seq stored is read back
            // from the chunks at open).
            let mut start = 0;
            let mut bytes = 0;
            for (i, entry) in follow.pending.iter().enumerate() {
                bytes += encoded_len(entry);
                if bytes >= CHUNK_BYTES || i + 1 == follow.pending.len() {
                    let chunk = &follow.pending[start..=i];
                    let value = postcard::to_allocvec(chunk).map_err(corrupt)?;
                    self.chunks
                        .insert(chunk_key(session, entry.seq), value)
                        .map_err(StoreError::sled("log"))?;
                    start = i + 1;
                    bytes = 0;
                }
            }
            // Stored: never written again, even if what follows fails (the last seq is also
            // recovered from the chunks at open).
            follow.pending.clear();
            self.follows
                .insert(session.as_bytes(), &last.to_be_bytes())
                .map_err(StoreError::sled("follows"))?;
            if last > KEEP_PER_SESSION && last / 1000 > first.saturating_sub(1) / 1000 {
                self.remove_chunks(session, last - KEEP_PER_SESSION)?;
            }
        }
        Ok(())
    }

    /// The entries of `session` after `after`, in order (stored and not yet committed).
    pub fn since(&self, session: &str, after: u64) -> Result<Vec<LogEntry>, StoreError> {
        let mut entries = Vec::new();
        for item in self
            .chunks
            .range(chunk_key(session, after.saturating_add(1))..=chunk_key(session, u64::MAX))
        {
            let (_, value) = item.map_err(StoreError::sled("log"))?;
            let chunk: Vec<LogEntry> = postcard::from_bytes(&value).map_err(corrupt)?;
            // Strictly increasing, even over chunks that overlap (a forget that failed
            // half-way, then a follow from the start).
            for entry in chunk {
                if entry.seq > entries.last().map_or(after, |e: &LogEntry| e.seq) {
                    entries.push(entry);
                }
            }
        }
        if let Some(follow) = self.map().get(session) {
            let stored = entries.last().map(|e| e.seq).unwrap_or(after);
            entries.extend(follow.pending.iter().filter(|e| e.seq > stored).cloned());
        }
        Ok(entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloud_protocol::session::{Author, SessionEvent};

    fn entry(seq: u64) -> LogEntry {
        LogEntry {
            seq,
            at: 0,
            author: Author::Agent,
            event: SessionEvent::Message(format!("{{\"n\":{seq}}}")),
        }
    }

    #[test]
    fn entries_are_stored_once_in_order_and_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::store::open(dir.path()).unwrap();
        let inbound = Inbound::open(&db).unwrap();
        inbound.follow("s-1").unwrap();
        for seq in 1..=3 {
            assert!(inbound.store("s-1", entry(seq)).unwrap());
        }
        inbound.commit().unwrap();
        for seq in 4..=5 {
            assert!(inbound.store("s-1", entry(seq)).unwrap());
        }
        assert!(
            !inbound.store("s-1", entry(3)).unwrap(),
            "a replayed entry is a duplicate"
        );
        assert_eq!(inbound.last_seq("s-1").unwrap(), 5);
        let replay: Vec<u64> = inbound
            .since("s-1", 2)
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(replay, [3, 4, 5]);
        assert_eq!(inbound.followed().unwrap(), [("s-1".to_owned(), 5)]);
        // A session whose id extends another's is kept apart.
        inbound.follow("s-10").unwrap();
        inbound.store("s-10", entry(1)).unwrap();
        assert_eq!(inbound.since("s-1", 0).unwrap().len(), 5);
        inbound.forget("s-1").unwrap();
        assert!(inbound.since("s-1", 0).unwrap().is_empty());
        assert_eq!(inbound.since("s-10", 0).unwrap().len(), 1);
    }

    #[test]
    fn bursts_are_stored_in_small_chunks_and_never_as_files_of_their_own() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::store::open(dir.path()).unwrap();
        let inbound = Inbound::open(&db).unwrap();
        inbound.follow("s-1").unwrap();
        let text = "x".repeat(120);
        for seq in 1..=8_192u64 {
            let mut entry = entry(seq);
            entry.event = SessionEvent::Message(format!("{seq} {text}"));
            inbound.store("s-1", entry).unwrap();
            // The bridge commits after each burst of up to 256 messages.
            if seq % 256 == 0 {
                inbound.commit().unwrap();
            }
        }
        for item in inbound.chunks.iter() {
            let (_, value) = item.unwrap();
            assert!(
                value.len() <= CHUNK_BYTES + 200,
                "a chunk of {}",
                value.len()
            );
        }
        db.flush().unwrap();
        let blobs = std::fs::read_dir(dir.path().join("blobs"))
            .map(|entries| entries.count())
            .unwrap_or(0);
        assert_eq!(
            blobs, 0,
            "sled wrote leaves of chunks as files of their own"
        );
        assert_eq!(inbound.since("s-1", 8_000).unwrap().len(), 192);
    }

    #[test]
    fn chunks_are_bounded_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::store::open(dir.path()).unwrap();
        {
            let inbound = Inbound::open(&db).unwrap();
            inbound.follow("s-1").unwrap();
            for seq in 1..=12_345 {
                inbound.store("s-1", entry(seq)).unwrap();
                if seq % 100 == 0 {
                    inbound.commit().unwrap();
                }
            }
            // Not committed: 12,301..=12,345 are lost with this instance.
            let kept = inbound.since("s-1", 0).unwrap();
            assert_eq!(kept.last().unwrap().seq, 12_345);
            assert!(kept.len() as u64 >= KEEP_PER_SESSION, "{}", kept.len());
            assert!(
                kept.len() as u64 <= KEEP_PER_SESSION + 1000,
                "{}",
                kept.len()
            );
            assert!(kept.windows(2).all(|w| w[0].seq + 1 == w[1].seq));
        }
        let inbound = Inbound::open(&db).unwrap();
        assert_eq!(inbound.last_seq("s-1").unwrap(), 12_300);
        assert_eq!(inbound.since("s-1", 12_298).unwrap().len(), 2);
        assert!(inbound.store("s-1", entry(12_301)).unwrap());
    }
}
