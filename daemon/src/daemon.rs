//! The daemon's core: start-up, the one loop that consumes [`CoreEvent`]s, and the drain.
//!
//! Start-up order matters: the instance lock first (so two daemons never race for the
//! socket), then the configuration and logging, then the socket. Shutdown is explicit: the
//! shared cancellation token tells every connection to finish its current request and
//! close, the task tracker says when all have, and the wait is bounded by
//! [`DRAIN_TIMEOUT`].

use std::sync::Arc;
use std::time::Duration;

use cloud_protocol::ipc::{DaemonState, RelayMode, Supervisor};
use cloud_protocol::paths::Paths;
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;

use crate::bridge::Bridge;
use crate::config::{Config, ConfigError};
use crate::credentials;
use crate::event::{CoreEvent, Signal};
use crate::ipc::{listener, IpcError};
use crate::journal::Journal;
use crate::link::Link;
use crate::logging::{Logging, LoggingError};
use crate::sessions::inbound::Inbound;
use crate::sessions::replica::Replica;
use crate::signals;
use crate::singleton::{InstanceLock, LockError};
use crate::state::{Shared, Snapshot};
use crate::store::{self, StoreError};
use crate::supervisor::{BinaryIdentity, Handoff, Supervision};

/// The longest the drain waits for connections to finish.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the store's last flush may take once the drain is over.
const STORE_FLUSH_DEADLINE: Duration = Duration::from_secs(2);

/// How the daemon is started.
#[derive(Debug, Default)]
pub struct Options {
    /// Log to the log file in the state directory instead of stderr.
    pub detached: bool,
    /// What the service manager handed over (socket, notification socket, watchdog).
    pub handoff: Handoff,
}

