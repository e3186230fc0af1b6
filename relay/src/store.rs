//! The relay's durable state: one sled tree with prefixed keys.
//!
//! Keys (session ids never contain a NUL byte, so every prefix scan is unambiguous):
//! - `s\0{session}` → the [`Session`] (postcard). Its `last_seq` and `last_activity` are
//!   recomputed from the log on open, so appending to the log never rewrites it.
//! - `l\0{session}\0{seq: u64 BE}` → a [`LogEntry`] (postcard). Big-endian keys sort in
//!   sequence order.
//! - `d\0{instance}` → the last journal seq applied for that daemon instance (u64 BE): the
//!   bridge dedup table.
//! - `p\0{session}\0{request_id}` → the state of a permission prompt (one byte).
//! - `q\0{session}\0{seq: u64 BE}` → an agent input line waiting for the session's agent
//!   (messages sent while it is paused or failed), keyed by its log seq.
//!
//! Everything one event changes goes into one [`Batch`] applied atomically, so a crash
//! leaves either the whole event or none of it. Nothing here flushes on its own: the core
//! flushes once per round and only then acknowledges.
//!
//! This module must never decide anything: it encodes, decodes and scans.

use std::path::{Path, PathBuf};

use cloud_protocol::session::{LogEntry, Session};
use sled::{Batch, IVec, Tree};

/// sled's cache; its default is 1 GiB, far more than the relay's working set.
const CACHE_CAPACITY: u64 = 8 * 1024 * 1024;

/// The state of a permission prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptState {
    /// Waiting for its first answer.
    Pending,
    /// Answered; later answers are refused.
    Answered,
    /// Withdrawn by the agent (or its agent stopped); answers are refused.
    Withdrawn,
}

impl PromptState {
    fn to_byte(self) -> u8 {
        match self {
            PromptState::Pending => 0,
            PromptState::Answered => 1,
            PromptState::Withdrawn => 2,
        }
    }

    fn from_byte(byte: u8) -> PromptState {
        match byte {
            0 => PromptState::Pending,
            1 => PromptState::Answered,
            _ => PromptState::Withdrawn,
        }
    }
}

/// The store could not be opened, read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled failed.
    #[error("relay store {path}: {source}")]
    Sled {
        /// The store's directory.
        path: PathBuf,
        /// Why.
        source: sled::Error,
    },
    /// A stored value does not decode (a bug or a damaged store).
    #[error("relay store {path}: undecodable value under {key}: {reason}")]
    Corrupt {
        /// The store's directory.
        path: PathBuf,
        /// The key, printable.
        key: String,
        /// Why.
        reason: String,
    },
}

/// A session as found on disk when the relay opens.
#[derive(Debug)]
pub struct StoredSession {
    /// The session, with `last_seq` and `last_activity` taken from its log.
    pub session: Session,
    /// Its permission prompts.
    pub prompts: Vec<(String, PromptState)>,
}

/// The relay's store.
#[derive(Debug, Clone)]
pub struct Store {
    /// Kept for flushing (flushes cover every tree).
    db: sled::Db,
    /// The one tree holding everything.
    tree: Tree,
    /// The directory, for messages.
    path: PathBuf,
}

fn key(prefix: u8, parts: &[&[u8]]) -> Vec<u8> {
    let mut key = vec![prefix, 0];
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            key.push(0);
        }
        key.extend_from_slice(part);
    }
    key
}

fn session_key(session: &str) -> Vec<u8> {
    key(b's', &[session.as_bytes()])
}

fn log_prefix(session: &str) -> Vec<u8> {
    key(b'l', &[session.as_bytes(), b""])
}

fn log_key(session: &str, seq: u64) -> Vec<u8> {
    key(b'l', &[session.as_bytes(), &seq.to_be_bytes()])
}

fn dedup_key(instance: &str) -> Vec<u8> {
    key(b'd', &[instance.as_bytes()])
}

