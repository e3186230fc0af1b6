//! The local-socket messages shared by `cloudd` and its clients.
//!
//! Each direction has its own type: clients send [`Request`]s (wrapped in a
//! [`ClientMessage`] that carries the request id), the daemon answers with a
//! [`Response`] or an [`ErrorBody`] and may push [`Notification`]s at any time (wrapped in a
//! [`ServerMessage`]). The binary encoding is postcard, which identifies enum variants by
//! position: new variants are only ever appended, and a change to an existing struct bumps
//! [`PROTOCOL_VERSION`] (tests pin the bytes of the current version).

use serde::{Deserialize, Serialize};

use crate::bridge::PermissionDecision;
use crate::session::{LogEntry, NewSession, Session, SessionAction, Visibility};
use crate::settings::SettingView;

/// The version of the local-socket protocol this build speaks. Both sides send it in the
/// hello; a mismatch is refused with an error naming both versions. (Version 1 is
/// pre-release: see docs/PROTOCOL.md, "Compatibility policy", for its changes without a
/// bump.)
pub const PROTOCOL_VERSION: u32 = 1;

/// A request and the id the client chose for it; the reply echoes the id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientMessage {
    /// Chosen by the client, echoed in the reply so replies can be matched to requests.
    pub id: u64,
    /// What the client asks for.
    pub request: Request,
}

/// Everything the daemon writes to a binary connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ServerMessage {
    /// The answer to the request with the same id.
    Reply {
        /// The id of the request this answers.
        id: u64,
        /// The response, or why the request failed.
        result: Result<Response, ErrorBody>,
    },
    /// Something the client subscribed to happened, or the daemon is closing the connection.
    Notify(Notification),
}

