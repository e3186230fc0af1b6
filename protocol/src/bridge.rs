//! The bridge: the one WebSocket between a daemon and its relay.
//!
//! Every WebSocket binary message is one postcard-encoded [`Envelope`]. Two channels share
//! the socket: [`Channel::Extension`] (this daemon instance: register, heartbeat, the
//! session replica, instance commands) and [`Channel::Task`] (per session: join/leave,
//! journaled events, session log entries).
//!
//! Sequence numbers:
//! - daemon → relay: `seq` is the daemon journal's sequence for a [`ToRelay::Event`]
//!   (0 for anything not journaled). The relay persists each event once, deduplicating by
//!   (instance id, seq), and acknowledges cumulatively in `ack` of its envelopes.
//! - relay → daemon: `ack` is the highest journal seq the relay has persisted; `seq` is 0
//!   (session log entries carry their own per-session sequence). On every (re)connect the
//!   daemon re-registers and rejoins each followed session *after* the last log sequence it
//!   stored, and resends its unacknowledged journal tail.
//!
//! Messages are limited to [`MAX_BRIDGE_MESSAGE`] bytes on both sides.

use serde::{Deserialize, Serialize};

use crate::session::{CreateSession, LogEntry, Session, SessionAction, Visibility};
use crate::settings::{SettingRecord, SettingRefusal, SettingWrite, SettingsSnapshot};
use crate::teleport::{TeleportReply, TeleportRequest};

/// The bridge protocol version, checked when the daemon registers. 2: journaled events
/// carry an idempotency key, and `RelayRequest::Get` exists. 4: `ToRelay::Authenticate`
/// (a connection opened with an expiring access token ends when it expires, unless the
/// daemon sends a fresh one first). 5: `FromRelay::SlowDown` (rate limits) and
/// `ToRelay::Telemetry` (opt-in anonymous aggregates); settings (`ToRelay::Settings`,
/// `FromRelay::Settings`, `FromRelay::SettingsReply`), and `CreateSession` carries
/// `allowed_domains` and `auto_stop_minutes`. 6: `ToRelay::Attached` (client presence),
/// and `Session` carries `auto_stop_minutes`, `clients`, `provider` and `allowed_domains`.
pub const BRIDGE_VERSION: u32 = 6;

/// The most sessions a [`ToRelay::Attached`] counts; the relay ignores the rest.
pub const MAX_ATTACHED: usize = 1024;

/// The largest bridge message either side accepts.
pub const MAX_BRIDGE_MESSAGE: usize = 16 * 1024 * 1024;

/// The path of the daemons' WebSocket endpoint on the relay.
pub const BRIDGE_PATH: &str = "/v1/bridge";

/// Which channel a message belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Channel {
    /// This daemon instance.
    Extension,
    /// Sessions.
    Task,
}

/// One bridge message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope<B> {
    /// The channel.
    pub channel: Channel,
    /// See the module docs.
    pub seq: u64,
    /// See the module docs.
    pub ack: u64,
    /// The message.
    pub body: B,
}

/// Decodes a bridge message, refusing oversized ones.
pub fn decode<B: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<Envelope<B>, BridgeError> {
    if bytes.len() > MAX_BRIDGE_MESSAGE {
        return Err(BridgeError::TooLarge { len: bytes.len() });
    }
    postcard::from_bytes(bytes).map_err(|e| BridgeError::Malformed(e.to_string()))
}

/// Encodes a bridge message.
pub fn encode<B: Serialize>(envelope: &Envelope<B>) -> Result<Vec<u8>, BridgeError> {
    let bytes =
        postcard::to_allocvec(envelope).map_err(|e| BridgeError::Malformed(e.to_string()))?;
    if bytes.len() > MAX_BRIDGE_MESSAGE {
        return Err(BridgeError::TooLarge { len: bytes.len() });
    }
    Ok(bytes)
}

/// A bridge message could not be decoded or encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BridgeError {
    /// Over [`MAX_BRIDGE_MESSAGE`].
    #[error("bridge message of {len} bytes exceeds the {MAX_BRIDGE_MESSAGE}-byte limit")]
    TooLarge {
        /// Its length.
        len: usize,
    },
    /// Not a valid envelope.
    #[error("malformed bridge message: {0}")]
    Malformed(String),
}

