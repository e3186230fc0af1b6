//! The bridge: the one WebSocket to the relay, kept up for the daemon's whole life.
//!
//! Each connection: connect (bearer token from the credentials, re-read every time), send
//! the instance snapshot, wait to be registered, rejoin every followed session after the
//! last log sequence stored, then stream the journal's durable entries the relay has not
//! acknowledged, while receiving session logs, replica updates, acks and replies. Pings
//! every 15 s; a connection silent for 45 s is dead. Failures reconnect after
//! [`backoff`] delays (short when nothing listened, exponential up to 10 s otherwise),
//! forever, except permanent refusals (bad or revoked token, bridge too old), which wait
//! for new credentials.
//!
//! Architecture invariant: this is the only module that speaks WebSocket. It never blocks
//! the IPC loop: handlers reach it through a bounded channel, and it reaches them through
//! [`crate::link::Link`].

pub mod backoff;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use cloud_protocol::bridge::{
    self, Channel, Envelope, FromRelay, InstanceSnapshot, Outbound, ToRelay, BRIDGE_PATH,
    BRIDGE_VERSION, MAX_BRIDGE_MESSAGE,
};
use cloud_protocol::ipc::{BridgeState, Notification, RelayMode};
use cloud_protocol::session::Session;
use futures_util::{FutureExt as _, SinkExt as _, StreamExt as _};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::sync::CancellationToken;

use self::backoff::{Backoff, Failure};
use crate::credentials::Credentials;
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
/// Journal entries sent per batch.
const SEND_BATCH: usize = 512;
/// How long the bridge waits before reading the journal again after a failed read.
const JOURNAL_RETRY: Duration = Duration::from_millis(250);
/// At most this many messages from the relay are handled in one go before the bridge
/// writes their session log entries and looks at its other work.
const READ_BURST: usize = 256;

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
    /// The daemon's drain.
    shutdown: CancellationToken,
}

