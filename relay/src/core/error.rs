//! What can go wrong with a request to the core (re-exported as `crate::core::CoreError`
//! for the HTTP handlers, the bridge and followers), shown to clients as the refusal.
//!
//! Only the error type: no IO, no state.

use cloud_protocol::session::TransitionError;

/// A refused command. The messages are shown to users as they are.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoreError {
    /// No such session, or one the user cannot see (the two are not distinguished).
    #[error("no such session: {0}")]
    NotFound(String),
    /// The user may see the session but not do this.
    #[error("{0}")]
    Forbidden(String),
    /// An illegal status transition.
    #[error(transparent)]
    Transition(#[from] TransitionError),
    /// The request conflicts with the session's state (an answered prompt, a completed
    /// session).
    #[error("{0}")]
    Conflict(String),
    /// The request is malformed.
    #[error("{0}")]
    Invalid(String),
    /// The store failed; the relay refuses changes until it is restarted.
    #[error("the relay's store failed; ask its operator to check its disk and logs")]
    Store,
    /// The relay is shutting down.
    #[error("the relay is shutting down; retry shortly")]
    ShuttingDown,
    /// The relay's platform cannot do this (its provider says what to install or enable).
    #[error("{0}")]
    Unavailable(String),
}
