//! The relay's core: the one task that changes sessions, their logs, prompts, agents, the
//! bridge dedup table (with each instance's most recent refusals) and the idempotency
//! keys ([`crate::idempotency`]). It hands each session's unfinished user messages to its
//! next agent, or logs them as not processed ([`crate::delivery`]), and logs each refused
//! journaled event in its session as not delivered.
//!
//! Every change arrives as a [`Command`] on one channel and is applied here, in order, so
//! there are no locks around session state and no two writers of a log. The loop works in
//! rounds (group commit): it takes every command that is ready, applies each one's store
//! writes as one atomic batch, flushes the store once, and only then runs the round's
//! effects — replies and acknowledgements, writes to agents, publication of new log entries
//! and session changes. So nothing is acknowledged, shown to a follower or given to an
//! agent before it is on disk.
//!
//! Readers (REST listings, log followers) never come here: they read the published session
//! snapshots in [`Shared`] and the store directly, up to the published log sequence. Each
//! published session also holds the entries its latest round appended, so a follower that
//! keeps up takes them from memory instead of reading back what was just written.
//!
//! The core never waits on a peer: replies are oneshots, agent input goes through unbounded
//! per-agent channels, notices through a broadcast channel that drops for laggards.

mod delivery;
mod error;
mod idempotency;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use cloud_protocol::agent;
use cloud_protocol::bridge::{Outbound, PermissionDecision};
use cloud_protocol::session::{
    Author, CreateSession, LogEntry, NetworkAccess, Session, SessionAction, SessionEvent,
    SessionStatus, Visibility,
};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio_util::task::TaskTracker;

use crate::access::{Access, Identity};
use crate::agents::process::{self as agents, AgentHandle, AgentReport, MAX_AGENT_LINE};
use delivery::Unfinished;
pub use error::CoreError;
use idempotency::{Keys, Lookup};
use crate::instances::Instances;
use crate::store::{Changes, PromptState, Store, StoreError, MAX_STORED_REFUSALS};
use crate::tokens::TokenCache;

/// The most commands applied in one round before flushing, so acknowledgements keep
/// flowing under sustained load.
const MAX_ROUND: usize = 4096;

/// How many commands may wait for the core; senders wait beyond that (backpressure).
pub const COMMAND_QUEUE: usize = 4096;

/// The most bytes of a refusal's reason kept for reporting it again. Reasons quote what
/// the daemon sent (a session id, a request id), so without a bound a daemon could make
/// the relay hold [`MAX_STORED_REFUSALS`] huge strings per instance.
const MAX_STORED_REASON: usize = 1024;

/// How many log entries one read takes when the core reads a session's log back.
const LOG_READ_PAGE: usize = 4096;

/// The most bytes of entries a published session keeps from its latest round (see
/// [`Published::recent`]); a round that appended more publishes none, and its followers
/// read the store.
const RECENT_BYTES: usize = 256 * 1024;

/// How many session notices a slow connection may fall behind before it resynchronises.
const NOTICE_QUEUE: usize = 1024;

/// A change asked of the core.
#[derive(Debug)]
pub enum Command {
    /// Create a session and start its agent.
    Create {
        /// Who asks (the owner to be).
        identity: Identity,
        /// What to create.
        request: CreateSession,
        /// The new session.
        reply: oneshot::Sender<Result<Session, CoreError>>,
    },
    /// Change a session's status, or delete it.
    Action {
        /// Who asks.
        identity: Identity,
        /// The session.
        session: String,
        /// What to do.
        action: SessionAction,
        /// The session afterwards (none after a delete).
        reply: oneshot::Sender<Result<Option<Session>, CoreError>>,
    },
    /// Change who may see a session.
    Share {
        /// Who asks.
        identity: Identity,
        /// The session.
        session: String,
        /// The new visibility.
        visibility: Visibility,
        /// The session afterwards.
        reply: oneshot::Sender<Result<Session, CoreError>>,
    },
    /// User events: from a daemon's journal (`instance` set, deduplicated by seq) or from
    /// REST (`instance` none, seq 0).
    Events {
        /// Who sends them.
        identity: Identity,
        /// The daemon instance, for deduplication.
        instance: Option<String>,
        /// (journal seq, event), in journal order.
        events: Vec<(u64, Outbound)>,
        /// What became of them.
        reply: oneshot::Sender<EventsOutcome>,
    },
    /// A daemon instance registers: what the relay holds of its journal.
    Register {
        /// The instance's dedup key.
        instance: String,
        /// Its ack and stored refusals.
        reply: oneshot::Sender<Registration>,
    },
    /// Something an agent did.
    Agent(AgentReport),
    /// Stop every agent, flush, and end the loop.
    Shutdown {
        /// Answered when done.
        reply: oneshot::Sender<()>,
    },
}

/// What became of a batch of events.
#[derive(Debug)]
pub struct EventsOutcome {
    /// The highest journal seq applied for the instance (0 without one): the cumulative ack.
    pub ack: u64,
    /// Each event that was applied now (not skipped as a duplicate): its journal seq and
    /// its log seq, or why it was refused.
    pub results: Vec<(u64, Result<u64, CoreError>)>,
    /// The refusals to report for the batch, in journal order: each event refused now, and
    /// each resent duplicate whose refusal is still stored (its first report may have been
    /// lost with an earlier connection). Empty without an instance.
    pub refusals: Vec<(u64, String)>,
    /// The events' buffer, emptied, so a caller sending batch after batch can reuse it.
    pub spare: Vec<(u64, Outbound)>,
}