impl Bridge {
    /// A bridge for `target`.
    pub fn new(
        link: Arc<Link>,
        commands: mpsc::Receiver<BridgeCommand>,
        paths: &cloud_protocol::paths::Paths,
        instance_id: String,
        shutdown: CancellationToken,
    ) -> Bridge {
        let hostname = hostname::get()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "unknown".into());
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
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
            tls: Arc::new(tls),
            shutdown,
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
                Ended::Refused(reason) => {
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

    /// The credentials for this attempt: the configured remote relay, else the embedded
    /// one (started on first need, stopped when a remote relay is configured).
    async fn credentials(&mut self) -> Result<(Credentials, RelayMode), Ended> {
        match crate::credentials::load(&self.config_dir) {
            Ok(Some(credentials)) => {
                if let Some(embedded) = self.embedded.take() {
                    embedded.stop().await;
                }
                Ok((credentials, RelayMode::Remote))
            }
            Ok(None) => {
                if self.embedded.is_none() {
                    // Its address is not known until it listens: say it is starting.
                    self.link.set_status(|s| {
                        s.mode = RelayMode::Embedded;
                        s.url.clear();
                    });
                    let state_dir = self.state_dir.clone();
                    let started =
                        tokio::task::spawn_blocking(move || EmbeddedRelay::start(&state_dir))
                            .await
                            .map_err(|e| {
                                Ended::Refused(format!("the embedded relay failed: {e}"))
                            })?;
                    // A relay that failed to start may start next time: retry, do not give up.
                    self.embedded = Some(started.map_err(|e| Ended::Failed {
                        reason: e.to_string(),
                        registered: false,
                    })?);
                }
                let embedded = self.embedded.as_ref().expect("just started");
                Ok((embedded.credentials.clone(), RelayMode::Embedded))
            }
            Err(e) => Err(Ended::Refused(e.to_string())),
        }
    }

    async fn connect_and_serve(&mut self) -> Ended {
        let (credentials, mode) = match self.credentials().await {
            Ok(found) => found,
            Err(ended) => return ended,
        };
        let url = match bridge_url(&credentials.relay) {
            Ok(url) => url,
            Err(reason) => return Ended::Refused(reason),
        };
        self.link.set_status(|s| {
            s.url = credentials.relay.clone();
            s.mode = mode;
        });
        let mut request = match url.as_str().into_client_request() {
            Ok(request) => request,
            Err(e) => return Ended::Refused(format!("invalid relay URL {url}: {e}")),
        };
        let Ok(authorization) = format!("Bearer {}", credentials.token).parse() else {
            return Ended::Refused("the token contains characters a header cannot carry".into());
        };
        request.headers_mut().insert("authorization", authorization);
        let config = WebSocketConfig::default()
            .max_message_size(Some(MAX_BRIDGE_MESSAGE))
            .max_frame_size(Some(MAX_BRIDGE_MESSAGE));
        let connect = tokio_tungstenite::connect_async_tls_with_config(
            request,
            Some(config),
            true,
            Some(tokio_tungstenite::Connector::Rustls(Arc::clone(&self.tls))),
        );
        let connected = tokio::select! {
            _ = self.shutdown.cancelled() => return Ended::Cancelled,
            connected = tokio::time::timeout(CONNECT_TIMEOUT, connect) => connected,
        };
        let mut socket = match connected {
            Err(_) => {
                return Ended::Failed {
                    reason: format!("connecting to {url} timed out"),
                    registered: false,
                }
            }
            // Refused: only a TCP connect fails this way (a connection that was established
            // and dropped is reset, which goes on the exponential schedule).
            Ok(Err(tungstenite::Error::Io(e)))
                if e.kind() == std::io::ErrorKind::ConnectionRefused =>
            {
                return Ended::NothingListening(format!("cannot connect to {url}: {e}"))
            }
            Ok(Err(tungstenite::Error::Http(response)))
                if matches!(response.status().as_u16(), 401 | 403) =>
            {
                return Ended::Refused(format!(
                    "the relay rejected the token (HTTP {}); log in again with `cloudctl login`",
                    response.status().as_u16()
                ))
            }
            Ok(Err(e)) => {
                return Ended::Failed {
                    reason: format!("cannot connect to {url}: {e}"),
                    registered: false,
                }
            }
            Ok(Ok((socket, _))) => socket,
        };

        // Register with the full snapshot, then wait for the verdict.
        let followed = self.link.inbound.followed().unwrap_or_default();
        let mut snapshot = self.snapshot.clone();
        snapshot.sessions = followed.iter().map(|(s, _)| s.clone()).collect();
        if let Err(ended) = send(
            &mut socket,
            Channel::Extension,
            0,
            ToRelay::Register(snapshot),
        )
        .await
        {
            return ended;
        }
        let registered = loop {
            let next = tokio::time::timeout(CONNECT_TIMEOUT, socket.next()).await;
            match next {
                Err(_) => {
                    return Ended::Failed {
                        reason: "the relay did not answer the registration".into(),
                        registered: false,
                    }
                }
                Ok(None) => {
                    return Ended::Failed {
                        reason: "the relay closed the connection while registering".into(),
                        registered: false,
                    }
                }
                Ok(Some(Err(e))) => {
                    return Ended::Failed {
                        reason: format!("reading from the relay failed: {e}"),
                        registered: false,
                    }
                }
                Ok(Some(Ok(Message::Binary(bytes)))) => match bridge::decode::<FromRelay>(&bytes) {
                    Ok(envelope) => match envelope.body {
                        FromRelay::Registered { user, org, .. } => {
                            // Its ack says what the relay already holds: trim before resending.
                            self.link.acknowledge(envelope.ack);
                            break (user, org);
                        }
                        FromRelay::Refused {
                            reason,
                            permanent: true,
                        } => return Ended::Refused(reason),
                        FromRelay::Refused { reason, .. } => {
                            return Ended::Failed {
                                reason,
                                registered: false,
                            }
                        }
                        other => {
                            return Ended::Failed {
                                reason: format!("unexpected {other:?} before registration"),
                                registered: false,
                            }
                        }
                    },
                    Err(e) => {
                        return Ended::Failed {
                            reason: format!("relay sent {e}"),
                            registered: false,
                        }
                    }
                },
                Ok(Some(Ok(_))) => continue,
            }
        };
        // The journal's events belong to the relay and identity they were queued for: a
        // different one never receives them.
        let owner = match mode {
            RelayMode::Embedded => {
                format!("the embedded relay as {}/{}", registered.0, registered.1)
            }
            RelayMode::Remote => format!(
                "{} as {}/{}",
                credentials.relay.trim_end_matches('/'),
                registered.0,
                registered.1
            ),
        };
        if let Err(reason) = self.claim_journal(&owner).await {
            return Ended::Failed {
                reason,
                registered: false,
            };
        }
        tracing::info!(user = %registered.0, org = %registered.1, url = %url, "connected to the relay");
        self.link.set_status(|s| {
            s.state = BridgeState::Connected;
            s.reason = None;
            s.user = Some(registered.0.clone());
            s.org = Some(registered.1.clone());
        });
        for (session, after) in followed {
            if let Err(ended) = send(
                &mut socket,
                Channel::Task,
                0,
                ToRelay::Join { session, after },
            )
            .await
            {
                return registered_failure(ended);
            }
        }
        let ended = self.serve(&mut socket).await;
        let _ = socket.close(None).await;
        registered_failure(ended)
    }

    /// Makes `owner` (a relay and an identity) the owner of the journal's events. Events
    /// still unacknowledged that were queued for another owner are refused here, never
    /// sent: their waiters, `status` and `sessions` subscribers are told why.
    async fn claim_journal(&self, owner: &str) -> Result<(), String> {
        let link = &self.link;
        let previous = link
            .meta
            .journal_owner()
            .map_err(|e| format!("cannot read whose events the journal holds: {e}"))?;
        if previous.as_deref() == Some(owner) {
            return Ok(());
        }
        if let Some(previous) = previous {
            let reason = format!(
                "not delivered: it was queued for {previous}, and this daemon now talks to {owner}"
            );
            let mut n_refused = 0u64;
            loop {
                let after = link.journal.acked();
                let entries = link
                    .journal
                    .read_after(after, SEND_BATCH)
                    .map_err(|e| format!("cannot read the journal: {e}"))?;
                let Some(&(last, _)) = entries.last() else {
                    break;
                };
                for (seq, event) in entries {
                    link.refuse(seq, reason.clone());
                    link.report_refusal(seq, event.session().to_owned(), reason.clone());
                    n_refused += 1;
                }
                link.acknowledge(last);
            }
            if n_refused > 0 {
                tracing::warn!(n_refused, "refused journaled events queued for {previous}: this daemon now talks to {owner}");
            }
        }
        link.meta
            .set_journal_owner(owner)
            .await
            .map_err(|e| format!("cannot record whose events the journal holds: {e}"))
    }

    /// The registered connection's loop.
    async fn serve(&mut self, socket: &mut Socket) -> Ended {
        let mut durable = self.link.journal.durable();
        let mut sent_up_to = self.link.journal.acked();
        let mut pending: HashMap<u64, oneshot::Sender<Result<Option<Session>, String>>> =
            HashMap::new();
        let mut next_request_id: u64 = 1;
        let mut heartbeat =
            tokio::time::interval_at(Instant::now() + HEARTBEAT_INTERVAL, HEARTBEAT_INTERVAL);
        let mut ping = tokio::time::interval_at(Instant::now() + PING_INTERVAL, PING_INTERVAL);
        let mut last_heard = Instant::now();
        let ended = loop {
            // Stream whatever is durable and not yet sent.
            // Stream one batch of what is durable and not yet sent, then go back to the
            // select: reads (acks, logs) interleave with a long backlog, so neither side can
            // block the other on full buffers.
            let durable_now = *durable.borrow_and_update();
            if sent_up_to < durable_now {
                let mut batch = EventBatch::default();
                let read =
                    self.link
                        .journal
                        .for_each_after(sent_up_to, SEND_BATCH, |seq, event| {
                            batch.push(seq, event)
                        });
                match read {
                    Ok(()) => {
                        if let Some(reason) = batch.failed {
                            return Ended::Failed {
                                reason,
                                registered: false,
                            };
                        }
                        // Nothing left below `durable_now` (a skip ahead, or seqs the journal
                        // refused and will never hold): catch up, or this loop would spin.
                        if batch.messages.is_empty() {
                            sent_up_to = durable_now;
                        }
                        let bytes = tungstenite::Bytes::from(batch.bytes);
                        for (seq, message) in batch.messages {
                            let message = Message::Binary(bytes.slice(message));
                            if let Err(e) = socket.feed(message).await {
                                return Ended::Failed {
                                    reason: format!("sending to the relay failed: {e}"),
                                    registered: false,
                                };
                            }
                            sent_up_to = seq;
                        }
                    }
                    Err(e) => {
                        // Not in a tight loop: the next attempt waits a little.
                        tracing::error!("cannot read the journal: {e}");
                        tokio::time::sleep(JOURNAL_RETRY).await;
                    }
                }
            }
            let more_to_send = sent_up_to < durable_now;
            match tokio::time::timeout(DEAD_AFTER, socket.flush()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    break Ended::Failed {
                        reason: format!("sending to the relay failed: {e}"),
                        registered: true,
                    }
                }
                Err(_) => {
                    break Ended::Failed {
                        reason: format!("the relay took no data for {DEAD_AFTER:?}"),
                        registered: true,
                    }
                }
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => break Ended::Cancelled,
                _ = std::future::ready(()), if more_to_send => {}
                changed = durable.changed() => {
                    if changed.is_err() {
                        break Ended::Cancelled;
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
                    Some(BridgeCommand::Reconnect) => {
                        self.link.begin_epoch();
                        break Ended::Reconnect;
                    }
                    Some(BridgeCommand::Join { session }) => {
                        let after = self.link.inbound.last_seq(&session).unwrap_or(0);
                        if let Err(ended) = send(socket, Channel::Task, 0, ToRelay::Join { session, after }).await {
                            break ended;
                        }
                    }
                    Some(BridgeCommand::Leave { session }) => {
                        if let Err(ended) = send(socket, Channel::Task, 0, ToRelay::Leave { session }).await {
                            break ended;
                        }
                    }
                    Some(BridgeCommand::Request { request, reply }) => {
                        let id = next_request_id;
                        next_request_id += 1;
                        pending.insert(id, reply);
                        if let Err(ended) = send(socket, Channel::Extension, 0, ToRelay::Request { id, request }).await {
                            break ended;
                        }
                    }
                },
                message = socket.next() => {
                    last_heard = Instant::now();
                    // Handle what else has already arrived too, then write the burst's
                    // session log entries in one go.
                    let mut message = message;
                    let mut burst = 1;
                    let ended = loop {
                        if let Some(ended) = self.incoming(socket, message, &mut pending).await {
                            break Some(ended);
                        }
                        if burst == READ_BURST {
                            break None;
                        }
                        match socket.next().now_or_never() {
                            Some(next) => message = next,
                            None => break None,
                        }
                        burst += 1;
                    };
                    if let Err(e) = self.link.inbound.commit() {
                        tracing::error!("cannot store session log entries: {e}");
                    }
                    if let Some(ended) = ended {
                        break ended;
                    }
                }
            }
        };
        for (_, reply) in pending {
            let _ = reply.send(Err(
                "the relay connection was lost before it answered; try again".into(),
            ));
        }
        ended
    }

    /// Handles one read from the relay's socket. Returns how the connection ends, if it does.
    async fn incoming(
        &mut self,
        socket: &mut Socket,
        message: Option<Result<Message, tungstenite::Error>>,
        pending: &mut HashMap<u64, oneshot::Sender<Result<Option<Session>, String>>>,
    ) -> Option<Ended> {
        match message {
            None => Some(Ended::Failed {
                reason: "the relay closed the connection".into(),
                registered: true,
            }),
            Some(Err(e)) => Some(Ended::Failed {
                reason: format!("reading from the relay failed: {e}"),
                registered: true,
            }),
            Some(Ok(Message::Binary(bytes))) => match bridge::decode::<FromRelay>(&bytes) {
                Ok(envelope) => self.receive(socket, envelope, pending).await,
                Err(e) => {
                    tracing::warn!("closing the bridge: the relay sent {e}");
                    Some(Ended::Failed {
                        reason: format!("the relay sent {e}"),
                        registered: true,
                    })
                }
            },
            Some(Ok(Message::Close(_))) => Some(Ended::Failed {
                reason: "the relay closed the connection".into(),
                registered: true,
            }),
            Some(Ok(_)) => None,
        }
    }

    /// Handles one message from the relay. Returns how the connection ends, if it does.
    async fn receive(
        &mut self,
        socket: &mut Socket,
        envelope: Envelope<FromRelay>,
        pending: &mut HashMap<u64, oneshot::Sender<Result<Option<Session>, String>>>,
    ) -> Option<Ended> {
        let link = &self.link;
        let ack = covered_ack(&envelope.body, envelope.ack);
        match envelope.body {
            FromRelay::Ack | FromRelay::Registered { .. } => {}
            FromRelay::Refused { reason, permanent } => {
                return Some(if permanent {
                    Ended::Refused(reason)
                } else {
                    Ended::Failed {
                        reason,
                        registered: true,
                    }
                });
            }
            FromRelay::Sessions(sessions) => {
                if let Err(e) = link.replica.replace_all(&sessions) {
                    tracing::error!("cannot store the session replica: {e}");
                }
                // One notice per session, unless there are so many that subscribers would be
                // cut off for lagging: then they get the relay status and re-list.
                if sessions.len() <= crate::link::SESSIONS_FEED_CAPACITY / 2 {
                    for session in sessions {
                        let _ = link
                            .sessions_feed
                            .send(Arc::new(Notification::SessionChanged(session)));
                    }
                } else {
                    let _ = link
                        .sessions_feed
                        .send(Arc::new(Notification::Relay(link.status())));
                }
            }
            FromRelay::SessionChanged(session) => {
                if let Err(e) = link.replica.upsert(&session) {
                    tracing::error!("cannot store the session replica: {e}");
                }
                let _ = link
                    .sessions_feed
                    .send(Arc::new(Notification::SessionChanged(session)));
            }
            FromRelay::SessionRemoved { session } => {
                // Deleted or no longer visible: nothing more will come for it.
                if let Err(e) = link
                    .replica
                    .remove(&session)
                    .and_then(|()| link.inbound.forget(&session))
                {
                    tracing::error!("cannot store the session replica: {e}");
                }
                let _ = link
                    .sessions_feed
                    .send(Arc::new(Notification::SessionRemoved { session }));
            }
            FromRelay::Log { session, entry } => {
                // A copy for attached clients only when there are any: usually nobody watches.
                let notice = (link.session_feed.receiver_count() > 0).then(|| entry.clone());
                match link.inbound.store(&session, entry) {
                    Ok(true) => {
                        if let Some(entry) = notice {
                            let _ = link
                                .session_feed
                                .send(Arc::new(Notification::SessionLog { session, entry }));
                        }
                    }
                    Ok(false) => {}
                    Err(e) => tracing::error!("cannot store a session log entry: {e}"),
                }
            }
            FromRelay::EventRefused { seq, reason } => {
                // The relay re-reports its recent refusals at every registration: one already
                // known, or one for an event long acknowledged, is recorded quietly.
                let settled = seq <= link.journal.acked();
                let session = link
                    .journal
                    .read_after(seq.saturating_sub(1), 1)
                    .ok()
                    .and_then(|entries| entries.into_iter().find(|(s, _)| *s == seq))
                    .map(|(_, event)| event.session().to_owned())
                    .unwrap_or_default();
                if link.refuse(seq, reason.clone()) && !settled {
                    tracing::warn!(seq, session = %session, "the relay refused a journaled event: {reason}");
                    link.report_refusal(seq, session, reason);
                } else {
                    tracing::debug!(seq, "the relay re-reported a refusal: {reason}");
                }
            }
            FromRelay::JoinRefused { session, reason } => {
                tracing::warn!(session = %session, "cannot follow session: {reason}");
                if let Err(e) = link.inbound.forget(&session) {
                    tracing::error!("cannot forget session {session}: {e}");
                }
            }
            FromRelay::Reply { id, result } => {
                if let Some(reply) = pending.remove(&id) {
                    let _ = reply.send(result);
                }
            }
            FromRelay::TeleportReply { id, .. } => {
                tracing::debug!(id, "a teleport reply nobody asked for");
            }
            FromRelay::Command { id, name } => {
                let result = match name.as_str() {
                    "ping" => Ok("pong".to_owned()),
                    "refresh" => Ok("refreshed".to_owned()),
                    other => Err(format!("unknown instance command {other:?}")),
                };
                if let Err(ended) = send(
                    socket,
                    Channel::Extension,
                    0,
                    ToRelay::CommandResult { id, result },
                )
                .await
                {
                    return Some(ended);
                }
            }
        }
        // The verdicts above come before the ack that covers them.
        link.acknowledge(ack);
        None
    }
}

/// How much of the journal an envelope acknowledges. A refusal's envelope carries its
/// whole batch's ack, which may cover later refusals still on their way: it acknowledges
/// only below the refused seq (the batch's plain `Ack` follows with the rest).
fn covered_ack(body: &FromRelay, ack: u64) -> u64 {
    match body {
        FromRelay::EventRefused { seq, .. } => ack.min(seq.saturating_sub(1)),
        _ => ack,
    }
}

/// The body of a [`ToRelay::Event`], borrowed: it encodes exactly as one, so journal
/// entries are encoded where the journal keeps them, without a copy of each first.
struct EventBody<'a>(&'a Outbound);