/// What a daemon sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ToRelay {
    /// Extension channel, first message of every connection: who this instance is.
    Register(InstanceSnapshot),
    /// Extension channel, every 20 s: still here.
    Heartbeat,
    /// Extension channel: the answer to a [`FromRelay::Command`].
    CommandResult {
        /// The command's id.
        id: u64,
        /// Its outcome.
        result: Result<String, String>,
    },
    /// Task channel: follow a session, receiving its log after `after`.
    Join {
        /// The session.
        session: String,
        /// The last log sequence already stored (0 for all).
        after: u64,
    },
    /// Task channel: stop following a session.
    Leave {
        /// The session.
        session: String,
    },
    /// Task channel, journaled (`seq` set): something the user did.
    Event(Outbound),
    /// Extension channel: a request answered by [`FromRelay::Reply`] (session
    /// management, which needs the relay to be reachable and is not journaled).
    Request {
        /// Chosen by the daemon, echoed in the reply.
        id: u64,
        /// What is asked.
        request: RelayRequest,
    },
    /// A teleport request (task channel), answered by [`FromRelay::TeleportReply`].
    Teleport {
        /// Chosen by the daemon, echoed in the reply.
        id: u64,
        /// What is asked.
        request: TeleportRequest,
    },
    /// Extension channel: a fresh access token for this connection, of the same user, org
    /// and login, sent before the one it was opened (or last renewed) with expires. Not
    /// answered; a token the relay does not accept ends the connection with
    /// `Refused{permanent: false}`.
    Authenticate {
        /// The new access token.
        token: BearerToken,
    },
    /// Extension channel, only when the user set `telemetry = true`: the daemon's
    /// anonymous aggregates since its previous report (counts only: no ids, paths, names
    /// or tokens). Not answered; the relay adds them to its `/metrics` totals.
    Telemetry(TelemetryReport),
    /// Extension channel: write a setting of this user or of their current org; answered
    /// by [`FromRelay::SettingsReply`].
    Settings {
        /// Chosen by the daemon, echoed in the reply.
        id: u64,
        /// The write.
        write: SettingWrite,
    },
    /// Extension channel: every session this daemon's local clients (editors, `cloudctl
    /// attach`) are attached to right now, the whole set (at most [`MAX_ATTACHED`]), sent
    /// after registering and after each change. The relay counts the daemon as a `daemon`
    /// client of each of them that the user may see, live while the connection answers
    /// its pings; not answered.
    Attached {
        /// The session ids.
        sessions: Vec<String>,
    },
}

/// What an opted-in daemon reports, at most every few minutes: counts since its previous
/// report, nothing else.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TelemetryReport {
    /// Events queued by clients.
    pub sends: u64,
    /// Events the relay acknowledged.
    pub deliveries: u64,
    /// Events the relay refused.
    pub refusals: u64,
    /// Events sent again (after a reconnect or a slow-down).
    pub retries: u64,
    /// Connections to the relay registered.
    pub reconnects: u64,
    /// Slow-downs the relay asked for.
    pub slow_downs: u64,
    /// Send→delivered latencies, counted per bucket of
    /// [`TELEMETRY_LATENCY_BUCKETS_MS`] (the last count is everything above its last bound).
    pub latency_buckets: Vec<u64>,
}

/// The upper bounds, in milliseconds, of the latency buckets of a [`TelemetryReport`] (and
/// of the daemon's own histogram).
pub const TELEMETRY_LATENCY_BUCKETS_MS: [u64; 12] =
    [1, 2, 5, 10, 25, 50, 100, 250, 500, 1_000, 5_000, 30_000];

/// A bearer token on the wire: its `Debug` never shows it, so no log line can.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct BearerToken(pub String);

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(<redacted>)")
    }
}

/// Who this daemon instance is, sent on every (re)connect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceSnapshot {
    /// Stable per state directory.
    pub instance_id: String,
    /// The machine's name.
    pub hostname: String,
    /// The daemon's version.
    pub daemon_version: String,
    /// [`BRIDGE_VERSION`] of the daemon.
    pub bridge_version: u32,
    /// Registered worktrees.
    pub worktrees: Vec<String>,
    /// Sessions this instance follows.
    pub sessions: Vec<String>,
}

/// The longest idempotency key, in bytes, that an [`Outbound`] event may carry.
pub const MAX_IDEMPOTENCY_KEY: usize = 128;

/// A journaled event: something a user did that must reach the relay exactly once.
///
/// Every variant ends with `key`, an optional idempotency key chosen by the client that
/// made the event (at most [`MAX_IDEMPOTENCY_KEY`] bytes, any UTF-8). The relay treats a
/// repeat of a key from the same daemon instance (for REST, the same user) as the same
/// event, whatever its journal seq: it is acknowledged, answered as the first one was,
/// and never applied twice. So a client that lost a reply can retry safely.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outbound {
    /// A user message for the session's agent.
    UserMessage {
        /// The session.
        session: String,
        /// The text.
        text: String,
        /// The client's idempotency key, if it chose one.
        key: Option<String>,
    },
    /// The answer to a permission prompt.
    PermissionAnswer {
        /// The session.
        session: String,
        /// The prompt's request id.
        request_id: String,
        /// The answer.
        decision: PermissionDecision,
        /// The client's idempotency key, if it chose one.
        key: Option<String>,
    },
    /// Stop what the agent is doing.
    Interrupt {
        /// The session.
        session: String,
        /// The client's idempotency key, if it chose one.
        key: Option<String>,
    },
}

impl Outbound {
    /// The session the event is for.
    pub fn session(&self) -> &str {
        match self {
            Outbound::UserMessage { session, .. }
            | Outbound::PermissionAnswer { session, .. }
            | Outbound::Interrupt { session, .. } => session,
        }
    }

