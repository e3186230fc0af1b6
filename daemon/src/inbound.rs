//! What the relay sent about followed sessions: a bounded copy of each session's log, so
//! `attach --since SEQ` replays what happened while no client watched, and the set of
//! followed sessions, rejoined after every reconnect from the last sequence stored.
//!
//! Architecture invariant: this module is the only one that touches the `inbound` and
//! `follows` trees. Entries are stored in sequence order without duplicates.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cloud_protocol::session::LogEntry;

use crate::store::StoreError;

/// How many entries are kept per session; older ones are dropped.
pub const KEEP_PER_SESSION: u64 = 10_000;

fn entry_key(session: &str, seq: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(session.len() + 9);
    key.extend_from_slice(session.as_bytes());
    key.push(0);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

fn decode_seq(value: &[u8]) -> u64 {
    u64::from_be_bytes(value.try_into().unwrap_or([0; 8]))
}

fn prefix(session: &str) -> Vec<u8> {
    let mut key = session.as_bytes().to_vec();
    key.push(0);
    key
}

/// The inbound logs and the followed sessions.
#[derive(Debug, Clone)]
pub struct Inbound {
    /// Session log entries by (session, seq).
    entries: sled::Tree,
    /// Followed sessions → the last seq stored (durable copy).
    follows: sled::Tree,
    /// The same, in memory: consulted on every send and every entry, so it must not cost a
    /// store read each time.
    followed: Arc<Mutex<HashMap<String, u64>>>,
}

impl Inbound {
    /// Opens the trees.
    pub fn open(db: &sled::Db) -> Result<Inbound, StoreError> {
        let follows = db
            .open_tree("follows")
            .map_err(StoreError::sled("follows"))?;
        let mut followed = HashMap::new();
        for item in follows.iter() {
            let (key, value) = item.map_err(StoreError::sled("follows"))?;
            followed.insert(
                String::from_utf8_lossy(&key).into_owned(),
                decode_seq(&value),
            );
        }
        Ok(Inbound {
            entries: db
                .open_tree("inbound")
                .map_err(StoreError::sled("inbound"))?,
            follows,
            followed: Arc::new(Mutex::new(followed)),
        })
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
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
        followed.insert(session.to_owned(), 0);
        Ok(())
    }

    /// Stops following `session` and forgets its log.
    pub fn forget(&self, session: &str) -> Result<(), StoreError> {
        self.map().remove(session);
        self.follows
            .remove(session)
            .map_err(StoreError::sled("follows"))?;
        let mut batch = sled::Batch::default();
        for item in self.entries.scan_prefix(prefix(session)) {
            let (key, _) = item.map_err(StoreError::sled("inbound"))?;
            batch.remove(key);
        }
        self.entries
            .apply_batch(batch)
            .map_err(StoreError::sled("inbound"))
    }

    /// Every followed session with the last seq stored for it.
    pub fn followed(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let mut followed: Vec<(String, u64)> = self
            .map()
            .iter()
            .map(|(s, seq)| (s.clone(), *seq))
            .collect();
        followed.sort();
        Ok(followed)
    }

    /// Whether `session` is followed.
    pub fn is_followed(&self, session: &str) -> Result<bool, StoreError> {
        Ok(self.map().contains_key(session))
    }

    /// The last seq stored for `session` (0 when none).
    pub fn last_seq(&self, session: &str) -> Result<u64, StoreError> {
        Ok(self.map().get(session).copied().unwrap_or(0))
    }

    /// Stores `entry` of a followed session if it is new; returns whether it was. An entry
    /// at or below the last stored seq is a duplicate (a replay after a reconnect) and is
    /// skipped, and so is anything for a session no longer followed.
    pub fn store(&self, session: &str, entry: &LogEntry) -> Result<bool, StoreError> {
        let mut followed = self.map();
        // A late entry of a session no longer followed must not bring it back.
        let Some(last) = followed.get_mut(session) else {
            return Ok(false);
        };
        if entry.seq <= *last {
            return Ok(false);
        }
        let bytes = postcard::to_allocvec(entry).map_err(|e| StoreError::Corrupt {
            what: "inbound",
            message: e.to_string(),
        })?;
        self.entries
            .insert(entry_key(session, entry.seq), bytes)
            .map_err(StoreError::sled("inbound"))?;
        self.follows
            .insert(session, &entry.seq.to_be_bytes())
            .map_err(StoreError::sled("follows"))?;
        *last = entry.seq;
        drop(followed);
        if entry.seq > KEEP_PER_SESSION && entry.seq.is_multiple_of(1000) {
            self.drop_before(session, entry.seq - KEEP_PER_SESSION)?;
        }
        Ok(true)
    }

    fn drop_before(&self, session: &str, seq: u64) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for item in self
            .entries
            .range(entry_key(session, 0)..entry_key(session, seq))
        {
            let (key, _) = item.map_err(StoreError::sled("inbound"))?;
            batch.remove(key);
        }
        self.entries
            .apply_batch(batch)
            .map_err(StoreError::sled("inbound"))
    }

    /// The stored entries of `session` after `after`, in order.
    pub fn since(&self, session: &str, after: u64) -> Result<Vec<LogEntry>, StoreError> {
        self.entries
            .range(entry_key(session, after.saturating_add(1))..entry_key(session, u64::MAX))
            .map(|item| {
                let (_, value) = item.map_err(StoreError::sled("inbound"))?;
                postcard::from_bytes(&value).map_err(|e| StoreError::Corrupt {
                    what: "inbound",
                    message: e.to_string(),
                })
            })
            .collect()
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
        for seq in 1..=5 {
            assert!(inbound.store("s-1", &entry(seq)).unwrap());
        }
        assert!(
            !inbound.store("s-1", &entry(3)).unwrap(),
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
        inbound.store("s-10", &entry(1)).unwrap();
        assert_eq!(inbound.since("s-1", 0).unwrap().len(), 5);
        inbound.forget("s-1").unwrap();
        assert!(inbound.since("s-1", 0).unwrap().is_empty());
        assert_eq!(inbound.since("s-10", 0).unwrap().len(), 1);
    }
}
