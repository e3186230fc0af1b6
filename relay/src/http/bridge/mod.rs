//! The daemons' endpoint: `GET /v1/bridge`, one WebSocket per daemon instance.
//!
//! The pipeline of one connection: a binary WebSocket message → [`bridge::decode`] → a
//! [`ToRelay`] → the extension handler (register, heartbeat, requests) or the task handler
//! (join, leave, journaled events) → the core. Consecutive journaled events are handed to
//! the core as one batch, so they share one flush; the reply's cumulative ack is stamped
//! on every envelope sent afterwards. The connection does not wait for a batch's reply
//! before reading on: while the core flushes a round, the next batches (at most
//! [`MAX_BATCHES_IN_FLIGHT`] in all) wait for its next round, which takes them together.
//! Replies are reported in the order of their batches, and before the log entries and
//! session notices of the round that answered them (the core answers and publishes a
//! round in one step), as when the connection waited for each reply.
//!
//! A refusal is reported (`EventRefused`) before any envelope whose ack covers it is
//! read: after its batch, again for a resend of it, and again at each registration while
//! the core stores it, with `Registered`'s ack held below the stored refusals and a
//! plain `Ack` after them. So one lost with an earlier connection is not reported as
//! delivered.
//!
//! Once registered, the connection is in the instance registry ([`crate::instances`])
//! under (token user, instance id) until it ends, unless a reconnect of the same instance
//! replaced it there first; heartbeats are recorded there.
//!
//! Outgoing traffic has four sources, all bounded: this task's own answers, session
//! notices (a broadcast; a connection that falls behind gets the full list again), one
//! log follower task per joined session (which hands over a page of entries at a time and
//! waits when the connection is slow, costing nothing because it reads from the store),
//! and instance commands from the registry, each sent as a `Command` with an id of this
//! connection's and completed by the daemon's `CommandResult` (or failed when the
//! connection ends).
//! Everything is queued on the socket and written with one flush before the connection
//! waits again, so a burst of log entries and acks costs one write, not one per message.
//!
//! A message that does not decode, is too large or is not binary ends the connection with
//! `Refused{permanent: false}`; nothing else is affected. A revoked token ends it with
//! `Refused{permanent: true}`. This module never logs a token.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use cloud_protocol::bridge::{
    self, BridgeError, Channel, Envelope, FromRelay, Outbound, RelayRequest, ToRelay,
    BRIDGE_VERSION, MAX_BRIDGE_MESSAGE,
};
use cloud_protocol::session::{Author, LogEntry, SessionEvent};
use futures_util::{FutureExt as _, SinkExt as _};
use serde::Serialize;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::Authenticated;
use crate::access::Identity;
use crate::core::{Command, CoreError, Notice, Shared};
use crate::follow::{Entries, Follower};
use crate::instances::{CommandError, CommandReply, InstanceCommand, COMMAND_QUEUE};

/// How long a new connection may take to register.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(30);

/// A daemon silent for this long is gone (it pings every 15 s and heartbeats every 20 s).
const SILENCE_LIMIT: Duration = Duration::from_secs(90);

/// Outgoing messages waiting for the socket.
const OUTGOING_QUEUE: usize = 256;

/// The most journaled events handed to the core at once.
const MAX_EVENT_BATCH: usize = 1024;

/// The most batches of events handed to the core and not yet answered. While the core
/// flushes one round, the next batches are read and queued for its next round, which then
/// takes them all with one flush.
const MAX_BATCHES_IN_FLIGHT: usize = 4;

/// The most queued log entries written before one flush.
const MAX_SEND_BATCH: usize = 1024;

/// How much one read from the socket may take. The WebSocket layer zeroes this much of its
/// buffer before every read, so its 128 KiB default costs more than the small messages it
/// reads.
const READ_BUFFER: usize = 16 * 1024;

