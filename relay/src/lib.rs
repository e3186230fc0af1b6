//! `cloud-relay`: the cloud side of cloudd — sessions, their workspaces, the agents that
//! run in them, and the routing between them and every connected daemon and viewer.
//!
//! It runs as its own server (`cloud-relay serve`) or embedded in a daemon ([`start`] on
//! loopback). The story of a request, module by module:
//!
//! - [`http`]: the router and the server. `http::auth` turns the bearer token into an
//!   identity ([`auth`], over the API keys of [`tokens`]) and serves the token exchange; one module per REST resource (`http::sessions`,
//!   `http::events`, `http::log`, `http::instances`), each turning a request into a
//!   core command or a read of the published state; `http::error` is the answer when
//!   that fails.
//! - `http::bridge`: the daemons' WebSocket (postcard envelopes, dedup, cumulative
//!   acks): registration, event batches, the daemon's replica and joins, instance
//!   commands, and encoding, each in a module of its own.
//! - `http::viewer`: the read-only WebSocket that streams a session's log as JSON.
//! - [`instances`]: the connected daemon instances, and commands sent to them.
//! - [`limits`]: the rate limits per API key (token buckets); `metrics`: the operator's
//!   figures at `GET /metrics`.
//! - [`access`]: who may see and change a session.
//! - [`orgs`]: who belongs to which org (`DATA/members.jsonl`); [`settings`]: the users'
//!   and orgs' settings (`DATA/settings.json`), versioned, pushed to daemons.
//! - [`core`]: the one task that changes state; group-commits every round to the
//!   [`store`] before acknowledging, publishing or telling an agent anything. Its loop is
//!   in `core` itself; each kind of change in a module of its concern: `core::sessions`
//!   (lifecycle, starting and stopping agents), `core::events` (user events, dedup,
//!   refusals, with `core::idempotency`), `core::prompts`, `core::agent_reports`,
//!   `core::unfinished` (on top of `core::delivery`); `core::shared` is what
//!   readers see; `core::error` is what a request to it can fail with.
//! - [`follow`]: reading a session's log after a cursor, then live.
//! - [`presence`]: every session's connected clients (daemons on behalf of attached
//!   editors, viewers, terminals) and their heartbeats; `idle`: pausing a session with
//!   no client and no activity for its `auto_stop_minutes`, and resuming it when a client
//!   attaches.
//! - `terminal`: shells in sessions' workspaces on pseudo-terminals, for `http::terminal`
//!   (the shell socket).
//! - [`agents`]: [`agents::process`] runs agent processes on stream-json stdio;
//!   [`agents::shell`] is the built-in agent (public as [`shell_agent`]).
//! - [`providers`]: where sessions run (`local`, `sandbox`): preparing a workspace
//!   (rebuilt from its snapshot when gone), the command that runs a program inside a
//!   session's confinement, pausing and resuming an agent, and the filtering proxy of
//!   `limited` sandboxes.
//!
//! Architecture invariants: only [`core`] writes the store; nothing is acknowledged or shown
//! before it is flushed; tokens are stored hashed and never logged; the core never waits on
//! a peer, and every queue to a peer is bounded except agent stdin (a slow agent must not
//! stall the core; its input is bounded by what users send it).

pub mod access;
mod agents;
pub mod auth;
mod core;
mod follow;
mod http;
mod idle;
mod instances;
pub mod limits;
mod metrics;
pub mod orgs;
pub mod presence;
pub mod providers;
pub mod settings;
mod store;
mod teleport;
mod terminal;
pub mod tokens;

pub use crate::agents::shell as shell_agent;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::auth::Auth;
use crate::core::{Command, Core, Shared};
use crate::store::{Store, StoreError};

/// The relay's version, sent to daemons when they register.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// How often the token file is checked for changes besides at each authentication.
const TOKEN_CHECK_INTERVAL: Duration = Duration::from_millis(500);

/// The longest shutdown waits for connections to close.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// How to run a relay.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Where to listen (`127.0.0.1:0` picks a free port).
    pub listen: SocketAddr,
    /// The data directory: `tokens.jsonl`, `store/`, `workspaces/`.
    pub data_dir: PathBuf,
    /// The agent command line, run in each session's workspace.
    pub agent_command: Vec<String>,
    /// How long an access token lives ([`auth::DEFAULT_ACCESS_TOKEN_TTL`] normally).
    pub access_token_ttl: Duration,
    /// How fast each API key may call ([`limits::Limits::default`] normally).
    pub limits: limits::Limits,
    /// The device-login grant's timing (10 minutes, polls every 5 s, normally).
    pub device: auth::DeviceConfig,
    /// Client heartbeats and the unit of `auto_stop_minutes` (10 s and a minute,
    /// normally).
    pub presence: presence::PresenceConfig,
    /// Where sessions run ([`providers::ProviderConfig::default`]: `local`).
    pub provider: providers::ProviderConfig,
}

/// The relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// A data directory could not be created.
    #[error("cannot create {path}: {source}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The listening address could not be bound.
    #[error("cannot listen on {address}: {source}")]
    Bind {
        /// The address.
        address: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The store could not be opened or loaded.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The signing secret or the refresh tokens could not be read.
    #[error("{0}")]
    Auth(String),
    /// The snapshot store could not be opened.
    #[error("cannot open the snapshot store: {0}")]
    Teleport(String),
}

