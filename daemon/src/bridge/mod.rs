//! The bridge: the one WebSocket to the relay, kept up for the daemon's whole life.
//!
//! A connection's story, one module per step:
//!
//! - `connect.rs`: which relay (the credentials, re-read at every attempt, or the embedded
//!   relay), its bridge URL ([`bridge_url`]), TLS, the upgrade with the bearer token, the
//!   registration (the instance snapshot out, `Registered` or `Refused` back, the journal
//!   trimmed to the relay's ack), and claiming the journal for the identity that registered.
//! - `writer.rs`: what goes out: the rejoin of every followed session after the last seq
//!   stored, then the journal's durable entries the relay has not acknowledged, in seq
//!   order, and the control messages (joins, leaves, requests, heartbeats, and the
//!   sessions local clients are attached to, `ToRelay::Attached`, at connect and at each
//!   change).
//! - `reader.rs`: what comes in, dispatched: acks, refusals, session logs, replica updates,
//!   replies, instance commands, slow-downs.
//! - [`backoff`]: how long to wait before the next attempt.
//!
//! This module owns [`Bridge`] and its two loops: `keep_up`, which reconnects after
//! [`backoff`] delays (short when nothing listened, exponential up to 10 s otherwise),
//! forever, except after a permanent refusal (bad or revoked token, bridge too old), which
//! waits for new credentials; and `serve`, the registered connection's loop, which turns
//! between the journal, the handlers' commands, the timers (a heartbeat every 20 s, a ping
//! every 15 s; a connection silent for 45 s is dead; with `telemetry = true` only, an
//! anonymous report every [`TELEMETRY_INTERVAL`]) and the socket. A relay's slow-down
//! pauses the journal's stream for its delay, then streams again from the relay's ack
//! (the relay dropped what came after, and deduplicates what it had taken). The requests a
//! connection has in flight wait in [`InFlight`], one table of pending replies per kind of
//! request; they are failed when the connection ends.
//!
//! Architecture invariant: this is the only module that speaks WebSocket. It never blocks
//! the IPC loop: handlers reach it through a bounded channel, and it reaches them through
//! [`crate::link::Link`].

pub mod backoff;
mod connect;
mod reader;
mod writer;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use cloud_protocol::bridge::{BearerToken, Channel, InstanceSnapshot, ToRelay, BRIDGE_VERSION};
use cloud_protocol::ipc::{BridgeState, RelayMode};
use cloud_protocol::session::Session;
use cloud_protocol::settings::{SettingRecord, SettingRefusal};
use cloud_protocol::teleport::TeleportReply;
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use self::backoff::{Backoff, Failure};
pub use self::connect::bridge_url;
use self::writer::send;
use crate::auth::{Access, AuthError, Keeper};
use crate::embedded::EmbeddedRelay;
use crate::link::{BridgeCommand, Link};

/// How often the daemon says it is alive on the extension channel.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(20);
/// How often the daemon pings.
pub const PING_INTERVAL: Duration = Duration::from_secs(15);
/// Silence after which the connection counts as dead.
pub const DEAD_AFTER: Duration = Duration::from_secs(45);
/// The longest a connect (TCP, TLS, upgrade, registration) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// The longest pause a relay's slow-down (or an upgrade's `Retry-After`) gets: a relay
/// cannot silence the daemon for longer at a time.
pub const MAX_SLOW_DOWN: Duration = Duration::from_secs(300);
/// How often an opted-in daemon (`telemetry = true`) reports its aggregates: the first
/// report goes right after its first registration, the next ones at this interval.
pub const TELEMETRY_INTERVAL: Duration = Duration::from_secs(60 * 60);

/// How a connection ended.
#[derive(Debug)]
enum Ended {
    /// The daemon is shutting down.
    Cancelled,
    /// The relay refused for good; wait for new credentials.
    Refused(String),
    /// A failure worth retrying; `registered` says whether the connection got as far as
    /// registering (which resets the backoff).
    Failed { reason: String, registered: bool },
    /// Nothing listens at the relay's address (the TCP connection was refused): retry on
    /// the short schedule, it costs the relay nothing.
    NothingListening(String),
    /// The credentials changed while connected.
    Reconnect,
    /// The relay refused the access token at the upgrade (HTTP 401): worth one refresh.
    Unauthorized(String),
    /// The relay answered the upgrade with 429: try again after its `Retry-After`.
    RateLimited(Duration),
}