fn prompt_prefix(session: &str) -> Vec<u8> {
    key(b'p', &[session.as_bytes(), b""])
}

fn prompt_key(session: &str, request_id: &str) -> Vec<u8> {
    key(b'p', &[session.as_bytes(), request_id.as_bytes()])
}

fn queue_prefix(session: &str) -> Vec<u8> {
    key(b'q', &[session.as_bytes(), b""])
}

fn queue_key(session: &str, seq: u64) -> Vec<u8> {
    key(b'q', &[session.as_bytes(), &seq.to_be_bytes()])
}

fn seq_of(key: &[u8]) -> u64 {
    let tail: [u8; 8] = key[key.len() - 8..].try_into().unwrap_or([0; 8]);
    u64::from_be_bytes(tail)
}

impl Store {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let sled_error = |source| StoreError::Sled {
            path: dir.to_owned(),
            source,
        };
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(CACHE_CAPACITY)
            .open()
            .map_err(sled_error)?;
        let tree = db.open_tree("relay").map_err(sled_error)?;
        Ok(Store {
            db,
            tree,
            path: dir.to_owned(),
        })
    }

    fn sled_error(&self, source: sled::Error) -> StoreError {
        StoreError::Sled {
            path: self.path.clone(),
            source,
        }
    }

    fn corrupt(&self, key: &[u8], reason: impl ToString) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            key: String::from_utf8_lossy(key).replace('\0', "/"),
            reason: reason.to_string(),
        }
    }

    /// Applies one event's changes atomically.
    pub fn apply(&self, batch: Batch) -> Result<(), StoreError> {
        self.tree.apply_batch(batch).map_err(|e| self.sled_error(e))
    }

    /// Makes everything applied so far durable (against a killed process; see sled #1351
    /// for power loss).
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.db
            .flush_async()
            .await
            .map(drop)
            .map_err(|e| self.sled_error(e))
    }

    /// Every stored session with its prompts.
    pub fn load_sessions(&self) -> Result<Vec<StoredSession>, StoreError> {
        let mut sessions = Vec::new();
        for item in self.tree.scan_prefix(key(b's', &[])) {
            let (key, value) = item.map_err(|e| self.sled_error(e))?;
            let mut session: Session =
                postcard::from_bytes(&value).map_err(|e| self.corrupt(&key, e))?;
            if let Some(last) = self.last_log_entry(&session.id)? {
                session.last_seq = last.seq;
                session.last_activity = session.last_activity.max(last.at);
            } else {
                session.last_seq = 0;
            }
            let mut prompts = Vec::new();
            let prefix = prompt_prefix(&session.id);
            for item in self.tree.scan_prefix(&prefix) {
                let (key, value) = item.map_err(|e| self.sled_error(e))?;
                let request_id = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
                prompts.push((
                    request_id,
                    PromptState::from_byte(value.first().copied().unwrap_or(2)),
                ));
            }
            sessions.push(StoredSession { session, prompts });
        }
        Ok(sessions)
    }

    fn last_log_entry(&self, session: &str) -> Result<Option<LogEntry>, StoreError> {
        match self
            .tree
            .scan_prefix(log_prefix(session))
            .next_back()
            .transpose()
            .map_err(|e| self.sled_error(e))?
        {
            Some((key, value)) => Ok(Some(
                postcard::from_bytes(&value).map_err(|e| self.corrupt(&key, e))?,
            )),
            None => Ok(None),
        }
    }

    /// The whole dedup table: instance id → last journal seq applied.
    pub fn load_dedup(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let prefix = key(b'd', &[]);
        self.tree
            .scan_prefix(&prefix)
            .map(|item| {
                let (key, value) = item.map_err(|e| self.sled_error(e))?;
                let instance = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
                Ok((instance, seq_of(&value)))
            })
            .collect()
    }

    /// Log entries of `session` with `after < seq <= up_to`, at most `limit` of them.
    pub fn read_log(
        &self,
        session: &str,
        after: u64,
        up_to: u64,
        limit: usize,
    ) -> Result<Vec<LogEntry>, StoreError> {
        if after >= up_to {
            return Ok(Vec::new());
        }
        let start = log_key(session, after.saturating_add(1));
        let end = log_key(session, up_to);
        self.tree
            .range(start..=end)
            .take(limit)
            .map(|item| {
                let (key, value) = item.map_err(|e| self.sled_error(e))?;
                postcard::from_bytes(&value).map_err(|e| self.corrupt(&key, e))
            })
            .collect()
    }

    /// The agent input lines queued for `session`, in order, with their keys' seqs.
    pub fn queued_input(&self, session: &str) -> Result<Vec<(u64, String)>, StoreError> {
        self.tree
            .scan_prefix(queue_prefix(session))
            .map(|item| {
                let (key, value) = item.map_err(|e| self.sled_error(e))?;
                Ok((seq_of(&key), String::from_utf8_lossy(&value).into_owned()))
            })
            .collect()
    }

    /// Every key belonging to `session` (its record, log, prompts and queue).
    pub fn session_keys(&self, session: &str) -> Result<Vec<IVec>, StoreError> {
        let mut keys = vec![IVec::from(session_key(session))];
        for prefix in [
            log_prefix(session),
            prompt_prefix(session),
            queue_prefix(session),
        ] {
            for item in self.tree.scan_prefix(prefix).keys() {
                keys.push(item.map_err(|e| self.sled_error(e))?);
            }
        }
        Ok(keys)
    }
}

