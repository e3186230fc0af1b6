//! The relay's durable state: one sled tree with prefixed keys.
//!
//! Keys (session ids never contain a NUL byte, so every prefix scan is unambiguous):
//! - `s\0{session}` → the [`Session`] (postcard). Its `last_seq` and `last_activity` are
//!   recomputed from the log on open, so appending to the log never rewrites it.
//! - `l\0{session}\0{seq: u64 BE}` → a log chunk: the [`LogEntry`] with that seq and the
//!   ones after it that were written in the same round, each postcard-encoded, back to back
//!   (a chunk of one is exactly one encoded entry, as earlier relays wrote every entry).
//!   Big-endian keys sort in sequence order, and chunks never overlap. One key per round
//!   and session, rather than one per entry, is what keeps sled's per-key cost off the
//!   bridge's hot path.
//! - `d\0{instance}` → the last journal seq applied for that daemon instance (u64 BE): the
//!   bridge dedup table.
//! - `r\0{instance}\0{seq: u64 BE}` → why the journaled event `seq` of that daemon instance
//!   was refused (UTF-8), for the most recent refusals of each instance
//!   ([`MAX_STORED_REFUSALS`]), so a registration can report them again. Instance ids are
//!   the daemon's choice and may hold a NUL byte, so these keys are read from the end: the
//!   last 8 bytes are the seq, the byte before them a NUL, the rest the instance.
//! - `p\0{session}\0{request_id}` → the state of a permission prompt (one byte).
//! - `f\0{session}` → the session's finished mark, a log seq (u64 BE): every user message
//!   after it in the log is unfinished, and is handed to the session's next agent; every
//!   one before it is finished. Written when a session is created, whenever a turn ends
//!   and when unfinished messages are given up.
//! - `q\0{session}\0{seq: u64 BE}` → written only by earlier relays: a user message waiting
//!   for the session's next agent. Read once, to place a session's first `f` key.
//! - `k\0{scope length: u32 BE}{scope}{key}` → what became of the first event with that
//!   idempotency key in that scope (a daemon instance, or a REST user): the time it was
//!   recorded (ms, u64 BE), then 0 and its log seq (u64 BE), or 1, a refusal kind byte and
//!   the reason (UTF-8). The length prefix keeps any scope and key apart.
//! - `K\0{at: u64 BE}{scope length: u32 BE}{scope}{key}` → nothing: the same records by
//!   time, so expired ones are found without a full scan.
//!
//! Everything a round of the core changes goes into one [`Batch`] applied atomically, so
//! a crash leaves either the whole of each event or none of it. Nothing here flushes on its
//! own: the core flushes once per round and only then acknowledges.
//!
//! This module must never decide anything: it encodes, decodes and scans.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use cloud_protocol::session::{LogEntry, Session};
use sled::{Batch, IVec, Tree};

/// sled's cache; its default is 1 GiB, far more than the relay's working set.
const CACHE_CAPACITY: u64 = 8 * 1024 * 1024;

/// A log chunk takes no more entries once it holds this many bytes. sled rewrites a whole
/// leaf (up to 17 keys) as one log record and moves any record over 128 KiB to a file of
/// its own, so chunks stay well below 128 KiB ÷ 17.
const LOG_CHUNK_BYTES: usize = 4 * 1024;

/// How many refusals are kept per daemon instance (the most recent ones, by journal seq).
pub const MAX_STORED_REFUSALS: usize = 256;

/// What became of the first event with an idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyOutcome {
    /// It was applied, with this log seq.
    Applied(u64),
    /// It was refused.
    Refused {
        /// The kind of refusal, as the core numbers them.
        kind: u8,
        /// Why.
        reason: String,
    },
}

/// The stored record of an idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    /// When it was recorded (milliseconds since the Unix epoch).
    pub at: u64,
    /// What became of its event.
    pub outcome: KeyOutcome,
}

impl KeyRecord {
    fn encode(&self) -> Vec<u8> {
        let mut value = self.at.to_be_bytes().to_vec();
        match &self.outcome {
            KeyOutcome::Applied(seq) => {
                value.push(0);
                value.extend_from_slice(&seq.to_be_bytes());
            }
            KeyOutcome::Refused { kind, reason } => {
                value.push(1);
                value.push(*kind);
                value.extend_from_slice(reason.as_bytes());
            }
        }
        value
    }

