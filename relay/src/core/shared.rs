//! What every task of a running relay shares ([`Shared`]), and what readers see of the
//! core's state: each session as of the last flushed round ([`Published`]), with a watch
//! of its last log seq and the entries its latest round appended, and the [`Notice`]s of
//! session changes that bridge connections replicate.
//!
//! Readers (REST handlers, bridge connections, log followers) query the published
//! sessions here and read logs from the store up to the published seq; they change
//! nothing but by sending the core a [`Command`]. Only the core publishes
//! (`Core::publish`, after each round's flush), so nothing unflushed is ever visible.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use cloud_protocol::session::{LogEntry, Session};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio_util::task::TaskTracker;

use super::{Command, CoreError, COMMAND_QUEUE};
use crate::access::{Access, Identity};
use crate::auth::Auth;
use crate::instances::Instances;
use crate::store::Store;

/// The most bytes of entries a published session keeps from its latest round (see
/// [`Published::recent`]); a round that appended more publishes none, and its followers
/// read the store.
const RECENT_BYTES: usize = 256 * 1024;

/// How many session notices a slow connection may fall behind before it resynchronises.
const NOTICE_QUEUE: usize = 1024;

/// A change to a session that connections replicate.
#[derive(Debug, Clone)]
pub enum Notice {
    /// Created or changed (boxed: a session is large beside an id).
    Changed(Box<Session>),
    /// Deleted.
    Removed(String),
}

/// A published session: what readers may see.
#[derive(Debug)]
pub struct Published {
    /// The session as of the last flushed round.
    pub session: Session,
    /// The last log seq on disk, for followers to wait on.
    pub log_seq: watch::Sender<u64>,
    /// The entries the latest round that appended any appended, in order, on disk (empty
    /// before the first, or when they were more than [`RECENT_BYTES`]): one round's worth
    /// at most, whatever the log's length.
    pub recent: Arc<[LogEntry]>,
}

/// State shared by every task of a running relay.
#[derive(Debug)]
pub struct Shared {
    /// API keys, access and refresh tokens.
    pub auth: Auth,
    /// The store, for log reads.
    pub store: Store,
    /// Published sessions by id.
    pub sessions: RwLock<HashMap<String, Published>>,
    /// Session changes, for bridge connections.
    pub notices: broadcast::Sender<Notice>,
    /// The core's command channel.
    pub core: mpsc::Sender<Command>,
    /// Tells every connection to close.
    pub cancel: tokio_util::sync::CancellationToken,
    /// Every connection task, so shutdown can wait for them.
    pub connections: TaskTracker,
    /// The connected daemon instances, for listing and instance commands.
    pub instances: Instances,
    /// Snapshot versions, blobs and workspaces.
    pub teleport: Arc<crate::teleport::Teleport>,
    /// How fast each API key may call.
    pub limits: crate::limits::Limiters,
    /// The operator's figures (`GET /metrics`).
    pub metrics: crate::metrics::RelayMetrics,
    /// The users' and orgs' settings.
    pub settings: crate::settings::Settings,
    /// Every session's connected clients.
    pub presence: Arc<crate::presence::Presence>,
    /// Where sessions run: their workspaces, the confinement of their programs.
    pub provider: Arc<crate::providers::Provider>,
    /// Shells in sessions' workspaces (`cloudctl session shell`).
    pub terminals: crate::terminal::Terminals,
}

impl Shared {
    /// The published session, if this user may see it, with their access.
    pub fn session_for(
        &self,
        identity: &Identity,
        id: &str,
    ) -> Result<(Session, Access), CoreError> {
        let sessions = self.sessions.read().unwrap();
        let published = sessions
            .get(id)
            .ok_or_else(|| CoreError::NotFound(id.to_owned()))?;
        match identity.access(&published.session) {
            Access::None => Err(CoreError::NotFound(id.to_owned())),
            access => Ok((published.session.clone(), access)),
        }
    }

    /// Whether this user may see the published session ([`Shared::session_for`] without
    /// the copy).
    pub fn can_see(&self, identity: &Identity, id: &str) -> bool {
        self.sessions
            .read()
            .unwrap()
            .get(id)
            .is_some_and(|p| !matches!(identity.access(&p.session), Access::None))
    }

    /// The sessions in this user's listing, oldest first.
    pub fn list_for(&self, identity: &Identity) -> Vec<Session> {
        let mut list: Vec<Session> = self
            .sessions
            .read()
            .unwrap()
            .values()
            .filter(|p| identity.lists(&p.session))
            .map(|p| p.session.clone())
            .collect();
        list.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        list
    }

    /// The published entries of the session's latest round after `after`, if they continue
    /// from it (`after + 1` is among them, or they start right after it).
    pub fn recent_after(&self, id: &str, after: u64) -> Option<(Arc<[LogEntry]>, usize)> {
        let recent = Arc::clone(&self.sessions.read().unwrap().get(id)?.recent);
        let first = recent.first()?.seq;
        let last = recent.last()?.seq;
        if first > after.saturating_add(1) || last <= after {
            return None;
        }
        let start = usize::try_from(after + 1 - first).unwrap_or(0);
        Some((recent, start))
    }