/// Builds one event's writes. The core gathers a whole round's into one sled batch
/// ([`Changes::into_batch`]): one apply and one flush per round instead of per event.
#[derive(Debug, Default)]
pub struct Changes {
    /// Inserts (`Some`) and removals (`None`), in order; a later write to a key wins.
    ops: Vec<(IVec, Option<IVec>)>,
}

impl Changes {
    /// Writes the session record.
    pub fn put_session(&mut self, session: &Session) {
        let value = postcard::to_allocvec(session).expect("a session always serialises");
        self.insert(session_key(&session.id), value);
    }

    /// Appends a log entry.
    pub fn put_log(&mut self, session: &str, entry: &LogEntry) {
        let value = postcard::to_allocvec(entry).expect("a log entry always serialises");
        self.insert(log_key(session, entry.seq), value);
    }

    /// Records the last journal seq applied for a daemon instance.
    pub fn put_dedup(&mut self, instance: &str, seq: u64) {
        self.insert(dedup_key(instance), seq.to_be_bytes().to_vec());
    }

    /// Records a prompt's state.
    pub fn put_prompt(&mut self, session: &str, request_id: &str, state: PromptState) {
        self.insert(prompt_key(session, request_id), vec![state.to_byte()]);
    }

    /// Queues an agent input line until the session's agent runs.
    pub fn put_queued(&mut self, session: &str, seq: u64, line: &str) {
        self.insert(queue_key(session, seq), line.as_bytes().to_vec());
    }

    /// Removes a queued line (it was handed to the agent).
    pub fn remove_queued(&mut self, session: &str, seq: u64) {
        self.ops.push((queue_key(session, seq).into(), None));
    }

    /// Removes a key (used when deleting a session).
    pub fn remove(&mut self, key: IVec) {
        self.ops.push((key, None));
    }

    /// Appends another event's writes after these.
    pub fn extend(&mut self, later: Changes) {
        self.ops.extend(later.ops);
    }

    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// One atomic sled batch of everything, later writes winning.
    pub fn into_batch(self) -> Batch {
        let mut batch = Batch::default();
        for (key, value) in self.ops {
            match value {
                Some(value) => batch.insert(key, value),
                None => batch.remove(key),
            }
        }
        batch
    }

    fn insert(&mut self, key: impl Into<IVec>, value: Vec<u8>) {
        self.ops.push((key.into(), Some(value.into())));
    }
}