/// A running relay. Call [`RunningRelay::shutdown`] to stop it cleanly.
#[derive(Debug)]
pub struct RunningRelay {
    /// The bound address.
    local_addr: SocketAddr,
    /// Everything the tasks share.
    shared: Arc<Shared>,
    /// The core's loop.
    core_task: tokio::task::JoinHandle<()>,
    /// The HTTP server.
    server_task: tokio::task::JoinHandle<()>,
    /// The token file watcher.
    token_task: tokio::task::JoinHandle<()>,
    /// The idle auto-stop watcher.
    idle_task: tokio::task::JoinHandle<()>,
    /// The sweep of staged files no commit took.
    staging_task: tokio::task::JoinHandle<()>,
}

/// The current time in milliseconds since the Unix epoch.
pub(crate) fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn create_private_dir(path: &std::path::Path) -> Result<(), RelayError> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder
        .create(path)
        .map_err(|source| RelayError::CreateDir {
            path: path.to_owned(),
            source,
        })
}

/// How long opening the store waits for its lock.
const STORE_LOCK_WAIT: Duration = Duration::from_secs(2);

/// Opens the store, waiting up to [`STORE_LOCK_WAIT`] while its lock is held: when a relay
/// of this process has just stopped (a restart of the embedded relay, a test), sled's IO
/// threads may hold the store's file a moment longer than the relay held the store.
async fn open_store(path: &std::path::Path) -> Result<Store, StoreError> {
    let deadline = tokio::time::Instant::now() + STORE_LOCK_WAIT;
    loop {
        match Store::open(path) {
            Err(e) if e.is_locked() && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            result => return result,
        }
    }
}

/// Starts a relay: opens its store, restarts the agents of running sessions, and serves.
pub async fn start(config: RelayConfig) -> Result<RunningRelay, RelayError> {
    create_private_dir(&config.data_dir)?;
    let workspaces = config.data_dir.join("workspaces");
    create_private_dir(&workspaces)?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| RelayError::Bind {
            address: config.listen,
            source,
        })?;
    let local_addr = listener.local_addr().map_err(|source| RelayError::Bind {
        address: config.listen,
        source,
    })?;
    let store = open_store(&config.data_dir.join("store")).await?;
    let auth = Auth::open(&config.data_dir, config.access_token_ttl, config.device)
        .map_err(RelayError::Auth)?;
    let teleport = teleport::Teleport::open(&config.data_dir, workspaces.clone())
        .map_err(RelayError::Teleport)?;
    let settings = settings::Settings::open(&config.data_dir).map_err(RelayError::Auth)?;
    // Probes the platform (a process or two): once, before serving.
    let provider = {
        let (config, data, workspaces) =
            (config.provider, config.data_dir.clone(), workspaces.clone());
        tokio::task::spawn_blocking(move || providers::Provider::new(config, &data, workspaces))
            .await
            .map_err(|e| RelayError::Auth(format!("the provider check failed: {e}")))?
    };
    let (shared, commands) = core::shared(
        auth,
        store,
        Arc::new(teleport),
        config.limits,
        settings,
        config.presence,
        Arc::new(provider),
    );
    let core_task = Core::start(shared.clone(), commands, config.agent_command).await?;

    let server_task = http::serve(listener, shared.clone());

    let token_shared = shared.clone();
    let token_task = tokio::spawn(async move {
        let mut interval = tokio::time::interval(TOKEN_CHECK_INTERVAL);
        loop {
            tokio::select! {
                _ = token_shared.cancel.cancelled() => return,
                _ = interval.tick() => token_shared.auth.refresh_files(),
            }
        }
    });
    let idle_task = idle::spawn(shared.clone());
    let staging_task = Arc::clone(&shared.teleport).sweep_staging(shared.cancel.clone());
    tracing::info!(address = %local_addr, data = %config.data_dir.display(), "relay listening");
    Ok(RunningRelay {
        local_addr,
        shared,
        core_task,
        server_task,
        token_task,
        idle_task,
        staging_task,
    })
}

impl RunningRelay {
    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, closes every connection, stops every agent and flushes the store.
    /// Session statuses are kept, so the next start restarts the agents of running ones.
    pub async fn shutdown(self) {
        tracing::info!("relay shutting down");
        self.shared.cancel.cancel();
        let mut server_task = self.server_task;
        if tokio::time::timeout(DRAIN_TIMEOUT, &mut server_task)
            .await
            .is_err()
        {
            tracing::warn!("HTTP requests did not finish in time");
            server_task.abort();
            let _ = server_task.await;
        }
        self.shared.connections.close();
        if tokio::time::timeout(DRAIN_TIMEOUT, self.shared.connections.wait())
            .await
            .is_err()
        {
            tracing::warn!("connections did not close in time");
        }
        let _ = self.shared.call(|reply| Command::Shutdown { reply }).await;
        let _ = self.core_task.await;
        let _ = self.token_task.await;
        let _ = self.idle_task.await;
        let _ = self.staging_task.await;
        tracing::info!("relay stopped");
    }
}
