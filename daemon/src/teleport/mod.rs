//! Teleport: a worktree's exact state (uncommitted and untracked files included) goes to a
//! session as a snapshot version, and the session's versions (the agent's edits) come
//! back, without ever overwriting local work silently.
//!
//! The story, module by module:
//! - [`worktrees`]: the links (root ↔ session), the tree both sides last agreed on, and
//!   the scanner's index, in the store's `teleport` tree.
//! - [`local`]: scanning a worktree through its index; reading the blobs a push sends.
//! - [`push`]: scan → delta against the agreed tree → the blobs the relay lacks → commit
//!   on the agreed version; a stale base is merged in (a pull) and committed again.
//! - [`pull`]: the session's changes since the agreed version → the three-way merge with
//!   the worktree as scanned → [`apply`], which writes it (temp file + rename, re-checked
//!   just before each replace; a change on both sides keeps both).
//! - [`transfer`]: the blob socket, beside the bridge: file contents never travel in the
//!   ordered task stream.
//! - `cloud_tree::git`: HEAD and branch, recorded with each version, and the history that
//!   travels as bundles.
//! - [`watch`]: the daemon's watches: file-system events (debounced) become incremental
//!   pushes, the session's new versions become pulls, until stopped; they resume when the
//!   daemon starts.
//!
//! Architecture invariants: scanning, hashing, reading and writing files run on the
//! blocking pool, never on the socket's thread; one operation per worktree at a time;
//! nothing from the relay is written outside a worktree's root (the safe writer of
//! `cloud_tree`, and `RelPath` on every path).

pub mod apply;
pub mod db;
pub mod local;
pub mod pull;
pub mod push;
pub mod transfer;
pub mod watch;
pub mod worktrees;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use cloud_protocol::ipc::{Notification, TeleportLink, TeleportProgress};
use cloud_protocol::teleport::{TeleportReply, TeleportRequest};
use tokio::sync::{broadcast, mpsc};

use crate::link::Link;
use crate::store::StoreError;
use worktrees::{Worktree, Worktrees};

/// How many times a push scans again (a file changed while it was read) or merges again
/// (the session moved on meanwhile) before giving up.
pub const MAX_ATTEMPTS: usize = 5;

/// How many teleport notifications a subscriber may fall behind.
pub const FEED_CAPACITY: usize = 1024;

/// Why a teleport operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TeleportError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Local(String),
    #[error("{path} is not a directory")]
    NotADirectory { path: String },
    #[error("the relay: {0}")]
    Relay(String),
    #[error("the blob transfer: {0}")]
    Transfer(#[from] transfer::TransferError),
    #[error("{0} changed while it was being sent")]
    ChangedDuringPush(String),
    #[error("{root} is linked to session {linked}; pull with --session {linked}, or push to link it to another")]
    LinkedElsewhere { root: String, linked: String },
    #[error("{0} is not linked to a session: give one with --session")]
    NotLinked(String),
    #[error("{0}")]
    GaveUp(String),
}

/// Progress of one operation: to the client that asked for it (a bounded queue: a client
/// that reads slowly skips steps, never blocks the work) and, for watches, to the
/// teleport feed.
#[derive(Debug, Clone)]
pub struct Reporter {
    root: String,
    session: String,
    client: Option<mpsc::Sender<TeleportProgress>>,
    feed: Option<broadcast::Sender<Arc<Notification>>>,
}

/// How many progress steps wait for a slow client before newer ones are dropped.
pub const PROGRESS_QUEUE: usize = 16;

impl Reporter {
    /// Reports nowhere.
    pub fn silent() -> Reporter {
        Reporter {
            root: String::new(),
            session: String::new(),
            client: None,
            feed: None,
        }
    }

    /// Reports to `client` (the connection that asked) and/or `feed` (the teleport topic).
    pub fn new(
        root: &str,
        session: &str,
        client: Option<mpsc::Sender<TeleportProgress>>,
        feed: Option<broadcast::Sender<Arc<Notification>>>,
    ) -> Reporter {
        Reporter {
            root: root.to_owned(),
            session: session.to_owned(),
            client,
            feed,
        }
    }

