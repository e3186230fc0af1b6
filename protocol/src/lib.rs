//! `cloud-protocol`: every type that crosses a cloudd process boundary, and the codecs.
//!
//! Architecture invariant: this crate does no IO. It turns bytes into typed messages and
//! back, and computes where files live from environment variables, but it never opens a
//! file or a socket. Both the daemon and every client depend on it, so the wire format has
//! exactly one definition.
//!
//! - [`ipc`]: the local-socket messages (`Request`, `Response`, `Notification`) and the
//!   protocol version.
//! - [`frame`]: the binary framing (u32 little-endian length, then a postcard body).
//! - [`jsonrpc`]: the newline-delimited JSON-RPC 2.0 encoding of the same messages.
//! - [`paths`]: the one location rule for the socket, state, config and lock files.
//! - [`session`]: cloud sessions, their lifecycle and their ordered logs.
//! - [`settings`]: settings shared across a team's machines, and their precedence.
//! - [`bridge`]: the daemon ↔ relay WebSocket envelope and messages.
//! - [`agent`]: the stream-json lines agents speak on stdio.
//! - [`blobs`]: the blob socket that carries teleport's file contents beside the bridge.
//! - [`teleport`]: checked paths, content ids, manifests, deltas, the three-way merge and
//!   the teleport requests of the bridge.
//! - [`terminal`]: the frames of a terminal into a session (keystrokes, window size,
//!   output, exit status).

pub mod agent;
pub mod blobs;
pub mod bridge;
pub mod content_length;
pub mod frame;
pub mod ipc;
pub mod jsonrpc;
pub mod paths;
pub mod session;
pub mod settings;
pub mod teleport;
pub mod terminal;

/// The largest message any encoding accepts: a binary frame body, a JSON line, or the body
/// of a Content-Length framed message.
///
/// Anything larger is refused before it is buffered, so a client cannot make the daemon
/// allocate without bound.
pub const MAX_MESSAGE_LEN: usize = 16 * 1024 * 1024;

/// The first byte of a newline-delimited JSON-RPC connection. `C`
/// ([`content_length::FIRST_BYTE`]) selects Content-Length framed JSON-RPC; any other
/// first byte selects binary framing.
pub const JSON_FIRST_BYTE: u8 = b'{';
