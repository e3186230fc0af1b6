//! Who may see and who may change a session: the visibility rules in one place.
//!
//! private = its owner; team = its owner's org; public = anyone with the id, read-only for
//! everyone outside the owner's org. Write access (sending, answering prompts,
//! interrupting, status actions, sharing) belongs to the owner, and to the owner's org when
//! the session is team or public. Callers answer "not found" for a session the user cannot
//! see, so its existence is not revealed.
//!
//! This module does no IO and keeps no state.

use cloud_protocol::session::{Session, Visibility};

/// An authenticated user: what a live token stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user's name.
    pub user: String,
    /// Their org.
    pub org: String,
    /// The hash of the token they used, so open connections can notice its revocation.
    pub token_hash: String,
}

/// What a user may do with a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Access {
    /// Nothing: the session does not exist for them.
    None,
    /// Read its log and status.
    View,
    /// Everything.
    Write,
}

impl Identity {
    /// Whether this user owns the session (same name in the same org).
    pub fn owns(&self, session: &Session) -> bool {
        self.user == session.owner && self.org == session.org
    }

    /// This user's access to the session.
    pub fn access(&self, session: &Session) -> Access {
        let same_org = self.org == session.org;
        match session.visibility {
            _ if self.owns(session) => Access::Write,
            Visibility::Private => Access::None,
            Visibility::Team if same_org => Access::Write,
            Visibility::Team => Access::None,
            Visibility::Public if same_org => Access::Write,
            Visibility::Public => Access::View,
        }
    }

    /// Whether the session belongs in this user's listing: their own, and their org's team
    /// and public sessions. Other orgs' public sessions are reachable by id only.
    pub fn lists(&self, session: &Session) -> bool {
        self.owns(session) || (self.org == session.org && session.visibility != Visibility::Private)
    }
}
