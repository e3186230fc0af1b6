//! Idempotency keys: a client's retry of an event is recognised as the same event.
//!
//! An [`Outbound`](cloud_protocol::bridge::Outbound) event may carry a key chosen by its
//! client. Keys are scoped: a daemon instance's events by its dedup key
//! (`user/instance`), REST events by the token's user (user names never contain `/`, so
//! the two never meet). The first event with a key in a scope is applied or refused as
//! usual and its outcome recorded (the log seq, or the refusal) in the same store batch;
//! a repeat is answered with that outcome and applied no further. Records are kept for
//! [`KEY_LIFETIME`] from their first use and then swept, at most [`MAX_SWEEP`] at a time
//! and at most every [`SWEEP_INTERVAL`]; an expired record no longer counts.
//!
//! This module owns the records' lifetime and the keys recorded in the current round
//! (which are not in the store until the round's batch is applied). It never applies an
//! event and never flushes: the core does both.

use std::collections::HashMap;

use cloud_protocol::bridge::MAX_IDEMPOTENCY_KEY;

use super::error::CoreError;
use crate::store::{Changes, KeyOutcome, KeyRecord, Store, StoreError};

/// How long a key is remembered (milliseconds): a day, far longer than any client retries.
pub const KEY_LIFETIME: u64 = 24 * 60 * 60 * 1000;

/// How often expired records are looked for (milliseconds).
pub const SWEEP_INTERVAL: u64 = 10 * 60 * 1000;

/// The most expired records removed by one sweep, so a sweep never makes a round slow;
/// when there were more, the next round sweeps again.
pub const MAX_SWEEP: usize = 10_000;

/// What a key's lookup found.
#[derive(Debug)]
pub enum Lookup {
    /// A repeat: the first event's outcome.
    Repeat(Result<u64, CoreError>),
    /// The first use of the key (or the first since its record expired, written at `at`).
    New {
        /// When the expired record was written.
        expired: Option<u64>,
    },
}

/// The core's idempotency keys.
#[derive(Debug, Default)]
pub struct Keys {
    /// (scope, key) → outcome, for the keys recorded in the current round.
    round: HashMap<(String, String), KeyOutcome>,
    /// When the last sweep ran (0: never).
    last_sweep: u64,
    /// Whether the last sweep stopped at [`MAX_SWEEP`].
    more_expired: bool,
}

impl Keys {
    /// Refuses a key over [`MAX_IDEMPOTENCY_KEY`] bytes.
    pub fn check_length(key: &str) -> Result<(), CoreError> {
        if key.len() > MAX_IDEMPOTENCY_KEY {
            return Err(CoreError::Invalid(format!(
                "an idempotency key is at most {MAX_IDEMPOTENCY_KEY} bytes; this one has {}",
                key.len()
            )));
        }
        Ok(())
    }

    /// Looks `key` up in `scope` at time `now`.
    pub fn lookup(
        &self,
        store: &Store,
        scope: &str,
        key: &str,
        now: u64,
    ) -> Result<Lookup, StoreError> {
        if let Some(outcome) = self.round.get(&(scope.to_owned(), key.to_owned())) {
            return Ok(Lookup::Repeat(replay(outcome)));
        }
        Ok(match store.key_record(scope, key)? {
            Some(record) if now.saturating_sub(record.at) < KEY_LIFETIME => {
                Lookup::Repeat(replay(&record.outcome))
            }
            Some(record) => Lookup::New {
                expired: Some(record.at),
            },
            None => Lookup::New { expired: None },
        })
    }

    /// Records the outcome of the first event with `key` in `scope`, in `changes` (which
    /// must share a batch with the event's own writes). Transient failures are not
    /// recorded: a retry may succeed.
    pub fn record(
        &mut self,
        changes: &mut Changes,
        scope: &str,
        key: &str,
        at: u64,
        expired: Option<u64>,
        result: &Result<u64, CoreError>,
    ) {
        let outcome = match result {
            Ok(seq) => KeyOutcome::Applied(*seq),
            Err(error) => match refusal(error) {
                Some(outcome) => outcome,
                None => return,
            },
        };
        if let Some(expired) = expired {
            changes.remove_key_record(scope, key, expired);
        }
        changes.put_key_record(
            scope,
            key,
            &KeyRecord {
                at,
                outcome: outcome.clone(),
            },
        );
        self.round
            .insert((scope.to_owned(), key.to_owned()), outcome);
    }

    /// Forgets the round's keys: its batch has been applied.
    pub fn end_round(&mut self) {
        self.round.clear();
    }

    /// Removes expired records into `changes` if a sweep is due at `now`.
    pub fn sweep(
        &mut self,
        store: &Store,
        now: u64,
        changes: &mut Changes,
    ) -> Result<(), StoreError> {
        if !self.more_expired && now.saturating_sub(self.last_sweep) < SWEEP_INTERVAL {
            return Ok(());
        }
        self.last_sweep = now;
        let expired = store.key_records_before(now.saturating_sub(KEY_LIFETIME), MAX_SWEEP)?;
        // Two store keys per record.
        self.more_expired = expired.len() >= 2 * MAX_SWEEP;
        if !expired.is_empty() {
            tracing::debug!(
                n_records = expired.len() / 2,
                "expired idempotency keys removed"
            );
        }
        for key in expired {
            changes.remove(key);
        }
        Ok(())
    }
}

