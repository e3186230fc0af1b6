//! `cloudd`: the per-user agent that ties this machine to a cloud relay.
//!
//! The modules, in the order a request meets them:
//!
//! - [`singleton`]: the lock file that makes this the one daemon of its state directory.
//! - [`config`]: the TOML configuration, loaded at start and on SIGHUP.
//! - [`logging`]: tracing setup (stderr, or a log file when detached), the reloadable
//!   filter, and the log feed that subscribers of the `log` topic receive.
//! - [`ipc`]: the local socket: binding it safely, accepting clients, checking their uid,
//!   telling the two encodings apart, and answering requests, one module per family
//!   (`ipc::daemon`, `ipc::sessions`, `ipc::attach`).
//! - [`state`]: what the daemon knows and shares with every connection.
//! - [`store`]: the sled database and which module owns which tree.
//! - [`journal`]: outbound events, durable before `queued`, trimmed on the relay's ack.
//! - [`sessions`]: what the relay sent about sessions: followed sessions' logs
//!   (`sessions::inbound`), the session replica (`sessions::replica`), and the prompts
//!   still waiting in a log (`sessions::prompts`).
//! - [`credentials`], [`embedded`]: which relay, and the in-process one when none is set;
//!   [`auth`]: the access tokens for it (exchanged, kept, refreshed).
//! - [`bridge`]: the WebSocket to the relay: connect (URL, TLS, register, claim the
//!   journal), writer (the journal, then control messages), reader (dispatching what the
//!   relay sends), backoff; [`link`]: what it shares with the handlers.
//! - [`teleport`]: worktrees linked to sessions: push, pull, the blob socket.
//! - [`metrics`]: the daemon's health figures (`cloudctl metrics`), and the anonymous
//!   aggregates sent only with `telemetry = true`.
//! - [`account`]: the current org, the user's orgs and the settings copy (with the
//!   effective value of each setting).
//! - [`daemon`]: the core: start-up, the one loop that consumes [`event::CoreEvent`]s
//!   (signals, shutdown requests), and the bounded drain; [`event`] names those events.
//! - [`signals`]: turns SIGTERM, SIGINT and SIGHUP into core events.
//! - [`supervisor`]: systemd socket activation, readiness and watchdog notifications, and
//!   noticing that the daemon's own binary was upgraded.
//!
//! Architecture invariant: the socket loop never waits on a slow client. Every queue is
//! bounded, every frame has a size limit and every write a deadline.

pub mod account;
pub mod auth;
pub mod bridge;
pub mod config;
pub mod credentials;
pub mod daemon;
pub mod embedded;
pub mod event;
pub mod ipc;
pub mod journal;
pub mod link;
pub mod logging;
pub mod memory;
pub mod metrics;
pub mod sessions;
pub mod signals;
pub mod singleton;
pub mod state;
pub mod store;
#[cfg(unix)]
pub mod supervisor;
pub mod teleport;

/// This build's version, reported in the hello and in `status`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
