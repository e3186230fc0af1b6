//! A session's permission prompts, read from its log: which still wait for an answer, and
//! how a settled one was settled. An agent asks with a `can_use_tool` control request; an
//! answer (from any client, through the relay) or the agent's own withdrawal settles it.
//!
//! Architecture invariant: pure functions of the log entries given. This module stores
//! nothing and does no IO; the log is [`crate::sessions::inbound`]'s, and answers are
//! journaled by the IPC handlers.

use cloud_protocol::agent::Control;
use cloud_protocol::ipc::Prompt;
use cloud_protocol::session::{Author, LogEntry, SessionEvent};

/// The permission prompts of a log still waiting for an answer.
pub fn pending_prompts(entries: &[LogEntry]) -> Vec<Prompt> {
    let mut prompts: Vec<Prompt> = Vec::new();
    for entry in entries {
        let SessionEvent::Message(text) = &entry.event else {
            continue;
        };
        match cloud_protocol::agent::control(text) {
            Some(Control::Prompt {
                request_id,
                tool_name,
                input,
            }) if entry.author == Author::Agent => prompts.push(Prompt {
                request_id,
                tool_name,
                input,
                seq: entry.seq,
            }),
            Some(Control::Answered { request_id } | Control::Withdrawn { request_id }) => {
                prompts.retain(|p| p.request_id != request_id);
            }
            _ => {}
        }
    }
    prompts
}

/// How prompt `request_id` was settled, by the latest answer or withdrawal of it in the
/// log: "already answered" or "withdrawn by the agent". `None` when nothing settled it.
pub fn settled(entries: &[LogEntry], request_id: &str) -> Option<&'static str> {
    entries.iter().rev().find_map(|entry| match &entry.event {
        SessionEvent::Message(text) => match cloud_protocol::agent::control(text)? {
            Control::Answered { request_id: id } if id == request_id => Some("already answered"),
            Control::Withdrawn { request_id: id } if id == request_id => {
                Some("withdrawn by the agent")
            }
            _ => None,
        },
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(seq: u64, author: Author, text: &str) -> LogEntry {
        LogEntry {
            seq,
            at: 0,
            author,
            event: SessionEvent::Message(text.to_owned()),
        }
    }

    fn prompt(request_id: &str) -> String {
        format!(
            r#"{{"type":"control_request","request_id":"{request_id}","request":{{"subtype":"can_use_tool","tool_name":"Bash","input":{{}}}}}}"#
        )
    }

    #[test]
    fn prompts_wait_until_answered_or_withdrawn() {
        let log = [
            line(1, Author::Agent, &prompt("r-1")),
            line(2, Author::Agent, &prompt("r-2")),
            line(3, Author::Agent, &prompt("r-3")),
            // A user's line that looks like a prompt is not one.
            line(4, Author::User("u".into()), &prompt("r-4")),
            line(
                5,
                Author::User("u".into()),
                r#"{"type":"control_response","response":{"request_id":"r-1"}}"#,
            ),
            line(
                6,
                Author::Agent,
                r#"{"type":"control_cancel_request","request_id":"r-3"}"#,
            ),
        ];
        let pending: Vec<(String, u64)> = pending_prompts(&log)
            .into_iter()
            .map(|p| (p.request_id, p.seq))
            .collect();
        assert_eq!(pending, [("r-2".to_owned(), 2)]);
        assert_eq!(settled(&log, "r-1"), Some("already answered"));
        assert_eq!(settled(&log, "r-2"), None);
        assert_eq!(settled(&log, "r-3"), Some("withdrawn by the agent"));
    }
}