/// `GET /v1/bridge`: authenticates (401 before upgrading), then serves the connection.
pub async fn connect(
    State(shared): State<Arc<Shared>>,
    Authenticated(identity): Authenticated,
    upgrade: WebSocketUpgrade,
) -> Response {
    let guard = shared.connections.token();
    upgrade
        .read_buffer_size(READ_BUFFER)
        .max_message_size(MAX_BRIDGE_MESSAGE)
        .max_frame_size(MAX_BRIDGE_MESSAGE)
        .on_upgrade(move |socket| async move {
            let _guard = guard;
            Connection::new(shared, identity).run(socket).await;
        })
}

/// Why a connection ended, for the log.
#[derive(Debug)]
enum End {
    /// The daemon closed it.
    Closed,
    /// The relay is shutting down.
    Shutdown,
    /// The connection broke or was refused.
    Refused(String),
}

/// Entries of a followed session's log, from its follower task, each sent as a
/// [`FromRelay::Log`].
#[derive(Debug)]
struct LogPage {
    /// The session.
    session: Arc<str>,
    /// In order.
    entries: Entries,
}

/// The body of a [`FromRelay::Log`], borrowed: it encodes exactly as one, without copying
/// the session id and the entry into a message first.
struct LogBody<'a> {
    session: &'a str,
    entry: &'a LogEntry,
}

/// [`FromRelay::Log`]'s variant index (checked against the protocol by a test).
const LOG_VARIANT: u32 = 7;

impl Serialize for LogBody<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStructVariant as _;
        let mut log = serializer.serialize_struct_variant("FromRelay", LOG_VARIANT, "Log", 2)?;
        log.serialize_field("session", self.session)?;
        log.serialize_field("entry", self.entry)?;
        log.end()
    }
}

/// About how many bytes a [`FromRelay::Log`] envelope of `entry` takes: its strings, and
/// room for the varints and lengths.
fn log_len(session: &str, entry: &LogEntry) -> usize {
    let text = match &entry.event {
        SessionEvent::Message(text) => text.len(),
        SessionEvent::Status { reason, .. } => reason.as_ref().map_or(0, String::len),
    };
    let author = match &entry.author {
        Author::User(name) => name.len(),
        Author::Agent | Author::Relay => 0,
    };
    session.len() + author + text + 48
}

/// Appends a [`FromRelay::Log`] envelope carrying `ack` to `bytes`; on an error `bytes` is
/// left as it was.
fn encode_log(
    ack: u64,
    session: &str,
    entry: &LogEntry,
    bytes: &mut Vec<u8>,
) -> Result<(), BridgeError> {
    let start = bytes.len();
    let envelope = Envelope {
        channel: Channel::Task,
        seq: 0,
        ack,
        body: LogBody { session, entry },
    };
    bytes.reserve(log_len(session, entry));
    let encoded = postcard::to_extend(&envelope, Appender(bytes)).map(drop);
    let len = bytes.len() - start;
    let error = match encoded {
        Ok(()) if len <= MAX_BRIDGE_MESSAGE => return Ok(()),
        Ok(()) => BridgeError::TooLarge { len },
        Err(e) => BridgeError::Malformed(e.to_string()),
    };
    bytes.truncate(start);
    Err(error)
}

/// Appends to a buffer it borrows (postcard's `to_extend` takes its writer by value).
struct Appender<'a>(&'a mut Vec<u8>);

impl Extend<u8> for Appender<'_> {
    fn extend<I: IntoIterator<Item = u8>>(&mut self, bytes: I) {
        self.0.extend(bytes);
    }
}

/// The outcome of the oldest batch of events in flight (which stays in `in_flight`: the
/// caller removes it). The core dropping the reply means it is shutting down, or that its
/// store failed: nothing more is acknowledged either way.
async fn next_outcome(
    in_flight: &mut VecDeque<oneshot::Receiver<crate::core::EventsOutcome>>,
) -> Result<crate::core::EventsOutcome, End> {
    match in_flight.front_mut() {
        Some(outcome) => outcome
            .await
            .map_err(|_| End::Refused(CoreError::ShuttingDown.to_string())),
        None => std::future::pending().await,
    }
}