impl Ended {
    /// Why the connection ended, in words, where there is more to say than that it did
    /// (the requests still waiting for an answer are told).
    fn why(&self) -> Option<&str> {
        match self {
            Ended::Refused(why)
            | Ended::Failed { reason: why, .. }
            | Ended::NothingListening(why)
            | Ended::Unauthorized(why) => Some(why),
            Ended::Cancelled | Ended::Reconnect | Ended::RateLimited(_) => None,
        }
    }
}

/// The bridge task's state.
#[derive(Debug)]
pub struct Bridge {
    /// Shared with the handlers.
    link: Arc<Link>,
    /// Commands from the handlers.
    commands: mpsc::Receiver<BridgeCommand>,
    /// Where `credentials.toml` lives (re-read at every connect).
    config_dir: std::path::PathBuf,
    /// Where the embedded relay keeps its data.
    state_dir: std::path::PathBuf,
    /// The embedded relay, while no remote relay is configured.
    embedded: Option<EmbeddedRelay>,
    /// Who this instance is (sessions are filled in at each connect).
    snapshot: InstanceSnapshot,
    /// TLS settings for `wss://`.
    tls: Arc<rustls::ClientConfig>,
    /// The access tokens.
    keeper: Arc<Keeper>,
    /// The relay of the current connection (as the credentials name it), the access
    /// token it was opened (or last renewed) with, and when to refresh it.
    access: Option<(String, Access, Instant)>,
    /// The daemon's drain.
    shutdown: CancellationToken,
    /// While the relay asks this daemon to slow down: when the journal streams again
    /// (from the relay's ack: what it dropped meanwhile is sent again).
    paused_until: Option<Instant>,
    /// The highest journal seq ever sent, so a resend is counted as a retry.
    highest_sent: u64,
    /// When the next telemetry report is due (sent only with `telemetry = true`).
    telemetry_due: Instant,
}