    /// The event's idempotency key, if its client chose one.
    pub fn key(&self) -> Option<&str> {
        match self {
            Outbound::UserMessage { key, .. }
            | Outbound::PermissionAnswer { key, .. }
            | Outbound::Interrupt { key, .. } => key.as_deref(),
        }
    }
}

/// An answer to a permission prompt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PermissionDecision {
    /// Allowed, optionally with the tool input changed (JSON text).
    Allow {
        /// The replacement input, as JSON text.
        updated_input: Option<String>,
    },
    /// Denied, with a message for the agent.
    Deny {
        /// Why.
        message: String,
    },
}

/// Session management asked of the relay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RelayRequest {
    /// Create a session.
    Create(CreateSession),
    /// Change a session's status, or delete it.
    Action {
        /// The session.
        session: String,
        /// What to do.
        action: SessionAction,
    },
    /// Change who may see a session.
    Share {
        /// The session.
        session: String,
        /// The new visibility.
        visibility: Visibility,
    },
    /// The session as this user may see it (public ones included), or "no such session".
    Get {
        /// The session.
        session: String,
    },
}

/// What a relay sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum FromRelay {
    /// Task channel: nothing but the envelope's `ack` (sent when there is nothing else to
    /// carry it).
    Ack,
    /// Extension channel: the registration was accepted.
    Registered {
        /// The authenticated user.
        user: String,
        /// Their org.
        org: String,
        /// The relay's version.
        relay_version: String,
    },
    /// Extension channel: the connection is refused and about to close.
    Refused {
        /// Why, in words (never the token).
        reason: String,
        /// Whether retrying cannot help (bad or revoked token, bridge too old).
        permanent: bool,
    },
    /// Extension channel: every session visible to this user (sent after registering).
    Sessions(Vec<Session>),
    /// Extension channel: a visible session was created or changed.
    SessionChanged(Session),
    /// Extension channel: a session was deleted or is no longer visible.
    SessionRemoved {
        /// Its id.
        session: String,
    },
    /// Extension channel: an instance-level command; answered by
    /// [`ToRelay::CommandResult`]. Unknown commands are answered with an error.
    Command {
        /// Its id.
        id: u64,
        /// The command's name (`ping`, `refresh`, ...).
        name: String,
    },
    /// Task channel: an entry of a followed session's log.
    Log {
        /// The session.
        session: String,
        /// The entry.
        entry: LogEntry,
    },
    /// Task channel: a journaled event was persisted but refused (a second answer to a
    /// prompt, a viewer sending, a session that is gone). `ack` still covers it.
    EventRefused {
        /// The event's journal seq.
        seq: u64,
        /// Why.
        reason: String,
    },
    /// Task channel: joining a session failed (it does not exist or is not visible).
    JoinRefused {
        /// The session.
        session: String,
        /// Why.
        reason: String,
    },
    /// Extension channel: the answer to a [`ToRelay::Request`].
    Reply {
        /// The request's id.
        id: u64,
        /// The session after the request (none after a delete), or why it failed.
        result: Result<Option<Session>, String>,
    },
    /// The answer to a [`ToRelay::Teleport`].
    TeleportReply {
        /// The request's id.
        id: u64,
        /// The answer, or why it failed.
        result: Result<TeleportReply, String>,
    },
    /// Extension channel: over this login's rate limit. With `request` set, that
    /// [`ToRelay::Request`] was not carried out (ask again after the delay). Without it,
    /// journaled events were dropped, not persisted and not acknowledged, from the first
    /// one the envelope's `ack` does not cover: the daemon stops streaming its journal for
    /// `retry_after_ms`, then resends from its last acknowledged seq. The relay drops every
    /// later event until that resend reaches the first dropped one, so nothing is skipped.
    SlowDown {
        /// How long to wait, in milliseconds.
        retry_after_ms: u64,
        /// The request refused, if this is about a request rather than events.
        request: Option<u64>,
    },
    /// Extension channel: every setting of this user and of the org the connection acts
    /// in, sent after registering and whenever one of them changes. The daemon keeps it.
    Settings(SettingsSnapshot),
    /// Extension channel: the answer to a [`ToRelay::Settings`].
    SettingsReply {
        /// The request's id.
        id: u64,
        /// The record written, or why not (with the current record when it was stale).
        result: Result<SettingRecord, SettingRefusal>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversized_messages_are_refused() {
        let big = vec![0u8; MAX_BRIDGE_MESSAGE + 1];
        assert_eq!(
            decode::<ToRelay>(&big).unwrap_err(),
            BridgeError::TooLarge {
                len: MAX_BRIDGE_MESSAGE + 1
            }
        );
    }

    #[test]
    fn envelopes_round_trip() {
        let envelope = Envelope {
            channel: Channel::Task,
            seq: 42,
            ack: 0,
            body: ToRelay::Event(Outbound::UserMessage {
                session: "s-1".into(),
                text: "ls".into(),
                key: Some("k-1".into()),
            }),
        };
        let bytes = encode(&envelope).unwrap();
        assert_eq!(decode::<ToRelay>(&bytes).unwrap(), envelope);
    }
}
