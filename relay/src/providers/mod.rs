//! Providers: where a relay runs its sessions' workspaces and agents, chosen per relay
//! (`cloud-relay serve --provider local|sandbox`, default `local`) and recorded in each
//! session (`Session::provider`).
//!
//! - [`local`]: a directory on the relay host; the agent is a plain process group
//!   (`network_access = none` gets an empty network namespace where the platform allows).
//! - [`sandbox`]: the agent runs under bubblewrap and sees only its workspace (bound at
//!   its real path, read-write), its own /tmp, and a read-only system; its network is
//!   none, only the [`proxy`] (limited) or the host's (full).
//! - [`proxy`]: the filtering HTTP(S) proxy the relay runs for `limited` sandboxes, one
//!   Unix socket per session; [`forward`] is the tiny forwarder that runs inside the
//!   sandbox (`cloud-relay sandbox-forward`) and is the sandbox's only way out.
//!
//! The interface, all on [`Provider`]:
//!
//! - [`Provider::check`]: whether this platform can run the provider at all (at serve
//!   start, logged; at every create, refused with what to install or enable).
//! - [`Provider::create`]: prepare a session's workspace; when its directory is gone,
//!   rebuild it from the session's newest snapshot version ([`Provider::needs_rebuild`]
//!   says when that is due; the core shows `starting` meanwhile).
//! - [`Provider::command`]: THE way to run anything inside a session's confinement (its
//!   agent, a terminal's shell): a `tokio::process::Command` ready to spawn, working
//!   directory the workspace, confinement applied. Stdio, process group or session are
//!   left to the caller.
//! - [`Provider::pause`] (SIGSTOP to the agent's whole process group: the process stays,
//!   its stdin keeps queueing), [`Provider::resume`] (SIGCONT), [`Provider::stop`] (ends
//!   it), [`Provider::status`] (running, paused or exited, from `/proc`), and
//!   [`Provider::delete`] (its proxy, versions and workspace).
//!
//! This module never touches the store or a session's status: the core decides, the
//! provider does. It never pretends: what it cannot enforce it refuses or reports.

pub mod forward;
pub mod local;
pub mod proxy;
pub mod sandbox;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use cloud_protocol::session::{NetworkAccess, ProviderKind, Session};

use crate::agents::process::{self, AgentHandle, Signal};
use crate::teleport::Teleport;

/// How a relay runs its sessions.
#[derive(Debug, Clone)]
pub struct ProviderConfig {
    /// Which provider.
    pub kind: ProviderKind,
    /// The bubblewrap program (sandbox), `bwrap` on the PATH normally.
    pub bwrap: PathBuf,
    /// The `cloud-relay` program, run inside `limited` sandboxes as their forwarder
    /// (`cloud-relay sandbox-forward`); none: `limited` sandboxes are refused.
    pub helper: Option<PathBuf>,
    /// Hosts every `limited` session may reach besides its own `allowed_domains`.
    pub allowed_domains: Vec<String>,
}

impl Default for ProviderConfig {
    fn default() -> ProviderConfig {
        ProviderConfig {
            kind: ProviderKind::Local,
            bwrap: PathBuf::from("bwrap"),
            helper: None,
            allowed_domains: Vec::new(),
        }
    }
}

/// What a provider could not do. The messages are shown to users as they are.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProviderError {
    /// The platform cannot run this provider (what to install or enable).
    #[error("{0}")]
    Unavailable(String),
    /// The workspace could not be prepared.
    #[error("{0}")]
    Workspace(String),
}

/// An agent's process as its provider sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentState {
    /// Running (or sleeping, waiting for input).
    Running,
    /// Stopped by SIGSTOP.
    Paused,
    /// Gone, or a zombie.
    Exited,
}

/// The relay's provider.
#[derive(Debug)]
pub struct Provider {
    config: ProviderConfig,
    /// `DATA/workspaces`.
    workspaces: PathBuf,
    /// `DATA/sandbox`: each `limited` session's proxy socket, in a directory of its own.
    sockets: PathBuf,
    /// The last platform check: none when it passed.
    problem: Mutex<Option<String>>,
    /// Whether the local provider can give an agent an empty network namespace (why not).
    local_netns: Result<(), String>,
    /// The filtering proxies of `limited` sandboxes.
    proxies: proxy::Proxies,
}

