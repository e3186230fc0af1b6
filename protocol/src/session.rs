//! Cloud sessions: the model the relay owns and the daemon mirrors.
//!
//! A session has a lifecycle ([`SessionStatus`]) whose transitions are checked here, in
//! one place, so the relay refuses an illegal one with the list of legal ones. Every
//! session has an ordered log of [`LogEntry`]s numbered by the relay; messages are
//! stream-json text (the agent protocol's own shape) carried verbatim.

use serde::{Deserialize, Serialize};

/// Where a session is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionStatus {
    /// Created; its agent is being started.
    Starting,
    /// Its agent runs and takes messages.
    Running,
    /// Its agent is stopped; messages wait until it is resumed.
    Paused,
    /// Finished for good.
    Completed,
    /// Its agent failed; `failure` says why. Resuming starts a new agent.
    Failed,
}

impl SessionStatus {
    /// The statuses this one may move to.
    pub fn allowed_next(self) -> &'static [SessionStatus] {
        use SessionStatus::*;
        match self {
            Starting => &[Running, Failed, Completed],
            Running => &[Paused, Completed, Failed],
            Paused => &[Running, Completed],
            Failed => &[Running, Completed],
            Completed => &[],
        }
    }

    /// Checks a transition, explaining a refusal.
    pub fn check_transition(self, to: SessionStatus) -> Result<(), TransitionError> {
        if self.allowed_next().contains(&to) {
            Ok(())
        } else {
            Err(TransitionError { from: self, to })
        }
    }

    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionStatus::Starting => "starting",
            SessionStatus::Running => "running",
            SessionStatus::Paused => "paused",
            SessionStatus::Completed => "completed",
            SessionStatus::Failed => "failed",
        }
    }
}

/// An illegal status transition.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", transition_message(*from, *to))]
pub struct TransitionError {
    /// The current status.
    pub from: SessionStatus,
    /// The refused target.
    pub to: SessionStatus,
}

fn transition_message(from: SessionStatus, to: SessionStatus) -> String {
    let allowed: Vec<&str> = from.allowed_next().iter().map(|s| s.as_str()).collect();
    if allowed.is_empty() {
        format!(
            "cannot move a {} session to {}: a {} session is final",
            from.as_str(),
            to.as_str(),
            from.as_str()
        )
    } else {
        format!(
            "cannot move a {} session to {}; from {} it can move to: {}",
            from.as_str(),
            to.as_str(),
            from.as_str(),
            allowed.join(", ")
        )
    }
}

/// Who may see a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Visibility {
    /// Its owner only.
    Private,
    /// Everyone in its owner's org.
    Team,
    /// Anyone with its id, read-only.
    Public,
}

/// What network the session's agent may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetworkAccess {
    /// None (enforced where the platform allows, reported otherwise).
    None,
    /// Package registries and the like.
    Limited,
    /// Anything.
    Full,
}

/// What the agent may do with the repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RepoAccess {
    /// Read only.
    Read,
    /// Read and write.
    Write,
}

/// A cloud session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// Its id (`s-` and hex).
    pub id: String,
    /// Where it is in its life.
    pub status: SessionStatus,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_at: u64,
    /// Time of the last log entry or status change, milliseconds since the Unix epoch.
    pub last_activity: u64,
    /// What the session is for, in words.
    pub task: String,
    /// Who may see it.
    pub visibility: Visibility,
    /// What the agent may do with the repository.
    pub repo_access: RepoAccess,
    /// What network the agent may use.
    pub network_access: NetworkAccess,
    /// The image its workspace is made from.
    pub vm_image: String,
    /// The user who created it.
    pub owner: String,
    /// The owner's org.
    pub org: String,
    /// Why it failed, when it did.
    pub failure: Option<String>,
    /// The sequence number of its last log entry (0 when empty).
    pub last_seq: u64,
    /// Its newest snapshot version (teleport), with the git HEAD and branch it records.
    pub snapshot: Option<Box<crate::teleport::VersionInfo>>,
    /// The relay pauses it after this many minutes with no connected client and no log
    /// activity, 0 never.
    #[serde(default)]
    pub auto_stop_minutes: u32,
    /// Its connected clients as the relay counted them when it answered a read of this one
    /// session (`session show`, `GET /v1/sessions/{id}`); empty in listings and in the
    /// copies a daemon is sent as sessions change.
    #[serde(default)]
    pub clients: Vec<SessionClient>,
    /// Where its workspace and agent run (the relay's `--provider`).
    #[serde(default)]
    pub provider: ProviderKind,
    /// The hosts its agent may reach when its network is `limited` (the sandbox provider
    /// enforces them through its filtering proxy; the relay's own `--allowed-domain`s are
    /// allowed besides).
    #[serde(default)]
    pub allowed_domains: Vec<String>,
}

