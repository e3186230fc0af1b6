//! The local socket: binding it safely, accepting clients, and serving each one. Reading
//! the modules in order tells a request's story:
//!
//! - [`listener`]: prepares the socket directory (0700), removes a dead predecessor's
//!   socket, binds (0600), and accepts connections until the drain starts.
//! - [`connection`]: one client: checks its uid, picks the encoding from its first byte,
//!   reads messages, writes replies and notifications, and closes with a reason.
//! - [`client`]: what the daemon knows about one client, and the write deadline.
//! - [`handler`]: checks the greeting and hands each request to its family.
//! - One module per family of requests:
//!   - [`daemon`]: the daemon and its relay connection: hello, ping, status, shutdown,
//!     subscribe, login, logout, whoami.
//!   - [`sessions`]: the sessions and the events sent to them: list, show, create, pause,
//!     resume, complete, delete, share; send, interrupt, answer (journaled); delivery.
//!   - [`attach`]: following a session and reading its log: attach, detach, unfollow,
//!     permissions.
//!   - [`teleport`]: worktrees and sessions: push, pull, watch, stop, status (push and
//!     pull are answered later, with progress notifications meanwhile).
//!   - [`account`]: orgs (list, switch) and settings (get, set).
//!   - [`device`]: device logins (this machine's, by approval elsewhere; approving or
//!     denying another's), the user's logins (list, revoke), and where the login is kept.
//!   - [`shell`]: a shell in a session's workspace (`session/shell`): the relay's shell
//!     socket, opened for the client, then carried frame by frame on its connection.
//! - [`relay`]: how a family's handler asks the relay (through the bridge, bounded).
//!
//! Architecture invariant: no handler talks to the network (except [`device`], through
//! the bridge's [`crate::auth::Keeper`], whose every call is bounded, and [`shell`], whose
//! socket to the relay is opened with a deadline and whose every frame has one) or waits without a
//! deadline; a family reads the daemon's state and the stores, writes the journal, and asks the
//! bridge through [`crate::link::Link`].

pub mod account;
pub mod attach;
pub mod client;
pub mod connection;
pub mod daemon;
pub mod device;
pub mod handler;
pub mod listener;
pub mod relay;
pub mod sessions;
pub mod shell;
pub mod teleport;

use cloud_protocol::ipc::{ErrorBody, ErrorCode};

/// An internal error, as a reply: something the client cannot fix (a store that failed).
fn internal(e: impl std::fmt::Display) -> ErrorBody {
    ErrorBody::new(ErrorCode::Internal, format!("internal error: {e}"))
}

/// The reply for a session this daemon does not know, worded the same by every family.
fn not_found(session: &str) -> ErrorBody {
    ErrorBody::new(
        ErrorCode::NotFound,
        format!("no session {session} (see `cloudctl session list`)"),
    )
}

/// The local socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum IpcError {
    /// The socket directory could not be created or secured.
    #[error("cannot prepare socket directory {path}: {source}")]
    SocketDir {
        /// The directory.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The socket directory belongs to someone else.
    #[error("socket directory {path} is owned by uid {owner}, not by this user (uid {uid}); remove it or set CLOUDD_SOCKET")]
    ForeignSocketDir {
        /// The directory.
        path: std::path::PathBuf,
        /// Its owner.
        owner: u32,
        /// This user.
        uid: u32,
    },
    /// Something that is not a socket is in the way.
    #[error("{path} exists and is not a socket; move it away or set CLOUDD_SOCKET")]
    NotASocket {
        /// The path.
        path: std::path::PathBuf,
    },
    /// Another process listens on the socket path.
    #[error("{path} is in use by another process (a cloudd with another CLOUDD_HOME?); stop it or choose another CLOUDD_SOCKET")]
    SocketInUse {
        /// The socket path.
        path: std::path::PathBuf,
    },
    /// Binding failed.
    #[error("cannot listen on {path}: {source}")]
    Bind {
        /// The socket path.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
}
