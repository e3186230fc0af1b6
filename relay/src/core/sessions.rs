//! Session lifecycle as the core drives it: create (a workspace, a first status entry, an
//! agent), status actions (pause, resume, complete; each transition checked; a user's, or
//! the relay's own for idle auto-stop with its reason in the log), share,
//! delete (its agent stopped, its workspace and every key of it removed), and starting
//! and stopping a session's agent, with the status and log entries that go with them.
//! The session's provider ([`crate::providers`]) does the work: it prepares the workspace
//! (rebuilding a gone one from its snapshot on a task, the session `starting`
//! meanwhile), builds the agent's command, and pauses (SIGSTOP: the same agent stays) and
//! resumes (SIGCONT) it.
//!
//! Everything here runs inside a core round: writes go into the round's changes, never
//! straight to the store, and nothing here waits (an agent is stopped, and a deleted
//! workspace removed, by a task of the core's tracker).

use std::collections::HashMap;
use std::sync::Arc;

use cloud_protocol::session::{
    Author, CreateSession, NetworkAccess, Session, SessionAction, SessionEvent, SessionStatus,
    Visibility,
};

use super::delivery::Unfinished;
use super::{now, Core, CoreError, Round, SessionRuntime};
use crate::access::Identity;
use crate::agents::process;
use crate::providers::AgentState;
use crate::store::Changes;

/// The longest idle limit a session may have: a week, as the setting allows.
const MAX_AUTO_STOP_MINUTES: u32 = 7 * 24 * 60;

impl Core {
    /// Creates a session owned by the user, in a new workspace, and starts its agent.
    pub(super) fn create(
        &mut self,
        identity: &Identity,
        request: CreateSession,
        round: &mut Round,
    ) -> Result<Session, CoreError> {
        if request.auto_stop_minutes > MAX_AUTO_STOP_MINUTES {
            return Err(CoreError::Invalid(format!(
                "auto_stop_minutes {} is more than a week: use 0 (never) to {MAX_AUTO_STOP_MINUTES}",
                request.auto_stop_minutes
            )));
        }
        // Refused, never pretended, where the platform cannot run the provider.
        self.shared
            .provider
            .check()
            .map_err(|e| CoreError::Unavailable(e.to_string()))?;
        let id = new_session_id()?;
        let workspace = self.shared.provider.workspace(&id);
        std::fs::create_dir_all(&workspace).map_err(|e| {
            tracing::error!(path = %workspace.display(), error = %e, "cannot create a workspace");
            CoreError::Invalid(format!("cannot create the session's workspace: {e}"))
        })?;
        // An org's locked settings hold whatever the client asked (a daemon applies them
        // itself; a REST client or another build may not).
        let settings = &self.shared.settings;
        let visibility = settings
            .locked(&identity.org, "visibility")
            .and_then(|v| Visibility::parse(&v))
            .unwrap_or(request.visibility);
        let network_access = settings
            .locked(&identity.org, "network")
            .and_then(|v| NetworkAccess::parse(&v))
            .unwrap_or(request.network_access);
        let allowed_domains = settings
            .locked(&identity.org, "allowed_domains")
            .map(|v| {
                v.split(',')
                    .map(|d| d.trim().to_owned())
                    .filter(|d| !d.is_empty())
                    .collect()
            })
            .unwrap_or(request.allowed_domains);
        let at = now();
        let session = Session {
            id: id.clone(),
            status: SessionStatus::Starting,
            created_at: at,
            last_activity: at,
            task: request.task,
            visibility,
            repo_access: request.repo_access,
            network_access,
            vm_image: request.vm_image,
            owner: identity.user.clone(),
            org: identity.org.clone(),
            failure: None,
            last_seq: 0,
            snapshot: None,
            auto_stop_minutes: request.auto_stop_minutes,
            clients: Vec::new(),
            provider: self.shared.provider.kind(),
            allowed_domains,
        };
        self.sessions.insert(
            id.clone(),
            SessionRuntime {
                session,
                prompts: HashMap::new(),
                agent: None,
                unfinished: Unfinished::default(),
                provisioning: false,
            },
        );
        let mut changes = Changes::default();
        // Nothing is unfinished yet; the key also tells a restart this relay wrote it.
        changes.put_finished(&id, 0);
        self.append(
            &id,
            Author::Relay,
            SessionEvent::Status {
                status: SessionStatus::Starting,
                reason: None,
            },
            round,
        );
        self.start_agent(&id, None, &mut changes, round);
        self.commit(changes, round);
        tracing::info!(session = %id, owner = %identity.user, "session created");
        Ok(self.sessions[&id].session.clone())
    }