    /// A receiver of the session's published log seq.
    pub fn log_seq(&self, id: &str) -> Option<watch::Receiver<u64>> {
        self.sessions
            .read()
            .unwrap()
            .get(id)
            .map(|p| p.log_seq.subscribe())
    }

    /// Sends a command and waits for its reply.
    pub async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, CoreError> {
        let (reply, answer) = oneshot::channel();
        self.core
            .send(make(reply))
            .await
            .map_err(|_| CoreError::ShuttingDown)?;
        answer.await.map_err(|_| CoreError::ShuttingDown)
    }
}

/// Builds the shared state; the core's receiver is returned for [`Core::start`](super::Core::start).
pub fn shared(
    auth: Auth,
    store: Store,
    teleport: Arc<crate::teleport::Teleport>,
    limits: crate::limits::Limits,
    settings: crate::settings::Settings,
    presence: crate::presence::PresenceConfig,
    provider: Arc<crate::providers::Provider>,
) -> (Arc<Shared>, mpsc::Receiver<Command>) {
    let (core, commands) = mpsc::channel(COMMAND_QUEUE);
    let shared = Shared {
        auth,
        store,
        sessions: RwLock::default(),
        notices: broadcast::channel(NOTICE_QUEUE).0,
        core,
        cancel: tokio_util::sync::CancellationToken::new(),
        connections: TaskTracker::new(),
        instances: Instances::default(),
        teleport,
        limits: crate::limits::Limiters::new(limits),
        metrics: crate::metrics::RelayMetrics::default(),
        settings,
        presence: Arc::new(crate::presence::Presence::new(presence)),
        provider,
        terminals: crate::terminal::Terminals::new(),
    };
    (Arc::new(shared), commands)
}

/// What a published session keeps of its latest round's entries: all of them, unless they
/// are larger than [`RECENT_BYTES`].
pub(super) fn recent(entries: Vec<LogEntry>) -> Arc<[LogEntry]> {
    let bytes: usize = entries.iter().map(LogEntry::approx_len).sum();
    if bytes > RECENT_BYTES {
        return Arc::new([]);
    }
    entries.into()
}

#[cfg(test)]
mod tests {
    use cloud_protocol::session::{Author, NetworkAccess, SessionEvent, SessionStatus, Visibility};

    use super::*;

    #[test]
    fn a_follower_takes_the_latest_round_from_memory_only_when_it_continues_its_cursor() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        let teleport =
            crate::teleport::Teleport::open(dir.path(), dir.path().join("workspaces")).unwrap();
        let (shared, _commands) = shared(
            Auth::open(
                dir.path(),
                crate::auth::DEFAULT_ACCESS_TOKEN_TTL,
                Default::default(),
            )
            .unwrap(),
            store,
            Arc::new(teleport),
            crate::limits::Limits::OFF,
            crate::settings::Settings::open(dir.path()).unwrap(),
            Default::default(),
            Arc::new(crate::providers::Provider::new(
                Default::default(),
                dir.path(),
                dir.path().join("workspaces"),
            )),
        );
        let entry = |seq: u64, text: String| LogEntry {
            seq,
            at: seq,
            author: Author::Agent,
            event: SessionEvent::Message(text),
        };
        let session = Session {
            id: "s-1".to_owned(),
            status: SessionStatus::Running,
            created_at: 1,
            last_activity: 1,
            task: String::new(),
            visibility: Visibility::Private,
            repo_access: cloud_protocol::session::RepoAccess::Read,
            network_access: NetworkAccess::Full,
            vm_image: String::new(),
            owner: "u".to_owned(),
            org: "o".to_owned(),
            failure: None,
            last_seq: 7,
            snapshot: None,
            auto_stop_minutes: 0,
            clients: Vec::new(),
            provider: Default::default(),
            allowed_domains: Vec::new(),
        };
        let round = (5..=7).map(|seq| entry(seq, seq.to_string())).collect();
        shared.sessions.write().unwrap().insert(
            "s-1".to_owned(),
            Published {
                session,
                log_seq: watch::channel(7).0,
                recent: recent(round),
            },
        );
        let taken = |after| {
            shared
                .recent_after("s-1", after)
                .map(|(all, start)| all[start..].iter().map(|e| e.seq).collect::<Vec<_>>())
        };
        // A gap before the round (or nothing new): the store is read instead.
        assert_eq!(taken(3), None);
        assert_eq!(taken(4), Some(vec![5, 6, 7]));
        assert_eq!(taken(6), Some(vec![7]));
        assert_eq!(taken(7), None);
        assert_eq!(taken(9), None);
        assert!(shared.recent_after("s-2", 0).is_none());
        // A round larger than RECENT_BYTES is not kept.
        assert!(recent(vec![entry(8, "x".repeat(RECENT_BYTES + 1))]).is_empty());
    }
}
