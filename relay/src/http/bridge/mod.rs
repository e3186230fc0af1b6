//! The daemons' endpoint: `GET /v1/bridge`, one WebSocket per daemon instance.
//!
//! The pipeline of one connection: a binary WebSocket message → [`bridge::decode`] (on
//! the bulk pool above 64 KiB, a commit's delta: `cloud_tree::bulk::sized`) → a
//! [`ToRelay`] → the extension handler (register, heartbeat, requests) or the task handler
//! (join, leave, journaled events) → the core. This module holds the connection itself:
//! the upgrade, the state of one connection, its loop, decoding and dispatch, and how it
//! ends. Each job of the loop has a module of its own, as more `impl Connection` blocks:
//!
//! - [`register`]: the `Register` handshake (the instance's ack, its stored refusals).
//! - [`events`]: journaled events handed to the core in batches, and their outcomes
//!   (refusals, then the cumulative ack) reported in batch order; the events limit (an
//!   event over it is dropped, not acknowledged, and the daemon is told to slow down).
//! - [`sessions`]: the daemon's replica (the visible sessions and their changes), joins
//!   and leaves (a follower task per joined session), and session requests.
//! - [`instance`]: this connection in the instance registry: heartbeats, instance
//!   commands and their results.
//! - [`send`]: queueing messages on the socket, stamped with the ack, and encoding log
//!   entries borrowed into one buffer per page.
//! - [`settings`](mod@settings): the settings of the connection's user and org, sent when
//!   they change, and the daemon's writes.
//! - [`presence`](mod@presence): the daemon as a `daemon` client of the sessions its local
//!   clients are attached to, beaten by whatever the daemon sends and kept live by pings.
//!
//! Outgoing traffic has four sources, all bounded: this task's own answers, session
//! notices (a broadcast; a connection that falls behind gets the full list again), one
//! log follower task per joined session (which hands over a page of entries at a time and
//! waits when the connection is slow, costing nothing because it reads from the store),
//! and instance commands from the registry. Everything is queued on the socket and written
//! with one flush before the connection waits again, so a burst of log entries and acks
//! costs one write, not one per message.
//!
//! A message that does not decode, is too large or is not binary ends the connection with
//! `Refused{permanent: false}`; nothing else is affected. A revoked credential (its API
//! key, or its refresh-token family) ends it with `Refused{permanent: true}`. A connection
//! opened with an access token ends with `Refused{permanent: false}` when the token
//! expires, unless the daemon sent a fresh one of the same login first
//! (`ToRelay::Authenticate`). A user removed from the connection's org ends it with
//! `Refused{permanent: false}` (the reconnect is refused with what to do). A daemon silent for [`SILENCE_LIMIT`] is dropped. This
//! module never logs a token, and only the core changes state: a connection sends it
//! commands.

mod events;
mod instance;
mod presence;
mod register;
mod send;
mod sessions;
mod settings;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use cloud_protocol::bridge::{self, Envelope, FromRelay, Outbound, ToRelay, MAX_BRIDGE_MESSAGE};
use cloud_protocol::teleport::TeleportReply;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::Authenticated;
use crate::access::Identity;
use crate::core::{EventsOutcome, Shared};
use crate::follow::Entries;
use crate::instances::{CommandReply, InstanceCommand, COMMAND_QUEUE};
use events::{next_outcome, MAX_BATCHES_IN_FLIGHT};

/// A daemon silent for this long is gone (it pings every 15 s and heartbeats every 20 s).
const SILENCE_LIMIT: Duration = Duration::from_secs(90);