/// Where a relay runs its sessions' workspaces and agents (`cloud-relay serve --provider`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    /// A directory on the relay host; the agent runs as a plain process group.
    #[default]
    Local,
    /// A bubblewrap sandbox that sees only its workspace, its own /tmp and a read-only
    /// system, with its network as the session's `network_access` says.
    Sandbox,
}

impl ProviderKind {
    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Local => "local",
            ProviderKind::Sandbox => "sandbox",
        }
    }
}

/// What kind of client a [`SessionClient`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientKind {
    /// A daemon, on behalf of an editor or a `cloudctl attach` attached to the session.
    Daemon,
    /// A viewer's WebSocket (`GET /v1/sessions/{id}/subscribe`).
    Viewer,
    /// A terminal into the session's workspace.
    Terminal,
}

impl ClientKind {
    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            ClientKind::Daemon => "daemon",
            ClientKind::Viewer => "viewer",
            ClientKind::Terminal => "terminal",
        }
    }
}

/// One connected client of a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionClient {
    /// What it is.
    pub kind: ClientKind,
    /// The user it authenticated as.
    pub user: String,
    /// Which one, in words: a daemon's host name, a viewer's user agent, a terminal's
    /// label.
    pub label: String,
    /// When it connected, milliseconds since the Unix epoch.
    pub connected_at: u64,
    /// When it was last heard from, milliseconds since the Unix epoch.
    pub last_heartbeat: u64,
}

/// What creating a session takes. In JSON every field is optional.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CreateSession {
    /// What the session is for.
    pub task: String,
    /// Who may see it.
    pub visibility: Visibility,
    /// What network the agent may use.
    pub network_access: NetworkAccess,
    /// What the agent may do with the repository.
    pub repo_access: RepoAccess,
    /// The image (free-form; `default` when unsure).
    pub vm_image: String,
    /// The hosts its agent may reach when its network is limited (enforced by the sandbox
    /// provider; an org's locked `allowed_domains` replaces them).
    pub allowed_domains: Vec<String>,
    /// Pause it after this many minutes with no connected client and no log activity, 0
    /// never.
    pub auto_stop_minutes: u32,
}

impl Default for CreateSession {
    fn default() -> CreateSession {
        CreateSession {
            task: String::new(),
            visibility: Visibility::Private,
            network_access: NetworkAccess::Limited,
            repo_access: RepoAccess::Write,
            vm_image: "default".into(),
            allowed_domains: Vec::new(),
            auto_stop_minutes: 30,
        }
    }
}

/// What a client asks the daemon to create: every field optional. A field left out takes
/// the effective default (see [`crate::settings`]): the local `config.toml`, then the
/// user's setting, then the org's, then the built-in default; a locked org setting
/// overrides even a field given here.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NewSession {
    /// What the session is for.
    pub task: String,
    /// Who may see it.
    pub visibility: Option<Visibility>,
    /// What network the agent may use.
    pub network_access: Option<NetworkAccess>,
    /// What the agent may do with the repository (default: write).
    pub repo_access: Option<RepoAccess>,
    /// The image (default: `default`).
    pub vm_image: Option<String>,
    /// The hosts its agent may reach.
    pub allowed_domains: Option<Vec<String>>,
    /// Pause it after this many idle minutes (no client, no activity), 0 never.
    pub auto_stop_minutes: Option<u32>,
}

