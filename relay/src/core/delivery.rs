//! Delivery of user messages to a session's agents, and the relay's log entries about what
//! could not be delivered.
//!
//! A user message is *unfinished* from the moment it is in the session's log until the
//! agent it was handed to ends a turn (a stream-json `result`): agents take their messages
//! in order and end one turn per message, so each `result` finishes the oldest unfinished
//! one. Unfinished messages are handed to every new agent of the session (after a pause,
//! a failure or a relay restart), in order, so a message the relay acknowledged reaches
//! an agent that finishes it; when the session is completed instead, each is logged as
//! [`not_processed`]. Only a mark is stored (the store's `f` key: a log seq after which
//! every user message is unfinished): the messages themselves are already in the log.
//!
//! A journaled event that the relay refuses is logged as [`not_delivered`], so every
//! client attached to the session sees it, not only the daemon that sent it.
//!
//! This module keeps no state but what [`Unfinished`] holds and does no IO: the core
//! decides when messages are handed over, finished or given up.

use std::collections::VecDeque;

use cloud_protocol::agent;
use cloud_protocol::bridge::{Outbound, PermissionDecision};
use cloud_protocol::session::{Author, LogEntry, SessionEvent};
use serde_json::{json, Value};

/// The most bytes of a refused message's text quoted in its `not_delivered` entry: the
/// entry says what was refused, it does not carry it.
const MAX_QUOTED_TEXT: usize = 200;

/// The log seqs of a session's unfinished user messages, oldest first, as runs of
/// consecutive seqs: a burst of messages to a busy agent costs one run, not one seq each.
#[derive(Debug, Default)]
pub struct Unfinished {
    /// Inclusive (first, last) runs, in order, never adjacent or overlapping.
    runs: VecDeque<(u64, u64)>,
}

impl Unfinished {
    /// Adds a message, whose seq is above every seq held.
    pub fn push(&mut self, seq: u64) {
        match self.runs.back_mut() {
            Some((_, last)) if *last + 1 == seq => *last = seq,
            _ => self.runs.push_back((seq, seq)),
        }
    }

    /// Finishes the oldest message; returns its seq.
    pub fn finish_oldest(&mut self) -> Option<u64> {
        let (first, last) = self.runs.front_mut()?;
        let seq = *first;
        if first == last {
            self.runs.pop_front();
        } else {
            *first += 1;
        }
        Some(seq)
    }

    /// The seq of the oldest unfinished message.
    pub fn oldest(&self) -> Option<u64> {
        self.runs.front().map(|(first, _)| *first)
    }

    /// Whether every message is finished.
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// How many messages are unfinished.
    pub fn len(&self) -> u64 {
        self.runs.iter().map(|(first, last)| last - first + 1).sum()
    }

    /// The runs, oldest first: inclusive (first, last) seqs.
    pub fn runs(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.runs.iter().copied()
    }

    /// Forgets every message (they were given up); returns the seq of the newest, if any.
    pub fn clear(&mut self) -> Option<u64> {
        let newest = self.runs.back().map(|(_, last)| *last);
        self.runs.clear();
        newest
    }
}

/// Whether a log entry is a user message for the agent (as opposed to a user's answer or
/// interrupt, or anyone else's entry).
pub fn is_user_message(entry: &LogEntry) -> bool {
    matches!(
        (&entry.author, &entry.event),
        (Author::User(_), SessionEvent::Message(line))
            if agent::parse(line).is_some_and(|parsed| parsed.kind == "user")
    )
}

/// Whether an agent's stdout line ends its turn.
pub fn ends_turn(kind: &str) -> bool {
    kind == "result"
}

/// The text of a user message line (the line itself if it is not one).
fn user_text(line: &str) -> String {
    let value = serde_json::from_str::<Value>(line).ok();
    match value.as_ref().map(|v| &v["message"]["content"]) {
        Some(Value::String(text)) => text.clone(),
        Some(content) if !content.is_null() => content.to_string(),
        _ => line.to_owned(),
    }
}

/// The relay's log entry for the user message at log seq `seq` (its stream-json `line`)
/// that no agent will process, and why.
pub fn not_processed(line: &str, seq: u64, reason: &str) -> String {
    json!({
        "type": "system",
        "subtype": "not_processed",
        "message": user_text(line),
        "seq": seq,
        "reason": reason,
    })
    .to_string()
}

/// The relay's log entry for a journaled event it refused: what it was and why.
pub fn not_delivered(event: &Outbound, reason: &str) -> String {
    let what = match event {
        Outbound::UserMessage { text, .. } => {
            let mut end = text.len().min(MAX_QUOTED_TEXT);
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            let ellipsis = if end < text.len() { "…" } else { "" };
            format!("message {:?}", format!("{}{ellipsis}", &text[..end]))
        }
        Outbound::PermissionAnswer {
            request_id,
            decision: PermissionDecision::Allow { .. },
            ..
        } => format!("allow {request_id}"),
        Outbound::PermissionAnswer {
            request_id,
            decision: PermissionDecision::Deny { .. },
            ..
        } => format!("deny {request_id}"),
        Outbound::Interrupt { .. } => "interrupt".to_owned(),
    };
    json!({
        "type": "system",
        "subtype": "not_delivered",
        "message": what,
        "reason": reason,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unfinished_messages_finish_oldest_first_across_runs() {
        let mut unfinished = Unfinished::default();
        assert_eq!(unfinished.finish_oldest(), None);
        for seq in [3, 4, 5, 9, 11, 12] {
            unfinished.push(seq);
        }
        assert_eq!(
            unfinished.runs().collect::<Vec<_>>(),
            [(3, 5), (9, 9), (11, 12)]
        );
        assert_eq!(unfinished.len(), 6);
        assert_eq!(unfinished.oldest(), Some(3));
        let mut finished = Vec::new();
        while let Some(seq) = unfinished.finish_oldest() {
            finished.push(seq);
        }
        assert_eq!(finished, [3, 4, 5, 9, 11, 12]);
        assert_eq!(unfinished.oldest(), None);
        assert!(unfinished.is_empty());
        unfinished.push(20);
        unfinished.push(21);
        assert_eq!(unfinished.clear(), Some(21));
        assert!(unfinished.is_empty());
    }

    #[test]
    fn entries_say_what_was_not_processed_or_delivered() {
        let line = agent::user_message("echo \"AAA\"");
        let entry: Value = serde_json::from_str(&not_processed(&line, 7, "gone")).unwrap();
        assert_eq!(
            entry,
            json!({"type": "system", "subtype": "not_processed", "message": "echo \"AAA\"", "seq": 7, "reason": "gone"})
        );
        let long = Outbound::UserMessage {
            session: "s".into(),
            text: "é".repeat(300),
            key: None,
        };
        let entry: Value = serde_json::from_str(&not_delivered(&long, "no")).unwrap();
        let message = entry["message"].as_str().unwrap();
        assert!(message.len() < MAX_QUOTED_TEXT + 20, "{message}");
        assert!(message.ends_with("…\""), "{message}");
        let allow = Outbound::PermissionAnswer {
            session: "s".into(),
            request_id: "r-1".into(),
            decision: PermissionDecision::Allow {
                updated_input: None,
            },
            key: None,
        };
        let entry: Value = serde_json::from_str(&not_delivered(&allow, "withdrawn")).unwrap();
        assert_eq!(
            entry,
            json!({"type": "system", "subtype": "not_delivered", "message": "allow r-1", "reason": "withdrawn"})
        );
    }
}