    /// The same reporter, for the worktree at `root` linked to `session`.
    pub fn for_link(&self, root: &str, session: &str) -> Reporter {
        Reporter {
            root: root.to_owned(),
            session: session.to_owned(),
            ..self.clone()
        }
    }

    pub fn report(&self, phase: &str, done: u64, total: u64, bytes_done: u64, bytes_total: u64) {
        if self.client.is_none() && self.feed.is_none() {
            return;
        }
        let progress = TeleportProgress {
            root: self.root.clone(),
            session: self.session.clone(),
            phase: phase.to_owned(),
            done,
            total,
            bytes_done,
            bytes_total,
        };
        if let Some(feed) = &self.feed {
            let _ = feed.send(Arc::new(Notification::TeleportProgress(progress.clone())));
        }
        if let Some(client) = &self.client {
            let _ = client.try_send(progress);
        }
    }
}

/// The teleport service the IPC handlers call.
#[derive(Debug)]
pub struct Teleport {
    pub worktrees: Worktrees,
    link: Arc<Link>,
    /// One operation per root at a time.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The teleport topic.
    pub feed: broadcast::Sender<Arc<Notification>>,
    /// The running watches, by root.
    watches: watch::Watches,
    /// Work left running after its caller was answered (a push's bookkeeping).
    background: tokio_util::task::TaskTracker,
    /// Links whose push was answered and whose record is still being written, as they
    /// will be recorded: `teleport status` shows these.
    recording: Mutex<HashMap<String, Worktree>>,
}

impl Teleport {
    pub fn new(worktrees: Worktrees, link: Arc<Link>) -> Teleport {
        Teleport {
            worktrees,
            link,
            locks: Mutex::new(HashMap::new()),
            feed: broadcast::channel(FEED_CAPACITY).0,
            watches: Mutex::new(HashMap::new()),
            background: tokio_util::task::TaskTracker::new(),
            recording: Mutex::new(HashMap::new()),
        }
    }

    /// Waits until the work left running after its caller was answered is done (the
    /// drain: a push's version is recorded in its link before the daemon exits).
    pub async fn background_done(&self) {
        self.background.close();
        self.background.wait().await;
        self.background.reopen();
    }