/// Declares the requests once: each one's method name (for JSON-RPC and the logs), its
/// [`Request`] variant and its params. The enum, the [`method`] name constants,
/// [`Request::method`] and the JSON-RPC params decoder ([`Request::from_json_params`]) all
/// follow from this one declaration, so the encodings cannot disagree on a method.
///
/// A variant is a unit (no params), a newtype (its params are that type, `null` read as
/// `{}`), or a struct (its fields are the params). A field written `name: Type as Json` is
/// read from JSON as `Json` and converted with `Into` (for shapes JSON clients write
/// differently, such as a permission decision's input as an object).
macro_rules! requests {
    (
        $(
            $(#[$doc:meta])*
            $constant:ident = $name:literal => $variant:ident
                $( ( $inner:ty ) )?
                $( { $( $(#[$field_attr:meta])* $field:ident : $field_ty:ty $( as $json_ty:ty )? ),* $(,)? } )?
            ;
        )*
    ) => {
        /// A client's request. Each variant's answer is the [`Response`] variant of the same
        /// name. Declared with its method name and params in one place (`requests!`).
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        pub enum Request {
            $(
                $(#[$doc])*
                $variant $( ($inner) )? $( { $( $(#[$field_attr])* $field: $field_ty ),* } )?,
            )*
        }

        /// The method names of the requests, shared by the JSON-RPC encoding and the logs.
        pub mod method {
            $(
                #[doc = concat!("[`super::Request::", stringify!($variant), "`]")]
                pub const $constant: &str = $name;
            )*
            /// Every method name, in declaration order.
            pub const ALL: &[&str] = &[$($name),*];
        }

        impl Request {
            /// The method name of this request (as in JSON-RPC), for logs and error messages.
            pub fn method(&self) -> &'static str {
                match self {
                    $( Request::$variant { .. } => method::$constant, )*
                }
            }

            /// The request `method_name` names, its params read from `params`; `Ok(None)`
            /// when no method has that name. Every JSON-RPC decoding path builds requests
            /// here.
            pub(crate) fn from_json_params(
                method_name: &str,
                params: impl crate::jsonrpc::ParamsSource,
            ) -> serde_json::Result<Option<Request>> {
                $(
                    if method_name == $name {
                        return requests!(@build params, $variant $( ($inner) )? $( { $( $(#[$field_attr])* $field : $field_ty $( as $json_ty )? ),* } )?).map(Some);
                    }
                )*
                let _ = params;
                Ok(None)
            }
        }
    };
    (@build $params:ident, $variant:ident) => {
        Ok::<Request, serde_json::Error>(Request::$variant)
    };
    (@build $params:ident, $variant:ident ($inner:ty)) => {
        $params.read_or_empty::<$inner>().map(Request::$variant)
    };
    (@build $params:ident, $variant:ident { $( $(#[$field_attr:meta])* $field:ident : $field_ty:ty $( as $json_ty:ty )? ),* }) => {{
        #[derive(Deserialize)]
        struct Params {
            $( $(#[$field_attr])* $field: requests!(@json_ty $field_ty $(, $json_ty)?), )*
        }
        $params
            .read::<Params>()
            .map(|p| Request::$variant { $( $field: p.$field.into() ),* })
    }};
    (@json_ty $field_ty:ty) => { $field_ty };
    (@json_ty $field_ty:ty, $json_ty:ty) => { $json_ty };
}

requests! {
    /// Must be the first request on a connection: exchanges protocol versions.
    /// Answered by [`Response::Hello`], or by [`ErrorCode::VersionMismatch`] and a close.
    HELLO = "hello" => Hello(Hello);
    /// Liveness check. Answered by [`Response::Pong`].
    PING = "ping" => Ping;
    /// The daemon's state. Answered by [`Response::Status`].
    STATUS = "status" => Status;
    /// Asks the daemon to drain and exit. Answered by [`Response::ShuttingDown`] before the
    /// drain starts.
    SHUTDOWN = "shutdown" => Shutdown;
    /// Starts pushing notifications of the given topics on this connection. Answered by
    /// [`Response::Subscribed`]; subscribing again replaces the topic set.
    SUBSCRIBE = "subscribe" => Subscribe(Subscribe);
    /// Points the daemon at a remote relay (the token is stored 0600, never logged).
    /// Answered by [`Response::Identity`] once the relay accepted it, or an error.
    LOGIN = "login" => Login {
        /// `https://host[:port]` (or `wss://`; `http`/`ws` only for loopback).
        relay: String,
        /// The bearer token.
        token: String,
    };
    /// Forgets the remote relay and returns to the embedded one. Answered by
    /// [`Response::Identity`].
    LOGOUT = "logout" => Logout;
    /// Who the daemon talks to the relay as. Answered by [`Response::Identity`].
    WHOAMI = "whoami" => Whoami;
    /// Creates a session (needs the relay) in the current org; fields left out take the
    /// effective settings. Answered by [`Response::Session`].
    SESSION_CREATE = "session/create" => SessionCreate(NewSession);
    /// The sessions visible to this user, from the local replica (works offline, marked
    /// stale). Answered by [`Response::Sessions`].
    SESSION_LIST = "session/list" => SessionList;
    /// One session from the replica. Answered by [`Response::Session`].
    SESSION_SHOW = "session/show" => SessionShow {
        /// The session.
        session: String,
    };
    /// Pauses, resumes, completes or deletes a session (needs the relay). Answered by
    /// [`Response::Session`] (or [`Response::SessionDeleted`]).
    SESSION_ACTION = "session/action" => SessionAction {
        /// The session.
        session: String,
        /// What to do.
        action: SessionAction,
    };
    /// Changes a session's visibility (needs the relay). Answered by [`Response::Session`].
    SESSION_SHARE = "session/share" => SessionShare {
        /// The session.
        session: String,
        /// Who may see it.
        visibility: Visibility,
    };
    /// Sends a user message: journaled, then delivered (also while the relay is
    /// unreachable). Answered by [`Response::Queued`] once it is on disk, or, with `wait`
    /// and the relay connected, by [`Response::Delivered`] once the relay took it (or the
    /// refusal's error).
    SEND = "send" => Send {
        /// The session.
        session: String,
        /// The message.
        text: String,
        /// A client-chosen idempotency key (at most [`MAX_IDEMPOTENCY_KEY`] bytes): a
        /// repeat of a key is the same event, answered as the first was.
        #[serde(default)]
        key: Option<String>,
        /// Wait for the relay's verdict (bounded) before answering.
        #[serde(default)]
        wait: bool,
    };
    /// Waits (up to a deadline) until the relay has acknowledged or refused a queued
    /// event. Answered by [`Response::Delivered`], or an error with the refusal's reason.
    DELIVERY = "delivery" => Delivery {
        /// The journal seq from [`Response::Queued`].
        seq: u64,
    };
    /// Follows a session on this connection: pushes [`Notification::SessionLog`] for every
    /// entry after `since` (the stored ones first, then live). Answered by
    /// [`Response::Attached`].
    ATTACH = "attach" => Attach {
        /// The session.
        session: String,
        /// Replay entries after this sequence (none: only the latest).
        #[serde(default)]
        since: Option<u64>,
    };
    /// Stops following a session on this connection. Answered by [`Response::Pong`].
    DETACH = "detach" => Detach {
        /// The session.
        session: String,
    };
    /// Interrupts the session's agent (journaled). Answered like [`Request::Send`].
    INTERRUPT = "interrupt" => Interrupt {
        /// The session.
        session: String,
        /// A client-chosen idempotency key, as for [`Request::Send`].
        #[serde(default)]
        key: Option<String>,
        /// Wait for the relay's verdict (bounded) before answering.
        #[serde(default)]
        wait: bool,
    };
    /// The session's pending permission prompts. Answered by [`Response::Prompts`].
    PERMISSIONS = "permissions" => Permissions {
        /// The session.
        session: String,
    };
    /// Answers a permission prompt (journaled; when the relay is reachable the reply waits
    /// for it, so a second answer gets "already answered"). Answered by
    /// [`Response::Queued`] or [`Response::Delivered`].
    ANSWER = "answer" => Answer {
        /// The session.
        session: String,
        /// The prompt's request id.
        request_id: String,
        /// Allow or deny. JSON clients write `{"behavior": "allow", "updated_input": {..}}`
        /// or `{"behavior": "deny", "message": ".."}`.
        decision: PermissionDecision as crate::jsonrpc::JsonDecision,
        /// A client-chosen idempotency key, as for [`Request::Send`].
        #[serde(default)]
        key: Option<String>,
    };
    /// Stops following a session on this daemon: forgets its stored log and leaves it on
    /// the relay (an `attach` or `send` follows it again). Answered by [`Response::Pong`].
    UNFOLLOW = "session/unfollow" => Unfollow {
        /// The session.
        session: String,
    };
    /// Links the worktree at `path` to `session` (if it is not yet) and pushes its state
    /// as it is now: a new snapshot version. [`Notification::TeleportProgress`] follows on
    /// this connection meanwhile. Answered by [`Response::Teleported`].
    TELEPORT_PUSH = "teleport/push" => TeleportPush {
        /// The worktree's root, absolute.
        path: String,
        /// The session.
        session: String,
    };
    /// Brings the session's newest version into the worktree at `path` (three-way: local
    /// changes are never overwritten; a change on both sides keeps both). Progress as for
    /// a push. Answered by [`Response::Teleported`].
    TELEPORT_PULL = "teleport/pull" => TeleportPull {
        /// The worktree's root, absolute (created if absent).
        path: String,
        /// The session (none: the one `path` is linked to).
        #[serde(default)]
        session: Option<String>,
    };
    /// Keeps the worktree at `path` and `session` in step, both ways, until stopped: the
    /// daemon's watch, which outlives this connection and daemon restarts. Pushes first.
    /// Answered by [`Response::TeleportLinks`] with the link.
    TELEPORT_WATCH = "teleport/watch" => TeleportWatch {
        /// The worktree's root, absolute.
        path: String,
        /// The session.
        session: String,
    };
    /// Stops watching the worktree at `path` (its link stays, for later pushes and pulls).
    /// Answered by [`Response::TeleportLinks`] with the link.
    TELEPORT_STOP = "teleport/stop" => TeleportStop {
        /// The worktree's root, absolute.
        path: String,
    };
    /// Every linked worktree: its session, versions, pending changes, conflicts and
    /// watcher health. Answered by [`Response::TeleportLinks`].
    TELEPORT_STATUS = "teleport/status" => TeleportStatus;
    /// The daemon's own health figures since it started (they never leave the machine
    /// unless `telemetry = true`). Answered by [`Response::Metrics`].
    METRICS = "metrics" => Metrics;
    /// The user's orgs, the current one marked (known from the relay's last token answer,
    /// so it works offline). Answered by [`Response::Orgs`].
    ORG_LIST = "org/list" => OrgList;
    /// Makes `org` the current org: remembered, and the bridge reconnects in its scope.
    /// Answered by [`Response::Orgs`] once connected in it, or an error (not a member).
    ORG_SWITCH = "org/switch" => OrgSwitch {
        /// The org.
        org: String,
    };
    /// The settings in effect and where each comes from (from the daemon's copy, so it
    /// works offline); with `org`, the current org's records. Answered by
    /// [`Response::Settings`].
    SETTINGS_GET = "settings/get" => SettingsGet {
        /// One key (none: every key).
        #[serde(default)]
        key: Option<String>,
        /// The org's records instead of the values in effect.
        #[serde(default)]
        org: bool,
    };
    /// Writes a user setting, or (org admins) an org setting, on the relay; a write of a
    /// stale version is refused with the current value (`conflict`). Answered by
    /// [`Response::Settings`] with the new record.
    SETTINGS_SET = "settings/set" => SettingsSet {
        /// The key.
        key: String,
        /// The value.
        value: String,
        /// The current org's setting instead of the user's.
        #[serde(default)]
        org: bool,
        /// Lock the org setting: nothing below overrides it.
        #[serde(default)]
        lock: bool,
        /// The version the write replaces (none: the version of the daemon's copy).
        #[serde(default)]
        version: Option<u64>,
    };
    /// Starts a device login at `relay` (no token needed): the daemon asks the relay for
    /// a user code and keeps the device code to itself, for this connection. Answered by
    /// [`Response::DeviceLogin`] (state `pending`); then poll with
    /// [`Request::LoginDevicePoll`] every `interval_ms`.
    LOGIN_DEVICE = "login/device" => LoginDevice {
        /// `https://host[:port]` (or `wss://`; `http`/`ws` only for loopback).
        relay: String,
    };
    /// Asks the relay once whether this connection's device login was approved. Answered
    /// by [`Response::DeviceLogin`] while it waits (`pending`, or `slow_down`: add 5 s to
    /// the interval), by [`Response::Identity`] once approved (the daemon is logged in and
    /// connected), or by a `refused` error (denied, expired).
    LOGIN_DEVICE_POLL = "login/device/poll" => LoginDevicePoll;
    /// Lets the machine showing `code` log in as this daemon's user (its own login, for
    /// the same user, org and scopes). Answered by [`Response::DeviceDecided`].
    DEVICE_APPROVE = "device/approve" => DeviceApprove {
        /// The code the new machine shows, like `BCDF-GHJK` (case and dash optional).
        code: String,
    };
    /// Refuses the machine showing `code`. Answered by [`Response::DeviceDecided`].
    DEVICE_DENY = "device/deny" => DeviceDeny {
        /// The code the new machine shows.
        code: String,
    };
    /// This user's logins on the relay, one per machine. Answered by
    /// [`Response::Devices`].
    DEVICE_LIST = "device/list" => DeviceList;
    /// Revokes one of this user's logins: that machine's next refresh or connect fails
    /// and it must log in again. Answered by [`Response::Devices`] with the revoked login.
    DEVICE_REVOKE = "device/revoke" => DeviceRevoke {
        /// Its id (or a prefix only it has), from [`Request::DeviceList`].
        id: String,
    };
    /// Where this daemon keeps its login. Answered by [`Response::CredentialStore`].
    CREDENTIALS = "credentials" => Credentials;
    /// Opens an interactive shell in the session's workspace on the relay, in a terminal
    /// of `cols`×`rows` (refused for viewers and for users who may not change the
    /// session). Answered by [`Response::ShellOpened`]; from then on the connection
    /// carries only terminal frames ([`crate::terminal`]: `ToShell` from the client,
    /// `FromShell` from the daemon, each a u32 little-endian length and a postcard body),
    /// until the shell's `Exit`. Send nothing after the request until its reply.
    SESSION_SHELL = "session/shell" => SessionShell {
        /// The session.
        session: String,
        /// The terminal's columns (0: 80).
        cols: u16,
        /// The terminal's rows (0: 24).
        rows: u16,
        /// The shell's `TERM` (none: `xterm-256color`).
        #[serde(default)]
        term: Option<String>,
    };
}

pub use crate::bridge::MAX_IDEMPOTENCY_KEY;

/// The client's half of the version exchange.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The protocol version the client speaks ([`PROTOCOL_VERSION`] of its build).
    pub protocol: u32,
    /// The client's name, for logs (`cloudctl`, an editor extension, ...).
    pub client: String,
    /// The client's own version, for logs.
    pub client_version: String,
}

impl Hello {
    /// The hello of a client built from this crate.
    pub fn new(client: impl Into<String>, client_version: impl Into<String>) -> Hello {
        Hello {
            protocol: PROTOCOL_VERSION,
            client: client.into(),
            client_version: client_version.into(),
        }
    }
}

/// The topics a client wants pushed to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscribe {
    /// Every topic to receive; an empty list unsubscribes.
    pub topics: Vec<Topic>,
}

/// A family of notifications.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Topic {
    /// Daemon lifecycle: ready, draining, configuration reloaded.
    State,
    /// The daemon's log records, as they are written (like `tail -f` on its log).
    Log,
    /// Changes to the session replica, the relay connection, refused events.
    Sessions,
    /// The daemon's teleport watches: progress, versions pushed and pulled, conflicts.
    Teleport,
}

/// A successful answer. Each variant answers the [`Request`] variant of the same name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// The daemon's half of the version exchange.
    Hello(HelloReply),
    /// The daemon is alive.
    Pong,
    /// The daemon's state.
    Status(Status),
    /// The daemon accepted the shutdown request and is draining.
    ShuttingDown,
    /// The topics this connection now receives.
    Subscribed(Subscribe),
    /// Who the daemon talks to the relay as.
    Identity(Identity),
    /// Sessions from the replica.
    Sessions {
        /// The sessions, most recently active first.
        sessions: Vec<Session>,
        /// Whether the replica may be out of date (the relay is unreachable).
        stale: bool,
    },
    /// One session.
    Session {
        /// The session.
        session: Session,
        /// Whether it may be out of date.
        stale: bool,
    },
    /// The session was deleted.
    SessionDeleted,
    /// The event is on disk and will reach the relay.
    Queued {
        /// Its journal seq.
        seq: u64,
    },
    /// The relay has acknowledged the event.
    Delivered {
        /// Its journal seq.
        seq: u64,
    },
    /// The connection follows the session; notifications follow.
    Attached {
        /// The session.
        session: String,
        /// The last log sequence the daemon has stored for it.
        last_seq: u64,
    },
    /// Pending permission prompts.
    Prompts(Vec<Prompt>),
    /// A push or pull is done.
    Teleported(TeleportOutcome),
    /// Linked worktrees.
    TeleportLinks(Vec<TeleportLink>),
    /// The daemon's health figures.
    Metrics(Metrics),
    /// The user's orgs.
    Orgs(Orgs),
    /// Settings.
    Settings(Vec<SettingView>),
    /// A device login waiting for approval.
    DeviceLogin(DeviceLogin),
    /// A device login was approved or denied.
    DeviceDecided(DeviceDecision),
    /// The user's logins.
    Devices(Vec<Device>),
    /// Where the daemon keeps its login.
    CredentialStore(CredentialStore),
    /// The shell is open: terminal frames follow, both ways.
    ShellOpened {
        /// The session.
        session: String,
    },
}

/// The daemon's health figures since it started, as `cloudctl metrics` shows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metrics {
    /// Milliseconds since the daemon started.
    pub uptime_ms: u64,
    /// Journaled events queued by clients (sends, interrupts, permission answers).
    pub sends: u64,
    /// Journaled events the relay acknowledged (refused ones not included).
    pub deliveries: u64,
    /// Journaled events refused (by the relay, or by the daemon for another relay).
    pub refusals: u64,
    /// Journaled events sent to the relay again (after a reconnect or a slow-down).
    pub retries: u64,
    /// Connections to the relay registered (the first one included).
    pub reconnects: u64,
    /// Slow-downs the relay asked for (rate limits).
    pub slow_downs: u64,
    /// Journaled events not yet acknowledged.
    pub journal_depth: u64,
    /// Clients connected right now, this one included.
    pub clients: u32,
    /// Send→delivered latency of the events queued since the daemon started.
    pub latency: Histogram,
    /// While the relay asks this daemon to slow down: until when, in milliseconds since
    /// the Unix epoch.
    pub rate_limited_until_ms: Option<u64>,
    /// Whether anonymous aggregates are sent to the relay (`telemetry = true`).
    pub telemetry: bool,
}

/// A histogram with fixed buckets.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Histogram {
    /// Each bucket's upper bound, in milliseconds.
    pub bounds_ms: Vec<u64>,
    /// How many values fell in each bucket (at or below its bound, above the previous
    /// one); one more count than bounds: the values above the last bound.
    pub counts: Vec<u64>,
    /// How many values in all.
    pub count: u64,
    /// Their sum, in milliseconds.
    pub sum_ms: u64,
    /// The median's bucket bound (none without values; the largest value seen when it
    /// falls above the last bound).
    pub p50_ms: Option<u64>,
    /// The 99th percentile's bucket bound, likewise.
    pub p99_ms: Option<u64>,
}

/// The user's orgs, as `org list` shows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Orgs {
    /// The org sessions are created in and listed from.
    pub current: Option<String>,
    /// Every org the user belongs to, as the relay last said.
    pub orgs: Vec<String>,
}

/// A device login waiting for approval on another machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceLogin {
    /// The code to approve, like `BCDF-GHJK` (`cloudctl device approve CODE`).
    pub user_code: String,
    /// Whether to poll at the interval or slow down.
    pub state: DeviceLoginState,
    /// How long to wait before the next poll, in milliseconds.
    pub interval_ms: u64,
    /// How long the code lived when it was made, in milliseconds.
    pub expires_in_ms: u64,
}

/// Where a device login is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceLoginState {
    /// Not decided yet: poll again after the interval.
    Pending,
    /// Polled too soon: add 5 seconds to the interval.
    SlowDown,
}

/// A decision on a device login.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceDecision {
    /// The code, as typed.
    pub code: String,
    /// The name the new machine gave (its hostname).
    pub name: String,
    /// Approved (or denied).
    pub approved: bool,
}

/// One of the user's logins on the relay: a machine's refresh-token family.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    /// Its id (what `device/revoke` takes).
    pub id: String,
    /// The machine's name (its hostname when it logged in).
    pub name: String,
    /// The org it acts in.
    pub org: String,
    /// When it logged in, milliseconds since the Unix epoch.
    pub created_at_ms: u64,
    /// When it last refreshed its access token.
    pub last_used_at_ms: u64,
    /// Whether it is this daemon's login.
    pub current: bool,
}

/// Where the daemon keeps its login.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CredentialStore {
    /// `keychain`, `file`, or `none` (not logged in: the embedded relay).
    pub store: String,
    /// Which keychain entry or which file.
    pub location: String,
}

/// What a push or a pull did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TeleportOutcome {
    /// The worktree's root.
    pub root: String,
    /// The session.
    pub session: String,
    /// The version both sides now agree on.
    pub version: u64,
    /// Files that changed (sent by a push, written by a pull).
    pub files: u64,
    /// Blobs uploaded or downloaded, and their bytes.
    pub blobs: u64,
    pub bytes: u64,
    /// Paths changed on both sides: the local file stayed, the remote version is beside
    /// it (see [`crate::teleport::RelPath::conflict_name`]).
    pub conflicts: Vec<String>,
    /// Paths that could not be read or written, each with why; the rest went on.
    pub problems: Vec<String>,
}

/// A linked worktree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TeleportLink {
    /// The worktree's root.
    pub root: String,
    /// The session.
    pub session: String,
    /// The last version both sides agreed on (0: none yet).
    pub version: u64,
    /// The session's newest version the daemon knows of.
    pub remote_version: u64,
    /// Whether the daemon keeps it in step.
    pub watching: bool,
    /// Local changes not yet pushed (known from the watcher; 0 when not watching).
    pub pending: u64,
    /// Conflict copies still in the worktree.
    pub conflicts: Vec<String>,
    /// The watcher's health: `ok`, or what is wrong and what to do.
    pub watcher: String,
    /// The latest failure, if the latest attempt failed.
    pub last_error: Option<String>,
}

/// Progress of a push or pull, pushed to the connection that asked for it (and to
/// [`Topic::Teleport`] subscribers for the daemon's watches).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TeleportProgress {
    /// The worktree's root.
    pub root: String,
    /// The session.
    pub session: String,
    /// `scan`, `upload`, `commit`, `download`, `apply`, or `done`.
    pub phase: String,
    /// Items (files or blobs) done and in all.
    pub done: u64,
    pub total: u64,
    /// Bytes done and in all.
    pub bytes_done: u64,
    pub bytes_total: u64,
}

/// Who the daemon talks to the relay as.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The relay.
    pub relay: RelayStatus,
}

/// A pending permission prompt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prompt {
    /// Its request id (what `allow`/`deny` take).
    pub request_id: String,
    /// The tool the agent wants to use.
    pub tool_name: String,
    /// The tool's input, as JSON text.
    pub input: String,
    /// The log sequence of the prompt.
    pub seq: u64,
}

/// The relay connection, as `status` and `whoami` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayStatus {
    /// Embedded in the daemon, or remote.
    pub mode: RelayMode,
    /// Its URL.
    pub url: String,
    /// The bridge's state.
    pub state: BridgeState,
    /// Why it is retrying or refused.
    pub reason: Option<String>,
    /// The user the token belongs to, once registered.
    pub user: Option<String>,
    /// Their org.
    pub org: Option<String>,
    /// Journaled events not yet acknowledged by the relay.
    pub journal_depth: u64,
    /// This daemon instance's id.
    pub instance_id: String,
    /// How many journaled events were refused (by the relay, or by the daemon because they
    /// were queued for another relay or identity), since the state directory was made.
    pub refused_events: u64,
    /// The latest refusal's reason.
    pub last_refusal: Option<String>,
}