/// [`ToRelay::Event`]'s variant index (checked against the protocol by a test).
const EVENT_VARIANT: u32 = 5;

impl serde::Serialize for EventBody<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_newtype_variant("ToRelay", EVENT_VARIANT, "Event", self.0)
    }
}

/// Journal entries encoded as bridge messages back to back in one buffer (one allocation
/// for the batch; each message is a slice of it).
#[derive(Debug, Default)]
struct EventBatch {
    /// The encoded messages.
    bytes: Vec<u8>,
    /// Each message's seq and place in `bytes`, in order.
    messages: Vec<(u64, std::ops::Range<usize>)>,
    /// Why an entry could not be encoded (the batch is then not sent).
    failed: Option<String>,
}

impl EventBatch {
    /// Appends entry `seq` as a [`ToRelay::Event`] envelope.
    fn push(&mut self, seq: u64, event: &Outbound) {
        if self.failed.is_some() {
            return;
        }
        let start = self.bytes.len();
        let envelope = Envelope {
            channel: Channel::Task,
            seq,
            ack: 0,
            body: EventBody(event),
        };
        match postcard::to_extend(&envelope, std::mem::take(&mut self.bytes)) {
            Ok(bytes) if bytes.len() - start <= MAX_BRIDGE_MESSAGE => {
                self.bytes = bytes;
                self.messages.push((seq, start..self.bytes.len()));
            }
            Ok(bytes) => {
                self.failed = Some(format!(
                    "cannot encode a bridge message: {}",
                    bridge::BridgeError::TooLarge {
                        len: bytes.len() - start
                    }
                ));
            }
            Err(e) => self.failed = Some(format!("cannot encode a bridge message: {e}")),
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

async fn send(socket: &mut Socket, channel: Channel, seq: u64, body: ToRelay) -> Result<(), Ended> {
    send_buffered(socket, channel, seq, body).await?;
    match tokio::time::timeout(DEAD_AFTER, socket.flush()).await {
        Ok(result) => result.map_err(|e| Ended::Failed {
            reason: format!("sending to the relay failed: {e}"),
            registered: false,
        }),
        Err(_) => Err(Ended::Failed {
            reason: format!("the relay took no data for {DEAD_AFTER:?}"),
            registered: false,
        }),
    }
}

/// Queues a message without flushing (the caller flushes a batch once).
async fn send_buffered(
    socket: &mut Socket,
    channel: Channel,
    seq: u64,
    body: ToRelay,
) -> Result<(), Ended> {
    let bytes = bridge::encode(&Envelope {
        channel,
        seq,
        ack: 0,
        body,
    })
    .map_err(|e| Ended::Failed {
        reason: format!("cannot encode a bridge message: {e}"),
        registered: false,
    })?;
    socket
        .feed(Message::Binary(bytes.into()))
        .await
        .map_err(|e| Ended::Failed {
            reason: format!("sending to the relay failed: {e}"),
            registered: false,
        })
}

/// The bridge endpoint of a relay base URL. `https`/`wss` anywhere; `http`/`ws` only on
/// loopback, where there is nothing to encrypt against.
pub fn bridge_url(relay: &str) -> Result<String, String> {
    let relay = relay.trim_end_matches('/');
    let (scheme, rest) = relay
        .split_once("://")
        .ok_or_else(|| format!("invalid relay URL {relay:?}: expected https://host[:port]"))?;
    let secure = match scheme {
        "https" | "wss" => true,
        "http" | "ws" => false,
        other => {
            return Err(format!(
                "invalid relay URL scheme {other:?}: use https (or http on loopback)"
            ))
        }
    };
    let host = rest.split('/').next().unwrap_or("");
    let host_only = host
        .rsplit_once(':')
        .filter(|(_, port)| port.chars().all(|c| c.is_ascii_digit()))
        .map(|(h, _)| h)
        .unwrap_or(host)
        .trim_start_matches('[')
        .trim_end_matches(']');
    let loopback = host_only == "localhost"
        || host_only
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !secure && !loopback {
        return Err(format!(
            "refusing plain {scheme}:// to {host_only}: tokens travel only over TLS except on loopback; use https://"
        ));
    }
    Ok(format!(
        "{}://{rest}{BRIDGE_PATH}",
        if secure { "wss" } else { "ws" }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_acknowledges_only_below_itself() {
        let refused = |seq| FromRelay::EventRefused {
            seq,
            reason: "viewers cannot send".into(),
        };
        // A batch 1..=10 with 5 and 7 refused arrives as: refusal 5, refusal 7, ack 10.
        assert_eq!(covered_ack(&refused(5), 10), 4);
        assert_eq!(covered_ack(&refused(7), 10), 6);
        assert_eq!(covered_ack(&FromRelay::Ack, 10), 10);
    }

    #[test]
    fn journal_entries_encode_as_the_protocol_does() {
        let events = [
            Outbound::UserMessage {
                session: "s-0123456789abcdef".into(),
                text: "x".repeat(70_000),
                key: Some("k-1".into()),
            },
            Outbound::Interrupt {
                session: "s-1".into(),
                key: None,
            },
            Outbound::PermissionAnswer {
                session: "s-2".into(),
                request_id: "r-1".into(),
                decision: cloud_protocol::bridge::PermissionDecision::Deny {
                    message: "no".into(),
                },
                key: Some("k".repeat(128)),
            },
        ];
        let mut batch = EventBatch::default();
        let seqs = [1, 127, u64::MAX];
        for (seq, event) in seqs.iter().zip(&events) {
            batch.push(*seq, event);
        }
        assert!(batch.failed.is_none());
        assert_eq!(batch.messages.len(), 3);
        for ((seq, range), event) in batch.messages.iter().zip(&events) {
            let expected = bridge::encode(&Envelope {
                channel: Channel::Task,
                seq: *seq,
                ack: 0,
                body: ToRelay::Event(event.clone()),
            })
            .unwrap();
            assert_eq!(&batch.bytes[range.clone()], expected.as_slice());
        }
    }

    #[test]
    fn bridge_urls() {
        assert_eq!(
            bridge_url("https://relay.example").unwrap(),
            "wss://relay.example/v1/bridge"
        );
        assert_eq!(
            bridge_url("http://127.0.0.1:8080/").unwrap(),
            "ws://127.0.0.1:8080/v1/bridge"
        );
        assert_eq!(
            bridge_url("ws://[::1]:9").unwrap(),
            "ws://[::1]:9/v1/bridge"
        );
        assert!(bridge_url("http://relay.example")
            .unwrap_err()
            .contains("TLS"));
        assert!(bridge_url("ftp://x").is_err());
        assert!(bridge_url("relay.example").is_err());
    }
}