    fn decode(value: &[u8]) -> Option<KeyRecord> {
        let at = u64::from_be_bytes(value.get(..8)?.try_into().ok()?);
        let outcome = match value.get(8)? {
            0 => KeyOutcome::Applied(u64::from_be_bytes(value.get(9..17)?.try_into().ok()?)),
            1 => KeyOutcome::Refused {
                kind: *value.get(9)?,
                reason: String::from_utf8_lossy(value.get(10..)?).into_owned(),
            },
            _ => return None,
        };
        Some(KeyRecord { at, outcome })
    }
}

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

impl StoreError {
    /// Whether the store could not be opened because its lock is held (by another process,
    /// or by what is left of a store this process just closed).
    pub fn is_locked(&self) -> bool {
        // sled says so only in words.
        matches!(self, StoreError::Sled { source: sled::Error::Io(e), .. }
            if e.to_string().contains("could not acquire lock"))
    }
}

/// A session as found on disk when the relay opens.
#[derive(Debug)]
pub struct StoredSession {
    /// The session, with `last_seq` and `last_activity` taken from its log.
    pub session: Session,
    /// Its permission prompts.
    pub prompts: Vec<(String, PromptState)>,
    /// Its finished mark (a log seq: the user messages after it are unfinished); `None`
    /// for a session an earlier relay wrote.
    pub finished: Option<u64>,
    /// The log seqs of the messages an earlier relay queued for its next agent (`q` keys),
    /// in order.
    pub legacy_queue: Vec<u64>,
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

fn refusal_key(instance: &str, seq: u64) -> Vec<u8> {
    key(b'r', &[instance.as_bytes(), &seq.to_be_bytes()])
}

/// Splits a refusal key into its instance and seq; None for a key that is not one.
fn parse_refusal_key(key: &[u8]) -> Option<(String, u64)> {
    // `r`, NUL, the instance, NUL, 8 bytes of seq.
    let instance_end = key.len().checked_sub(9).filter(|&end| end >= 2)?;
    if key[..2] != [b'r', 0] || key[instance_end] != 0 {
        return None;
    }
    let instance = String::from_utf8_lossy(&key[2..instance_end]).into_owned();
    Some((instance, seq_of(key)))
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

fn finished_key(session: &str) -> Vec<u8> {
    key(b'f', &[session.as_bytes()])
}

/// A scope and an idempotency key, length-prefixed, as both key record keys end.
fn scoped_key(scope: &str, idempotency_key: &str) -> Vec<u8> {
    let length = u32::try_from(scope.len()).unwrap_or(u32::MAX);
    let mut bytes = length.to_be_bytes().to_vec();
    bytes.extend_from_slice(scope.as_bytes());
    bytes.extend_from_slice(idempotency_key.as_bytes());
    bytes
}

fn key_record_key(scope: &str, idempotency_key: &str) -> Vec<u8> {
    let mut key = vec![b'k', 0];
    key.extend_from_slice(&scoped_key(scope, idempotency_key));
    key
}

fn key_index_key(at: u64, scope: &str, idempotency_key: &str) -> Vec<u8> {
    let mut key = vec![b'K', 0];
    key.extend_from_slice(&at.to_be_bytes());
    key.extend_from_slice(&scoped_key(scope, idempotency_key));
    key
}

/// The seq in the last 8 bytes of a key (or of a dedup value); 0 when a damaged record has
/// fewer.
fn seq_of(key: &[u8]) -> u64 {
    key.len()
        .checked_sub(8)
        .and_then(|at| key[at..].try_into().ok())
        .map_or(0, u64::from_be_bytes)
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
    ///
    /// On a blocking thread rather than with sled's `flush_async`: that hands the flush to
    /// sled's own thread pool, which wakes all of its idle threads (seven) for every task,
    /// and the flush's write is a second task there, so each flush cost fourteen wake-ups
    /// instead of eight.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let db = self.db.clone();
        match tokio::task::spawn_blocking(move || db.flush()).await {
            Ok(flushed) => flushed.map(drop).map_err(|e| self.sled_error(e)),
            Err(e) => Err(
                self.sled_error(sled::Error::Io(std::io::Error::other(format!(
                    "the flush did not complete: {e}"
                )))),
            ),
        }
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
            let finished = self
                .get(&finished_key(&session.id))?
                .map(|value| seq_of(&value));
            let legacy_queue = self
                .tree
                .scan_prefix(queue_prefix(&session.id))
                .keys()
                .map(|key| key.map(|key| seq_of(&key)).map_err(|e| self.sled_error(e)))
                .collect::<Result<_, _>>()?;
            sessions.push(StoredSession {
                session,
                prompts,
                finished,
                legacy_queue,
            });
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
            Some((key, value)) => {
                let mut last = None;
                self.decode_chunk(&key, &value, |entry| {
                    last = Some(entry);
                    true
                })?;
                Ok(last)
            }
            None => Ok(None),
        }
    }

