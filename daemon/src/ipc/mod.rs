//! The local socket: binding it safely, accepting clients, and serving each one.
//!
//! - [`listener`]: prepares the socket directory (0700), removes a dead predecessor's
//!   socket, binds (0600), and accepts connections until the drain starts.
//! - [`connection`]: one client: checks its uid, picks the encoding from its first byte,
//!   reads messages, writes replies and notifications, and closes with a reason.
//! - [`client`]: what the daemon knows about one client, and the write deadline.
//! - [`handler`]: turns one request into one response against the shared state.
//! - [`sessions`]: the sessions family: login, the replica, journaled events, attach.

pub mod client;
pub mod connection;
pub mod handler;
pub mod listener;
pub mod sessions;

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
