//! What the daemon knows about one connected client, and the deadline every write to a
//! client has. Shared by the connection (which owns it) and the request handlers (which
//! change it); it holds state only and does no IO.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use cloud_protocol::ipc::{Closing, ErrorBody, Notification, Response, TeleportProgress};
use cloud_protocol::session::LogEntry;
use tokio::sync::{broadcast, mpsc, oneshot};

/// Requests a client may have waiting for a later answer at once.
pub const MAX_DEFERRED: usize = 4;

/// A request answered later: its answer, and its progress meanwhile.
#[derive(Debug)]
pub struct Deferred {
    /// The answer, once the work is done.
    pub answer: oneshot::Receiver<Result<Response, ErrorBody>>,
    /// Progress steps to notify the client of.
    pub progress: mpsc::Receiver<TeleportProgress>,
}

/// The longest a write to a client (and a wait for the journal on its behalf) may take.
pub const WRITE_DEADLINE: Duration = Duration::from_secs(5);

/// What the daemon knows about one client.
#[derive(Debug, Default)]
pub struct ClientState {
    /// Whether the hello succeeded. Every other request is refused until it has.
    pub greeted: bool,
    /// The client's name and version, from its hello, for logs.
    pub client: Option<String>,
    /// The client's pid, when the platform reports it, for logs.
    pub pid: Option<u32>,
    /// Lifecycle notifications, when subscribed.
    pub state_feed: Option<broadcast::Receiver<Arc<Notification>>>,
    /// Log records, when subscribed.
    pub log_feed: Option<broadcast::Receiver<Arc<Notification>>>,
    /// Replica, relay and refusal notifications, when subscribed.
    pub sessions_feed: Option<broadcast::Receiver<Arc<Notification>>>,
    /// Session log entries, while attached to at least one session.
    pub session_feed: Option<broadcast::Receiver<Arc<Notification>>>,
    /// Teleport progress and outcomes of the daemon's watches, when subscribed.
    pub teleport_feed: Option<broadcast::Receiver<Arc<Notification>>>,
    /// Set by a handler whose answer comes later (a teleport push or pull): the connection
    /// takes it right after the handler returns, ignores the handler's own result, and
    /// writes the answer when it comes, with progress notifications meanwhile.
    pub deferring: Option<Deferred>,
    /// Requests of this client answered later and not answered yet.
    pub deferred: usize,
    /// Attached sessions and the last log seq sent to this client for each.
    pub attached: HashMap<String, u64>,
    /// What makes the relay count this daemon as a client of each attached session,
    /// released by a detach or when the connection closes.
    pub attach_guards: HashMap<String, crate::sessions::attachments::AttachGuard>,
    /// Stored entries to send after the attach reply, in order.
    pub replay: Vec<(String, LogEntry)>,
    /// The highest journal seq whose flush must complete before the replies now queued
    /// are written.
    pub needs_durable: u64,
    /// Set when the connection must close once what is queued has been written.
    pub closing: Option<Closing>,
    /// This connection's device login, while it waits for approval: the relay and what
    /// it answered (the device code never leaves the daemon).
    pub device_login: Option<(String, crate::auth::DeviceStart)>,
    /// Set by `session/shell` once the relay opened the shell: after the reply, the
    /// connection carries only its terminal frames ([`super::shell::pipe`]).
    pub shell: Option<super::shell::ShellSocket>,
}