/// What the relay holds of a registering daemon instance's journal.
#[derive(Debug)]
pub struct Registration {
    /// The highest journal seq applied for the instance: the cumulative ack.
    pub ack: u64,
    /// The instance's stored refusals (the most recent [`MAX_STORED_REFUSALS`]), in journal
    /// order: (seq, reason).
    pub refusals: Vec<(u64, String)>,
}

impl From<AgentReport> for Command {
    fn from(report: AgentReport) -> Command {
        Command::Agent(report)
    }
}

/// A change to a session that connections replicate.
#[derive(Debug, Clone)]
pub enum Notice {
    /// Created or changed.
    Changed(Session),
    /// Deleted.
    Removed(String),
}

/// A published session: what readers may see.
#[derive(Debug)]
pub struct Published {
    /// The session as of the last flushed round.
    pub session: Session,
    /// The last log seq on disk, for followers to wait on.
    pub log_seq: watch::Sender<u64>,
    /// The entries the latest round that appended any appended, in order, on disk (empty
    /// before the first, or when they were more than [`RECENT_BYTES`]): one round's worth
    /// at most, whatever the log's length.
    pub recent: Arc<[LogEntry]>,
}

/// State shared by every task of a running relay.
#[derive(Debug)]
pub struct Shared {
    /// Live tokens.
    pub tokens: TokenCache,
    /// The store, for log reads.
    pub store: Store,
    /// Published sessions by id.
    pub sessions: RwLock<HashMap<String, Published>>,
    /// Session changes, for bridge connections.
    pub notices: broadcast::Sender<Notice>,
    /// The core's command channel.
    pub core: mpsc::Sender<Command>,
    /// Tells every connection to close.
    pub cancel: tokio_util::sync::CancellationToken,
    /// Every connection task, so shutdown can wait for them.
    pub connections: TaskTracker,
    /// The connected daemon instances, for listing and instance commands.
    pub instances: Instances,
}

impl Shared {
    /// The published session, if this user may see it, with their access.
    pub fn session_for(
        &self,
        identity: &Identity,
        id: &str,
    ) -> Result<(Session, Access), CoreError> {
        let sessions = self.sessions.read().unwrap();
        let published = sessions
            .get(id)
            .ok_or_else(|| CoreError::NotFound(id.to_owned()))?;
        match identity.access(&published.session) {
            Access::None => Err(CoreError::NotFound(id.to_owned())),
            access => Ok((published.session.clone(), access)),
        }
    }

    /// Whether this user may see the published session ([`Shared::session_for`] without
    /// the copy).
    pub fn can_see(&self, identity: &Identity, id: &str) -> bool {
        self.sessions
            .read()
            .unwrap()
            .get(id)
            .is_some_and(|p| !matches!(identity.access(&p.session), Access::None))
    }

    /// The sessions in this user's listing, oldest first.
    pub fn list_for(&self, identity: &Identity) -> Vec<Session> {
        let mut list: Vec<Session> = self
            .sessions
            .read()
            .unwrap()
            .values()
            .filter(|p| identity.lists(&p.session))
            .map(|p| p.session.clone())
            .collect();
        list.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        list
    }

    /// The published entries of the session's latest round after `after`, if they continue
    /// from it (`after + 1` is among them, or they start right after it).
    pub fn recent_after(&self, id: &str, after: u64) -> Option<(Arc<[LogEntry]>, usize)> {
        let recent = Arc::clone(&self.sessions.read().unwrap().get(id)?.recent);
        let first = recent.first()?.seq;
        let last = recent.last()?.seq;
        if first > after.saturating_add(1) || last <= after {
            return None;
        }
        let start = usize::try_from(after + 1 - first).unwrap_or(0);
        Some((recent, start))
    }

    /// A receiver of the session's published log seq.
    pub fn log_seq(&self, id: &str) -> Option<watch::Receiver<u64>> {
        self.sessions
            .read()
            .unwrap()
            .get(id)
            .map(|p| p.log_seq.subscribe())
    }

    /// Sends a command and waits for its reply.
    pub async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, CoreError> {
        let (reply, answer) = oneshot::channel();
        self.core
            .send(make(reply))
            .await
            .map_err(|_| CoreError::ShuttingDown)?;
        answer.await.map_err(|_| CoreError::ShuttingDown)
    }
}

/// Builds the shared state; the core's receiver is returned for [`Core::start`].
pub fn shared(tokens: TokenCache, store: Store) -> (Arc<Shared>, mpsc::Receiver<Command>) {
    let (core, commands) = mpsc::channel(COMMAND_QUEUE);
    let shared = Shared {
        tokens,
        store,
        sessions: RwLock::default(),
        notices: broadcast::channel(NOTICE_QUEUE).0,
        core,
        cancel: tokio_util::sync::CancellationToken::new(),
        connections: TaskTracker::new(),
        instances: Instances::default(),
    };
    (Arc::new(shared), commands)
}

/// A session as the core holds it.
#[derive(Debug)]
struct SessionRuntime {
    /// The authoritative session (ahead of the published copy until the round's flush).
    session: Session,
    /// Its permission prompts by request id.
    prompts: HashMap<String, PromptState>,
    /// Its agent, while one runs.
    agent: Option<AgentHandle>,
    /// Its user messages that no agent has finished (see [`delivery`]): all handed to its
    /// agent while one runs, and to the next one otherwise.
    unfinished: Unfinished,
}

/// An answer to a caller, given once the round's writes are on disk.
type Reply = Box<dyn FnOnce() + Send>;