    /// Applies a status action (a checked transition) or deletes the session; returns the
    /// session afterwards (none after a delete).
    pub(super) fn action(
        &mut self,
        identity: &Identity,
        id: &str,
        action: SessionAction,
        round: &mut Round,
    ) -> Result<Option<Session>, CoreError> {
        self.writable(identity, id, "viewers cannot change a session")?;
        tracing::info!(session = %id, ?action, by = %identity.user, "session action");
        self.act(id, action, None, round)
    }

    /// Applies an action the relay decided itself (idle auto-stop), logging `reason` with
    /// the new status.
    pub(super) fn relay_action(
        &mut self,
        id: &str,
        action: SessionAction,
        reason: String,
        round: &mut Round,
    ) -> Result<Option<Session>, CoreError> {
        if !self.sessions.contains_key(id) {
            return Err(CoreError::NotFound(id.to_owned()));
        }
        tracing::info!(session = %id, ?action, %reason, "relay action");
        self.act(id, action, Some(reason), round)
    }

    /// Applies a status action (a checked transition), logging `reason` with the new
    /// status, or deletes the session.
    fn act(
        &mut self,
        id: &str,
        action: SessionAction,
        reason: Option<String>,
        round: &mut Round,
    ) -> Result<Option<Session>, CoreError> {
        let Some(target) = action.target() else {
            self.delete(id, round);
            return Ok(None);
        };
        let from = self.sessions[id].session.status;
        from.check_transition(target)?;
        let mut changes = Changes::default();
        match target {
            SessionStatus::Running if self.resume_agent(id, &mut changes, round) => {
                self.set_status(id, SessionStatus::Running, reason, &mut changes, round);
            }
            SessionStatus::Running => {
                self.sessions.get_mut(id).unwrap().session.status = SessionStatus::Starting;
                self.start_agent(id, reason, &mut changes, round);
                // The status passed through starting only in memory: log the move from
                // the old status to the new one.
            }
            SessionStatus::Paused => {
                // The agent stays, stopped with its whole process group: what users send
                // waits in its stdin, and its prompts stay open.
                if let Some(agent) = &self.sessions[id].agent {
                    self.shared.provider.pause(agent);
                }
                self.shared.teleport.unwatch(id);
                self.set_status(id, SessionStatus::Paused, reason, &mut changes, round);
            }
            status => {
                // Read before this action writes anything (see `start_agent`).
                let unfinished = match status {
                    SessionStatus::Completed => self.unfinished_lines(id, round),
                    _ => Vec::new(),
                };
                self.stop_agent(id, &mut changes, round);
                self.set_status(id, status, reason, &mut changes, round);
                if status == SessionStatus::Completed {
                    self.give_up_unfinished(
                        id,
                        unfinished,
                        "the session was completed before an agent finished it",
                        &mut changes,
                        round,
                    );
                }
            }
        }
        self.commit(changes, round);
        Ok(Some(self.sessions[id].session.clone()))
    }

    /// Deletes a session: stops its agent, removes its workspace (on a task) and every
    /// store key of it.
    fn delete(&mut self, id: &str, round: &mut Round) {
        let Some(mut runtime) = self.sessions.remove(id) else {
            return;
        };
        if !runtime.unfinished.is_empty() {
            // Its log goes with it, so there is nowhere left to record them.
            tracing::info!(
                session = %id,
                n_messages = runtime.unfinished.len(),
                "session deleted with messages no agent finished"
            );
        }
        let provider = Arc::clone(&self.shared.provider);
        let stop = runtime.agent.take().map(|agent| provider.stop(agent));
        let (teleport, session) = (Arc::clone(&self.shared.teleport), id.to_owned());
        teleport.unwatch(id);
        self.agent_tasks.spawn(async move {
            if let Some(stop) = stop {
                stop.await;
            }
            // Its proxy, its versions and its workspace.
            provider.delete(&teleport, &session).await;
        });
        let mut changes = Changes::default();
        self.apply_pending(round);
        match self.store.session_keys(id) {
            Ok(keys) => keys.into_iter().for_each(|key| changes.remove(key)),
            Err(e) => {
                tracing::error!(error = %e, "cannot list a deleted session's keys");
                self.broken = true;
            }
        }
        self.commit(changes, round);
        round.touched.remove(id);
        round.removed.push(id.to_owned());
        tracing::info!(session = %id, "session deleted");
    }