    /// Holds the worktree at `root` for one operation.
    async fn hold(&self, root: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self.locks.lock().expect("teleport locks poisoned");
            Arc::clone(locks.entry(root.to_owned()).or_default())
        };
        lock.lock_owned().await
    }

    /// Asks the relay, through the bridge.
    async fn request(&self, request: TeleportRequest) -> Result<TeleportReply, TeleportError> {
        self.link
            .teleport_request(request)
            .await
            .map_err(TeleportError::Relay)
    }

    /// Runs `work` on a new connection to the relay's blob socket, on the bulk I/O thread
    /// (`cloud_tree::bulk::spawn_io`): a batch's megabytes are framed, masked and copied
    /// there, never on the runtime's thread, which carries every message. `work` closes
    /// the socket. Stopped if the caller stops waiting for it.
    async fn on_blob_socket<T, Fut>(
        &self,
        work: impl FnOnce(transfer::BlobSocket) -> Fut + Send + 'static,
    ) -> Result<T, TeleportError>
    where
        T: Send + 'static,
        Fut: std::future::Future<Output = Result<T, transfer::TransferError>> + Send + 'static,
    {
        let endpoint = self.link.blob_endpoint().ok_or_else(|| {
            TeleportError::Relay("the relay is not connected; try again once it is".into())
        })?;
        let task =
            tokio_util::task::AbortOnDropHandle::new(cloud_tree::bulk::spawn_io(async move {
                work(transfer::BlobSocket::connect(&endpoint).await?).await
            }));
        Ok(task
            .await
            .map_err(|e| TeleportError::Local(format!("a blob transfer failed: {e}")))??)
    }

    /// Runs blocking work on the blocking pool.
    async fn blocking<T: Send + 'static>(
        work: impl FnOnce() -> Result<T, TeleportError> + Send + 'static,
    ) -> Result<T, TeleportError> {
        cloud_tree::bulk::spawn(work)
            .await
            .map_err(|e| TeleportError::Local(format!("a teleport task failed: {e}")))?
    }

    /// Every linked worktree, as `teleport status` shows it.
    pub async fn status(&self) -> Result<Vec<TeleportLink>, TeleportError> {
        // Taken before the records are read: a link recorded meanwhile is read fresh.
        let recording = self.recording();
        let worktrees = self.worktrees.clone();
        let list = Self::blocking(move || Ok(worktrees.list()?)).await?;
        Ok(list
            .into_iter()
            .map(|w| self.link_view(recording.get(&w.root).unwrap_or(&w)))
            .collect())
    }

    /// The view of one linked worktree.
    pub async fn link_of(&self, root: &str) -> Result<Option<TeleportLink>, TeleportError> {
        let recording = self.recording();
        let worktrees = self.worktrees.clone();
        let root = root.to_owned();
        Ok(Self::blocking(move || Ok(worktrees.get(&root)?))
            .await?
            .map(|w| self.link_view(recording.get(&w.root).unwrap_or(&w))))
    }

    /// The links whose push was answered and whose record is still being written.
    fn recording(&self) -> HashMap<String, Worktree> {
        self.recording
            .lock()
            .expect("teleport recording poisoned")
            .clone()
    }

    /// A link as `teleport status` shows it, with its watch's health.
    fn link_view(&self, worktree: &Worktree) -> TeleportLink {
        let health = worktree
            .watching
            .then(|| self.watch_health(&worktree.root))
            .flatten();
        let (watcher, pending) = match (worktree.watching, health) {
            (false, _) => ("-".to_owned(), 0),
            (true, Some(health)) => (health.watcher, health.pending),
            (true, None) => (
                "not running (it starts with the daemon; `teleport watch` starts it now)"
                    .to_owned(),
                0,
            ),
        };
        TeleportLink {
            root: worktree.root.clone(),
            session: worktree.session.clone(),
            version: worktree.version,
            remote_version: worktree.remote_version,
            watching: worktree.watching,
            pending,
            conflicts: worktree.conflicts.clone(),
            watcher,
            last_error: worktree.last_error.clone(),
        }
    }
}

/// `path` made absolute and canonical; `create`: made first if missing.
pub fn canonical_root(path: &str, create: bool) -> Result<String, TeleportError> {
    let path = Path::new(path);
    if !path.is_absolute() {
        return Err(TeleportError::Local(format!(
            "{} is not an absolute path",
            path.display()
        )));
    }
    if create {
        create_root(path)?;
    }
    let canonical = std::fs::canonicalize(path)
        .map_err(|e| TeleportError::Local(format!("{}: {e}", path.display())))?;
    if !canonical.is_dir() {
        return Err(TeleportError::NotADirectory {
            path: canonical.display().to_string(),
        });
    }
    canonical
        .to_str()
        .map(str::to_owned)
        .ok_or_else(|| TeleportError::Local(format!("{} is not UTF-8", canonical.display())))
}

/// Makes the directory `path` and its missing parents, each 0755 whatever the umask (the
/// daemon's is 077, and a worktree is the user's, as the directories a pull writes are).
/// Directories that exist are left as they are.
fn create_root(path: &Path) -> Result<(), TeleportError> {
    let cannot = |what: &Path, e: std::io::Error| {
        TeleportError::Local(format!("cannot create {}: {e}", what.display()))
    };
    let missing: Vec<&Path> = path
        .ancestors()
        .take_while(|dir| std::fs::symlink_metadata(dir).is_err())
        .collect();
    std::fs::create_dir_all(path).map_err(|e| cannot(path, e))?;
    #[cfg(unix)]
    for dir in missing.into_iter().rev() {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| cannot(dir, e))?;
    }
    Ok(())
}
