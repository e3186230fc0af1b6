//! The core's side of delivery ([`super::delivery`]): each session's unfinished user
//! messages, rebuilt from its log at start (after the stored finished mark), read back to
//! be handed to a new agent, finished one per turn, or given up (each logged as
//! `not_processed`) when the session is completed. The finished mark (the store's `f` key)
//! is written in the batch of the change that moves it.
//!
//! It decides nothing: the session and agent handlers say when messages are handed over,
//! finished or given up.

use cloud_protocol::session::{Author, SessionEvent};

use super::delivery::{self, Unfinished};
use super::{Core, Round, SessionRuntime, LOG_READ_PAGE};
use crate::store::{Changes, Store, StoreError};

impl Core {
    /// The stream-json lines of the session's unfinished messages, oldest first, read back
    /// from its log.
    pub(super) fn unfinished_lines(&mut self, id: &str, round: &mut Round) -> Vec<String> {
        if self.sessions[id].unfinished.is_empty() {
            return Vec::new();
        }
        self.apply_pending(round);
        let mut lines = Vec::new();
        for (first, last) in self.sessions[id].unfinished.runs() {
            let mut after = first - 1;
            while after < last {
                let entries = match self.store.read_log(id, after, last, LOG_READ_PAGE) {
                    Ok(entries) => entries,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot read unfinished messages");
                        self.broken = true;
                        return Vec::new();
                    }
                };
                let Some(end) = entries.last().map(|e| e.seq) else {
                    break;
                };
                lines.extend(entries.into_iter().filter_map(|entry| match entry.event {
                    SessionEvent::Message(line) => Some(line),
                    SessionEvent::Status { .. } | SessionEvent::Snapshot(_) => None,
                }));
                after = end;
            }
        }
        lines
    }

    /// Logs each unfinished message of a session that no agent will take as
    /// `not_processed`, with `reason`, and marks them finished. `lines` are theirs, as
    /// [`Core::unfinished_lines`] read them.
    pub(super) fn give_up_unfinished(
        &mut self,
        id: &str,
        lines: Vec<String>,
        reason: &str,
        changes: &mut Changes,
        round: &mut Round,
    ) {
        let runtime = self.sessions.get_mut(id).unwrap();
        let seqs: Vec<u64> = runtime
            .unfinished
            .runs()
            .flat_map(|(first, last)| first..=last)
            .collect();
        if runtime.unfinished.clear().is_none() {
            return;
        }
        for (seq, line) in seqs.into_iter().zip(lines) {
            let entry = delivery::not_processed(&line, seq, reason);
            self.append(id, Author::Relay, SessionEvent::Message(entry), round);
        }
        changes.put_finished(id, finished_mark(&self.sessions[id]));
    }
}

/// The session's agent ended a turn: its oldest unfinished message is finished. In the
/// batch of the `result` entry, so a finished turn is never handed to an agent again.
pub(super) fn finish_turn(runtime: &mut SessionRuntime, changes: &mut Changes) {
    if runtime.unfinished.finish_oldest().is_some() {
        changes.put_finished(&runtime.session.id, finished_mark(runtime));
    }
}

/// The log seq to store as the session's finished mark (the `f` key): every user message
/// after it is unfinished, every one before it finished. Just before the oldest unfinished
/// message, or the end of the log, so a restart reads back as little of the log as it can.
fn finished_mark(runtime: &SessionRuntime) -> u64 {
    runtime
        .unfinished
        .oldest()
        .map_or(runtime.session.last_seq, |oldest| oldest - 1)
}

/// The unfinished messages of a session: the user messages of its log after `finished`.
pub(super) fn unfinished_messages(
    store: &Store,
    session: &str,
    finished: u64,
    last_seq: u64,
) -> Result<Unfinished, StoreError> {
    let mut unfinished = Unfinished::default();
    let mut after = finished;
    while after < last_seq {
        let entries = store.read_log(session, after, last_seq, LOG_READ_PAGE)?;
        let Some(end) = entries.last().map(|e| e.seq) else {
            break;
        };
        for entry in entries.iter().filter(|e| delivery::is_user_message(e)) {
            unfinished.push(entry.seq);
        }
        after = end;
    }
    Ok(unfinished)
}