    /// Changes the session's visibility.
    pub(super) fn share(
        &mut self,
        identity: &Identity,
        id: &str,
        visibility: Visibility,
        round: &mut Round,
    ) -> Result<Session, CoreError> {
        self.writable(identity, id, "viewers cannot share a session")?;
        let org = &self.sessions[id].session.org;
        if let Some(locked) = self.shared.settings.locked(org, "visibility") {
            if locked != visibility.as_str() {
                return Err(CoreError::Forbidden(format!(
                    "org {org} locked visibility to {locked}: ask an admin of {org} to change it"
                )));
            }
        }
        let runtime = self.sessions.get_mut(id).unwrap();
        runtime.session.visibility = visibility;
        runtime.session.last_activity = now();
        let mut changes = Changes::default();
        changes.put_session(&runtime.session);
        let session = runtime.session.clone();
        self.commit(changes, round);
        round.touched.insert(id.to_owned());
        Ok(session)
    }

    /// Moves a session to `status` (the caller checked the transition), logging it.
    pub(super) fn set_status(
        &mut self,
        id: &str,
        status: SessionStatus,
        reason: Option<String>,
        changes: &mut Changes,
        round: &mut Round,
    ) {
        let runtime = self.sessions.get_mut(id).unwrap();
        runtime.session.status = status;
        runtime.session.failure = if status == SessionStatus::Failed {
            reason.clone()
        } else {
            None
        };
        self.append(
            id,
            Author::Relay,
            SessionEvent::Status { status, reason },
            round,
        );
        changes.put_session(&self.sessions[id].session);
    }

    /// Starts the session's agent (its status must be starting, failed or paused) and
    /// moves it to running (logging `reason`), or to failed when the agent cannot start.
    /// Its unfinished messages are handed to the new agent. When its workspace must be rebuilt from its
    /// snapshot first, the provider does that on a task and the session stays `starting`
    /// until [`Command::Provisioned`](super::Command::Provisioned) comes back.
    pub(super) fn start_agent(
        &mut self,
        id: &str,
        reason: Option<String>,
        changes: &mut Changes,
        round: &mut Round,
    ) {
        let runtime = self.sessions.get_mut(id).unwrap();
        if runtime.provisioning {
            return;
        }
        if !self.shared.provider.needs_rebuild(&runtime.session) {
            self.spawn_agent(id, reason, changes, round);
            return;
        }
        runtime.provisioning = true;
        let session = runtime.session.clone();
        let version = session.snapshot.as_ref().map_or(0, |v| v.version);
        self.set_status(
            id,
            SessionStatus::Starting,
            Some(format!(
                "rebuilding the workspace from snapshot version {version}"
            )),
            changes,
            round,
        );
        let shared = Arc::clone(&self.shared);
        self.agent_tasks.spawn(async move {
            let result = shared
                .provider
                .create(&shared.teleport, &session)
                .await
                .map_err(|e| e.to_string());
            let _ = shared
                .core
                .send(super::Command::Provisioned {
                    session: session.id,
                    result,
                })
                .await;
        });
    }

    /// The provider finished preparing a session's workspace: starts its agent, unless
    /// the session moved on meanwhile, or fails it with the provider's message.
    pub(super) fn provisioned(&mut self, id: &str, result: Result<(), String>, round: &mut Round) {
        let Some(runtime) = self.sessions.get_mut(id) else {
            return;
        };
        runtime.provisioning = false;
        if runtime.session.status != SessionStatus::Starting || runtime.agent.is_some() {
            return;
        }
        let mut changes = Changes::default();
        match result {
            Ok(()) => self.spawn_agent(id, None, &mut changes, round),
            Err(reason) => {
                tracing::warn!(session = %id, %reason, "the provider failed");
                self.set_status(id, SessionStatus::Failed, Some(reason), &mut changes, round);
            }
        }
        self.commit(changes, round);
    }