/// Outgoing messages waiting for the socket.
const OUTGOING_QUEUE: usize = 256;

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
    in_flight: VecDeque<oneshot::Receiver<EventsOutcome>>,
    /// The sending side of `commands`, until `Register` hands it to the registry.
    commands_sender: Option<mpsc::Sender<InstanceCommand>>,
    /// Instance commands to send to the daemon (from the registry).
    commands: mpsc::Receiver<InstanceCommand>,
    /// Commands sent and not yet answered, by command id.
    pending: HashMap<u64, CommandReply>,
    /// The last command id used on this connection.
    last_command: u64,
    /// Teleport requests run as tasks of their own (a commit can take seconds); their
    /// answers come back here.
    teleport_sender: mpsc::Sender<(u64, Result<TeleportReply, String>)>,
    teleport_replies: mpsc::Receiver<(u64, Result<TeleportReply, String>)>,
    /// Teleport requests running, at most [`MAX_TELEPORT_REQUESTS`].
    teleport_running: usize,
    /// The highest journal seq this connection handed to the core: anything at or below
    /// it is a resend, which the core deduplicates and the events limit does not count.
    handed: u64,
    /// The first event dropped over the events limit, while the daemon has not resent it:
    /// every later event is dropped too, so the core never sees a gap.
    dropping_from: Option<u64>,
    /// The settings last sent to the daemon.
    last_settings: Option<cloud_protocol::settings::SettingsSnapshot>,
    /// The registered instance's host name, naming it as a client of sessions.
    hostname: String,
    /// The sessions the daemon's local clients are attached to, each counted while this
    /// connection holds its guard.
    presence: HashMap<String, crate::presence::PresenceGuard>,
}

/// Teleport requests one connection may have running at once; more wait in the socket.
const MAX_TELEPORT_REQUESTS: usize = 8;