impl RelayStatus {
    /// How messages name the relay: `the relay at URL`, or `the embedded relay (starting)`
    /// while the embedded relay has no address yet (it gets an ephemeral port when it
    /// starts, after the daemon does).
    pub fn describe(&self) -> String {
        match (self.mode, self.url.is_empty()) {
            (RelayMode::Embedded, true) => "the embedded relay (starting)".into(),
            (RelayMode::Embedded, false) => format!("the embedded relay at {}", self.url),
            (RelayMode::Remote, _) => format!("the relay at {}", self.url),
        }
    }
}

/// Where the relay runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RelayMode {
    /// In the daemon, on loopback (no relay configured).
    Embedded,
    /// Elsewhere (`cloudctl login`).
    Remote,
}

/// The bridge's connection state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BridgeState {
    /// Connecting for the first time.
    Connecting,
    /// Connected and registered.
    Connected,
    /// Waiting to reconnect after a failure.
    Retrying,
    /// Refused for good (bad or revoked token, protocol too old): not retrying.
    Refused,
}

/// The daemon's half of the version exchange.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloReply {
    /// The protocol version the daemon speaks.
    pub protocol: u32,
    /// The daemon's build version (`cloudd --version`).
    pub daemon_version: String,
    /// The daemon's process id.
    pub pid: u32,
    /// What started the daemon and restarts it.
    pub supervisor: Supervisor,
    /// Whether the daemon's executable changed on disk since it started (an upgrade was
    /// installed): clients restart such a daemon.
    pub binary_replaced: bool,
}