    /// Continues the session's paused agent (SIGCONT: the same process) when it is there
    /// to continue: alive, and its workspace still in place (an agent whose workspace
    /// was removed is stopped, its prompts withdrawn: the next one starts in the rebuilt
    /// workspace).
    fn resume_agent(&mut self, id: &str, changes: &mut Changes, round: &mut Round) -> bool {
        let provider = Arc::clone(&self.shared.provider);
        let runtime = self.sessions.get_mut(id).unwrap();
        let Some(agent) = &runtime.agent else {
            return false;
        };
        let alive = provider.status(agent) != AgentState::Exited;
        if alive && provider.workspace(id).is_dir() {
            provider.resume(agent);
            if runtime.session.snapshot.is_some() {
                let org = runtime.session.org.clone();
                Arc::clone(&self.shared.teleport).watch(&self.shared, id, &org);
            }
            return true;
        }
        if let Some(agent) = runtime.agent.take() {
            self.agent_tasks.spawn(provider.stop(agent));
            self.withdraw_prompts(id, changes, round);
        }
        false
    }

    /// Spawns the session's agent in its (existing) workspace through the provider.
    fn spawn_agent(
        &mut self,
        id: &str,
        reason: Option<String>,
        changes: &mut Changes,
        round: &mut Round,
    ) {
        // Every unfinished message, in order: those no agent was handed yet and those an
        // earlier agent did not finish. Read first: reading applies the round's writes so
        // far, and the caller's writes from here on must share one batch.
        let unfinished = self.unfinished_lines(id, round);
        let generation = self.next_generation;
        self.next_generation += 1;
        let provider = Arc::clone(&self.shared.provider);
        let session = &self.sessions[id].session;
        let workspace = provider.workspace(id);
        let spawned = std::fs::create_dir_all(&workspace)
            .map_err(|e| format!("cannot create the workspace {}: {e}", workspace.display()))
            .and_then(|()| {
                let (program, args) = self
                    .agent_command
                    .split_first()
                    .ok_or_else(|| process::AgentError::NoCommand.to_string())?;
                let command = provider
                    .command(session, program, args)
                    .map_err(|e| e.to_string())?;
                process::spawn(
                    command,
                    program,
                    id,
                    generation,
                    self.shared.core.clone(),
                    &self.agent_tasks,
                )
                .map_err(|e| e.to_string())
            });
        match spawned {
            Ok(agent) => {
                // Say in the session's own log whether its network access holds.
                if let Some(note) = provider.network_note(session) {
                    self.append(
                        id,
                        Author::Relay,
                        SessionEvent::Message(note.to_string()),
                        round,
                    );
                }
                for line in &unfinished {
                    round.write(&agent, line);
                }
                let runtime = self.sessions.get_mut(id).unwrap();
                runtime.agent = Some(agent);
                // A relay restarted with another provider runs its sessions with that one.
                runtime.session.provider = provider.kind();
                if runtime.session.snapshot.is_some() {
                    // A teleported workspace: the agent's edits become versions as it
                    // makes them.
                    let org = runtime.session.org.clone();
                    Arc::clone(&self.shared.teleport).watch(&self.shared, id, &org);
                }
                self.set_status(id, SessionStatus::Running, reason, changes, round);
            }
            Err(reason) => {
                tracing::warn!(session = %id, %reason, "agent did not start");
                self.set_status(id, SessionStatus::Failed, Some(reason), changes, round);
            }
        }
    }

    /// Stops the session's agent, if one runs, withdrawing its pending prompts.
    fn stop_agent(&mut self, id: &str, changes: &mut Changes, round: &mut Round) {
        if let Some(agent) = self.sessions.get_mut(id).and_then(|r| r.agent.take()) {
            self.agent_tasks.spawn(self.shared.provider.stop(agent));
        }
        self.shared.teleport.unwatch(id);
        self.withdraw_prompts(id, changes, round);
    }
}

/// A new session id: `s-` and 16 random hex digits.
fn new_session_id() -> Result<String, CoreError> {
    let mut random = [0u8; 8];
    getrandom::fill(&mut random).map_err(|e| {
        tracing::error!(error = %e, "random source failed");
        CoreError::Invalid("the relay cannot generate a session id".to_owned())
    })?;
    Ok(format!("s-{:016x}", u64::from_be_bytes(random)))
}