/// What one round produced.
#[derive(Default)]
struct Round {
    /// Whether anything was written (so a flush is due).
    dirty: bool,
    /// The round's writes not yet applied: applied as one batch before the flush, or
    /// earlier when the core must read the store.
    pending: Changes,
    /// Daemon instances whose dedup seq moved since the last apply; their records join the
    /// next batch (once per round, not once per event).
    dedup: Vec<String>,
    /// Sessions whose published copy is out of date.
    touched: BTreeSet<String>,
    /// The entries appended this round, by session, published with it after the flush.
    entries: HashMap<String, Vec<LogEntry>>,
    /// Sessions deleted this round.
    removed: Vec<String>,
    /// Answers to callers, in order.
    replies: Vec<Reply>,
    /// Input for agents, one buffer of lines per agent: each gets one write per round.
    agent_input: Vec<(mpsc::UnboundedSender<Vec<u8>>, Vec<u8>)>,
    /// Agent generation → its buffer in `agent_input`.
    agent_index: HashMap<u64, usize>,
    /// The time of the round's log entries, read once: a round runs without waiting.
    at: Option<u64>,
}

impl Round {
    fn reply<T: Send + 'static>(&mut self, sender: oneshot::Sender<T>, value: T) {
        self.replies.push(Box::new(move || {
            let _ = sender.send(value);
        }));
    }

    /// The time of the round's log entries (milliseconds since the Unix epoch).
    fn now(&mut self) -> u64 {
        *self.at.get_or_insert_with(now)
    }

    /// Gives `line` to `agent` once the round's writes are on disk.
    fn write(&mut self, agent: &AgentHandle, line: &str) {
        let index = *self.agent_index.entry(agent.generation).or_insert_with(|| {
            self.agent_input.push((agent.stdin(), Vec::new()));
            self.agent_input.len() - 1
        });
        let buffer = &mut self.agent_input[index].1;
        buffer.extend_from_slice(line.as_bytes());
        buffer.push(b'\n');
    }
}

/// The core: owns sessions, agents and the dedup table.
pub struct Core {
    /// The store.
    store: Store,
    /// What readers see.
    shared: Arc<Shared>,
    /// The agent command line.
    agent_command: Vec<String>,
    /// `DATA/workspaces`.
    workspaces: PathBuf,
    /// Sessions by id.
    sessions: HashMap<String, SessionRuntime>,
    /// Daemon instance → last journal seq applied.
    dedup: HashMap<String, u64>,
    /// Daemon instance → its most recent refusals (at most [`MAX_STORED_REFUSALS`]), by
    /// journal seq, as stored.
    refusals: HashMap<String, BTreeMap<u64, String>>,
    /// Idempotency keys recorded this round, and their sweeping.
    keys: Keys,
    /// The next agent generation.
    next_generation: u64,
    /// Agent tasks and agent stops, so shutdown can wait for them.
    agent_tasks: TaskTracker,
    /// Set when the store failed: from then on every change is refused and nothing is
    /// acknowledged, because memory and disk may disagree.
    broken: bool,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("n_sessions", &self.sessions.len())
            .field("broken", &self.broken)
            .finish()
    }
}

/// The current time in milliseconds since the Unix epoch.
fn now() -> u64 {
    crate::now_millis()
}