/// What started the daemon and will restart it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Supervisor {
    /// Started by hand or by `cloudctl` (detached): restart it directly.
    None,
    /// A systemd user service: restart it with `systemctl --user restart cloudd.service`.
    Systemd,
    /// A launchd agent: restart it with `launchctl kickstart -k`.
    Launchd,
}

/// What `cloudctl status` shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// The daemon's process id.
    pub pid: u32,
    /// The daemon's build version.
    pub version: String,
    /// The protocol version the daemon speaks.
    pub protocol: u32,
    /// Where the daemon is in its lifecycle.
    pub state: DaemonState,
    /// What started the daemon and restarts it.
    pub supervisor: Supervisor,
    /// Milliseconds since the daemon started.
    pub uptime_ms: u64,
    /// The socket clients connect to.
    pub socket: String,
    /// The directory holding the daemon's durable state and its log.
    pub state_dir: String,
    /// The configuration file (it need not exist).
    pub config_file: String,
    /// How many times the configuration has been loaded (1 at start, +1 per reload).
    pub config_generation: u64,
    /// The log filter in effect.
    pub log_filter: String,
    /// The log file, when the daemon runs detached.
    pub log_file: Option<String>,
    /// Clients connected right now, this one included.
    pub clients: u32,
    /// The relay connection.
    pub relay: RelayStatus,
}