impl Provider {
    /// The provider of a relay whose data is in `data_dir`. Checks the platform (running
    /// a probe process: blocking, call it once at start) and logs what it found.
    pub fn new(config: ProviderConfig, data_dir: &Path, workspaces: PathBuf) -> Provider {
        let local_netns = local::probe_network_namespace();
        let provider = Provider {
            sockets: data_dir.join("sandbox"),
            workspaces,
            problem: Mutex::new(None),
            local_netns,
            proxies: proxy::Proxies::default(),
            config,
        };
        match provider.probe() {
            Ok(()) => tracing::info!(provider = provider.kind().as_str(), "provider ready"),
            Err(problem) => {
                tracing::error!(provider = provider.kind().as_str(), %problem, "provider unavailable: sessions cannot be created");
                *provider.problem.lock().unwrap() = Some(problem);
            }
        }
        provider
    }

    /// Which provider this is.
    pub fn kind(&self) -> ProviderKind {
        self.config.kind
    }

    /// Whether this platform can run the provider: the reason, with what to install or
    /// enable, when not. A failed check is made again (the operator may have fixed it);
    /// a passed one is remembered.
    pub fn check(&self) -> Result<(), ProviderError> {
        let mut problem = self.problem.lock().unwrap();
        if problem.is_some() {
            *problem = self.probe().err();
        }
        match &*problem {
            None => Ok(()),
            Some(problem) => Err(ProviderError::Unavailable(problem.clone())),
        }
    }

    fn probe(&self) -> Result<(), String> {
        match self.config.kind {
            ProviderKind::Local => Ok(()),
            ProviderKind::Sandbox => sandbox::probe(&self.config.bwrap),
        }
    }

    /// The session's workspace directory on the relay host.
    pub fn workspace(&self, session: &str) -> PathBuf {
        self.workspaces.join(session)
    }

    /// Whether the session's workspace directory is gone and has a snapshot version to be
    /// rebuilt from (then [`Provider::create`] takes a while: run it off the core).
    pub fn needs_rebuild(&self, session: &Session) -> bool {
        session.snapshot.is_some() && !self.workspace(&session.id).is_dir()
    }

    /// Prepares the session's workspace: creates its directory, or, when it is gone and
    /// the session has a snapshot version, rebuilds it from the newest version (on the
    /// blocking pool).
    pub async fn create(
        &self,
        teleport: &Arc<Teleport>,
        session: &Session,
    ) -> Result<(), ProviderError> {
        let workspace = self.workspace(&session.id);
        if !self.needs_rebuild(session) {
            return std::fs::create_dir_all(&workspace).map_err(|e| {
                ProviderError::Workspace(format!(
                    "cannot create the workspace {}: {e}",
                    workspace.display()
                ))
            });
        }
        let (teleport, id, org) = (
            Arc::clone(teleport),
            session.id.clone(),
            session.org.clone(),
        );
        let rebuilt = tokio::task::spawn_blocking(move || {
            let (info, delta) = teleport
                .snapshots
                .changes(&id, 0)
                .map_err(|e| format!("cannot read the session's newest snapshot version: {e}"))?;
            let problems = crate::teleport::materialise::materialise(
                &workspace,
                &delta,
                &teleport.blobs,
                &org,
                None,
            )?;
            for problem in &problems {
                tracing::warn!(session = %id, "rebuilding the workspace: cannot write {problem}");
            }
            tracing::info!(session = %id, version = info.version, files = info.files, "workspace rebuilt from its snapshot");
            Ok::<_, String>(())
        })
        .await
        .map_err(|e| format!("the rebuild task failed: {e}"))
        .and_then(|r| r);
        rebuilt.map_err(|e| {
            ProviderError::Workspace(format!(
                "cannot rebuild the workspace from its snapshot: {e}"
            ))
        })
    }

    /// A command that runs `program` with `args` inside the session's confinement, its
    /// working directory the session's workspace (which must exist: see
    /// [`Provider::create`]), `CLOUD_SESSION_ID` set. The caller sets stdio and the
    /// process group or session, and spawns it (inside a tokio runtime: a `limited`
    /// sandbox's proxy is started here on first use).
    ///
    /// Local: the program itself (with `network_access = none`, in an empty network
    /// namespace where [`Provider::network_note`] says it is enforced). Sandbox: `bwrap`
    /// around it (see [`sandbox`]), and for `limited` the in-sandbox forwarder around that.
    pub fn command(
        &self,
        session: &Session,
        program: &str,
        args: &[String],
    ) -> Result<tokio::process::Command, ProviderError> {
        let workspace = self.workspace(&session.id);
        let mut command = match self.config.kind {
            ProviderKind::Local => local::command(
                program,
                args,
                session.network_access == NetworkAccess::None && self.local_netns.is_ok(),
            ),
            ProviderKind::Sandbox => {
                self.check()?;
                let proxy = match session.network_access {
                    NetworkAccess::Limited => Some(self.proxy_socket(session)?),
                    NetworkAccess::None | NetworkAccess::Full => None,
                };
                sandbox::command(
                    &self.config.bwrap,
                    &workspace,
                    session.network_access,
                    proxy.as_ref(),
                    program,
                    args,
                )?
            }
        };
        command
            .current_dir(&workspace)
            .env("CLOUD_SESSION_ID", &session.id);
        Ok(command)
    }