/// The daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Another daemon runs.
    #[error(transparent)]
    Lock(#[from] LockError),
    /// The configuration file is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Logging could not be set up.
    #[error(transparent)]
    Logging(#[from] LoggingError),
    /// The socket could not be bound.
    #[error(transparent)]
    Ipc(#[from] IpcError),
    /// A directory could not be created.
    #[error("cannot create {path}: {source}")]
    Dir {
        /// The directory.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Creates a private directory (0700 on Unix).
fn create_private_dir(path: &std::path::Path) -> Result<(), StartError> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(path).map_err(|source| StartError::Dir {
        path: path.to_owned(),
        source,
    })
}

/// Runs the daemon until it is told to stop, then drains. Returns once every connection
/// has closed or the drain timed out.
pub async fn run(mut paths: Paths, options: Options) -> Result<(), StartError> {
    create_private_dir(&paths.state_dir)?;
    let lock = InstanceLock::acquire(&paths.lock_file())?;
    let config = Config::load(&paths.config_file())?;
    let log_file = options.detached.then(|| paths.log_file());
    let mut logging = Logging::init(log_file.as_deref(), config.log.as_deref())?;

    let mut handoff = options.handoff;
    // A socket passed by the service manager is served as is; status reports its path.
    let adopted = match handoff.listen_fd.take() {
        Some(fd) => {
            let (listener, path) = listener::adopt(fd)?;
            if let Some(path) = path {
                paths.socket = path;
            }
            tracing::info!(socket = %paths.socket.display(), "serving the socket passed by the service manager");
            Some(listener)
        }
        None => None,
    };
    // The stores, the journal and the bridge.
    let db = store::open(&paths.state_dir.join("store"))?;
    let instance_id = store::instance_id(&db)?;
    let journal_dir = paths.state_dir.join("journal");
    let journal = Journal::open(&journal_dir, &db)?;
    // Private like the store: new files are (the umask), older ones are made so.
    store::restrict(&journal_dir)?;
    tokio::spawn(Arc::clone(&journal).run_flusher());
    // The relay's URL is in status (and in every message about it) from the start; the
    // embedded relay's is known once it listens.
    let remote = credentials::load(&paths.config_dir).ok().flatten();
    let (link, bridge_commands) = Link::new(
        journal,
        Inbound::open(&db)?,
        Replica::open(&db)?,
        (store::Meta::open(&db)?, crate::account::Account::open(&db)?),
        if remote.is_some() {
            RelayMode::Remote
        } else {
            RelayMode::Embedded
        },
        remote
            .map(|credentials| credentials.relay)
            .unwrap_or_default(),
        instance_id.clone(),
    );
    link.metrics.set_telemetry(config.telemetry);
    let link = Arc::new(link);
    let teleport_db = crate::teleport::db::TeleportDb::open(&paths.state_dir.join("teleport"))?;
    let worktrees = crate::teleport::worktrees::Worktrees::new(teleport_db);
    worktrees.take_over(&db)?;
    let teleport = Arc::new(crate::teleport::Teleport::new(worktrees, Arc::clone(&link)));

    let (core_tx, mut core_rx) = mpsc::channel(64);
    let shared = Arc::new(Shared::new(
        paths,
        Supervision {
            supervisor: handoff.supervisor.unwrap_or(Supervisor::None),
            binary: BinaryIdentity::current(),
        },
        Snapshot {
            state: DaemonState::Ready,
            config_generation: 1,
            log_filter: logging.filter().to_owned(),
            log_file: log_file.as_ref().map(|p| p.display().to_string()),
        },
        config.max_clients,
        logging.feed.clone(),
        core_tx.clone(),
        (Arc::clone(&link), teleport),
    ));
    let bridge = Bridge::new(
        Arc::clone(&link),
        bridge_commands,
        &shared.paths,
        instance_id,
        shared.shutdown.clone(),
    );
    let bridge_task = tokio::spawn(bridge.run());
    // The watches the links record: the daemon's, so they outlive daemon restarts. Each
    // waits for the relay, then rescans (what changed while no daemon watched) and pulls.
    match shared.teleport.resume_watches().await {
        Ok(0) => {}
        Ok(n_watches) => tracing::info!(n_watches, "teleport watches resumed"),
        Err(e) => tracing::error!("cannot resume the teleport watches: {e}"),
    }
    let signal_task = signals::spawn(core_tx).map_err(StartError::Signals)?;
    let listener = match adopted {
        Some(listener) => listener,
        None => listener::bind(&shared)?,
    };
    let tracker = TaskTracker::new();
    let accept_task = tokio::spawn(listener::accept_loop(
        listener,
        Arc::clone(&shared),
        tracker.clone(),
    ));
    tracing::info!(
        pid = shared.pid,
        version = crate::VERSION,
        socket = %shared.paths.socket.display(),
        lock = %lock.path().display(),
        "cloudd ready"
    );
    handoff.notify(&format!(
        "READY=1\nMAINPID={}\nSTATUS=serving {}",
        shared.pid,
        shared.paths.socket.display()
    ));

    // The watchdog is pinged from this loop, so a wedged core stops the pings.
    let mut watchdog = handoff.watchdog_interval.map(tokio::time::interval);
    let reason = loop {
        let event = tokio::select! {
            event = core_rx.recv() => event,
            _ = tick(&mut watchdog) => {
                handoff.notify("WATCHDOG=1");
                continue;
            }
        };
        let Some(event) = event else {
            break "the core channel closed".to_owned();
        };
        match event {
            CoreEvent::Signal(Signal::Hangup) => reload(&shared, &mut logging),
            CoreEvent::Signal(signal) => break format!("{signal:?} signal received"),
            CoreEvent::ShutdownRequested { by } => break by,
        }
    };

    tracing::info!("draining: {reason}");
    handoff.notify("STOPPING=1");
    shared.update(format!("draining: {reason}"), |s| {
        s.state = DaemonState::Draining
    });
    // One deadline for the whole drain: connections and the bridge (with the embedded
    // relay) stop together, on the same token.
    let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
    // Connections get most of it; the bridge always keeps a second to stop the embedded
    // relay (and its agents) cleanly.
    let connections_deadline = deadline - Duration::from_secs(1);
    shared.shutdown.cancel();
    tracker.close();
    // The watches finish their current step (bounded); their links keep `watching`.
    let _ = tokio::time::timeout_at(connections_deadline, shared.teleport.stop_watches()).await;
    // A push answered before its link recorded the version finishes recording it.
    let _ = tokio::time::timeout_at(connections_deadline, shared.teleport.background_done()).await;
    let _ = accept_task.await;
    if tokio::time::timeout_at(connections_deadline, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            n_connections = tracker.len(),
            "drain timed out after {DRAIN_TIMEOUT:?}; closing the remaining connections"
        );
    }
    if tokio::time::timeout_at(deadline, bridge_task)
        .await
        .is_err()
    {
        tracing::warn!("the bridge did not stop within the drain's {DRAIN_TIMEOUT:?}");
    }
    // Bounded: a store that a full disk left broken may never finish a flush (sled 0.34).
    match tokio::time::timeout(STORE_FLUSH_DEADLINE, db.flush_async()).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::error!("cannot flush the store: {e}"),
        Err(_) => tracing::error!(
            "the store did not finish flushing within {STORE_FLUSH_DEADLINE:?}; stopping without it"
        ),
    }
    signal_task.abort();
    tracing::info!("cloudd stopped");
    drop(lock);
    // sled flushes again when the last handle of a database drops, and can wait there
    // forever for one that a full disk broke: what must be durable was flushed above (the
    // journal flushes before anything is answered `queued`), so one handle of the store
    // and of the journal is left to the process's exit.
    std::mem::forget(db);
    std::mem::forget(link);
    Ok(())
}

/// Waits for the next tick of an optional interval (forever when there is none).
async fn tick(interval: &mut Option<tokio::time::Interval>) {
    match interval {
        Some(interval) => {
            interval.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// Re-reads the configuration file and applies what can change while running. An invalid
/// file is reported and the configuration in effect is kept.
fn reload(shared: &Shared, logging: &mut Logging) {
    let path = shared.paths.config_file();
    let config = match Config::load(&path) {
        Ok(config) => config,
        Err(e) => {
            tracing::error!("configuration not reloaded, keeping the current one: {e}");
            shared.update(format!("configuration not reloaded: {e}"), |_| {});
            return;
        }
    };
    let filter = match logging.reload(config.log.as_deref()) {
        Ok(filter) => filter.to_owned(),
        Err(e) => {
            tracing::error!("configuration not reloaded, keeping the current one: {e}");
            shared.update(format!("configuration not reloaded: {e}"), |_| {});
            return;
        }
    };
    shared.set_max_clients(config.max_clients);
    shared.link.metrics.set_telemetry(config.telemetry);
    shared.update("configuration reloaded", |s| {
        s.config_generation += 1;
        s.log_filter = filter;
    });
    tracing::info!(
        generation = shared.snapshot().config_generation,
        "configuration reloaded"
    );
}
