//! Teleport, the relay's side: each session's tree as numbered snapshot versions, the
//! blobs they are made of, and the session's workspace kept equal to the newest version.
//!
//! - [`blobs`]: the content-addressed blob store (per org, checked before stored).
//! - [`snapshots`]: versions per session; a commit only on the newest version.
//! - [`materialise`]: writing a version's changes into the workspace.
//! - [`watch`]: watching a workspace while its agent runs, so its edits become versions
//!   as they are made.
//!
//! A daemon's push commits a delta (its blobs uploaded first on the blob socket); the
//! relay writes it into the workspace and announces the version in the session's log
//! (`SessionEvent::Snapshot`). The agent's own edits become versions too: after each of
//! its turns, before a daemon asks for changes, and while its agent runs whenever the
//! workspace's watch sees it change, the workspace is scanned through an index kept in
//! memory, and what changed since the newest version is committed as the agent's (one
//! capture path, [`Teleport::capture`]).
//!
//! Architecture invariants: teleport work never runs on the core task (the core only logs
//! the announcement) nor on a connection's loop (requests run as tasks of their own);
//! one commit or capture per session at a time; nothing is written outside a workspace.

pub mod blobs;
pub mod materialise;
pub mod snapshots;
pub mod staging;
pub mod watch;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use cloud_protocol::blobs::{Blob, BATCH_BYTES};
use cloud_protocol::session::Author;
use cloud_protocol::teleport::{
    BundleRef, ContentId, Delta, GitState, RelPath, TeleportReply, TeleportRequest, VersionAuthor,
    VersionInfo, MAX_LACKS_IDS,
};
use cloud_tree::{git, Index, Root, ScanOptions};

use crate::access::{Access, Identity};
use crate::core::{Command, Shared};
use blobs::BlobStore;
use snapshots::{Commit, Snapshots};

/// The teleport service.
#[derive(Debug)]
pub struct Teleport {
    pub(crate) snapshots: Snapshots,
    pub blobs: BlobStore,
    workspaces: PathBuf,
    /// Each session's workspace index (what the last capture saw).
    indexes: Mutex<HashMap<String, Index>>,
    /// One commit or capture per session at a time.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The watched workspaces, by session.
    watches: Mutex<HashMap<String, watch::Running>>,
    /// What the relay itself just wrote into each workspace (a push materialised).
    own_writes: Mutex<HashMap<String, OwnWrites>>,
    /// Pushes' files written beside the workspaces while they upload.
    pub stages: staging::Stages,
}

/// The paths of a push the relay just wrote into a workspace, and until when events on
/// them are taken for the echo of those writes rather than the agent's edits.
#[derive(Debug)]
struct OwnWrites {
    paths: std::collections::BTreeSet<RelPath>,
    until: std::time::Instant,
}

/// How long after a push is written the workspace's events on its paths are its echo.
/// An agent's edit of one of those very paths within it is found by the capture after the
/// agent's turn (or any later one) instead.
const OWN_WRITES_ECHO: std::time::Duration = std::time::Duration::from_secs(1);

/// How often unused staged files are looked for.
const STAGING_SWEEP: std::time::Duration = std::time::Duration::from_secs(60);

/// Runs blocking work on the blocking pool.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    cloud_tree::bulk::spawn(work)
        .await
        .map_err(|e| format!("a teleport task failed: {e}"))?
}

impl Teleport {
    /// Opens the snapshot store under `data_dir` (`snapshots/`, `blobs/`); workspaces are
    /// `workspaces/<session>`.
    pub fn open(data_dir: &Path, workspaces: PathBuf) -> Result<Teleport, String> {
        let snapshots = Snapshots::open(&data_dir.join("snapshots")).map_err(|e| e.to_string())?;
        Ok(Teleport {
            snapshots,
            blobs: BlobStore::new(data_dir.join("blobs")),
            indexes: Mutex::new(HashMap::new()),
            locks: Mutex::new(HashMap::new()),
            watches: Mutex::new(HashMap::new()),
            own_writes: Mutex::new(HashMap::new()),
            stages: staging::Stages::open(&workspaces),
            workspaces,
        })
    }