/// One daemon's connection.
struct Connection {
    /// The relay.
    shared: Arc<Shared>,
    /// Who authenticated.
    identity: Identity,
    /// This connection's id in the instance registry.
    connection: u64,
    /// The registered instance's dedup key, `user/instance` (after `Register`).
    instance: Option<String>,
    /// The registered instance's id (after `Register`).
    instance_id: Option<String>,
    /// The cumulative ack stamped on every envelope.
    ack: u64,
    /// Sessions this daemon's replica holds, so a session that stops being visible can be
    /// removed from it.
    known: HashSet<String>,
    /// Joined sessions and how to stop following them.
    follows: HashMap<String, CancellationToken>,
    /// For follower tasks.
    outgoing_sender: mpsc::Sender<LogPage>,
    /// Drained into the socket.
    outgoing: mpsc::Receiver<LogPage>,
    /// Cancelled when this connection ends (and by shutdown).
    cancel: CancellationToken,
    /// The last time anything arrived.
    last_seen: Instant,
    /// The core's emptied buffer of the last event batch, for the next one.
    spare_events: Vec<(u64, Outbound)>,
    /// Batches of events handed to the core, oldest first, whose outcomes are still to
    /// come (and to be reported, in this order).
    in_flight: VecDeque<oneshot::Receiver<crate::core::EventsOutcome>>,
    /// The sending side of `commands`, until `Register` hands it to the registry.
    commands_sender: Option<mpsc::Sender<InstanceCommand>>,
    /// Instance commands to send to the daemon (from the registry).
    commands: mpsc::Receiver<InstanceCommand>,
    /// Commands sent and not yet answered, by command id.
    pending: HashMap<u64, CommandReply>,
    /// The last command id used on this connection.
    last_command: u64,
}

impl Connection {
    fn new(shared: Arc<Shared>, identity: Identity) -> Connection {
        let (outgoing_sender, outgoing) = mpsc::channel(OUTGOING_QUEUE);
        let (commands_sender, commands) = mpsc::channel(COMMAND_QUEUE);
        let cancel = shared.cancel.child_token();
        Connection {
            connection: shared.instances.connection_id(),
            shared,
            identity,
            instance: None,
            instance_id: None,
            ack: 0,
            known: HashSet::new(),
            follows: HashMap::new(),
            outgoing_sender,
            outgoing,
            cancel,
            last_seen: Instant::now(),
            spare_events: Vec::new(),
            in_flight: VecDeque::new(),
            commands_sender: Some(commands_sender),
            commands,
            pending: HashMap::new(),
            last_command: 0,
        }
    }

    async fn run(mut self, mut socket: WebSocket) {
        tracing::info!(user = %self.identity.user, org = %self.identity.org, "bridge connected");
        let end = match self.serve(&mut socket).await {
            Ok(()) => End::Closed,
            Err(end) => end,
        };
        self.cancel.cancel();
        self.end_commands(&end);
        let reason = match &end {
            End::Closed => None,
            End::Shutdown => Some("the relay is shutting down".to_owned()),
            End::Refused(reason) => Some(reason.clone()),
        };
        let close = Message::Close(Some(CloseFrame {
            code: if matches!(end, End::Shutdown) {
                1001
            } else {
                1000
            },
            reason: reason
                .unwrap_or_default()
                .chars()
                .take(100)
                .collect::<String>()
                .into(),
        }));
        let _ = tokio::time::timeout(Duration::from_secs(1), socket.send(close)).await;
        tracing::info!(
            user = %self.identity.user,
            instance = self.instance.as_deref().unwrap_or("-"),
            ?end,
            "bridge disconnected"
        );
    }

    /// Leaves the instance registry (unless a reconnect replaced this connection there
    /// already) and fails every command this connection was given and did not answer.
    fn end_commands(&mut self, end: &End) {
        let Some(instance) = &self.instance_id else {
            return;
        };
        self.shared
            .instances
            .unregister(&self.identity.user, instance, self.connection);
        let error = match end {
            End::Shutdown => CommandError::ShuttingDown,
            End::Closed | End::Refused(_) => CommandError::Disconnected(instance.clone()),
        };
        self.commands.close();
        for (_, reply) in self.pending.drain() {
            let _ = reply.send(Err(error.clone()));
        }
        while let Ok(command) = self.commands.try_recv() {
            let _ = command.reply.send(Err(error.clone()));
        }
    }