/// The daemon's lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DaemonState {
    /// Serving requests.
    Ready,
    /// Finishing in-flight requests before exiting; new connections are refused.
    Draining,
}

/// Something pushed by the daemon without a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Notification {
    /// The daemon's lifecycle changed ([`Topic::State`]).
    State(StateChange),
    /// A log record ([`Topic::Log`]).
    Log(LogRecord),
    /// The daemon is closing this connection, and says why. Sent to every connection,
    /// subscribed or not, whenever the daemon can still write to it.
    Closing(Closing),
    /// An entry of an attached session's log.
    SessionLog {
        /// The session.
        session: String,
        /// The entry.
        entry: LogEntry,
    },
    /// A session in the replica was created or changed ([`Topic::Sessions`]).
    SessionChanged(Session),
    /// A session left the replica ([`Topic::Sessions`]).
    SessionRemoved {
        /// Its id.
        session: String,
    },
    /// The relay connection changed ([`Topic::Sessions`]).
    Relay(RelayStatus),
    /// A journaled event was refused by the relay ([`Topic::Sessions`]).
    EventRefused {
        /// Its journal seq.
        seq: u64,
        /// Its session.
        session: String,
        /// Why.
        reason: String,
    },
    /// Progress of a push or pull (to the connection that asked, and [`Topic::Teleport`]).
    TeleportProgress(TeleportProgress),
    /// A watched link pushed or pulled a version ([`Topic::Teleport`]).
    Teleported(TeleportOutcome),
}

