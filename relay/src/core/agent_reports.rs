//! What an agent's reports do to its session: each stdout line is logged, and control
//! messages acted on (a permission request opens a prompt, a cancel withdraws it, any
//! other control request is answered with an error at once, a `result` finishes the
//! oldest unfinished message); an over-long line is replaced by a `relay_notice`; an agent
//! that exits on its own fails its session and withdraws its prompts.
//!
//! Reports of an agent the core has already replaced or stopped (an older generation) are
//! dropped. Nothing here starts or stops an agent: [`super::sessions`] does.

use cloud_protocol::agent;
use cloud_protocol::session::{Author, SessionEvent, SessionStatus};
use std::sync::Arc;

use super::unfinished::finish_turn;
use super::{delivery, prompts, Core, Round};
use crate::agents::process::{AgentReport, MAX_AGENT_LINE};
use crate::store::Changes;

impl Core {
    /// Applies an agent's report, unless it comes from an agent the session no longer runs.
    pub(super) fn agent_report(&mut self, report: AgentReport, round: &mut Round) {
        match report {
            AgentReport::Line {
                session,
                generation,
                line,
                truncated,
            } => {
                let current = self
                    .sessions
                    .get(&session)
                    .and_then(|r| r.agent.as_ref())
                    .is_some_and(|a| a.generation == generation);
                if !current {
                    return;
                }
                let mut changes = Changes::default();
                if truncated {
                    let notice = serde_json::json!({
                        "type": "system",
                        "subtype": "relay_notice",
                        "message": format!("the agent wrote a line over {MAX_AGENT_LINE} bytes; it was dropped"),
                    })
                    .to_string();
                    self.append(
                        &session,
                        Author::Relay,
                        SessionEvent::Message(notice),
                        round,
                    );
                } else {
                    self.agent_line(&session, line, &mut changes, round);
                }
                self.commit(changes, round);
            }
            AgentReport::Exited {
                session,
                generation,
                reason,
            } => {
                let Some(runtime) = self.sessions.get_mut(&session) else {
                    return;
                };
                if runtime.agent.as_ref().map(|a| a.generation) != Some(generation) {
                    return;
                }
                runtime.agent = None;
                self.shared.teleport.unwatch(&session);
                tracing::info!(%session, %reason, "agent exited on its own");
                let mut changes = Changes::default();
                self.withdraw_prompts(&session, &mut changes, round);
                self.set_status(
                    &session,
                    SessionStatus::Failed,
                    Some(reason),
                    &mut changes,
                    round,
                );
                self.commit(changes, round);
            }
        }
    }

    /// Logs an agent's stdout line and reacts to control messages.
    fn agent_line(&mut self, id: &str, line: String, changes: &mut Changes, round: &mut Round) {
        let parsed = agent::parse(&line);
        self.append(id, Author::Agent, SessionEvent::Message(line), round);
        let Some(parsed) = parsed else { return };
        let runtime = self.sessions.get_mut(id).unwrap();
        match (
            parsed.kind.as_str(),
            parsed.subtype.as_deref(),
            parsed.request_id,
        ) {
            ("control_request", Some(agent::CAN_USE_TOOL), Some(request_id)) => {
                prompts::open(runtime, request_id, changes);
            }
            ("control_request", subtype, Some(request_id)) => {
                // The relay handles no control requests from agents: answer at once, so
                // the agent never waits for an answer that cannot come.
                let error = match subtype {
                    Some(subtype) => format!("unsupported control request subtype: {subtype}"),
                    None => "control request without a subtype".to_owned(),
                };
                let response = agent::error_response(&request_id, &error);
                if let Some(agent) = &runtime.agent {
                    round.write(agent, &response);
                }
                self.append(id, Author::Relay, SessionEvent::Message(response), round);
            }
            ("control_cancel_request", _, Some(request_id))
                if prompts::is_pending(runtime, &request_id) =>
            {
                prompts::withdrawn_by_agent(runtime, request_id, changes);
            }
            (kind, _, _) if delivery::ends_turn(kind) => {
                finish_turn(runtime, changes);
                // What the agent changed in its workspace this turn becomes a version.
                let org = runtime.session.org.clone();
                let (shared, id) = (Arc::clone(&self.shared), id.to_owned());
                self.agent_tasks.spawn(async move {
                    let teleport = Arc::clone(&shared.teleport);
                    teleport.capture(&shared, &id, &org).await;
                });
            }
            _ => {}
        }
    }
}