    /// Queues one message stamped with the current ack. Nothing reaches the daemon before
    /// the next [`Connection::flush`] (which `serve` makes before it waits for anything).
    async fn send(&self, socket: &mut WebSocket, body: FromRelay) -> Result<(), End> {
        self.send_acked(socket, self.ack, body).await
    }

    /// [`Connection::send`] with another ack (a registration's, held below a refusal).
    async fn send_acked(
        &self,
        socket: &mut WebSocket,
        ack: u64,
        body: FromRelay,
    ) -> Result<(), End> {
        let channel = match &body {
            FromRelay::Ack
            | FromRelay::Log { .. }
            | FromRelay::EventRefused { .. }
            | FromRelay::JoinRefused { .. } => Channel::Task,
            _ => Channel::Extension,
        };
        let envelope = Envelope {
            channel,
            seq: 0,
            ack,
            body,
        };
        let bytes = match bridge::encode(&envelope) {
            Ok(bytes) => bytes,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode a bridge message; skipping it");
                return Ok(());
            }
        };
        socket
            .feed(Message::Binary(bytes.into()))
            .await
            .map_err(|e| End::Refused(format!("send failed: {e}")))
    }

    /// Queues a page of log entries, each as one message stamped with the current ack,
    /// encoded back to back into one buffer (each message is a slice of it).
    async fn send_logs(&self, socket: &mut WebSocket, page: LogPage) -> Result<(), End> {
        let capacity = page
            .entries
            .iter()
            .map(|entry| log_len(&page.session, entry))
            .sum();
        let mut bytes = Vec::with_capacity(capacity);
        let mut messages = Vec::with_capacity(page.entries.len());
        for entry in page.entries.iter() {
            let start = bytes.len();
            match encode_log(self.ack, &page.session, entry, &mut bytes) {
                Ok(()) => messages.push(start..bytes.len()),
                Err(e) => {
                    tracing::error!(error = %e, "cannot encode a bridge message; skipping it");
                }
            }
        }
        let bytes = axum::body::Bytes::from(bytes);
        for message in messages {
            socket
                .feed(Message::Binary(bytes.slice(message)))
                .await
                .map_err(|e| End::Refused(format!("send failed: {e}")))?;
        }
        Ok(())
    }

    /// Writes every queued message to the socket.
    async fn flush(&self, socket: &mut WebSocket) -> Result<(), End> {
        socket
            .flush()
            .await
            .map_err(|e| End::Refused(format!("send failed: {e}")))
    }

    /// Sends a refusal; the caller ends the connection.
    async fn refuse(&self, socket: &mut WebSocket, reason: String, permanent: bool) -> End {
        let _ = self
            .send(
                socket,
                FromRelay::Refused {
                    reason: reason.clone(),
                    permanent,
                },
            )
            .await;
        End::Refused(reason)
    }

    /// Reads the next message as an envelope; `Ok(None)` when the daemon closed.
    async fn decode(
        &mut self,
        socket: &mut WebSocket,
        message: Option<Result<Message, axum::Error>>,
    ) -> Result<Option<Envelope<ToRelay>>, End> {
        match message {
            None | Some(Ok(Message::Close(_))) => Err(End::Closed),
            Some(Err(e)) => Err(self
                .refuse(socket, format!("unreadable bridge message: {e}"), false)
                .await),
            Some(Ok(Message::Binary(bytes))) => match bridge::decode::<ToRelay>(&bytes) {
                Ok(envelope) => Ok(Some(envelope)),
                Err(e) => Err(self.refuse(socket, e.to_string(), false).await),
            },
            Some(Ok(Message::Text(_))) => Err(self
                .refuse(
                    socket,
                    "bridge messages must be binary postcard envelopes".to_owned(),
                    false,
                )
                .await),
            // The WebSocket layer answers pings itself.
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => Ok(None),
        }
    }

    async fn serve(&mut self, socket: &mut WebSocket) -> Result<(), End> {
        self.register(socket).await?;
        let mut notices = self.shared.notices.subscribe();
        self.send_sessions(socket).await?;
        let mut token_generation = self.shared.tokens.subscribe();
        let mut silence_check = tokio::time::interval(Duration::from_secs(5));
        loop {
            // One write for everything this connection queued since it last waited.
            self.flush(socket).await?;
            tokio::select! {
                _ = self.cancel.cancelled() => return Err(End::Shutdown),
                changed = token_generation.changed() => {
                    if changed.is_err() || !self.shared.tokens.is_live(&self.identity.token_hash) {
                        return Err(self.refuse(socket, "the token was revoked".to_owned(), true).await);
                    }
                }
                outcome = next_outcome(&mut self.in_flight), if !self.in_flight.is_empty() => {
                    self.in_flight.pop_front();
                    self.report(socket, outcome?).await?;
                }
                message = socket.recv(), if self.in_flight.len() < MAX_BATCHES_IN_FLIGHT => {
                    // Once per wake-up, not per message: handle_ready reads on without
                    // waiting.
                    self.last_seen = Instant::now();
                    let first = self.decode(socket, message).await?;
                    self.handle_ready(socket, first).await?;
                }
                Some(page) = self.outgoing.recv() => {
                    self.report_ready(socket).await?;
                    let mut sent = page.entries.len();
                    self.send_logs(socket, page).await?;
                    while sent < MAX_SEND_BATCH {
                        let Ok(page) = self.outgoing.try_recv() else { break };
                        sent += page.entries.len();
                        self.send_logs(socket, page).await?;
                    }
                }
                Some(command) = self.commands.recv() => self.command(socket, command).await?,
                notice = notices.recv() => match notice {
                    Ok(notice) => {
                        self.report_ready(socket).await?;
                        self.notice(socket, notice).await?;
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => self.send_sessions(socket).await?,
                    Err(broadcast::error::RecvError::Closed) => return Err(End::Shutdown),
                },
                _ = silence_check.tick() => {
                    if self.last_seen.elapsed() > SILENCE_LIMIT {
                        return Err(End::Refused("silent for too long".to_owned()));
                    }
                }
            }
        }
    }

    /// Waits for `Register`, checks it, and answers `Registered`, then the instance's stored
    /// refusals (each as `EventRefused`) and an `Ack` if it has any.
    async fn register(&mut self, socket: &mut WebSocket) -> Result<(), End> {
        let envelope = loop {
            let message = tokio::select! {
                _ = self.cancel.cancelled() => return Err(End::Shutdown),
                message = tokio::time::timeout(REGISTER_TIMEOUT, socket.recv()) => match message {
                    Ok(message) => message,
                    Err(_) => return Err(End::Refused("no registration".to_owned())),
                },
            };
            self.last_seen = Instant::now();
            if let Some(envelope) = self.decode(socket, message).await? {
                break envelope;
            }
        };
        let ToRelay::Register(snapshot) = envelope.body else {
            return Err(self
                .refuse(
                    socket,
                    "the first bridge message must be Register".to_owned(),
                    false,
                )
                .await);
        };
        if snapshot.bridge_version < BRIDGE_VERSION {
            return Err(self
                .refuse(
                    socket,
                    format!(
                        "bridge version {} is too old: this relay needs {BRIDGE_VERSION}; upgrade cloudd",
                        snapshot.bridge_version
                    ),
                    true,
                )
                .await);
        }
        tracing::info!(
            user = %self.identity.user,
            instance = %snapshot.instance_id,
            hostname = %snapshot.hostname,
            daemon_version = %snapshot.daemon_version,
            "bridge registered"
        );
        // The instance's current ack, so the daemon can trim its journal before sending
        // anything, and its stored refusals, which an earlier connection may have lost.
        // The daemon chooses its instance id; scoping the dedup key by the token's user
        // keeps another user's daemon from ever colliding with (or poisoning) it.
        let dedup_key = format!("{}/{}", self.identity.user, snapshot.instance_id);
        let instance = dedup_key.clone();
        let registration = self
            .shared
            .call(|reply| Command::Register { instance, reply })
            .await
            .map_err(|e| End::Refused(e.to_string()))?;
        self.ack = registration.ack;
        self.instance = Some(dedup_key);
        if let Some(commands) = self.commands_sender.take() {
            let replaced = self.shared.instances.register(
                &self.identity.user,
                &snapshot,
                self.connection,
                commands,
                crate::now_millis(),
            );
            if replaced {
                tracing::info!(
                    user = %self.identity.user,
                    instance = %snapshot.instance_id,
                    "the instance reconnected: this connection replaces its earlier one"
                );
            }
        }
        self.instance_id = Some(snapshot.instance_id);
        // The daemon releases every event up to `Registered`'s ack as delivered, so it
        // must stay below the stored refusals until they have been reported; the `Ack`
        // after them carries the rest. Refusals the daemon knew already are harmless.
        let registered_ack = match registration.refusals.first() {
            Some(&(first, _)) => self.ack.min(first.saturating_sub(1)),
            None => self.ack,
        };
        self.send_acked(
            socket,
            registered_ack,
            FromRelay::Registered {
                user: self.identity.user.clone(),
                org: self.identity.org.clone(),
                relay_version: crate::VERSION.to_owned(),
            },
        )
        .await?;
        if registration.refusals.is_empty() {
            return Ok(());
        }
        for (seq, reason) in registration.refusals {
            self.send(socket, FromRelay::EventRefused { seq, reason })
                .await?;
        }
        self.send(socket, FromRelay::Ack).await
    }

    async fn send_sessions(&mut self, socket: &mut WebSocket) -> Result<(), End> {
        let sessions = self.shared.list_for(&self.identity);
        self.known = sessions.iter().map(|s| s.id.clone()).collect();
        self.send(socket, FromRelay::Sessions(sessions)).await
    }

    async fn notice(&mut self, socket: &mut WebSocket, notice: Notice) -> Result<(), End> {
        match notice {
            Notice::Changed(session) => {
                if self.identity.lists(&session) {
                    self.known.insert(session.id.clone());
                    self.send(socket, FromRelay::SessionChanged(session)).await
                } else if self.known.remove(&session.id) {
                    self.send(
                        socket,
                        FromRelay::SessionRemoved {
                            session: session.id,
                        },
                    )
                    .await
                } else {
                    Ok(())
                }
            }
            Notice::Removed(id) => {
                if self.known.remove(&id) {
                    self.send(socket, FromRelay::SessionRemoved { session: id })
                        .await
                } else {
                    Ok(())
                }
            }
        }
    }

    /// Handles `first` and every further message already received, grouping consecutive
    /// journaled events into one core batch.
    async fn handle_ready(
        &mut self,
        socket: &mut WebSocket,
        first: Option<Envelope<ToRelay>>,
    ) -> Result<(), End> {
        let mut events = std::mem::take(&mut self.spare_events);
        let mut next = first;
        loop {
            match next.take() {
                Some(Envelope {
                    seq,
                    body: ToRelay::Event(event),
                    ..
                }) => events.push((seq, event)),
                Some(envelope) => {
                    self.apply_events(socket, std::mem::take(&mut events))
                        .await?;
                    self.handle(socket, envelope).await?;
                }
                None => {}
            }
            if events.len() >= MAX_EVENT_BATCH {
                break;
            }
            // Only what has already arrived: never wait here.
            match socket.recv().now_or_never() {
                Some(message) => next = self.decode(socket, message).await?,
                None => break,
            }
        }
        self.apply_events(socket, events).await
    }

    /// Hands a batch of events to the core without waiting for its outcome, which
    /// [`Connection::report`] reports once the core has flushed it (outcomes in the order
    /// of their batches). With [`MAX_BATCHES_IN_FLIGHT`] waiting, the oldest is reported
    /// first.
    async fn apply_events(
        &mut self,
        socket: &mut WebSocket,
        events: Vec<(u64, Outbound)>,
    ) -> Result<(), End> {
        if events.is_empty() {
            self.spare_events = events;
            return Ok(());
        }
        while self.in_flight.len() >= MAX_BATCHES_IN_FLIGHT {
            let outcome = next_outcome(&mut self.in_flight).await;
            self.in_flight.pop_front();
            self.report(socket, outcome?).await?;
        }
        let (reply, outcome) = oneshot::channel();
        let command = Command::Events {
            identity: self.identity.clone(),
            instance: self.instance.clone(),
            events,
            reply,
        };
        self.shared
            .core
            .send(command)
            .await
            .map_err(|_| End::Refused(CoreError::ShuttingDown.to_string()))?;
        self.in_flight.push_back(outcome);
        Ok(())
    }

    /// Reports the outcome of the oldest batch in flight: its refusals, then the ack that
    /// covers it.
    async fn report(
        &mut self,
        socket: &mut WebSocket,
        outcome: crate::core::EventsOutcome,
    ) -> Result<(), End> {
        self.spare_events = outcome.spare;
        self.ack = self.ack.max(outcome.ack);
        for (seq, reason) in outcome.refusals {
            self.send(socket, FromRelay::EventRefused { seq, reason })
                .await?;
        }
        // Always end with a plain ack: the daemon acknowledges only below a refused seq
        // when it reads a refusal, so the batch's full ack must come on its own.
        self.send(socket, FromRelay::Ack).await?;
        Ok(())
    }

    /// Reports, in order, the outcomes of the batches in flight that the core has given
    /// already. Called before anything a round published (log entries, session notices)
    /// is sent: the core answers a round's batches in the same step as it publishes the
    /// round, so their refusals and ack still go out first, as when the connection waited
    /// for each outcome.
    async fn report_ready(&mut self, socket: &mut WebSocket) -> Result<(), End> {
        while let Some(outcome) = self.in_flight.front_mut() {
            let outcome = match outcome.try_recv() {
                Ok(outcome) => outcome,
                Err(oneshot::error::TryRecvError::Empty) => return Ok(()),
                Err(oneshot::error::TryRecvError::Closed) => {
                    return Err(End::Refused(CoreError::ShuttingDown.to_string()))
                }
            };
            self.in_flight.pop_front();
            self.report(socket, outcome).await?;
        }
        Ok(())
    }

    async fn handle(
        &mut self,
        socket: &mut WebSocket,
        envelope: Envelope<ToRelay>,
    ) -> Result<(), End> {
        match envelope.body {
            ToRelay::Register(_) => Err(self
                .refuse(socket, "already registered".to_owned(), false)
                .await),
            ToRelay::Heartbeat => {
                if let Some(instance) = &self.instance_id {
                    self.shared.instances.heartbeat(
                        &self.identity.user,
                        instance,
                        self.connection,
                        crate::now_millis(),
                    );
                }
                Ok(())
            }
            ToRelay::CommandResult { id, result } => {
                tracing::debug!(id, ok = result.is_ok(), "instance command answered");
                // A caller that stopped waiting (timed out) has nobody to tell.
                if let Some(reply) = self.pending.remove(&id) {
                    let _ = reply.send(result.map_err(CommandError::Failed));
                }
                Ok(())
            }
            ToRelay::Join { session, after } => self.join(socket, session, after).await,
            ToRelay::Leave { session } => {
                if let Some(follow) = self.follows.remove(&session) {
                    follow.cancel();
                }
                Ok(())
            }
            ToRelay::Event(_) => Ok(()),
            ToRelay::Request { id, request } => {
                self.flush(socket).await?;
                let result = self.request(request).await;
                self.send(
                    socket,
                    FromRelay::Reply {
                        id,
                        result: result.map_err(|e| e.to_string()),
                    },
                )
                .await
            }
        }
    }

    /// Queues an instance command for the daemon; its `CommandResult` completes `reply`.
    async fn command(
        &mut self,
        socket: &mut WebSocket,
        InstanceCommand { name, reply }: InstanceCommand,
    ) -> Result<(), End> {
        // Forget the callers that stopped waiting, so a daemon that never answers costs
        // only the commands still awaited.
        self.pending.retain(|_, reply| !reply.is_closed());
        self.last_command += 1;
        let id = self.last_command;
        tracing::debug!(
            user = %self.identity.user,
            instance = self.instance_id.as_deref().unwrap_or("-"),
            id,
            name = %name,
            "instance command"
        );
        self.pending.insert(id, reply);
        self.send(socket, FromRelay::Command { id, name }).await
    }

    async fn request(
        &self,
        request: RelayRequest,
    ) -> Result<Option<cloud_protocol::session::Session>, CoreError> {
        let identity = self.identity.clone();
        match request {
            RelayRequest::Create(request) => self
                .shared
                .call(|reply| Command::Create {
                    identity,
                    request,
                    reply,
                })
                .await?
                .map(Some),
            RelayRequest::Action { session, action } => {
                self.shared
                    .call(|reply| Command::Action {
                        identity,
                        session,
                        action,
                        reply,
                    })
                    .await?
            }
            RelayRequest::Share {
                session,
                visibility,
            } => self
                .shared
                .call(|reply| Command::Share {
                    identity,
                    session,
                    visibility,
                    reply,
                })
                .await?
                .map(Some),
            RelayRequest::Get { session } => self
                .shared
                .session_for(&identity, &session)
                .map(|(session, _)| Some(session)),
        }
    }

    async fn join(
        &mut self,
        socket: &mut WebSocket,
        session: String,
        after: u64,
    ) -> Result<(), End> {
        if let Some(previous) = self.follows.remove(&session) {
            previous.cancel();
        }
        let mut follower = match Follower::new(
            self.shared.clone(),
            self.identity.clone(),
            session.clone(),
            after,
        ) {
            Ok(follower) => follower,
            Err(e) => {
                return self
                    .send(
                        socket,
                        FromRelay::JoinRefused {
                            session,
                            reason: e.to_string(),
                        },
                    )
                    .await
            }
        };
        let stop = self.cancel.child_token();
        self.follows.insert(session, stop.clone());
        let outgoing = self.outgoing_sender.clone();
        let session: Arc<str> = follower.session().into();
        self.shared.connections.spawn(async move {
            loop {
                let entries = tokio::select! {
                    _ = stop.cancelled() => return,
                    entries = follower.next() => match entries {
                        Some(entries) => entries,
                        None => return,
                    },
                };
                let page = LogPage {
                    session: session.clone(),
                    entries,
                };
                tokio::select! {
                    _ = stop.cancelled() => return,
                    sent = outgoing.send(page) => if sent.is_err() { return },
                }
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use cloud_protocol::session::SessionStatus;

    use super::*;

    #[test]
    fn log_messages_encode_as_the_protocol_does() {
        let entries = [
            LogEntry {
                seq: 1,
                at: 1_700_000_000_000,
                author: Author::User("alice".to_owned()),
                event: SessionEvent::Message("{\"type\":\"user\"}".to_owned()),
            },
            LogEntry {
                seq: u64::MAX,
                at: 0,
                author: Author::Agent,
                event: SessionEvent::Message("x".repeat(70_000)),
            },
            LogEntry {
                seq: 300,
                at: 5,
                author: Author::Relay,
                event: SessionEvent::Status {
                    status: SessionStatus::Failed,
                    reason: Some("gone".to_owned()),
                },
            },
        ];
        for entry in entries {
            for ack in [0, 1, 127, 128, 1 << 40, u64::MAX] {
                let expected = bridge::encode(&Envelope {
                    channel: Channel::Task,
                    seq: 0,
                    ack,
                    body: FromRelay::Log {
                        session: "s-0123456789abcdef".to_owned(),
                        entry: entry.clone(),
                    },
                })
                .unwrap();
                let mut bytes = b"earlier messages".to_vec();
                let start = bytes.len();
                bytes.reserve_exact(log_len("s-0123456789abcdef", &entry));
                let capacity = bytes.capacity();
                encode_log(ack, "s-0123456789abcdef", &entry, &mut bytes).unwrap();
                assert_eq!(&bytes[start..], expected.as_slice());
                // The room reserved was enough: the buffer was never grown.
                assert_eq!(bytes.capacity(), capacity);
            }
        }
    }
}