impl Bridge {
    /// A bridge for the relay configured under `paths` (or the embedded one).
    pub fn new(
        link: Arc<Link>,
        commands: mpsc::Receiver<BridgeCommand>,
        paths: &cloud_protocol::paths::Paths,
        instance_id: String,
        shutdown: CancellationToken,
    ) -> Bridge {
        let tls = Arc::new(connect::tls_config());
        let hostname = hostname::get()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "unknown".into());
        let keeper = Arc::new(Keeper::new(paths.config_dir.clone(), Arc::clone(&tls)));
        let _ = link.keeper.set(Arc::clone(&keeper));
        Bridge {
            link,
            commands,
            config_dir: paths.config_dir.clone(),
            state_dir: paths.state_dir.clone(),
            embedded: None,
            snapshot: InstanceSnapshot {
                instance_id,
                hostname,
                daemon_version: crate::VERSION.into(),
                bridge_version: BRIDGE_VERSION,
                worktrees: Vec::new(),
                sessions: Vec::new(),
            },
            keeper,
            tls,
            access: None,
            shutdown,
            paused_until: None,
            highest_sent: 0,
            telemetry_due: Instant::now(),
        }
    }

    /// Keeps the bridge up until the daemon shuts down, then stops the embedded relay.
    pub async fn run(mut self) {
        self.keep_up().await;
        if let Some(embedded) = self.embedded.take() {
            embedded.stop().await;
        }
    }

    async fn keep_up(&mut self) {
        let mut backoff = Backoff::new();
        let mut first = true;
        loop {
            if !first {
                self.link.set_status(|s| {
                    if s.state != BridgeState::Refused {
                        s.state = BridgeState::Connecting;
                    }
                });
            }
            first = false;
            let ended = self.connect_and_serve().await;
            let wait = match ended {
                Ended::Cancelled => return,
                Ended::Reconnect => {
                    backoff.reset();
                    continue;
                }
                Ended::Refused(reason) | Ended::Unauthorized(reason) => {
                    tracing::warn!("relay refused this daemon for good: {reason}");
                    self.link.set_status(|s| {
                        s.state = BridgeState::Refused;
                        s.reason = Some(reason);
                    });
                    None
                }
                Ended::NothingListening(reason) => {
                    Some(self.retry(&mut backoff, Failure::NothingListening, reason))
                }
                Ended::RateLimited(delay) => {
                    let delay = delay.min(MAX_SLOW_DOWN);
                    let until = self.link.metrics.slowed_down(delay);
                    let reason = rate_limited_reason(until);
                    let backoff_delay = self.retry(&mut backoff, Failure::Failed, reason);
                    Some(delay.max(backoff_delay))
                }
                Ended::Failed { reason, registered } => {
                    if registered {
                        backoff.reset();
                    }
                    Some(self.retry(&mut backoff, Failure::Failed, reason))
                }
            };
            // Wait out the delay (forever after a refusal), or until told to reconnect.
            let sleep = async {
                match wait {
                    Some(delay) => tokio::time::sleep(delay).await,
                    None => std::future::pending().await,
                }
            };
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    _ = self.shutdown.cancelled() => return,
                    _ = &mut sleep => break,
                    command = self.commands.recv() => match command {
                        None => return,
                        Some(BridgeCommand::Reconnect) => {
                            self.link.begin_epoch();
                            backoff.reset();
                            self.link.set_status(|s| s.state = BridgeState::Connecting);
                            break;
                        }
                        Some(BridgeCommand::Request { reply, .. }) => {
                            let _ = reply.send(Err(self.unreachable()));
                        }
                        Some(BridgeCommand::Teleport { reply, .. }) => {
                            let _ = reply.send(Err(self.unreachable()));
                        }
                        Some(BridgeCommand::Settings { reply, .. }) => {
                            let _ = reply.send(Err(self.unreachable().into()));
                        }
                        // Followed sessions are rejoined at the next connect (and
                        // unfollowed ones are not).
                        Some(BridgeCommand::Join { .. } | BridgeCommand::Leave { .. }) => {}
                    }
                }
            }
        }
    }

    /// A retryable failure: says why in the status, returns how long to wait.
    fn retry(&self, backoff: &mut Backoff, failure: Failure, reason: String) -> Duration {
        let delay = backoff.next_delay(failure, backoff::random_unit());
        // A relay that is down is tried about twice a second: log each new reason once.
        if self.link.status().reason.as_deref() == Some(reason.as_str()) {
            tracing::debug!("relay connection failed ({reason}); retrying in {delay:?}");
        } else {
            tracing::info!("relay connection failed ({reason}); retrying in {delay:?}");
        }
        self.link.set_status(|s| {
            s.state = BridgeState::Retrying;
            s.reason = Some(reason);
        });
        delay
    }

    /// Why a request cannot be served now.
    fn unreachable(&self) -> String {
        let status = self.link.status();
        format!(
            "{} is unreachable ({}); try again when `cloudctl status` shows it connected",
            status.describe(),
            status.reason.as_deref().unwrap_or("connecting")
        )
    }

    /// One connection: connect and register, rejoin the followed sessions, serve.
    async fn connect_and_serve(&mut self) -> Ended {
        let (mut socket, followed) = match self.connect().await {
            Ok(connected) => connected,
            Err(ended) => return ended,
        };
        if let Err(ended) = writer::rejoin(&mut socket, followed).await {
            self.link.set_blob_endpoint(None);
            return registered_failure(ended);
        }
        let ended = self.serve(&mut socket).await;
        self.link.set_blob_endpoint(None);
        let _ = socket.close(None).await;
        registered_failure(ended)
    }

    /// The registered connection's loop.
    async fn serve(&mut self, socket: &mut Socket) -> Ended {
        let mut durable = self.link.journal.durable();
        let mut sent_up_to = self.link.journal.acked();
        let mut in_flight = InFlight::new();
        let mut heartbeat =
            tokio::time::interval_at(Instant::now() + HEARTBEAT_INTERVAL, HEARTBEAT_INTERVAL);
        let mut ping = tokio::time::interval_at(Instant::now() + PING_INTERVAL, PING_INTERVAL);
        let mut last_heard = Instant::now();
        // The relay counts this daemon as a client of the sessions local clients are
        // attached to: tell it the set now, and whenever it changes.
        let mut attached = self.link.attachments.subscribe();
        let sessions = crate::sessions::attachments::sessions(&attached);
        attached.mark_unchanged();
        if !sessions.is_empty() {
            if let Err(ended) = send(
                socket,
                Channel::Extension,
                0,
                ToRelay::Attached { sessions },
            )
            .await
            {
                return ended;
            }
        }
        // Telemetry is for a remote relay only: the embedded one is this machine.
        let remote = self.link.status().mode == RelayMode::Remote;
        // A refresh runs as a task of its own, so the socket is served meanwhile; it is
        // never aborted (it may be saving a rotated refresh token).
        let mut refreshing: Option<tokio::task::JoinHandle<Result<Access, AuthError>>> = None;
        let ended = loop {
            let refresh_due = self.access.as_ref().map(|(_, _, due)| *due);
            // Stream one batch of what is durable and not yet sent, then go back to the
            // select: reads (acks, logs) interleave with a long backlog, so neither side can
            // block the other on full buffers.
            let durable_now = *durable.borrow_and_update();
            let paused = self.paused_until.is_some();
            if !paused {
                if let Err(ended) = self
                    .send_journal(socket, &mut sent_up_to, durable_now)
                    .await
                {
                    return ended;
                }
            }
            let more_to_send = !paused && sent_up_to < durable_now;
            let telemetry = remote && self.link.metrics.telemetry();
            if let Err(ended) = writer::flush(socket).await {
                break ended;
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => break Ended::Cancelled,
                _ = std::future::ready(()), if more_to_send => {}
                changed = durable.changed() => {
                    if changed.is_err() {
                        break Ended::Cancelled;
                    }
                }
                _ = sleep_until(self.paused_until), if paused => {
                    // Stream again from what the relay holds: it dropped everything after.
                    self.paused_until = None;
                    sent_up_to = self.link.journal.acked();
                    self.link.set_status(|s| {
                        if s.reason.as_deref().is_some_and(|r| r.starts_with("rate limited")) {
                            s.reason = None;
                        }
                    });
                }
                _ = tokio::time::sleep_until(self.telemetry_due), if telemetry => {
                    self.telemetry_due = Instant::now() + TELEMETRY_INTERVAL;
                    let report = self.link.metrics.telemetry_report();
                    if let Err(ended) = send(socket, Channel::Extension, 0, ToRelay::Telemetry(report)).await {
                        break ended;
                    }
                }
                _ = sleep_until(refresh_due), if refreshing.is_none() => {
                    let keeper = Arc::clone(&self.keeper);
                    let relay = self.access.as_ref().map(|(relay, ..)| relay.clone()).unwrap_or_default();
                    refreshing = Some(tokio::spawn(async move { keeper.access(&relay, None).await }));
                }
                refreshed = async { refreshing.as_mut().expect("guarded").await }, if refreshing.is_some() => {
                    refreshing = None;
                    if let Err(ended) = self.renew(socket, refreshed).await {
                        break ended;
                    }
                }
                changed = attached.changed() => {
                    if changed.is_err() {
                        break Ended::Cancelled;
                    }
                    let sessions = crate::sessions::attachments::sessions(&attached);
                    attached.mark_unchanged();
                    if let Err(ended) = send(socket, Channel::Extension, 0, ToRelay::Attached { sessions }).await {
                        break ended;
                    }
                }
                _ = heartbeat.tick() => {
                    if let Err(ended) = send(socket, Channel::Extension, 0, ToRelay::Heartbeat).await {
                        break ended;
                    }
                }
                _ = ping.tick() => {
                    if last_heard.elapsed() >= DEAD_AFTER {
                        break Ended::Failed { reason: format!("nothing heard from the relay for {DEAD_AFTER:?}"), registered: true };
                    }
                    if let Err(e) = socket.send(Message::Ping(Vec::new().into())).await {
                        break Ended::Failed { reason: format!("ping failed: {e}"), registered: true };
                    }
                }
                command = self.commands.recv() => match command {
                    None => break Ended::Cancelled,
                    Some(command) => {
                        if let Err(ended) = self.command(socket, command, &mut in_flight).await {
                            break ended;
                        }
                    }
                },
                message = socket.next() => {
                    last_heard = Instant::now();
                    if let Some(ended) = self.read_burst(socket, message, &mut in_flight).await {
                        break ended;
                    }
                }
            }
        };
        in_flight.fail_all(&match ended.why() {
            Some(why) => {
                format!("the relay connection was lost before it answered ({why}); try again")
            }
            None => "the relay connection was lost before it answered; try again".to_owned(),
        });
        ended
    }
}