    /// Calls `each` with every entry of a log chunk, in order, until it returns false.
    fn decode_chunk(
        &self,
        key: &[u8],
        mut chunk: &[u8],
        mut each: impl FnMut(LogEntry) -> bool,
    ) -> Result<(), StoreError> {
        if chunk.is_empty() {
            return Err(self.corrupt(key, "an empty log chunk"));
        }
        while !chunk.is_empty() {
            let (entry, rest) =
                postcard::take_from_bytes::<LogEntry>(chunk).map_err(|e| self.corrupt(key, e))?;
            chunk = rest;
            if !each(entry) {
                break;
            }
        }
        Ok(())
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

    /// Every stored refusal: (instance, journal seq, reason), each instance's in seq order.
    pub fn load_refusals(&self) -> Result<Vec<(String, u64, String)>, StoreError> {
        self.tree
            .scan_prefix(key(b'r', &[]))
            .map(|item| {
                let (key, value) = item.map_err(|e| self.sled_error(e))?;
                let (instance, seq) = parse_refusal_key(&key)
                    .ok_or_else(|| self.corrupt(&key, "not a refusal key"))?;
                Ok((instance, seq, String::from_utf8_lossy(&value).into_owned()))
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
        if after >= up_to || limit == 0 {
            return Ok(Vec::new());
        }
        let first = log_key(session, after.saturating_add(1));
        // The chunk holding `after + 1` starts at or before it.
        let start = match self
            .tree
            .range(log_prefix(session)..=first.clone())
            .next_back()
            .transpose()
            .map_err(|e| self.sled_error(e))?
        {
            Some((key, _)) => key.to_vec(),
            None => first,
        };
        let end = log_key(session, up_to);
        let mut entries = Vec::new();
        for item in self.tree.range(start..=end) {
            let (key, value) = item.map_err(|e| self.sled_error(e))?;
            let mut more = true;
            self.decode_chunk(&key, &value, |entry| {
                if entry.seq > up_to {
                    more = false;
                } else if entry.seq > after {
                    entries.push(entry);
                    more = entries.len() < limit;
                }
                more
            })?;
            if !more {
                break;
            }
        }
        Ok(entries)
    }

    fn get(&self, key: &[u8]) -> Result<Option<IVec>, StoreError> {
        self.tree.get(key).map_err(|e| self.sled_error(e))
    }

    /// The record of idempotency key `key` in `scope`, if one is stored (expired or not).
    pub fn key_record(&self, scope: &str, key: &str) -> Result<Option<KeyRecord>, StoreError> {
        let stored = key_record_key(scope, key);
        match self.get(&stored)? {
            Some(value) => KeyRecord::decode(&value)
                .map(Some)
                .ok_or_else(|| self.corrupt(&stored, "not an idempotency key record")),
            None => Ok(None),
        }
    }

    /// The keys of at most `limit` idempotency key records written before `before` (ms),
    /// oldest first: each record's key and its time index's key, to be removed together.
    pub fn key_records_before(&self, before: u64, limit: usize) -> Result<Vec<IVec>, StoreError> {
        let start = key(b'K', &[]);
        let end = key(b'K', &[&before.to_be_bytes()]);
        let mut keys = Vec::new();
        for item in self.tree.range(start..end).keys().take(limit) {
            let index = item.map_err(|e| self.sled_error(e))?;
            // `K`, NUL, 8 bytes of time, then the scoped key the record's key ends with.
            let mut record = vec![b'k', 0];
            record.extend_from_slice(index.get(10..).unwrap_or_default());
            keys.push(IVec::from(record));
            keys.push(index);
        }
        Ok(keys)
    }

    /// Every key belonging to `session` (its record, log, prompts, finished mark and
    /// earlier relays' queue).
    pub fn session_keys(&self, session: &str) -> Result<Vec<IVec>, StoreError> {
        let mut keys = vec![
            IVec::from(session_key(session)),
            IVec::from(finished_key(session)),
        ];
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

/// Builds writes: one event's, or a whole round's ([`Changes::extend`]). The core gathers a
/// round's into one sled batch ([`Changes::into_batch`]): one apply and one flush per round
/// instead of per event, and one log chunk per session instead of one key per entry.
#[derive(Debug, Default)]
pub struct Changes {
    /// Inserts (`Some`) and removals (`None`), in order; a later write to a key wins.
    ops: Vec<(IVec, Option<IVec>)>,
    /// Log chunks, in the order they were started.
    logs: Vec<LogChunk>,
    /// Each session's last chunk in `logs`, which later entries of the session extend.
    open: HashMap<String, usize>,
}

/// Consecutive log entries of one session, encoded as they are stored.
#[derive(Debug)]
struct LogChunk {
    /// The session.
    session: String,
    /// The key: the session and the first entry's seq.
    key: Vec<u8>,
    /// The seq the next entry must have to join this chunk.
    next_seq: u64,
    /// The encoded entries.
    bytes: Vec<u8>,
}

impl Changes {
    /// Writes the session record.
    pub fn put_session(&mut self, session: &Session) {
        let value = postcard::to_allocvec(session).expect("a session always serialises");
        self.insert(session_key(&session.id), value);
    }

    /// Appends a log entry. Entries of a session must come in seq order; consecutive ones
    /// share a chunk.
    pub fn put_log(&mut self, session: &str, entry: &LogEntry) {
        let index = match self.open.get(session) {
            Some(&index)
                if self.logs[index].next_seq == entry.seq
                    && self.logs[index].bytes.len() < LOG_CHUNK_BYTES =>
            {
                index
            }
            _ => {
                self.logs.push(LogChunk {
                    session: session.to_owned(),
                    key: log_key(session, entry.seq),
                    next_seq: entry.seq,
                    // Full size at once: growing it step by step costs more.
                    bytes: Vec::with_capacity(LOG_CHUNK_BYTES + 512),
                });
                let index = self.logs.len() - 1;
                self.open.insert(session.to_owned(), index);
                index
            }
        };
        let chunk = &mut self.logs[index];
        chunk.bytes = postcard::to_extend(entry, std::mem::take(&mut chunk.bytes))
            .expect("a log entry always serialises");
        chunk.next_seq = entry.seq + 1;
    }

    /// Records the last journal seq applied for a daemon instance.
    pub fn put_dedup(&mut self, instance: &str, seq: u64) {
        self.insert(dedup_key(instance), seq.to_be_bytes().to_vec());
    }

    /// Records why a daemon instance's journaled event `seq` was refused.
    pub fn put_refusal(&mut self, instance: &str, seq: u64, reason: &str) {
        self.insert(refusal_key(instance, seq), reason.as_bytes().to_vec());
    }

    /// Forgets a stored refusal (it is no longer among the most recent).
    pub fn remove_refusal(&mut self, instance: &str, seq: u64) {
        self.ops.push((refusal_key(instance, seq).into(), None));
    }

    /// Records a prompt's state.
    pub fn put_prompt(&mut self, session: &str, request_id: &str, state: PromptState) {
        self.insert(prompt_key(session, request_id), vec![state.to_byte()]);
    }

    /// Records the session's finished mark: its user messages up to log seq `seq` are
    /// finished, those after it are not.
    pub fn put_finished(&mut self, session: &str, seq: u64) {
        self.insert(finished_key(session), seq.to_be_bytes().to_vec());
    }

    /// Removes a message an earlier relay queued (its place is now in the `f` key).
    pub fn remove_legacy_queued(&mut self, session: &str, seq: u64) {
        self.ops.push((queue_key(session, seq).into(), None));
    }

    /// Records what became of the first event with idempotency key `key` in `scope`.
    pub fn put_key_record(&mut self, scope: &str, key: &str, record: &KeyRecord) {
        self.insert(key_record_key(scope, key), record.encode());
        self.insert(key_index_key(record.at, scope, key), Vec::new());
    }

    /// Forgets an idempotency key's record written at `at` (it expired).
    pub fn remove_key_record(&mut self, scope: &str, key: &str, at: u64) {
        self.ops.push((key_record_key(scope, key).into(), None));
        self.ops.push((key_index_key(at, scope, key).into(), None));
    }

    /// Removes a key (used when deleting a session).
    pub fn remove(&mut self, key: IVec) {
        self.ops.push((key, None));
    }

    /// Appends another event's writes after these.
    pub fn extend(&mut self, later: Changes) {
        self.ops.extend(later.ops);
        for chunk in later.logs {
            let index = self.logs.len();
            self.open.insert(chunk.session.clone(), index);
            self.logs.push(chunk);
        }
    }

    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty() && self.logs.is_empty()
    }

    /// One atomic sled batch of everything, later writes winning. Log chunks go first: a
    /// removal of a log key (deleting a session) is always meant to win.
    pub fn into_batch(self) -> Batch {
        let mut batch = Batch::default();
        for chunk in self.logs {
            batch.insert(chunk.key, chunk.bytes);
        }
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

#[cfg(test)]
mod tests {
    use cloud_protocol::session::{Author, SessionEvent};

    use super::*;

    fn entry(seq: u64, text: &str) -> LogEntry {
        LogEntry {
            seq,
            at: 1000 + seq,
            author: Author::Agent,
            event: SessionEvent::Message(text.to_owned()),
        }
    }

    fn seqs(entries: &[LogEntry]) -> Vec<u64> {
        entries.iter().map(|e| e.seq).collect()
    }

    /// Writes `rounds` (each a list of (session, seq)) one batch per round.
    fn write_rounds(store: &Store, rounds: &[&[(&str, u64)]]) {
        for round in rounds {
            let mut changes = Changes::default();
            for &(session, seq) in *round {
                changes.put_log(session, &entry(seq, &format!("{session} {seq}")));
            }
            store.apply(changes.into_batch()).unwrap();
        }
    }

    #[test]
    fn logs_read_back_across_chunks_rounds_and_sessions() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        write_rounds(
            &store,
            &[
                &[("s-a", 1), ("s-b", 1), ("s-a", 2), ("s-a", 3), ("s-b", 2)],
                &[("s-a", 4)],
                &[("s-a", 5), ("s-a", 6), ("s-a", 7)],
            ],
        );
        // Three rounds, three chunks of s-a, one of s-b.
        assert_eq!(store.tree.scan_prefix(log_prefix("s-a")).count(), 3);
        assert_eq!(store.tree.scan_prefix(log_prefix("s-b")).count(), 1);
        let all = store.read_log("s-a", 0, 7, 100).unwrap();
        assert_eq!(seqs(&all), [1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(all[5], entry(6, "s-a 6"));
        for after in 0..7 {
            for up_to in after..=8 {
                for limit in 1..4 {
                    let expected: Vec<u64> = (after + 1..=up_to.min(7)).take(limit).collect();
                    let read = store.read_log("s-a", after, up_to, limit).unwrap();
                    assert_eq!(seqs(&read), expected, "after {after} up_to {up_to}");
                }
            }
        }
        assert_eq!(seqs(&store.read_log("s-b", 0, 9, 10).unwrap()), [1, 2]);
        assert!(store.read_log("s-c", 0, 9, 10).unwrap().is_empty());
    }

    #[test]
    fn refusals_read_back_whatever_the_instance_ids_hold() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        // Instance ids are the daemon's choice: one may be another's prefix, or hold a NUL
        // and what looks like a seq.
        let tricky = format!("u/a\0{}", "\0".repeat(8));
        let mut changes = Changes::default();
        changes.put_dedup("u/a", 9);
        for (instance, seq) in [("u/a", 3), ("u/a", 1), (tricky.as_str(), 2), ("u/ab", 7)] {
            changes.put_refusal(instance, seq, &format!("{instance} {seq}"));
        }
        changes.put_refusal("u/a", 5, "five");
        changes.remove_refusal("u/a", 5);
        store.apply(changes.into_batch()).unwrap();
        let mut loaded = store.load_refusals().unwrap();
        loaded.sort();
        let expected: Vec<(String, u64, String)> =
            [("u/a", 1), ("u/a", 3), (&tricky, 2), ("u/ab", 7)]
                .into_iter()
                .map(|(instance, seq)| (instance.to_owned(), seq, format!("{instance} {seq}")))
                .collect();
        assert_eq!(loaded, expected);
        assert_eq!(store.load_dedup().unwrap(), [("u/a".to_owned(), 9)]);
        assert_eq!(parse_refusal_key(b"r\0"), None);
        assert_eq!(parse_refusal_key(&dedup_key("u/a")), None);
    }

    #[test]
    fn a_held_lock_is_recognised() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let error = Store::open(dir.path()).unwrap_err();
        assert!(error.is_locked(), "{error}");
        drop(store);
        Store::open(dir.path()).unwrap();
    }

    #[test]
    fn chunks_stay_small() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut changes = Changes::default();
        let text = "x".repeat(1000);
        for seq in 1..=20 {
            changes.put_log("s-a", &entry(seq, &text));
        }
        store.apply(changes.into_batch()).unwrap();
        for item in store.tree.scan_prefix(log_prefix("s-a")) {
            let (_, value) = item.unwrap();
            assert!(value.len() < LOG_CHUNK_BYTES + 1100, "{}", value.len());
        }
        assert!(store.tree.scan_prefix(log_prefix("s-a")).count() >= 20 * 1000 / LOG_CHUNK_BYTES);
        assert_eq!(
            seqs(&store.read_log("s-a", 0, 20, 100).unwrap()),
            (1..=20).collect::<Vec<_>>()
        );
    }

    #[test]
    fn single_entry_values_of_earlier_relays_are_chunks_of_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let session = Session {
            id: "s-a".to_owned(),
            status: cloud_protocol::session::SessionStatus::Paused,
            created_at: 1,
            last_activity: 1,
            task: String::new(),
            visibility: cloud_protocol::session::Visibility::Private,
            repo_access: cloud_protocol::session::RepoAccess::Read,
            network_access: cloud_protocol::session::NetworkAccess::Full,
            vm_image: String::new(),
            owner: "u".to_owned(),
            org: "o".to_owned(),
            failure: None,
            last_seq: 0,
            snapshot: None,
            auto_stop_minutes: 0,
            clients: Vec::new(),
            provider: Default::default(),
            allowed_domains: Vec::new(),
        };
        let mut changes = Changes::default();
        changes.put_session(&session);
        store.apply(changes.into_batch()).unwrap();
        // One key per entry, as earlier relays wrote them.
        for seq in 1..=3 {
            let value = postcard::to_allocvec(&entry(seq, "old")).unwrap();
            store.tree.insert(log_key("s-a", seq), value).unwrap();
        }
        write_rounds(&store, &[&[("s-a", 4), ("s-a", 5)]]);
        assert_eq!(
            seqs(&store.read_log("s-a", 1, 5, 10).unwrap()),
            [2, 3, 4, 5]
        );
        let loaded = store.load_sessions().unwrap();
        assert_eq!(loaded[0].session.last_seq, 5);
        assert_eq!(loaded[0].session.last_activity, 1005);
        // No `f` key: an earlier relay's session, with the messages it queued.
        assert_eq!(loaded[0].finished, None);
        assert!(loaded[0].legacy_queue.is_empty());
        for seq in [4, 5] {
            store
                .tree
                .insert(queue_key("s-a", seq), b"line".to_vec())
                .unwrap();
        }
        assert_eq!(store.load_sessions().unwrap()[0].legacy_queue, [4, 5]);
        let mut changes = Changes::default();
        changes.put_finished("s-a", 3);
        changes.remove_legacy_queued("s-a", 4);
        changes.remove_legacy_queued("s-a", 5);
        store.apply(changes.into_batch()).unwrap();
        let loaded = store.load_sessions().unwrap();
        assert_eq!(loaded[0].finished, Some(3));
        assert!(loaded[0].legacy_queue.is_empty());
        // A deleted session's keys include every chunk.
        let mut changes = Changes::default();
        for key in store.session_keys("s-a").unwrap() {
            changes.remove(key);
        }
        store.apply(changes.into_batch()).unwrap();
        assert!(store.tree.is_empty());
    }
}
