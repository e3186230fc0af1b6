//! Who may see and who may change a session: the visibility rules in one place.
//!
//! private = its owner; team = its owner's org; public = anyone with the id, read-only for
//! everyone outside the owner's org. Write access (sending, answering prompts,
//! interrupting, status actions, sharing) belongs to the owner, and to the owner's org when
//! the session is team or public. Callers answer "not found" for a session the user cannot
//! see, so its existence is not revealed.
//!
//! What a credential may do at all is its [`Scope`]s: `sessions:read` for reading,
//! `sessions:write` for changing (and for a daemon's bridge), `admin` for everything.
//!
//! This module does no IO and keeps no state.

use cloud_protocol::session::{Session, Visibility};
use serde::{Deserialize, Serialize};

/// What a credential may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Scope {
    /// Read sessions, their logs and instances.
    #[serde(rename = "sessions:read")]
    SessionsRead,
    /// Create and change sessions, send events, connect a daemon's bridge.
    #[serde(rename = "sessions:write")]
    SessionsWrite,
    /// Everything, including the operator's endpoints.
    #[serde(rename = "admin")]
    Admin,
}

impl Scope {
    /// Every scope, by name.
    pub const ALL: [Scope; 3] = [Scope::SessionsRead, Scope::SessionsWrite, Scope::Admin];

    /// Its name, as on the command line and in token answers.
    pub fn name(self) -> &'static str {
        match self {
            Scope::SessionsRead => "sessions:read",
            Scope::SessionsWrite => "sessions:write",
            Scope::Admin => "admin",
        }
    }
}

impl std::str::FromStr for Scope {
    type Err = String;

    fn from_str(name: &str) -> Result<Scope, String> {
        Scope::ALL
            .into_iter()
            .find(|scope| scope.name() == name)
            .ok_or_else(|| {
                format!("unknown scope {name:?}: use sessions:read, sessions:write or admin")
            })
    }
}

/// An authenticated user: what a live API key or access token stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user's name.
    pub user: String,
    /// The org they act in.
    pub org: String,
    /// What they may do.
    pub scopes: Vec<Scope>,
    /// The hash of the API key the credential comes from, so open connections can notice
    /// its revocation.
    pub key_hash: String,
    /// The refresh-token family an access token belongs to (`None` for an API key), so
    /// open connections can notice the family's revocation.
    pub family: Option<String>,
    /// When the credential stops being valid, in milliseconds since the Unix epoch.
    pub expires_at: Option<u64>,
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
    /// Whether the credential grants `scope` (`admin` grants every scope).
    pub fn may(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope) || self.scopes.contains(&Scope::Admin)
    }

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