/// Declares each notification's JSON-RPC method name once, beside its [`Notification`]
/// variant: the [`notification`] name constants, [`notification::ALL`] and
/// [`Notification::method`] (an exhaustive match, so a new variant does not compile until
/// it is given a name here) follow from it.
macro_rules! notification_methods {
    ($( $constant:ident = $name:literal => $variant:ident; )*) => {
        /// The notification method names of the JSON-RPC encoding.
        pub mod notification {
            $(
                #[doc = concat!("[`super::Notification::", stringify!($variant), "`]")]
                pub const $constant: &str = $name;
            )*
            /// Every notification method name, in declaration order.
            pub const ALL: &[&str] = &[$($name),*];
        }

        impl Notification {
            /// The JSON-RPC method name of this notification.
            pub fn method(&self) -> &'static str {
                match self {
                    $( Notification::$variant { .. } => notification::$constant, )*
                }
            }
        }
    };
}

notification_methods! {
    STATE = "state" => State;
    LOG = "log" => Log;
    CLOSING = "closing" => Closing;
    SESSION_LOG = "session/log" => SessionLog;
    SESSION_CHANGED = "session/changed" => SessionChanged;
    SESSION_REMOVED = "session/removed" => SessionRemoved;
    RELAY = "relay" => Relay;
    EVENT_REFUSED = "event/refused" => EventRefused;
    TELEPORT_PROGRESS = "teleport/progress" => TeleportProgress;
    TELEPORTED = "teleport/done" => Teleported;
}