    /// The session's proxy socket and the forwarder that reaches it (started on first use).
    fn proxy_socket(&self, session: &Session) -> Result<sandbox::ProxyAccess, ProviderError> {
        let helper = self.config.helper.clone().ok_or_else(|| {
            ProviderError::Unavailable(
                "this relay has no forwarder program for limited network; run it as `cloud-relay serve`".into(),
            )
        })?;
        let mut allowed = session.allowed_domains.clone();
        allowed.extend(self.config.allowed_domains.iter().cloned());
        let dir = self.sockets.join(&session.id);
        let socket = self
            .proxies
            .ensure(&session.id, &dir, proxy::AllowList::new(&allowed))
            .map_err(ProviderError::Workspace)?;
        Ok(sandbox::ProxyAccess {
            dir,
            socket,
            helper,
        })
    }

    /// What the session's log says about its network when its agent starts: whether
    /// its `network_access` is enforced, and how (none: nothing to say).
    pub fn network_note(&self, session: &Session) -> Option<serde_json::Value> {
        let access = session.network_access;
        let enforced = match (self.config.kind, access) {
            (_, NetworkAccess::Full) => return None,
            (ProviderKind::Local, NetworkAccess::Limited) => return None,
            (ProviderKind::Local, NetworkAccess::None) => self.local_netns.clone(),
            (ProviderKind::Sandbox, _) => Ok(()),
        };
        let mut note = serde_json::json!({
            "type": "system", "subtype": "network",
            "network_access": access_name(access),
            "enforced": enforced.is_ok(),
        });
        if let Err(reason) = enforced {
            tracing::warn!(session = %session.id, "network_access=none is not enforced: {reason}");
            note["reason"] = reason.into();
        }
        if access == NetworkAccess::Limited {
            let mut allowed = session.allowed_domains.clone();
            allowed.extend(self.config.allowed_domains.iter().cloned());
            note["allowed_domains"] = allowed.into();
        }
        Some(note)
    }

    /// Pauses the agent: SIGSTOP to its whole process group. The process stays; what is
    /// written to its stdin waits in the pipe until it is resumed.
    pub fn pause(&self, agent: &AgentHandle) {
        process::signal_group(agent.pid(), Signal::Stop);
    }

    /// Resumes a paused agent: SIGCONT to its process group (same process, same pid).
    pub fn resume(&self, agent: &AgentHandle) {
        process::signal_group(agent.pid(), Signal::Continue);
    }

    /// Stops the agent (SIGTERM to its group, then SIGKILL); the future ends when it has
    /// exited. The sandbox's processes go with it (bwrap's init dies with the group).
    pub fn stop(&self, agent: AgentHandle) -> impl std::future::Future<Output = ()> + Send {
        agent.stop()
    }

    /// The agent's process state, from `/proc` (Linux; elsewhere only whether it exited).
    pub fn status(&self, agent: &AgentHandle) -> AgentState {
        if agent.has_exited() {
            return AgentState::Exited;
        }
        let Some(pid) = agent.pid() else {
            return AgentState::Running;
        };
        if !cfg!(target_os = "linux") {
            return AgentState::Running;
        }
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            // The state follows the command name in parentheses (which may hold spaces).
            Ok(stat) => match stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.trim().chars().next())
            {
                Some('T' | 't') => AgentState::Paused,
                Some('Z' | 'X') | None => AgentState::Exited,
                Some(_) => AgentState::Running,
            },
            Err(_) => AgentState::Exited,
        }
    }

    /// Deletes what the provider holds of a session: its proxy (and socket), its
    /// snapshot versions and its workspace. Its agent must be stopped first.
    pub async fn delete(&self, teleport: &Arc<Teleport>, session: &str) {
        self.proxies.remove(session);
        let dir = self.sockets.join(session);
        if let Err(e) = tokio::fs::remove_dir_all(&dir).await {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %dir.display(), error = %e, "cannot remove a proxy socket");
            }
        }
        Arc::clone(teleport).delete_session(session).await;
    }

    /// Ends every proxy (the relay is stopping).
    pub fn shutdown(&self) {
        self.proxies.clear();
    }
}

fn access_name(access: NetworkAccess) -> &'static str {
    match access {
        NetworkAccess::None => "none",
        NetworkAccess::Limited => "limited",
        NetworkAccess::Full => "full",
    }
}
