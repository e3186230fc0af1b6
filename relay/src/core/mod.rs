//! The relay's core: the one task that changes sessions, their logs, prompts, agents, the
//! bridge dedup table (with each instance's most recent refusals) and the idempotency
//! keys.
//!
//! Every change arrives as a [`Command`] on one channel and is applied here, in order, so
//! there are no locks around session state and no two writers of a log. The loop works in
//! rounds (group commit): it takes every command that is ready, applies each one's store
//! writes as one atomic batch, flushes the store once, and only then runs the round's
//! effects — replies and acknowledgements, writes to agents, publication of new log entries
//! and session changes. So nothing is acknowledged, shown to a follower or given to an
//! agent before it is on disk.
//!
//! This module holds the loop itself: the commands, a round and its effects, start-up
//! from the store, commit, flush and publish, and appending to a session's log. Each kind
//! of change is applied by the module of its concern, as more `impl Core` blocks:
//!
//! - [`sessions`]: create, status actions, share, delete; starting and stopping a
//!   session's agent.
//! - [`events`]: user events (messages, permission answers, interrupts), deduplicated by
//!   journal seq, with refusals kept per daemon instance and idempotency keys
//!   ([`idempotency`]) honoured.
//! - [`prompts`]: permission prompts, opened by an agent, answered by a user, withdrawn.
//! - [`agent_reports`]: what an agent's output lines and exit do to its session.
//! - [`unfinished`]: handing each session's unfinished user messages to its next agent,
//!   or logging them as not processed, on top of [`delivery`]'s bookkeeping.
//! - [`shared`](mod@shared): what every task shares and what readers see: the published sessions.
//!   Readers (REST listings, log followers) never come here: they read the published
//!   session snapshots and the store, up to the published log sequence.
//!
//! [`error`] is what a request to the core can fail with.
//!
//! The core never waits on a peer: replies are oneshots, agent input goes through unbounded
//! per-agent channels, notices through a broadcast channel that drops for laggards. No
//! other task writes the store or a published session.

mod agent_reports;
mod delivery;
mod error;
mod events;
mod idempotency;
mod prompts;
mod sessions;
mod shared;
mod unfinished;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use cloud_protocol::bridge::Outbound;
use cloud_protocol::session::{
    Author, CreateSession, LogEntry, Session, SessionAction, SessionEvent, SessionStatus,
    Visibility,
};
use cloud_protocol::teleport::VersionInfo;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::task::TaskTracker;

use crate::access::{Access, Identity};
use crate::agents::process::{self, AgentHandle, AgentReport};
use crate::store::{Changes, PromptState, Store, StoreError};
use delivery::Unfinished;
pub use error::CoreError;
use idempotency::Keys;
use shared::recent;
pub use shared::{shared, Notice, Published, Shared};
use unfinished::unfinished_messages;

/// The most commands applied in one round before flushing, so acknowledgements keep
/// flowing under sustained load.
const MAX_ROUND: usize = 4096;

/// How many commands may wait for the core; senders wait beyond that (backpressure).
pub const COMMAND_QUEUE: usize = 4096;

/// How many log entries one read takes when the core reads a session's log back.
const LOG_READ_PAGE: usize = 4096;

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
    /// Log a new snapshot version of a session's tree (teleport committed it).
    Snapshot {
        /// The session.
        session: String,
        /// Who made it: the user whose daemon pushed it, or the agent.
        author: Author,
        /// The version.
        info: VersionInfo,
        /// The log seq of the announcement.
        reply: oneshot::Sender<Result<u64, CoreError>>,
    },
    /// A status action the relay decided itself (idle auto-stop), with why for the log.
    Relay {
        /// The session.
        session: String,
        /// What to do.
        action: SessionAction,
        /// Why, logged with the new status.
        reason: String,
        /// The session afterwards.
        reply: oneshot::Sender<Result<Option<Session>, CoreError>>,
    },
    /// Stop every agent, flush, and end the loop.
    Shutdown {
        /// Answered when done.
        reply: oneshot::Sender<()>,
    },
    /// The provider prepared (or failed to prepare) a session's workspace: start its
    /// agent, or fail it with the provider's message.
    Provisioned {
        /// The session.
        session: String,
        /// The provider's message when it failed.
        result: Result<(), String>,
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
    /// The instance's stored refusals (the most recent
    /// [`MAX_STORED_REFUSALS`](crate::store::MAX_STORED_REFUSALS)), in journal order:
    /// (seq, reason).
    pub refusals: Vec<(u64, String)>,
}

impl From<AgentReport> for Command {
    fn from(report: AgentReport) -> Command {
        Command::Agent(report)
    }
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
    /// Whether its provider is preparing its workspace (it is `starting` meanwhile).
    provisioning: bool,
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
    /// Sessions by id.
    sessions: HashMap<String, SessionRuntime>,
    /// Daemon instance → last journal seq applied.
    dedup: HashMap<String, u64>,
    /// Daemon instance → its most recent refusals (at most
    /// [`MAX_STORED_REFUSALS`](crate::store::MAX_STORED_REFUSALS)), by journal seq, as
    /// stored.
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
                    provisioning: false,
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
                core.start_agent(id, None, &mut changes, &mut round);
                core.commit(changes, &mut round);
            } else if status == SessionStatus::Paused {
                // A paused agent died with the previous relay too: resume starts a new one.
                let mut changes = Changes::default();
                core.withdraw_prompts(id, &mut changes, &mut round);
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
        for (id, runtime) in &mut self.sessions {
            if let Some(agent) = runtime.agent.take() {
                self.agent_tasks.spawn(self.shared.provider.stop(agent));
            }
            self.shared.teleport.unwatch(id);
        }
        self.shared.provider.shutdown();
        self.agent_tasks.close();
        let grace = process::STOP_GRACE + std::time::Duration::from_secs(3);
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
        let _ = self
            .shared
            .notices
            .send(Notice::Changed(Box::new(session.clone())));
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
                Command::Relay { reply, .. } => round.reply(reply, Err(CoreError::Store)),
                Command::Share { reply, .. } => round.reply(reply, Err(CoreError::Store)),
                Command::Snapshot { reply, .. } => round.reply(reply, Err(CoreError::Store)),
                Command::Events { .. }
                | Command::Register { .. }
                | Command::Agent(_)
                | Command::Provisioned { .. }
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
            Command::Relay {
                session,
                action,
                reason,
                reply,
            } => {
                let result = self.relay_action(&session, action, reason, round);
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
                let registration = self.registration(&instance);
                round.reply(reply, registration);
            }
            Command::Agent(report) => self.agent_report(report, round),
            Command::Snapshot {
                session,
                author,
                info,
                reply,
            } => {
                let result = match self.sessions.get_mut(&session) {
                    Some(runtime) => {
                        // Versions are announced in order per session (teleport holds the
                        // session while it commits and announces).
                        runtime.session.snapshot = Some(Box::new(info.clone()));
                        if runtime.agent.is_some() {
                            // The workspace is teleported now: watch it (if not yet).
                            let org = runtime.session.org.clone();
                            Arc::clone(&self.shared.teleport).watch(&self.shared, &session, &org);
                        }
                        let seq =
                            self.append(&session, author, SessionEvent::Snapshot(info), round);
                        let mut changes = Changes::default();
                        changes.put_session(&self.sessions[&session].session);
                        self.commit(changes, round);
                        Ok(seq)
                    }
                    None => Err(CoreError::NotFound(session)),
                };
                round.reply(reply, result);
            }
            Command::Provisioned { session, result } => self.provisioned(&session, result, round),
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
