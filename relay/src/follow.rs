//! Following a session's log: the stored entries after a cursor, then live ones.
//!
//! A follower never receives entries from the core. It waits on the session's published
//! log seq (a watch channel the core bumps after each flush) and reads the entries up to
//! it from the store, so a slow follower costs no memory anywhere and cannot miss or
//! reorder an entry, and nothing unflushed is ever shown. A follower that keeps up takes
//! them instead from the published session's latest round ([`Published::recent`]), which
//! the core publishes with the log seq after the same flush: the same entries, without
//! reading back what was just written.
//!
//! [`Published::recent`]: crate::core::Published::recent
//!
//! A follower stops when the session is deleted or stops being visible to its user.

use std::ops::Deref;
use std::sync::Arc;

use cloud_protocol::session::LogEntry;
use tokio::sync::watch;

use crate::access::Identity;
use crate::core::{CoreError, Shared};

/// How many entries one read returns.
const PAGE: usize = 256;

/// Consecutive entries handed out by a follower: shared with the published session when
/// they came from its latest round, read from the store otherwise.
#[derive(Debug, Clone)]
pub struct Entries {
    /// Every entry of the round (or of the read).
    all: Arc<[LogEntry]>,
    /// The first one handed out.
    start: usize,
}

impl Deref for Entries {
    type Target = [LogEntry];

    fn deref(&self) -> &[LogEntry] {
        &self.all[self.start..]
    }
}

/// A cursor over one session's log for one user.
#[derive(Debug)]
pub struct Follower {
    /// For the store and visibility checks.
    shared: Arc<Shared>,
    /// Whose view this is.
    identity: Identity,
    /// The session.
    session: String,
    /// The last seq handed out.
    cursor: u64,
    /// The session's published log seq.
    log_seq: watch::Receiver<u64>,
}

impl Follower {
    /// Follows `session` after `after`, if the user may see it.
    pub fn new(
        shared: Arc<Shared>,
        identity: Identity,
        session: String,
        after: u64,
    ) -> Result<Follower, CoreError> {
        shared.session_for(&identity, &session)?;
        let log_seq = shared
            .log_seq(&session)
            .ok_or_else(|| CoreError::NotFound(session.clone()))?;
        Ok(Follower {
            shared,
            identity,
            session,
            cursor: after,
            log_seq,
        })
    }

    /// The session.
    pub fn session(&self) -> &str {
        &self.session
    }

    /// The next entries, waiting for them; `None` when the session is gone or no longer
    /// visible.
    pub async fn next(&mut self) -> Option<Entries> {
        loop {
            let published = *self.log_seq.borrow_and_update();
            if published > self.cursor {
                if !self.shared.can_see(&self.identity, &self.session) {
                    return None;
                }
                if let Some((all, start)) = self.shared.recent_after(&self.session, self.cursor) {
                    let entries = Entries { all, start };
                    if let Some(last) = entries.last() {
                        self.cursor = last.seq;
                        return Some(entries);
                    }
                }
                let entries =
                    match self
                        .shared
                        .store
                        .read_log(&self.session, self.cursor, published, PAGE)
                    {
                        Ok(entries) => entries,
                        Err(e) => {
                            tracing::error!(error = %e, session = %self.session, "log read failed");
                            return None;
                        }
                    };
                match entries.last() {
                    Some(last) => {
                        self.cursor = last.seq;
                        return Some(Entries {
                            all: entries.into(),
                            start: 0,
                        });
                    }
                    // Published but not found: the session was deleted meanwhile.
                    None => return None,
                }
            }
            self.log_seq.changed().await.ok()?;
        }
    }
}
