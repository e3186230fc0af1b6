//! What the daemon knows, shared read-mostly with every connection.
//!
//! Connections read it to answer `status` and subscribe to its notification feeds; they
//! never change it directly. Changes (shutdown, reload) go to the core loop as
//! [`CoreEvent`]s, so there is one place where the daemon's state moves.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use cloud_protocol::ipc::{
    DaemonState, HelloReply, Notification, StateChange, Status, PROTOCOL_VERSION,
};
use cloud_protocol::paths::Paths;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use crate::event::CoreEvent;
use crate::link::Link;
use crate::supervisor::Supervision;

/// How many state notifications a subscriber may fall behind before it is cut off.
pub const STATE_FEED_CAPACITY: usize = 256;

/// The daemon's shared state.
#[derive(Debug)]
pub struct Shared {
    /// Where the daemon's files are.
    pub paths: Paths,
    /// The same, formatted once for `status` (they never change while running).
    paths_text: [String; 3],
    /// When the daemon started, for uptime.
    started: Instant,
    /// This process's pid.
    pub pid: u32,
    /// The effective uid clients must have.
    pub uid: u32,
    /// What started the daemon and its executable at start, reported to clients so they
    /// restart it the right way when it is outdated.
    supervision: Supervision,
    /// The parts that change: lifecycle state, configuration generation, log filter.
    snapshot: Mutex<Snapshot>,
    /// Live connections, for `status` and the client limit.
    clients: AtomicU32,
    /// The most clients served at once (from the config, updated on reload).
    max_clients: AtomicU32,
    /// Lifecycle notifications for `state` subscribers.
    pub state_feed: broadcast::Sender<Arc<Notification>>,
    /// Log records for `log` subscribers (filled by the logging layer).
    pub log_feed: broadcast::Sender<Arc<Notification>>,
    /// Requests to the core loop.
    core: mpsc::Sender<CoreEvent>,
    /// Cancelled when the drain starts: connections finish what they are doing and close.
    pub shutdown: CancellationToken,
    /// The journal, the stores the bridge fills, and the way to the bridge.
    pub link: Arc<Link>,
    /// Linked worktrees: push, pull, watch.
    pub teleport: Arc<crate::teleport::Teleport>,
}

/// The changing part of the state.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Lifecycle state.
    pub state: DaemonState,
    /// Configuration loads so far.
    pub config_generation: u64,
    /// The log filter in effect.
    pub log_filter: String,
    /// The log file, when detached.
    pub log_file: Option<String>,
}

/// Counts a connection for as long as it lives.
#[derive(Debug)]
pub struct ClientSlot {
    shared: Arc<Shared>,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.shared.clients.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Shared {
    /// The shared state of a daemon starting with `snapshot`.
    pub fn new(
        paths: Paths,
        supervision: Supervision,
        snapshot: Snapshot,
        max_clients: usize,
        log_feed: broadcast::Sender<Arc<Notification>>,
        core: mpsc::Sender<CoreEvent>,
        (link, teleport): (Arc<Link>, Arc<crate::teleport::Teleport>),
    ) -> Shared {
        let (state_feed, _) = broadcast::channel(STATE_FEED_CAPACITY);
        let paths_text = [
            paths.socket.display().to_string(),
            paths.state_dir.display().to_string(),
            paths.config_file().display().to_string(),
        ];
        Shared {
            paths,
            paths_text,
            started: Instant::now(),
            pid: std::process::id(),
            uid: current_uid(),
            supervision,
            snapshot: Mutex::new(snapshot),
            clients: AtomicU32::new(0),
            max_clients: AtomicU32::new(max_clients.min(u32::MAX as usize) as u32),
            state_feed,
            log_feed,
            core,
            shutdown: CancellationToken::new(),
            link,
            teleport,
        }
    }

    /// Takes a client slot, or `None` when the daemon serves as many clients as it allows.
    pub fn take_client_slot(self: &Arc<Shared>) -> Option<ClientSlot> {
        let max = self.max_clients.load(Ordering::Relaxed);
        let taken = self
            .clients
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            });
        taken.ok().map(|_| ClientSlot {
            shared: Arc::clone(self),
        })
    }

    /// The changing part of the state, as it is now.
    pub fn snapshot(&self) -> Snapshot {
        self.snapshot
            .lock()
            .expect("snapshot lock poisoned")
            .clone()
    }

    /// Changes the state and tells `state` subscribers why.
    pub fn update(&self, message: impl Into<String>, change: impl FnOnce(&mut Snapshot)) {
        let notification = {
            let mut snapshot = self.snapshot.lock().expect("snapshot lock poisoned");
            change(&mut snapshot);
            Notification::State(StateChange {
                state: snapshot.state,
                config_generation: snapshot.config_generation,
                message: message.into(),
            })
        };
        // No subscribers is not an error.
        let _ = self.state_feed.send(Arc::new(notification));
    }

    /// Applies a reloaded client limit.
    pub fn set_max_clients(&self, max_clients: usize) {
        self.max_clients
            .store(max_clients.min(u32::MAX as usize) as u32, Ordering::Relaxed);
    }

    /// What `status` answers.
    pub fn status(&self) -> Status {
        let snapshot = self.snapshot();
        Status {
            pid: self.pid,
            version: crate::VERSION.into(),
            protocol: PROTOCOL_VERSION,
            state: snapshot.state,
            supervisor: self.supervision.supervisor,
            uptime_ms: self.started.elapsed().as_millis() as u64,
            socket: self.paths_text[0].clone(),
            state_dir: self.paths_text[1].clone(),
            config_file: self.paths_text[2].clone(),
            config_generation: snapshot.config_generation,
            log_filter: snapshot.log_filter,
            log_file: snapshot.log_file,
            clients: self.clients.load(Ordering::Relaxed),
            relay: self.link.status(),
        }
    }

    /// The daemon's half of the hello.
    pub fn hello_reply(&self) -> HelloReply {
        HelloReply {
            protocol: PROTOCOL_VERSION,
            daemon_version: crate::VERSION.into(),
            pid: self.pid,
            supervisor: self.supervision.supervisor,
            binary_replaced: self.supervision.binary.replaced(),
        }
    }

    /// Asks the core loop to shut down. Never waits: if the core is already busy shutting
    /// down, the request is redundant.
    pub fn request_shutdown(&self, by: String) {
        let _ = self.core.try_send(CoreEvent::ShutdownRequested { by });
    }
}

/// This process's effective uid (0 where uids do not exist).
pub fn current_uid() -> u32 {
    #[cfg(unix)]
    {
        // SAFETY: geteuid has no preconditions and cannot fail.
        unsafe { libc::geteuid() }
    }
    #[cfg(not(unix))]
    {
        0
    }
}
