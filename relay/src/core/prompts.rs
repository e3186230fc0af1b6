//! Permission prompts: an agent's `can_use_tool` request opens one (pending), the first
//! user answer to a pending prompt wins (answered), and the agent's own cancel withdraws
//! it, as does the relay when the agent stops or exits (logging a `control_cancel_request`
//! for each, so every client stops showing it). A prompt's state is kept per session, in
//! memory and in the store.
//!
//! Only the core calls these, inside a round; they never write to the store but through
//! the round's changes.

use cloud_protocol::agent;
use cloud_protocol::bridge::PermissionDecision;
use cloud_protocol::session::{Author, SessionEvent};

use super::{append, Core, CoreError, Round, SessionRuntime};
use crate::access::Identity;
use crate::store::{Changes, PromptState};

impl Core {
    /// Answers a pending prompt of the session for the user (the first answer wins): logs
    /// the answer and gives it to the session's agent, if one runs. Returns its log seq.
    pub(super) fn answer_prompt(
        &mut self,
        identity: &Identity,
        session: &str,
        request_id: &str,
        decision: &PermissionDecision,
        changes: &mut Changes,
        round: &mut Round,
    ) -> Result<u64, CoreError> {
        let author = Author::User(identity.user.clone());
        let runtime = self.writable(
            identity,
            session,
            "viewers cannot answer permission prompts",
        )?;
        match runtime.prompts.get(request_id) {
            None => {
                return Err(CoreError::Conflict(format!(
                    "no permission request {request_id} in session {session}"
                )))
            }
            Some(PromptState::Answered) => {
                return Err(CoreError::Conflict(format!(
                    "permission request {request_id} was already answered"
                )))
            }
            Some(PromptState::Withdrawn) => {
                return Err(CoreError::Conflict(format!(
                    "permission request {request_id} was withdrawn"
                )))
            }
            Some(PromptState::Pending) => {}
        }
        if let PermissionDecision::Allow {
            updated_input: Some(input),
        } = decision
        {
            if serde_json::from_str::<serde_json::Value>(input).is_err() {
                return Err(CoreError::Invalid(
                    "updated_input is not valid JSON".to_owned(),
                ));
            }
        }
        let line = agent::permission_response(request_id, decision);
        let runtime = self.sessions.get_mut(session).unwrap();
        if let Some(agent) = &runtime.agent {
            round.write(agent, &line);
        }
        let seq = append(runtime, author, SessionEvent::Message(line), round);
        runtime
            .prompts
            .insert(request_id.to_owned(), PromptState::Answered);
        changes.put_prompt(session, request_id, PromptState::Answered);
        Ok(seq)
    }

    /// Withdraws every pending prompt of a session whose agent is gone, logging a
    /// `control_cancel_request` for each so every client stops showing it.
    pub(super) fn withdraw_prompts(&mut self, id: &str, changes: &mut Changes, round: &mut Round) {
        let runtime = self.sessions.get_mut(id).unwrap();
        let mut pending: Vec<String> = runtime
            .prompts
            .iter()
            .filter(|(_, state)| **state == PromptState::Pending)
            .map(|(request_id, _)| request_id.clone())
            .collect();
        pending.sort();
        for request_id in &pending {
            runtime
                .prompts
                .insert(request_id.clone(), PromptState::Withdrawn);
            changes.put_prompt(id, request_id, PromptState::Withdrawn);
        }
        for request_id in pending {
            let line =
                serde_json::json!({"type": "control_cancel_request", "request_id": request_id})
                    .to_string();
            self.append(id, Author::Relay, SessionEvent::Message(line), round);
        }
    }
}

/// An agent asks for permission: a new pending prompt, even if an earlier agent of this
/// session used the same id.
pub(super) fn open(runtime: &mut SessionRuntime, request_id: String, changes: &mut Changes) {
    changes.put_prompt(&runtime.session.id, &request_id, PromptState::Pending);
    runtime.prompts.insert(request_id, PromptState::Pending);
}

/// Whether the session's prompt is pending.
pub(super) fn is_pending(runtime: &SessionRuntime, request_id: &str) -> bool {
    runtime.prompts.get(request_id) == Some(&PromptState::Pending)
}

/// The agent withdrew one of its pending prompts.
pub(super) fn withdrawn_by_agent(
    runtime: &mut SessionRuntime,
    request_id: String,
    changes: &mut Changes,
) {
    changes.put_prompt(&runtime.session.id, &request_id, PromptState::Withdrawn);
    runtime.prompts.insert(request_id, PromptState::Withdrawn);
}