impl Core {
    /// Loads the store, publishes its sessions, restarts the agents of running sessions,
    /// and runs the loop on a new task.
    pub async fn start(
        shared: Arc<Shared>,
        commands: mpsc::Receiver<Command>,
        agent_command: Vec<String>,
        workspaces: PathBuf,
    ) -> Result<tokio::task::JoinHandle<()>, StoreError> {
        let store = shared.store.clone();
        let mut refusals: HashMap<String, BTreeMap<u64, String>> = HashMap::new();
        for (instance, seq, reason) in store.load_refusals()? {
            refusals.entry(instance).or_default().insert(seq, reason);
        }
        let mut core = Core {
            store: store.clone(),
            shared,
            agent_command,
            workspaces,
            sessions: HashMap::new(),
            dedup: store.load_dedup()?.into_iter().collect(),
            refusals,
            keys: Keys::default(),
            next_generation: 1,
            agent_tasks: TaskTracker::new(),
            broken: false,
        };
        let mut round = Round::default();
        let mut changes = Changes::default();
        for stored in store.load_sessions()? {
            let id = stored.session.id.clone();
            let finished = match stored.finished {
                Some(finished) => finished,
                None => {
                    // Written by an earlier relay, which kept only the messages no agent
                    // had been handed yet: every message before them counts as finished.
                    let finished = stored
                        .legacy_queue
                        .first()
                        .map_or(stored.session.last_seq, |first| first - 1);
                    changes.put_finished(&id, finished);
                    for &seq in &stored.legacy_queue {
                        changes.remove_legacy_queued(&id, seq);
                    }
                    finished
                }
            };
            let unfinished = unfinished_messages(&store, &id, finished, stored.session.last_seq)?;
            core.sessions.insert(
                id,
                SessionRuntime {
                    session: stored.session,
                    prompts: stored.prompts.into_iter().collect(),
                    agent: None,
                    unfinished,
                },
            );
        }
        core.commit(changes, &mut round);
        let ids: Vec<String> = core.sessions.keys().cloned().collect();
        for id in &ids {
            round.touched.insert(id.clone());
            let status = core.sessions[id].session.status;
            if matches!(status, SessionStatus::Running | SessionStatus::Starting) {
                // The previous relay's agent died with it: its prompts can no longer be
                // answered, and the session gets a new agent.
                let mut changes = Changes::default();
                core.withdraw_prompts(id, &mut changes, &mut round);
                if status == SessionStatus::Running {
                    core.sessions.get_mut(id).unwrap().session.status = SessionStatus::Starting;
                }
                core.start_agent(id, &mut changes, &mut round);
                core.commit(changes, &mut round);
            }
        }
        core.finish_round(round).await;
        tracing::info!(n_sessions = core.sessions.len(), "relay core started");
        Ok(tokio::spawn(core.run(commands)))
    }

    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        while let Some(first) = commands.recv().await {
            let mut round = Round::default();
            let mut shutdown = None;
            let mut next = Some(first);
            let mut n_commands = 0;
            while let Some(command) = next.take() {
                match command {
                    Command::Shutdown { reply } => {
                        shutdown = Some(reply);
                        break;
                    }
                    command => self.handle(command, &mut round),
                }
                n_commands += 1;
                if n_commands < MAX_ROUND {
                    next = commands.try_recv().ok();
                }
            }
            self.finish_round(round).await;
            if let Some(reply) = shutdown {
                self.shutdown().await;
                let _ = reply.send(());
                return;
            }
        }
    }

    /// Stops every agent (leaving session statuses as they are, so the next start restarts
    /// them) and flushes the store.
    async fn shutdown(&mut self) {
        for runtime in self.sessions.values_mut() {
            if let Some(agent) = runtime.agent.take() {
                self.agent_tasks.spawn(agent.stop());
            }
        }
        self.agent_tasks.close();
        let grace = agents::STOP_GRACE + std::time::Duration::from_secs(3);
        if tokio::time::timeout(grace, self.agent_tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("some agent tasks did not finish in time");
        }
        if let Err(e) = self.store.flush().await {
            tracing::error!(error = %e, "final flush failed");
        }
        tracing::info!("relay core stopped");
    }

    /// Flushes the round's writes, then publishes and runs its effects.
    async fn finish_round(&mut self, mut round: Round) {
        if !self.broken {
            let mut changes = Changes::default();
            match self.keys.sweep(&self.store, round.now(), &mut changes) {
                Ok(()) => self.commit(changes, &mut round),
                Err(e) => tracing::error!(error = %e, "cannot look for expired idempotency keys"),
            }
        }
        self.apply_pending(&mut round);
        self.keys.end_round();
        if round.dirty {
            if let Err(e) = self.store.flush().await {
                tracing::error!(error = %e, "store flush failed; refusing further changes");
                self.broken = true;
                // Dropping the effects drops the replies: callers see an error and daemons
                // get no acknowledgement, so they resend to a healthy relay later.
                return;
            }
        }
        for id in &round.touched {
            if let Some(runtime) = self.sessions.get(id) {
                self.publish(&runtime.session, round.entries.remove(id));
            }
        }
        for id in &round.removed {
            if self.shared.sessions.write().unwrap().remove(id).is_some() {
                let _ = self.shared.notices.send(Notice::Removed(id.clone()));
            }
        }
        for (stdin, input) in round.agent_input {
            let _ = stdin.send(input);
        }
        for reply in round.replies {
            reply();
        }
    }

    /// Publishes `session` with the entries its round appended (`None`: it appended none,
    /// and the entries published before stay).
    fn publish(&self, session: &Session, entries: Option<Vec<LogEntry>>) {
        let mut sessions = self.shared.sessions.write().unwrap();
        match sessions.get_mut(&session.id) {
            Some(published) => {
                published.session = session.clone();
                if let Some(entries) = entries {
                    published.recent = recent(entries);
                }
                published.log_seq.send_if_modified(|seq| {
                    let changed = *seq != session.last_seq;
                    *seq = session.last_seq;
                    changed
                });
            }
            None => {
                sessions.insert(
                    session.id.clone(),
                    Published {
                        session: session.clone(),
                        log_seq: watch::channel(session.last_seq).0,
                        recent: recent(entries.unwrap_or_default()),
                    },
                );
            }
        }
        drop(sessions);
        let _ = self.shared.notices.send(Notice::Changed(session.clone()));
    }

    /// Applies one unit's writes atomically.
    /// Adds an event's writes to the round. They reach the store as one batch with the
    /// rest of the round's ([`Core::apply_pending`]).
    fn commit(&mut self, changes: Changes, round: &mut Round) {
        if self.broken {
            return;
        }
        round.pending.extend(changes);
    }

    /// Applies the round's writes so far, as one atomic batch. Called before the flush and
    /// before any read of the store, so reads see every earlier event of the round, but
    /// never while an event is being handled: an event's log entry goes into the round at
    /// once, its other writes and its dedup record after it, and they must share a batch.
    fn apply_pending(&mut self, round: &mut Round) {
        if self.broken {
            return;
        }
        for instance in round.dedup.drain(..) {
            if let Some(&seq) = self.dedup.get(&instance) {
                round.pending.put_dedup(&instance, seq);
            }
        }
        if round.pending.is_empty() {
            return;
        }
        let pending = std::mem::take(&mut round.pending);
        match self.store.apply(pending.into_batch()) {
            Ok(()) => round.dirty = true,
            Err(e) => {
                tracing::error!(error = %e, "store write failed; refusing further changes");
                self.broken = true;
            }
        }
    }

    fn handle(&mut self, command: Command, round: &mut Round) {
        if self.broken {
            // Replies are dropped by `finish_round` anyway; refuse explicitly here.
            match command {
                Command::Create { reply, .. } => round.reply(reply, Err(CoreError::Store)),
                Command::Action { reply, .. } => round.reply(reply, Err(CoreError::Store)),
                Command::Share { reply, .. } => round.reply(reply, Err(CoreError::Store)),
                Command::Events { .. }
                | Command::Register { .. }
                | Command::Agent(_)
                | Command::Shutdown { .. } => {}
            }
            return;
        }
        match command {
            Command::Create {
                identity,
                request,
                reply,
            } => {
                let result = self.create(&identity, request, round);
                round.reply(reply, result);
            }
            Command::Action {
                identity,
                session,
                action,
                reply,
            } => {
                let result = self.action(&identity, &session, action, round);
                round.reply(reply, result);
            }
            Command::Share {
                identity,
                session,
                visibility,
                reply,
            } => {
                let result = self.share(&identity, &session, visibility, round);
                round.reply(reply, result);
            }
            Command::Events {
                identity,
                instance,
                events,
                reply,
            } => {
                let outcome = self.events(&identity, instance.as_deref(), events, round);
                round.reply(reply, outcome);
            }
            Command::Register { instance, reply } => {
                let registration = Registration {
                    ack: self.dedup.get(&instance).copied().unwrap_or(0),
                    refusals: self
                        .refusals
                        .get(&instance)
                        .map(|stored| {
                            stored
                                .iter()
                                .map(|(&seq, reason)| (seq, reason.clone()))
                                .collect()
                        })
                        .unwrap_or_default(),
                };
                round.reply(reply, registration);
            }
            Command::Agent(report) => self.agent_report(report, round),
            Command::Shutdown { .. } => {}
        }
    }

    /// The session if this user may write to it; `refusal` names what a viewer may not do.
    fn writable(
        &self,
        identity: &Identity,
        id: &str,
        refusal: &str,
    ) -> Result<&SessionRuntime, CoreError> {
        let runtime = self
            .sessions
            .get(id)
            .ok_or_else(|| CoreError::NotFound(id.to_owned()))?;
        match identity.access(&runtime.session) {
            Access::None => Err(CoreError::NotFound(id.to_owned())),
            Access::View => Err(CoreError::Forbidden(refusal.to_owned())),
            Access::Write => Ok(runtime),
        }
    }

    /// [`Core::writable`], for changing the session.
    fn writable_mut(
        &mut self,
        identity: &Identity,
        id: &str,
        refusal: &str,
    ) -> Result<&mut SessionRuntime, CoreError> {
        let runtime = self
            .sessions
            .get_mut(id)
            .ok_or_else(|| CoreError::NotFound(id.to_owned()))?;
        match identity.access(&runtime.session) {
            Access::None => Err(CoreError::NotFound(id.to_owned())),
            Access::View => Err(CoreError::Forbidden(refusal.to_owned())),
            Access::Write => Ok(runtime),
        }
    }

    fn create(
        &mut self,
        identity: &Identity,
        request: CreateSession,
        round: &mut Round,
    ) -> Result<Session, CoreError> {
        let id = new_session_id()?;
        let workspace = self.workspaces.join(&id);
        std::fs::create_dir_all(&workspace).map_err(|e| {
            tracing::error!(path = %workspace.display(), error = %e, "cannot create a workspace");
            CoreError::Invalid(format!("cannot create the session's workspace: {e}"))
        })?;
        let at = now();
        let session = Session {
            id: id.clone(),
            status: SessionStatus::Starting,
            created_at: at,
            last_activity: at,
            task: request.task,
            visibility: request.visibility,
            repo_access: request.repo_access,
            network_access: request.network_access,
            vm_image: request.vm_image,
            owner: identity.user.clone(),
            org: identity.org.clone(),
            failure: None,
            last_seq: 0,
        };
        self.sessions.insert(
            id.clone(),
            SessionRuntime {
                session,
                prompts: HashMap::new(),
                agent: None,
                unfinished: Unfinished::default(),
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
        self.start_agent(&id, &mut changes, round);
        self.commit(changes, round);
        tracing::info!(session = %id, owner = %identity.user, "session created");
        Ok(self.sessions[&id].session.clone())
    }

    fn action(
        &mut self,
        identity: &Identity,
        id: &str,
        action: SessionAction,
        round: &mut Round,
    ) -> Result<Option<Session>, CoreError> {
        let runtime = self.writable(identity, id, "viewers cannot change a session")?;
        let Some(target) = action.target() else {
            self.delete(id, round);
            return Ok(None);
        };
        let from = runtime.session.status;
        from.check_transition(target)?;
        let mut changes = Changes::default();
        match target {
            SessionStatus::Running => {
                self.sessions.get_mut(id).unwrap().session.status = SessionStatus::Starting;
                self.start_agent(id, &mut changes, round);
                // The status passed through starting only in memory: log the move from
                // the old status to the new one.
            }
            status => {
                // Read before this action writes anything (see `start_agent`).
                let unfinished = match status {
                    SessionStatus::Completed => self.unfinished_lines(id, round),
                    _ => Vec::new(),
                };
                self.stop_agent(id, &mut changes, round);
                self.set_status(id, status, None, &mut changes, round);
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
        tracing::info!(session = %id, ?action, by = %identity.user, "session action");
        Ok(Some(self.sessions[id].session.clone()))
    }

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
        let workspace = self.workspaces.join(id);
        let stop = runtime.agent.take().map(AgentHandle::stop);
        self.agent_tasks.spawn(async move {
            if let Some(stop) = stop {
                stop.await;
            }
            if let Err(e) = tokio::fs::remove_dir_all(&workspace).await {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %workspace.display(), error = %e, "cannot remove a workspace");
                }
            }
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

    fn share(
        &mut self,
        identity: &Identity,
        id: &str,
        visibility: Visibility,
        round: &mut Round,
    ) -> Result<Session, CoreError> {
        self.writable(identity, id, "viewers cannot share a session")?;
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

    fn events(
        &mut self,
        identity: &Identity,
        instance: Option<&str>,
        mut events: Vec<(u64, Outbound)>,
        round: &mut Round,
    ) -> EventsOutcome {
        let mut results = Vec::with_capacity(events.len());
        let mut refusals = Vec::new();
        for (seq, event) in events.drain(..) {
            let journaled = instance.filter(|_| seq > 0);
            if let Some(instance) = journaled {
                if seq <= self.dedup.get(instance).copied().unwrap_or(0) {
                    // A resend: not applied again, but a refusal is reported again.
                    if let Some(reason) = self.refusals.get(instance).and_then(|r| r.get(&seq)) {
                        refusals.push((seq, reason.clone()));
                    }
                    continue;
                }
            }
            let mut changes = Changes::default();
            let result =
                self.keyed_event(identity, instance, journaled, &event, &mut changes, round);
            if let Some(instance) = journaled {
                // A refused event counts as applied too: resending it must not retry it.
                // Its record joins the batch that holds the event ([`Core::apply_pending`]).
                match self.dedup.get_mut(instance) {
                    Some(last) => *last = seq,
                    None => {
                        self.dedup.insert(instance.to_owned(), seq);
                    }
                }
                if !round.dedup.iter().any(|i| i == instance) {
                    round.dedup.push(instance.to_owned());
                }
            }
            if let (Some(_), Err(e)) = (instance, &result) {
                let reason = e.to_string();
                if let Some(instance) = journaled {
                    // In the event's writes, so in the batch of its dedup record: a
                    // registration after a crash reports it again.
                    self.store_refusal(instance, seq, &reason, &mut changes);
                }
                refusals.push((seq, reason));
            }
            if !changes.is_empty() {
                self.commit(changes, round);
            }
            results.push((seq, result));
        }
        let ack = instance
            .and_then(|instance| self.dedup.get(instance).copied())
            .unwrap_or(0);
        EventsOutcome {
            ack,
            results,
            refusals,
            spare: events,
        }
    }

    /// Applies an event unless its idempotency key says it is a repeat, in which case the
    /// first one's outcome is answered again and nothing is applied. A refused journaled
    /// event (not a repeat) is logged in its session as `not_delivered`.
    fn keyed_event(
        &mut self,
        identity: &Identity,
        instance: Option<&str>,
        journaled: Option<&str>,
        event: &Outbound,
        changes: &mut Changes,
        round: &mut Round,
    ) -> Result<u64, CoreError> {
        let scope = instance.unwrap_or(&identity.user);
        let result = match event.key().map(|key| (key, Keys::check_length(key))) {
            None => self.event(identity, event, changes, round),
            Some((_, Err(e))) => Err(e),
            Some((key, Ok(()))) => match self.keys.lookup(&self.store, scope, key, round.now()) {
                Ok(Lookup::Repeat(result)) => return result,
                Ok(Lookup::New { expired }) => {
                    let result = self.event(identity, event, changes, round);
                    let at = round.now();
                    self.keys.record(changes, scope, key, at, expired, &result);
                    result
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot read an idempotency key; refusing further changes");
                    self.broken = true;
                    return Err(CoreError::Store);
                }
            },
        };
        if let (Some(_), Err(e)) = (journaled, &result) {
            // Where every client of the session sees it; not for a session this user
            // cannot see, nor for one that does not exist.
            let session = event.session();
            if !matches!(e, CoreError::NotFound(_)) && self.sessions.contains_key(session) {
                let line = delivery::not_delivered(event, &e.to_string());
                self.append(session, Author::Relay, SessionEvent::Message(line), round);
            }
        }
        result
    }

    /// Remembers a refusal of a daemon instance's event, in memory and in `changes`,
    /// forgetting the oldest beyond [`MAX_STORED_REFUSALS`] in both.
    fn store_refusal(&mut self, instance: &str, seq: u64, reason: &str, changes: &mut Changes) {
        let stored = match self.refusals.get_mut(instance) {
            Some(stored) => stored,
            None => self.refusals.entry(instance.to_owned()).or_default(),
        };
        let reason = bounded_reason(reason);
        changes.put_refusal(instance, seq, &reason);
        stored.insert(seq, reason);
        while stored.len() > MAX_STORED_REFUSALS {
            let Some((oldest, _)) = stored.pop_first() else {
                break;
            };
            changes.remove_refusal(instance, oldest);
        }
    }

    fn event(
        &mut self,
        identity: &Identity,
        event: &Outbound,
        changes: &mut Changes,
        round: &mut Round,
    ) -> Result<u64, CoreError> {
        let author = Author::User(identity.user.clone());
        match event {
            Outbound::UserMessage { session, text, .. } => {
                let runtime = self.writable_mut(identity, session, "viewers cannot send")?;
                if runtime.session.status == SessionStatus::Completed {
                    return Err(CoreError::Conflict(format!(
                        "session {session} is completed; create a new session"
                    )));
                }
                let line = user_message(text);
                // Without an agent, the session's next agent gets it (it is unfinished).
                if let Some(agent) = &runtime.agent {
                    round.write(agent, &line);
                }
                let seq = append(runtime, author, SessionEvent::Message(line), round);
                runtime.unfinished.push(seq);
                Ok(seq)
            }
            Outbound::PermissionAnswer {
                session,
                request_id,
                decision,
                ..
            } => {
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
                    .insert(request_id.clone(), PromptState::Answered);
                changes.put_prompt(session, request_id, PromptState::Answered);
                Ok(seq)
            }
            Outbound::Interrupt { session, .. } => {
                let runtime = self.writable_mut(identity, session, "viewers cannot interrupt")?;
                let Some(agent) = &runtime.agent else {
                    return Err(CoreError::Conflict(format!(
                        "session {session} is {}: there is nothing to interrupt",
                        runtime.session.status.as_str()
                    )));
                };
                let request_id = format!("interrupt-{}", runtime.session.last_seq + 1);
                let line = agent::interrupt_request(&request_id);
                round.write(agent, &line);
                Ok(append(runtime, author, SessionEvent::Message(line), round))
            }
        }
    }

    fn agent_report(&mut self, report: AgentReport, round: &mut Round) {
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
                // A new prompt, even if an earlier agent of this session used the same id.
                runtime
                    .prompts
                    .insert(request_id.clone(), PromptState::Pending);
                changes.put_prompt(id, &request_id, PromptState::Pending);
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
                if runtime.prompts.get(&request_id) == Some(&PromptState::Pending) =>
            {
                runtime
                    .prompts
                    .insert(request_id.clone(), PromptState::Withdrawn);
                changes.put_prompt(id, &request_id, PromptState::Withdrawn);
            }
            (kind, _, _) if delivery::ends_turn(kind) => finish_turn(runtime, changes),
            _ => {}
        }
    }

    /// Starts the session's agent (its status must be starting, failed or paused) and
    /// moves it to running, or to failed when the agent cannot start. Its unfinished
    /// messages are handed to the new agent.
    fn start_agent(&mut self, id: &str, changes: &mut Changes, round: &mut Round) {
        // Every unfinished message, in order: those no agent was handed yet and those an
        // earlier agent did not finish. Read first: reading applies the round's writes so
        // far, and the caller's writes from here on must share one batch.
        let unfinished = self.unfinished_lines(id, round);
        let generation = self.next_generation;
        self.next_generation += 1;
        let workspace = self.workspaces.join(id);
        let spawned = std::fs::create_dir_all(&workspace)
            .map_err(|e| format!("cannot create the workspace {}: {e}", workspace.display()))
            .and_then(|()| {
                agents::spawn(
                    &self.agent_command,
                    &workspace,
                    id,
                    generation,
                    self.sessions[id].session.network_access == NetworkAccess::None,
                    self.shared.core.clone(),
                    &self.agent_tasks,
                )
                .map_err(|e| e.to_string())
            });
        match spawned {
            Ok((agent, isolation)) => {
                // Say in the session's own log whether "no network" holds.
                let note = match isolation {
                    agents::NetworkIsolation::NotRequested => None,
                    agents::NetworkIsolation::Enforced => Some(serde_json::json!({
                        "type": "system", "subtype": "network", "network_access": "none", "enforced": true,
                    })),
                    agents::NetworkIsolation::NotEnforced(reason) => {
                        tracing::warn!(session = %id, "network_access=none is not enforced: {reason}");
                        Some(serde_json::json!({
                            "type": "system", "subtype": "network", "network_access": "none",
                            "enforced": false, "reason": reason,
                        }))
                    }
                };
                if let Some(note) = note {
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
                self.sessions.get_mut(id).unwrap().agent = Some(agent);
                self.set_status(id, SessionStatus::Running, None, changes, round);
            }
            Err(reason) => {
                tracing::warn!(session = %id, %reason, "agent did not start");
                self.set_status(id, SessionStatus::Failed, Some(reason), changes, round);
            }
        }
    }

    /// The stream-json lines of the session's unfinished messages, oldest first, read back
    /// from its log.
    fn unfinished_lines(&mut self, id: &str, round: &mut Round) -> Vec<String> {
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
                    SessionEvent::Status { .. } => None,
                }));
                after = end;
            }
        }
        lines
    }

    /// Logs each unfinished message of a session that no agent will take as
    /// `not_processed`, with `reason`, and marks them finished. `lines` are theirs, as
    /// [`Core::unfinished_lines`] read them.
    fn give_up_unfinished(
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

    /// Stops the session's agent, if one runs, withdrawing its pending prompts.
    fn stop_agent(&mut self, id: &str, changes: &mut Changes, round: &mut Round) {
        if let Some(agent) = self.sessions.get_mut(id).and_then(|r| r.agent.take()) {
            self.agent_tasks.spawn(agent.stop());
        }
        self.withdraw_prompts(id, changes, round);
    }

    /// Withdraws every pending prompt of a session whose agent is gone, logging a
    /// `control_cancel_request` for each so every client stops showing it.
    fn withdraw_prompts(&mut self, id: &str, changes: &mut Changes, round: &mut Round) {
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

    /// Moves a session to `status` (the caller checked the transition), logging it.
    fn set_status(
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

    /// Appends an entry to a session's log; returns its seq.
    fn append(&mut self, id: &str, author: Author, event: SessionEvent, round: &mut Round) -> u64 {
        let runtime = self.sessions.get_mut(id).unwrap();
        append(runtime, author, event, round)
    }
}

/// Appends an entry to a session's log (straight into the round's writes, where it joins
/// the session's log chunk); returns its seq.
fn append(
    runtime: &mut SessionRuntime,
    author: Author,
    event: SessionEvent,
    round: &mut Round,
) -> u64 {
    let at = round.now();
    let seq = runtime.session.last_seq + 1;
    runtime.session.last_seq = seq;
    runtime.session.last_activity = at;
    let id = &runtime.session.id;
    let entry = LogEntry {
        seq,
        at,
        author,
        event,
    };
    round.pending.put_log(id, &entry);
    match round.entries.get_mut(id) {
        Some(entries) => entries.push(entry),
        None => {
            round.entries.insert(id.clone(), vec![entry]);
        }
    }
    if !round.touched.contains(id) {
        round.touched.insert(id.clone());
    }
    seq
}

/// The session's agent ended a turn: its oldest unfinished message is finished. In the
/// batch of the `result` entry, so a finished turn is never handed to an agent again.
fn finish_turn(runtime: &mut SessionRuntime, changes: &mut Changes) {
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
fn unfinished_messages(
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

/// What a published session keeps of its latest round's entries: all of them, unless they
/// are larger than [`RECENT_BYTES`].
fn recent(entries: Vec<LogEntry>) -> Arc<[LogEntry]> {
    let bytes: usize = entries
        .iter()
        .map(|entry| match &entry.event {
            SessionEvent::Message(text) => text.len(),
            SessionEvent::Status { reason, .. } => reason.as_ref().map_or(0, String::len),
        })
        .sum();
    if bytes > RECENT_BYTES {
        return Arc::new([]);
    }
    entries.into()
}

/// The stream-json line of a user message: what [`agent::user_message`] writes, without
/// building a JSON tree first (the field order is serde_json's, which sorts keys).
fn user_message(text: &str) -> String {
    #[derive(serde::Serialize)]
    struct Line<'a> {
        message: Message<'a>,
        #[serde(rename = "type")]
        kind: &'static str,
    }
    #[derive(serde::Serialize)]
    struct Message<'a> {
        content: &'a str,
        role: &'static str,
    }
    serde_json::to_string(&Line {
        message: Message {
            content: text,
            role: "user",
        },
        kind: "user",
    })
    .expect("a user message always serialises")
}

/// `reason` if it fits [`MAX_STORED_REASON`], else its beginning and its end (where the
/// kind of refusal is said: `... was already answered`) around an ellipsis.
fn bounded_reason(reason: &str) -> String {
    if reason.len() <= MAX_STORED_REASON {
        return reason.to_owned();
    }
    let half = (MAX_STORED_REASON - " … ".len()) / 2;
    let mut head = half;
    while !reason.is_char_boundary(head) {
        head -= 1;
    }
    let mut tail = reason.len() - half;
    while !reason.is_char_boundary(tail) {
        tail += 1;
    }
    format!("{} … {}", &reason[..head], &reason[tail..])
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_follower_takes_the_latest_round_from_memory_only_when_it_continues_its_cursor() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        let (shared, _commands) = shared(TokenCache::open(dir.path()), store);
        let entry = |seq: u64, text: String| LogEntry {
            seq,
            at: seq,
            author: Author::Agent,
            event: SessionEvent::Message(text),
        };
        let session = Session {
            id: "s-1".to_owned(),
            status: SessionStatus::Running,
            created_at: 1,
            last_activity: 1,
            task: String::new(),
            visibility: Visibility::Private,
            repo_access: cloud_protocol::session::RepoAccess::Read,
            network_access: NetworkAccess::Full,
            vm_image: String::new(),
            owner: "u".to_owned(),
            org: "o".to_owned(),
            failure: None,
            last_seq: 7,
        };
        let round = (5..=7).map(|seq| entry(seq, seq.to_string())).collect();
        shared.sessions.write().unwrap().insert(
            "s-1".to_owned(),
            Published {
                session,
                log_seq: watch::channel(7).0,
                recent: recent(round),
            },
        );
        let taken = |after| {
            shared
                .recent_after("s-1", after)
                .map(|(all, start)| all[start..].iter().map(|e| e.seq).collect::<Vec<_>>())
        };
        // A gap before the round (or nothing new): the store is read instead.
        assert_eq!(taken(3), None);
        assert_eq!(taken(4), Some(vec![5, 6, 7]));
        assert_eq!(taken(6), Some(vec![7]));
        assert_eq!(taken(7), None);
        assert_eq!(taken(9), None);
        assert!(shared.recent_after("s-2", 0).is_none());
        // A round larger than RECENT_BYTES is not kept.
        assert!(recent(vec![entry(8, "x".repeat(RECENT_BYTES + 1))]).is_empty());
    }

    #[test]
    fn stored_reasons_are_bounded_and_keep_both_ends() {
        let short = "permission request r-1 was already answered";
        assert_eq!(bounded_reason(short), short);
        let exact = "x".repeat(MAX_STORED_REASON);
        assert_eq!(bounded_reason(&exact), exact);
        for filler in ["y", "é", "🦀"] {
            let long = format!(
                "permission request {} was already answered",
                filler.repeat(5000)
            );
            let bounded = bounded_reason(&long);
            assert!(bounded.len() <= MAX_STORED_REASON, "{}", bounded.len());
            assert!(bounded.len() > MAX_STORED_REASON - 8, "{}", bounded.len());
            assert!(bounded.starts_with("permission request "), "{bounded}");
            assert!(bounded.ends_with(" was already answered"), "{bounded}");
            assert!(bounded.contains(" … "), "{bounded}");
        }
    }

    #[test]
    fn user_message_lines_match_the_protocol() {
        for text in [
            "",
            "ls -la",
            "quotes \" and \\ backslashes",
            "new\nlines\r\tand controls \u{0} \u{1f}",
            "unicode é ✓ 🦀 \u{2028}",
        ] {
            assert_eq!(user_message(text), agent::user_message(text), "{text:?}");
        }
    }
}