impl Visibility {
    /// Its name, as in settings and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Visibility::Private => "private",
            Visibility::Team => "team",
            Visibility::Public => "public",
        }
    }

    /// The visibility named `name`.
    pub fn parse(name: &str) -> Option<Visibility> {
        match name {
            "private" => Some(Visibility::Private),
            "team" => Some(Visibility::Team),
            "public" => Some(Visibility::Public),
            _ => None,
        }
    }
}

impl NetworkAccess {
    /// Its name, as in settings and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            NetworkAccess::None => "none",
            NetworkAccess::Limited => "limited",
            NetworkAccess::Full => "full",
        }
    }

    /// The network access named `name`.
    pub fn parse(name: &str) -> Option<NetworkAccess> {
        match name {
            "none" => Some(NetworkAccess::None),
            "limited" => Some(NetworkAccess::Limited),
            "full" => Some(NetworkAccess::Full),
            _ => None,
        }
    }
}

/// A status change asked of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionAction {
    /// running → paused.
    Pause,
    /// paused or failed → running.
    Resume,
    /// → completed.
    Complete,
    /// Remove it and its log and workspace.
    Delete,
}

impl SessionAction {
    /// The status the action moves to (none for delete).
    pub fn target(self) -> Option<SessionStatus> {
        match self {
            SessionAction::Pause => Some(SessionStatus::Paused),
            SessionAction::Resume => Some(SessionStatus::Running),
            SessionAction::Complete => Some(SessionStatus::Completed),
            SessionAction::Delete => None,
        }
    }
}

/// One entry of a session's ordered log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// Its position in the session's log, from 1, without gaps.
    pub seq: u64,
    /// When the relay logged it, milliseconds since the Unix epoch.
    pub at: u64,
    /// Who it comes from.
    pub author: Author,
    /// What happened.
    pub event: SessionEvent,
}

impl LogEntry {
    /// About how many bytes it takes encoded: its strings, and a bound on the rest
    /// (sequence, time, tags, lengths). For sizing buffers and chunks, not for limits.
    pub fn approx_len(&self) -> usize {
        let author = match &self.author {
            Author::User(name) => name.len(),
            Author::Agent | Author::Relay => 0,
        };
        let event = match &self.event {
            SessionEvent::Message(text) => text.len(),
            SessionEvent::Status { reason, .. } => reason.as_ref().map_or(0, String::len),
            SessionEvent::Snapshot(version) => {
                let git = version.git.as_ref().map_or(0, |g| {
                    g.head.len() + g.branch.as_ref().map_or(0, String::len)
                });
                let by = match &version.author {
                    crate::teleport::VersionAuthor::Instance(id) => id.len(),
                    crate::teleport::VersionAuthor::Agent => 0,
                };
                git + by + 64
            }
        };
        author + event + 32
    }
}

/// Who a log entry comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Author {
    /// A user (their name).
    User(String),
    /// The session's agent.
    Agent,
    /// The relay itself (status changes, errors).
    Relay,
}

/// What a log entry records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionEvent {
    /// A stream-json message, as JSON text: `user`, `assistant`, `result`, `system`,
    /// `control_request`, `control_response`, `control_cancel_request`.
    Message(String),
    /// The session's status changed.
    Status {
        /// The new status.
        status: SessionStatus,
        /// Why, when there is a reason worth telling (a failure, or the relay's own pause or
        /// resume for idleness).
        reason: Option<String>,
    },
    /// A new snapshot version of the session's tree (a push, or the agent's edits).
    Snapshot(crate::teleport::VersionInfo),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn illegal_transitions_list_the_legal_ones() {
        let err = SessionStatus::Paused
            .check_transition(SessionStatus::Paused)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot move a paused session to paused; from paused it can move to: running, completed"
        );
        let err = SessionStatus::Completed
            .check_transition(SessionStatus::Running)
            .unwrap_err();
        assert!(err.to_string().contains("final"));
        SessionStatus::Running
            .check_transition(SessionStatus::Paused)
            .unwrap();
    }
}