impl Bridge {
    /// Hands a refreshed access token to the relay before the connection's one expires; a
    /// failed refresh is retried before then (the relay ends the connection at expiry,
    /// and the next connect gets a token of its own), one the relay refused for good ends
    /// the connection.
    async fn renew(
        &mut self,
        socket: &mut Socket,
        refreshed: Result<Result<Access, AuthError>, tokio::task::JoinError>,
    ) -> Result<(), Ended> {
        let refreshed = refreshed.unwrap_or_else(|e| Err(AuthError::Failed(e.to_string())));
        match refreshed {
            Ok(access) => {
                let token = BearerToken(access.token.clone());
                send(
                    socket,
                    Channel::Extension,
                    0,
                    ToRelay::Authenticate { token },
                )
                .await?;
                if let Some((_, held, due)) = self.access.as_mut() {
                    *due = crate::auth::refresh_at(&access);
                    *held = access;
                }
                Ok(())
            }
            Err(AuthError::LoggedOut(reason)) => Err(Ended::Refused(reason)),
            Err(AuthError::Changed) => Err(Ended::Reconnect),
            Err(e) => {
                tracing::info!("refreshing the access token failed ({e}); retrying");
                if let Some((_, access, due)) = self.access.as_mut() {
                    *due = crate::auth::retry_at(access, Instant::now());
                }
                Ok(())
            }
        }
    }
}