impl Connection {
    fn new(shared: Arc<Shared>, identity: Identity) -> Connection {
        let (outgoing_sender, outgoing) = mpsc::channel(OUTGOING_QUEUE);
        let (commands_sender, commands) = mpsc::channel(COMMAND_QUEUE);
        let (teleport_sender, teleport_replies) = mpsc::channel(MAX_TELEPORT_REQUESTS);
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
            teleport_sender,
            teleport_replies,
            teleport_running: 0,
            handed: 0,
            dropping_from: None,
            last_settings: None,
            hostname: String::new(),
            presence: HashMap::new(),
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
            // A commit's delta is megabytes: decoded on the bulk pool, while this
            // connection waits (its messages stay in order) and the runtime serves the rest.
            Some(Ok(Message::Binary(bytes))) => {
                let decoded =
                    cloud_tree::bulk::sized(bytes.len(), move || bridge::decode::<ToRelay>(&bytes))
                        .await;
                match decoded {
                    Ok(Ok(envelope)) => Ok(Some(envelope)),
                    Ok(Err(e)) => Err(self.refuse(socket, e.to_string(), false).await),
                    Err(e) => Err(self
                        .refuse(
                            socket,
                            format!("decoding a bridge message failed: {e}"),
                            false,
                        )
                        .await),
                }
            }
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
        let mut settings_changes = self.shared.settings.subscribe();
        self.send_settings(socket).await?;
        let mut token_generation = self.shared.auth.keys.subscribe();
        let mut silence_check = tokio::time::interval(Duration::from_secs(5));
        let mut presence_ping = tokio::time::interval(self.shared.presence.heartbeat());
        loop {
            // One write for everything this connection queued since it last waited.
            self.flush(socket).await?;
            // Renewed by `Authenticate`, so read at every turn.
            let expiry = self.identity.expires_at.map(|at| {
                let left = at.saturating_sub(crate::now_millis());
                tokio::time::Instant::now() + Duration::from_millis(left)
            });
            tokio::select! {
                _ = self.cancel.cancelled() => return Err(End::Shutdown),
                changed = token_generation.changed() => {
                    if changed.is_err() || !self.shared.auth.is_live(&self.identity) {
                        return Err(self.refuse(
                            socket,
                            "the credential was revoked: log in again with `cloudctl login`".to_owned(),
                            true,
                        ).await);
                    }
                    if !self.shared.auth.is_member(&self.identity) {
                        return Err(self.refuse(
                            socket,
                            format!(
                                "you are no longer a member of org {}: switch with `cloudctl org switch ORG` (see `cloudctl org list`)",
                                self.identity.org
                            ),
                            false,
                        ).await);
                    }
                }
                changed = settings_changes.changed() => {
                    if changed.is_err() {
                        return Err(End::Shutdown);
                    }
                    self.send_settings(socket).await?;
                }
                _ = sleep_until(expiry) => {
                    return Err(self.refuse(
                        socket,
                        "the access token expired: reconnect with a fresh one".to_owned(),
                        false,
                    ).await);
                }
                outcome = next_outcome(&mut self.in_flight), if !self.in_flight.is_empty() => {
                    self.in_flight.pop_front();
                    self.report(socket, outcome?).await?;
                }
                Some((id, result)) = self.teleport_replies.recv() => {
                    self.teleport_running -= 1;
                    self.send(socket, FromRelay::TeleportReply { id, result }).await?;
                }
                message = socket.recv(), if self.in_flight.len() < MAX_BATCHES_IN_FLIGHT
                    && self.teleport_running < MAX_TELEPORT_REQUESTS => {
                    // Once per wake-up, not per message: handle_ready reads on without
                    // waiting.
                    self.last_seen = Instant::now();
                    self.beat_presence();
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
                _ = presence_ping.tick() => self.ping_presence(socket).await?,
                _ = silence_check.tick() => {
                    if self.last_seen.elapsed() > SILENCE_LIMIT {
                        return Err(End::Refused("silent for too long".to_owned()));
                    }
                }
            }
        }
    }

    /// Renews this connection's credential with a fresh access token of the same login.
    async fn reauthenticate(&mut self, socket: &mut WebSocket, token: &str) -> Result<(), End> {
        match self.shared.auth.authenticate(token) {
            Ok(identity)
                if identity.user == self.identity.user
                    && identity.org == self.identity.org
                    && identity.key_hash == self.identity.key_hash
                    && identity.may(crate::access::Scope::SessionsWrite) =>
            {
                tracing::debug!(user = %identity.user, "bridge credential renewed");
                self.identity = identity;
                Ok(())
            }
            Ok(_) => Err(self
                .refuse(
                    socket,
                    "a token of another login cannot renew this connection: reconnect with it"
                        .to_owned(),
                    false,
                )
                .await),
            Err(e) => Err(self.refuse(socket, e.to_string(), false).await),
        }
    }

    /// Handles one message (journaled events go through [`Connection::handle_ready`]).
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
                self.heartbeat();
                Ok(())
            }
            ToRelay::CommandResult { id, result } => {
                self.command_result(id, result);
                Ok(())
            }
            ToRelay::Join { session, after } => self.join(socket, session, after).await,
            ToRelay::Leave { session } => {
                self.leave(&session);
                Ok(())
            }
            ToRelay::Event(_) => Ok(()),
            ToRelay::Authenticate { token } => self.reauthenticate(socket, &token.0).await,
            ToRelay::Telemetry(report) => {
                // Added to the totals only: who sent it is not kept. A report costs a
                // request token (one over the limit is dropped), so no daemon can flood
                // the totals.
                if self
                    .shared
                    .limits
                    .requests
                    .take(&self.identity.key_hash)
                    .is_ok()
                {
                    self.shared.metrics.telemetry(&report);
                }
                Ok(())
            }
            ToRelay::Settings { id, write } => self.write_setting(socket, id, write).await,
            ToRelay::Attached { sessions } => {
                self.attached(sessions);
                Ok(())
            }
            ToRelay::Teleport { id, request } => {
                // Off this loop: messages and answers keep flowing during a long commit.
                let (shared, identity) = (Arc::clone(&self.shared), self.identity.clone());
                let instance = self.instance_id.clone().unwrap_or_default();
                let replies = self.teleport_sender.clone();
                self.teleport_running += 1;
                tokio::spawn(async move {
                    let teleport = Arc::clone(&shared.teleport);
                    let result = teleport
                        .handle(&shared, &identity, &instance, request)
                        .await;
                    let _ = replies.send((id, result)).await;
                });
                Ok(())
            }
            ToRelay::Request { id, request } => {
                if let Err(limited) = self.shared.limits.requests.take(&self.identity.key_hash) {
                    self.shared
                        .metrics
                        .requests_rate_limited
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return self
                        .send(
                            socket,
                            FromRelay::SlowDown {
                                retry_after_ms: millis_up(limited.next_token),
                                request: Some(id),
                            },
                        )
                        .await;
                }
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
}

/// A delay in whole milliseconds, rounded up (a daemon that waits that long finds tokens).
fn millis_up(delay: Duration) -> u64 {
    delay.as_nanos().div_ceil(1_000_000) as u64
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