/// A lifecycle change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateChange {
    /// The state after the change.
    pub state: DaemonState,
    /// The configuration generation after the change.
    pub config_generation: u64,
    /// What happened, in words (`"configuration reloaded"`, `"SIGTERM received"`, ...).
    pub message: String,
}

/// One log record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRecord {
    /// Milliseconds since the Unix epoch.
    pub unix_ms: u64,
    /// `ERROR`, `WARN`, `INFO`, `DEBUG` or `TRACE`.
    pub level: String,
    /// The module that logged it.
    pub target: String,
    /// The message and its fields.
    pub message: String,
}

/// Why the daemon closes a connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Closing {
    /// A short machine-readable reason.
    pub code: ErrorCode,
    /// The reason in words.
    pub message: String,
}

/// A failed request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The kind of failure.
    pub code: ErrorCode,
    /// What went wrong and what the user can do, in words. Never contains a secret.
    pub message: String,
}

impl ErrorBody {
    /// An error of `code` with `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ErrorBody {
        ErrorBody {
            code,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for ErrorBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Declares each kind of failure once with its JSON-RPC error code: the [`ErrorCode`]
/// enum (variants in this order, which is their binary index), [`ErrorCode::jsonrpc_code`]
/// and [`ErrorCode::ALL`] follow from it.
macro_rules! error_codes {
    ($( $(#[$doc:meta])* $variant:ident = $code:literal, )*) => {
        /// The kinds of failure, with their JSON-RPC error codes.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum ErrorCode {
            $( $(#[$doc])* $variant, )*
        }

        impl ErrorCode {
            /// Every kind, in declaration (binary index) order.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant),*];

            /// The JSON-RPC 2.0 error code.
            pub fn jsonrpc_code(self) -> i64 {
                match self {
                    $( ErrorCode::$variant => $code, )*
                }
            }
        }
    };
}

error_codes! {
    /// The bytes were not a valid message (JSON-RPC -32700).
    ParseError = -32700,
    /// The message was valid JSON but not a valid request (-32600).
    InvalidRequest = -32600,
    /// No such method (-32601).
    MethodNotFound = -32601,
    /// The method exists but its parameters are wrong (-32602).
    InvalidParams = -32602,
    /// The daemon failed to carry out a valid request (-32603).
    Internal = -32603,
    /// The peer speaks another protocol version (-32000).
    VersionMismatch = -32000,
    /// A request other than hello arrived before the hello (-32001).
    HelloRequired = -32001,
    /// A message exceeded [`crate::MAX_MESSAGE_LEN`] (-32002).
    MessageTooLarge = -32002,
    /// The daemon is draining (-32003).
    ShuttingDown = -32003,
    /// The peer is not allowed to talk to this daemon (-32004).
    PermissionDenied = -32004,
    /// The client did not keep up with its notifications (-32005).
    SlowConsumer = -32005,
    /// The daemon serves as many clients as it allows (-32006).
    Busy = -32006,
    /// The relay is unreachable and the request needs it (-32007).
    RelayUnavailable = -32007,
    /// The relay refused the request (-32008).
    Refused = -32008,
    /// No such session, or not visible (-32009).
    NotFound = -32009,
    /// The prompt was already answered or withdrawn (-32010).
    AlreadyAnswered = -32010,
    /// A wait ran out (-32011).
    Timeout = -32011,
    /// The relay asks this client to slow down: retry after the delay `metrics` shows in
    /// `rate_limited_until_ms` (-32012).
    RateLimited = -32012,
    /// A write named a version that is no longer the current one (-32013).
    Conflict = -32013,
}

/// The error a daemon returns to a hello of another protocol version. Both sides use it so
/// the message is the same wherever it is shown.
pub fn version_mismatch(client_protocol: u32, daemon_protocol: u32) -> ErrorBody {
    let fix = if client_protocol < daemon_protocol {
        "upgrade the client to the daemon's version"
    } else {
        "restart the daemon with the new version: `cloudctl down && cloudctl up` (any cloudctl command also restarts it)"
    };
    ErrorBody::new(
        ErrorCode::VersionMismatch,
        format!(
            "protocol version mismatch: client speaks {client_protocol}, daemon speaks {daemon_protocol}; {fix}"
        ),
    )
}