/// The kinds of refusal a record keeps, so a repeat is refused exactly as its first.
const NOT_FOUND: u8 = 1;
const FORBIDDEN: u8 = 2;
const CONFLICT: u8 = 3;
const INVALID: u8 = 4;

/// A refusal as recorded; `None` for a transient one (the store, a shutdown, a provider
/// the platform cannot run yet).
fn refusal(error: &CoreError) -> Option<KeyOutcome> {
    let (kind, reason) = match error {
        CoreError::NotFound(session) => (NOT_FOUND, session.clone()),
        CoreError::Forbidden(reason) => (FORBIDDEN, reason.clone()),
        CoreError::Transition(_) | CoreError::Conflict(_) => (CONFLICT, error.to_string()),
        CoreError::Invalid(reason) => (INVALID, reason.clone()),
        CoreError::Store | CoreError::ShuttingDown | CoreError::Unavailable(_) => return None,
    };
    Some(KeyOutcome::Refused { kind, reason })
}

/// The answer a recorded outcome gives again.
fn replay(outcome: &KeyOutcome) -> Result<u64, CoreError> {
    match outcome {
        KeyOutcome::Applied(seq) => Ok(*seq),
        KeyOutcome::Refused { kind, reason } => Err(match *kind {
            NOT_FOUND => CoreError::NotFound(reason.clone()),
            FORBIDDEN => CoreError::Forbidden(reason.clone()),
            INVALID => CoreError::Invalid(reason.clone()),
            _ => CoreError::Conflict(reason.clone()),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_replay_as_they_were_refused() {
        let transition = cloud_protocol::session::SessionStatus::Completed
            .check_transition(cloud_protocol::session::SessionStatus::Running)
            .unwrap_err();
        for error in [
            CoreError::NotFound("s-1".into()),
            CoreError::Forbidden("viewers cannot send".into()),
            CoreError::Conflict("permission request r was withdrawn".into()),
            CoreError::Invalid("updated_input is not valid JSON".into()),
            CoreError::Transition(transition.clone()),
        ] {
            let replayed = replay(&refusal(&error).unwrap()).unwrap_err();
            assert_eq!(replayed.to_string(), error.to_string());
        }
        assert!(refusal(&CoreError::Store).is_none());
        assert!(refusal(&CoreError::ShuttingDown).is_none());
    }

    #[test]
    fn records_expire_and_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut keys = Keys::default();
        let day = KEY_LIFETIME;
        let mut changes = Changes::default();
        // The same key in two scopes, whose bytes could run together without the length.
        keys.record(&mut changes, "u/i", "k", 1000, None, &Ok(7));
        keys.record(
            &mut changes,
            "u/ik",
            "",
            2000,
            None,
            &Err(CoreError::Forbidden("no".into())),
        );
        assert!(matches!(
            keys.lookup(&store, "u/i", "k", 1000).unwrap(),
            Lookup::Repeat(Ok(7))
        ));
        store.apply(changes.into_batch()).unwrap();
        keys.end_round();
        assert!(matches!(
            keys.lookup(&store, "u/i", "k", 1000 + day - 1).unwrap(),
            Lookup::Repeat(Ok(7))
        ));
        assert!(matches!(
            keys.lookup(&store, "u/ik", "", 2000).unwrap(),
            Lookup::Repeat(Err(CoreError::Forbidden(_)))
        ));
        assert!(matches!(
            keys.lookup(&store, "u/i", "k", 1000 + day).unwrap(),
            Lookup::New {
                expired: Some(1000)
            }
        ));
        assert!(matches!(
            keys.lookup(&store, "u", "ik", 1000).unwrap(),
            Lookup::New { expired: None }
        ));
        // Reused after expiring: the old record's time index goes with it.
        let mut changes = Changes::default();
        keys.record(&mut changes, "u/i", "k", 1000 + day, Some(1000), &Ok(9));
        store.apply(changes.into_batch()).unwrap();
        keys.end_round();
        let mut changes = Changes::default();
        keys.sweep(&store, 2001 + day, &mut changes).unwrap();
        store.apply(changes.into_batch()).unwrap();
        assert!(matches!(
            keys.lookup(&store, "u/ik", "", 0).unwrap(),
            Lookup::New { expired: None }
        ));
        assert!(matches!(
            keys.lookup(&store, "u/i", "k", 1000 + day).unwrap(),
            Lookup::Repeat(Ok(9))
        ));
        // Not due again until the interval has passed; then only what expired goes.
        let mut changes = Changes::default();
        keys.sweep(&store, 2002 + day, &mut changes).unwrap();
        assert!(changes.is_empty(), "not due yet");
        keys.sweep(&store, 2001 + day + SWEEP_INTERVAL, &mut changes)
            .unwrap();
        assert!(
            changes.is_empty(),
            "the record of 1000 + day has not expired"
        );
        keys.sweep(&store, 1001 + 2 * day, &mut changes).unwrap();
        store.apply(changes.into_batch()).unwrap();
        assert!(matches!(
            keys.lookup(&store, "u/i", "k", 0).unwrap(),
            Lookup::New { expired: None }
        ));
    }
}