    /// Removes the staged files of pushes that were never committed
    /// ([`staging::Stages::expire`]), looking every [`STAGING_SWEEP`], until `cancel`.
    pub fn sweep_staging(
        self: Arc<Self>,
        cancel: tokio_util::sync::CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(STAGING_SWEEP);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = interval.tick() => {}
                }
                let this = Arc::clone(&self);
                let swept = cloud_tree::bulk::spawn(move || {
                    for leftovers in this.stages.expire(staging::STAGED_IDLE) {
                        tracing::debug!("removing the staged files of a push never committed");
                        leftovers.remove();
                    }
                });
                let _ = swept.await;
            }
        })
    }

    async fn hold(&self, session: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self.locks.lock().expect("teleport locks poisoned");
            Arc::clone(locks.entry(session.to_owned()).or_default())
        };
        lock.lock_owned().await
    }

    /// Answers a daemon's teleport request.
    pub async fn handle(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
        identity: &Identity,
        instance_id: &str,
        request: TeleportRequest,
    ) -> Result<TeleportReply, String> {
        let (session, access) = shared
            .session_for(identity, request.session())
            .map_err(|e| e.to_string())?;
        let writes = !matches!(request, TeleportRequest::Changes { .. });
        if writes && access != Access::Write {
            return Err(format!(
                "you may not change session {}: it is {}'s",
                session.id, session.owner
            ));
        }
        match request {
            TeleportRequest::Lacks { ids, .. } => {
                if ids.len() > MAX_LACKS_IDS {
                    return Err(format!("at most {MAX_LACKS_IDS} ids per question"));
                }
                let (this, org) = (Arc::clone(self), session.org.clone());
                let lacking =
                    blocking(move || this.blobs.lacks(&org, &ids).map_err(|e| e.to_string()))
                        .await?;
                Ok(TeleportReply::Lacks(lacking))
            }
            TeleportRequest::Commit {
                base,
                delta,
                mut git,
                ..
            } => {
                let _held = self.hold(&session.id).await;
                let (this, id, org) = (Arc::clone(self), session.id.clone(), session.org.clone());
                let author = VersionAuthor::Instance(instance_id.to_owned());
                // The history travels beside the version, not in it.
                let bundle = git.as_mut().and_then(|g| g.bundle.take());
                let committed = blocking(move || {
                    if let Some(bundle) = &bundle {
                        let lacking = this
                            .blobs
                            .lacks(&org, &bundle.blobs())
                            .map_err(|e| e.to_string())?;
                        if !lacking.is_empty() {
                            return Err(format!(
                                "the commit's git bundle needs {} blob(s) the relay does not have",
                                lacking.len()
                            ));
                        }
                    }
                    let now = crate::now_millis();
                    let began = std::time::Instant::now();
                    let workspace = this.workspaces.join(&id);
                    // The version's files are written while the version itself is.
                    let (outcome, materialised) = this
                        .snapshots
                        .commit_alongside(
                            &id,
                            &org,
                            &this.blobs,
                            base,
                            &delta,
                            git.clone(),
                            author,
                            now,
                            |info| {
                                let began = std::time::Instant::now();
                                // Before writing (the watch sees the events as they
                                // happen); the echo lasts from the end.
                                this.wrote(&id, &delta);
                                let staged = this.stages.get(&id);
                                if let Some(stage) = &staged {
                                    stage.settle();
                                    tracing::debug!(session = %id, "staging settled after {:?}", began.elapsed());
                                }
                                let problems = materialise::materialise(
                                    &workspace,
                                    &delta,
                                    &this.blobs,
                                    &org,
                                    staged.as_deref(),
                                );
                                // What the commit took or did not is of no later use.
                                let leftovers = this.stages.clear(&id);
                                this.echo_from_now(&id);
                                tracing::debug!(session = %id, version = info.version, "materialised in {:?}", began.elapsed());
                                (problems, leftovers)
                            },
                        )
                        .map_err(|e| e.to_string())?;
                    let materialised = materialised.map(|(problems, leftovers)| {
                        // Removed beside the answer, not before it.
                        drop(cloud_tree::bulk::spawn(move || leftovers.remove()));
                        problems
                    });
                    if let Commit::Committed(info) = &outcome {
                        tracing::debug!(session = %id, version = info.version, changes = delta.changes.len(), "committed in {:?}", began.elapsed());
                        if let Some(problems) = materialised {
                            for problem in problems? {
                                tracing::warn!(session = %id, "cannot materialise {problem}");
                            }
                            if let Some(state) = &git {
                                if let Err(e) =
                                    this.follow_head(&workspace, &org, state, bundle.as_ref())
                                {
                                    tracing::warn!(session = %id, "the workspace's repository does not follow the push: {e}");
                                }
                            }
                        }
                    }
                    Ok(outcome)
                })
                .await?;
                match committed {
                    Commit::Stale { current } => Ok(TeleportReply::Stale { current }),
                    Commit::Committed(info) => {
                        if info.version > base {
                            announce(
                                shared,
                                &session.id,
                                Author::User(identity.user.clone()),
                                &info,
                            )
                            .await;
                        }
                        Ok(TeleportReply::Committed(info))
                    }
                }
            }
            TeleportRequest::GitBundle { head, have, .. } => {
                let _held = self.hold(&session.id).await;
                let (this, id, org) = (Arc::clone(self), session.id.clone(), session.org.clone());
                let bundle = blocking(move || this.export(&id, &org, &head, &have)).await?;
                Ok(TeleportReply::GitBundle(bundle))
            }
            TeleportRequest::Changes { since, .. } => {
                // What the agent changed since its last turn is a version too.
                self.capture(shared, &session.id, &session.org).await;
                let (this, id) = (Arc::clone(self), session.id.clone());
                let (newest, delta) = blocking(move || {
                    this.snapshots
                        .changes(&id, since)
                        .map_err(|e| e.to_string())
                })
                .await?;
                Ok(TeleportReply::Changes { newest, delta })
            }
        }
    }

    /// Records that a push's `delta` was just written into `session`'s workspace.
    fn wrote(&self, session: &str, delta: &Delta) {
        let paths = delta.changes.iter().map(|c| c.path().clone()).collect();
        self.own_writes
            .lock()
            .expect("teleport own writes poisoned")
            .insert(
                session.to_owned(),
                OwnWrites {
                    paths,
                    until: std::time::Instant::now() + OWN_WRITES_ECHO,
                },
            );
    }

    /// Makes the echo of the push just written into `session`'s workspace last
    /// [`OWN_WRITES_ECHO`] from now (the writes took a while).
    fn echo_from_now(&self, session: &str) {
        if let Some(writes) = self
            .own_writes
            .lock()
            .expect("teleport own writes poisoned")
            .get_mut(session)
        {
            writes.until = std::time::Instant::now() + OWN_WRITES_ECHO;
        }
    }

    /// Whether every one of `paths` (a workspace's events) is at or under a path the
    /// relay itself wrote there moments ago: the echo of a push, not the agent's edits.
    pub(crate) fn only_own_writes(&self, session: &str, paths: &[RelPath]) -> bool {
        let mut own = self
            .own_writes
            .lock()
            .expect("teleport own writes poisoned");
        let Some(writes) = own.get(session) else {
            return false;
        };
        if std::time::Instant::now() > writes.until {
            own.remove(session);
            return false;
        }
        paths.iter().all(|path| {
            let mut at = Some(path.clone());
            while let Some(p) = at {
                if writes.paths.contains(&p) {
                    return true;
                }
                at = p.parent();
            }
            false
        })
    }

    /// Records what the agent changed in the workspace since the newest version as a new
    /// version (the agent's), and announces it. The session is held throughout, as a
    /// commit holds it while it materialises: a capture never sees a push half written,
    /// and a tree equal to the newest version's (what a push just wrote) makes no version.
    /// Returns false when it failed (logged; the next capture tries again).
    pub async fn capture(self: &Arc<Self>, shared: &Arc<Shared>, session: &str, org: &str) -> bool {
        let _held = self.hold(session).await;
        let (this, id, org_owned) = (Arc::clone(self), session.to_owned(), org.to_owned());
        let captured = blocking(move || this.capture_held(&id, &org_owned)).await;
        match captured {
            Ok(Some(info)) => {
                announce(shared, session, Author::Agent, &info).await;
                true
            }
            Ok(None) => true,
            Err(e) => {
                tracing::warn!(%session, "cannot record the agent's edits: {e}");
                false
            }
        }
    }

    /// Makes the workspace's repository follow a pushed HEAD: the bundle's history
    /// fetched in (the repository made first if there is none), HEAD and the branch moved
    /// there, the index reset to it (files untouched).
    fn follow_head(
        &self,
        workspace: &Path,
        org: &str,
        state: &GitState,
        bundle: Option<&BundleRef>,
    ) -> Result<(), String> {
        if let Some(bundle) = bundle {
            let file =
                tempfile::NamedTempFile::new_in(self.blobs.temp_dir().map_err(|e| e.to_string())?)
                    .map_err(|e| format!("cannot make a temp file: {e}"))?;
            self.assemble(org, &bundle.blobs(), file.path())?;
            git::receive(workspace, file.path(), "HEAD", "refs/cloudd/incoming", true)?;
        }
        git::set_head(workspace, &state.head, state.branch.as_deref())
    }

    /// Writes the blobs `ids` of `org`, in order, to `path`.
    fn assemble(&self, org: &str, ids: &[ContentId], path: &Path) -> Result<(), String> {
        let mut out = std::fs::File::create(path).map_err(|e| e.to_string())?;
        for id in ids {
            let bytes = self
                .blobs
                .get(org, id)
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("blob {id} is not in the store"))?;
            std::io::Write::write_all(&mut out, &bytes).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// A bundle of the workspace's history up to `head` without what `have` holds, stored
    /// as blobs of `org`.
    fn export(
        &self,
        session: &str,
        org: &str,
        head: &str,
        have: &[String],
    ) -> Result<BundleRef, String> {
        let workspace = self.workspaces.join(session);
        if !git::has_commit(&workspace, head) {
            return Err(format!(
                "the session's repository does not have commit {head}"
            ));
        }
        git::set_ref(&workspace, "refs/cloudd/export", head)?;
        let file =
            tempfile::NamedTempFile::new_in(self.blobs.temp_dir().map_err(|e| e.to_string())?)
                .map_err(|e| format!("cannot make a temp file: {e}"))?;
        if !git::bundle(&workspace, "refs/cloudd/export", have, file.path())? {
            return Err(format!("nothing to send: the daemon has {head} already"));
        }
        let content = cloud_tree::hash_file(file.path()).map_err(|e| e.to_string())?;
        let bundle = BundleRef {
            size: content.size,
            content: content.content,
            chunks: content.chunks,
        };
        let bytes = std::fs::read(file.path()).map_err(|e| e.to_string())?;
        let mut offset = 0usize;
        let mut batch = Vec::new();
        for id in bundle.blobs() {
            let len = if bundle.chunks.is_empty() {
                bytes.len()
            } else {
                bundle
                    .chunks
                    .iter()
                    .find(|c| c.id == id)
                    .map_or(0, |c| c.len as usize)
            };
            let blob = Blob {
                id,
                bytes: bytes[offset..offset + len].to_vec(),
            };
            offset += len;
            batch.push(blob);
        }
        self.blobs.put(org, &batch).map_err(|e| e.to_string())?;
        Ok(bundle)
    }

    fn capture_held(&self, session: &str, org: &str) -> Result<Option<VersionInfo>, String> {
        let workspace = self.workspaces.join(session);
        if !workspace.is_dir() {
            return Ok(None);
        }
        let previous = self
            .indexes
            .lock()
            .expect("teleport indexes poisoned")
            .get(session)
            .cloned()
            .unwrap_or_default();
        let scan = cloud_tree::scan(&workspace, &previous, &ScanOptions { threads: 1 })
            .map_err(|e| e.to_string())?;
        let newest = self.snapshots.newest(session).map_err(|e| e.to_string())?;
        let manifest = self
            .snapshots
            .manifest(session)
            .map_err(|e| e.to_string())?;
        let delta = manifest.diff(&scan.manifest);
        self.indexes
            .lock()
            .expect("teleport indexes poisoned")
            .insert(session.to_owned(), scan.index);
        // The agent's commits are part of its edits (the workspace's HEAD and branch).
        let git = git::state(&workspace).or_else(|| newest.git.clone());
        if delta.is_empty() && git == newest.git {
            return Ok(None);
        }
        // The agent's new contents go to the blob store first.
        let ids = delta.blobs();
        let lacking = self.blobs.lacks(org, &ids).map_err(|e| e.to_string())?;
        if !lacking.is_empty() {
            let root = Root::open(&workspace).map_err(|e| e.to_string())?;
            let locations = cloud_tree::blob_locations(&scan.manifest);
            // Stored a batch (one pack) at a time.
            let mut batch = Vec::new();
            let mut batch_bytes = 0;
            for id in lacking {
                let at = locations
                    .get(&id)
                    .ok_or_else(|| format!("blob {id} is in no file"))?;
                // A file the agent is still writing fails its hash: caught next time.
                let bytes = cloud_tree::read_blob(&root, &at.path, at.offset, at.len, id)
                    .map_err(|e| e.to_string())?;
                batch_bytes += bytes.len();
                batch.push(Blob { id, bytes });
                if batch_bytes >= BATCH_BYTES {
                    self.blobs.put(org, &batch).map_err(|e| e.to_string())?;
                    batch.clear();
                    batch_bytes = 0;
                }
            }
            self.blobs.put(org, &batch).map_err(|e| e.to_string())?;
        }
        match self
            .snapshots
            .commit(
                session,
                org,
                &self.blobs,
                newest.version,
                &delta,
                git,
                VersionAuthor::Agent,
                crate::now_millis(),
            )
            .map_err(|e| e.to_string())?
        {
            Commit::Committed(info) => Ok(Some(info)),
            // Not while this session is held.
            Commit::Stale { .. } => Ok(None),
        }
    }

    /// Forgets a deleted session's versions and removes its workspace, holding the
    /// session: a capture that was waiting for it then finds no workspace, and records
    /// nothing for a session that is gone.
    pub async fn delete_session(self: &Arc<Self>, session: &str) {
        self.unwatch(session);
        let _held = self.hold(session).await;
        self.indexes
            .lock()
            .expect("teleport indexes poisoned")
            .remove(session);
        let (this, id) = (Arc::clone(self), session.to_owned());
        if let Err(e) = blocking(move || {
            this.snapshots
                .delete_session(&id)
                .map_err(|e| e.to_string())
        })
        .await
        {
            tracing::warn!(%session, "cannot forget the session's versions: {e}");
        }
        let (this, id) = (Arc::clone(self), session.to_owned());
        let _ = blocking(move || {
            this.stages.forget(&id);
            Ok(())
        })
        .await;
        let workspace = self.workspaces.join(session);
        if let Err(e) = tokio::fs::remove_dir_all(&workspace).await {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %workspace.display(), error = %e, "cannot remove a workspace");
            }
        }
    }
}