/// An HTTP 429's `Retry-After` (whole seconds; 1 s when absent or unreadable), for the
/// bridge's upgrade and the blob socket's alike.
pub(crate) fn retry_after(headers: &tokio_tungstenite::tungstenite::http::HeaderMap) -> Duration {
    let seconds = headers
        .get("retry-after")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.trim().parse::<u64>().ok())
        .unwrap_or(1);
    Duration::from_secs(seconds)
}

/// What `status` says while the relay asks this daemon to slow down.
fn rate_limited_reason(until: std::time::SystemTime) -> String {
    let secs = until
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    format!(
        "rate limited until {:02}:{:02}:{:02} UTC (the relay asked this daemon to slow down; queued events wait in the journal and nothing is lost)",
        secs / 3600 % 24,
        secs / 60 % 60,
        secs % 60
    )
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The requests a connection has sent and the relay has not answered yet: one table of
/// pending replies per kind of request, with ids from one counter, so an id names one
/// request whatever its kind. The writer adds to it, the reader answers from it, and
/// whatever is left when the connection ends is failed.
#[derive(Debug)]
struct InFlight {
    /// The id the next request gets.
    next_id: u64,
    /// Session-management requests ([`ToRelay::Request`]), answered by `FromRelay::Reply`.
    sessions: Replies<Option<Session>>,
    /// Teleport requests ([`ToRelay::Teleport`]), answered by `FromRelay::TeleportReply`.
    teleport: Replies<TeleportReply>,
    /// Settings writes ([`ToRelay::Settings`]), answered by `FromRelay::SettingsReply`.
    settings: Replies<SettingRecord, SettingRefusal>,
}

impl InFlight {
    fn new() -> InFlight {
        InFlight {
            next_id: 1,
            sessions: Replies::default(),
            teleport: Replies::default(),
            settings: Replies::default(),
        }
    }

    /// A fresh request id.
    fn next_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Tells every waiter that no answer will come.
    fn fail_all(self, reason: &str) {
        self.sessions.fail_all(reason);
        self.teleport.fail_all(reason);
        self.settings.fail_all(reason);
    }
}

/// The waiters for one kind of reply, by request id.
#[derive(Debug)]
struct Replies<T, E = String> {
    waiting: HashMap<u64, oneshot::Sender<Result<T, E>>>,
}

impl<T, E> Default for Replies<T, E> {
    fn default() -> Replies<T, E> {
        Replies {
            waiting: HashMap::new(),
        }
    }
}

impl<T, E: From<String>> Replies<T, E> {
    /// Remembers who waits for the reply to request `id`.
    fn insert(&mut self, id: u64, reply: oneshot::Sender<Result<T, E>>) {
        self.waiting.insert(id, reply);
    }

    /// Hands the reply to request `id` to its waiter. A reply nobody waits for (an id
    /// never sent, or answered already) is dropped.
    fn answer(&mut self, id: u64, result: Result<T, E>) {
        if let Some(reply) = self.waiting.remove(&id) {
            let _ = reply.send(result);
        }
    }

    /// Tells every waiter `reason` instead of a reply.
    fn fail_all(self, reason: &str) {
        for (_, reply) in self.waiting {
            let _ = reply.send(Err(reason.to_owned().into()));
        }
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A connection that had registered: any failure resets the backoff.
fn registered_failure(ended: Ended) -> Ended {
    match ended {
        Ended::Failed { reason, .. } => Ended::Failed {
            reason,
            registered: true,
        },
        other => other,
    }
}
