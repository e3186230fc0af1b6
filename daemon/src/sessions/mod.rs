//! What the daemon holds about the relay's sessions, as the relay sent it: the state the
//! session requests read and the bridge's reader fills.
//!
//! - [`attachments`]: which sessions local clients are attached to right now, for the
//!   relay's count of this daemon as their client.
//! - [`inbound`]: the followed sessions and a bounded copy of each one's log, stored in
//!   order without duplicates, so `attach --since SEQ` replays what happened while nobody
//!   watched and a reconnect resumes after the last entry stored.
//! - [`replica`]: the sessions visible to this user, so `session list` and `session show`
//!   answer offline (marked stale).
//! - [`prompts`]: which permission prompts of a session's log still wait for an answer,
//!   read from the log itself (pure: no store, no IO).
//!
//! Architecture invariant: this is a cache of the relay's view. It is written from what
//! the relay sent (or answered to a request), never from a guess, and nothing here talks to
//! the network or to clients: the bridge writes it, the IPC handlers read it, and the
//! feeds that tell clients about changes belong to [`crate::link`].

pub mod attachments;
pub mod inbound;
pub mod prompts;
pub mod replica;