/// Logs a new version in the session's log (through the core, the only writer of logs).
async fn announce(shared: &Arc<Shared>, session: &str, author: Author, info: &VersionInfo) {
    let logged = shared
        .call(|reply| Command::Snapshot {
            session: session.to_owned(),
            author,
            info: info.clone(),
            reply,
        })
        .await;
    if let Err(e) | Ok(Err(e)) = logged.map(|r| r.map(drop)) {
        tracing::warn!(%session, "cannot announce version {}: {e}", info.version);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloud_protocol::teleport::Change;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    #[test]
    fn only_the_echo_of_a_push_just_written_is_taken_for_the_relays_own() {
        let dir = tempfile::tempdir().unwrap();
        let teleport = Teleport::open(dir.path(), dir.path().join("workspaces")).unwrap();
        assert!(!teleport.only_own_writes("s-1", &[p("a")]));
        teleport.wrote(
            "s-1",
            &Delta {
                changes: vec![Change::Remove(p("gone")), Change::Remove(p("src/x"))],
            },
        );
        // What it wrote, and what is under a path it wrote (a removed tree's files).
        assert!(teleport.only_own_writes("s-1", &[p("src/x"), p("gone/deep/file")]));
        // Anything else is the agent's, and so is every event of another session.
        assert!(!teleport.only_own_writes("s-1", &[p("src/x"), p("src/y")]));
        assert!(!teleport.only_own_writes("s-1", &[p("src")]));
        assert!(!teleport.only_own_writes("s-2", &[p("src/x")]));
        // Not for long.
        teleport
            .own_writes
            .lock()
            .unwrap()
            .get_mut("s-1")
            .unwrap()
            .until = std::time::Instant::now() - std::time::Duration::from_millis(1);
        assert!(!teleport.only_own_writes("s-1", &[p("src/x")]));
    }
}
