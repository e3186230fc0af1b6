//! A push: the worktree as it is now becomes the session's next snapshot version.
//!
//! Scan (through the index) → the delta from the tree both sides agreed on → the blobs the
//! relay lacks, read off the socket's thread and uploaded on the blob socket → a commit on
//! the agreed version. The relay refuses a stale base: the newer version is then merged in
//! (a pull: local work is kept, a change on both sides keeps both) and the push starts
//! again, at most [`super::MAX_ATTEMPTS`] times. A file that changes while it is read
//! makes the push scan again.
//!
//! This module never writes worktree files itself (a merge goes through `pull`).

use std::sync::Arc;

use cloud_protocol::ipc::TeleportOutcome;
use std::collections::HashMap;
use std::path::Path;

use cloud_protocol::teleport::{
    BundleRef, Change, ContentId, Delta, GitState, Manifest, TeleportReply, TeleportRequest,
    VersionInfo, MAX_LACKS_IDS,
};
use tokio::sync::mpsc;

use super::transfer::{Batch, TransferError};
use super::worktrees::{Worktree, Worktrees};
use super::{local, Reporter, Teleport, TeleportError, MAX_ATTEMPTS};

/// What a push did.
#[derive(Debug)]
pub(super) struct Pushed {
    pub outcome: TeleportOutcome,
    /// Whether it made a version (a quiet push of an unchanged tree does not).
    pub committed: bool,
    /// The index of the last full scan the push made (a retry, a merge), if it made one
    /// (stored already): a watch takes up its directories.
    pub index: Option<cloud_tree::Index>,
    /// The version committed, to record in the link ([`Teleport::finish_push`]).
    agreement: Option<Agreement>,
}

/// A scan's index, to store once the push no longer needs the machine's cores for its
/// upload ([`StoringIndex::join`]: at the push's end, or before a retry's scan).
#[derive(Default)]
pub(super) enum StoringIndex {
    #[default]
    Nothing,
    /// Scanned, not yet stored: the index before the scan and the scan's.
    Later {
        worktrees: Worktrees,
        root: String,
        previous: cloud_tree::Index,
        scanned: cloud_tree::Index,
    },
}

impl StoringIndex {
    /// Stores the index (on the bulk pool); the index, if there was one to store.
    async fn join(&mut self) -> Result<Option<cloud_tree::Index>, TeleportError> {
        match std::mem::take(self) {
            StoringIndex::Nothing => Ok(None),
            StoringIndex::Later {
                worktrees,
                root,
                previous,
                scanned,
            } => cloud_tree::bulk::spawn(move || {
                worktrees.set_index(&root, &previous, &scanned)?;
                Ok(scanned)
            })
            .await
            .map_err(|e| TeleportError::Local(format!("storing the index failed: {e}")))?
            .map(Some),
        }
    }
}

/// How the agreed tree changes when both sides agree on a new version.
#[derive(Debug)]
pub(super) enum Agreed {
    /// By the delta just committed (a push).
    Delta(Arc<Delta>),
    /// From `old` to `new` (a pull's merge).
    Tree { old: Manifest, new: Manifest },
}

/// Below this many bytes of blobs a push uploads them without asking which the relay
/// lacks first (the relay keeps one copy of each anyway): one round trip less per edit.
const ASK_ABOVE_BYTES: u64 = 256 * 1024;

/// How many upload batches wait between the reading thread and the socket.
const READ_AHEAD: usize = 2;

/// What is left of a push once the relay committed its version: the link's own record of
/// it (the agreed tree, the version, the scan's index), written with the worktree still
/// held. [`Teleport::push`] finishes it before it returns; the `teleport push` command
/// answers first and leaves it to [`Teleport::finish_in_background`].
pub struct Bookkeeping {
    teleport: Arc<Teleport>,
    root: String,
    held: tokio::sync::OwnedMutexGuard<()>,
    agreement: Option<Agreement>,
    storing: StoringIndex,
    /// The index a retry's scan stored ([`Pushed::index`]), freed with the rest.
    index: Option<cloud_tree::Index>,
    outcome: TeleportOutcome,
}

/// A version both sides now agree on, not yet recorded in the link.
#[derive(Debug)]
pub(super) struct Agreement {
    worktree: Worktree,
    agreed: Agreed,
    info: VersionInfo,
}

impl std::fmt::Debug for Bookkeeping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bookkeeping")
            .field("root", &self.root)
            .field("version", &self.outcome.version)
            .finish_non_exhaustive()
    }
}

impl Bookkeeping {
    /// What the push did.
    pub fn outcome(&self) -> &TeleportOutcome {
        &self.outcome
    }

    /// Records the agreed version and waits for the index, then the operation's result
    /// (`record_result`), and lets go of the worktree.
    pub async fn finish(mut self) -> Result<TeleportOutcome, TeleportError> {
        let this = Arc::clone(&self.teleport);
        let result = this
            .finish_push(self.agreement.take(), &mut self.storing)
            .await;
        let (result, index) = match result {
            Ok(index) => (Ok(self.outcome), index),
            Err(e) => (Err(e), None),
        };
        let retried = self.index.take();
        if index.is_some() || retried.is_some() {
            // A whole tree's index: freed off the runtime's thread, before `record_result`
            // hands the memory back.
            let _ = cloud_tree::bulk::spawn(move || drop((index, retried))).await;
        }
        this.record_result(&self.root, &result).await;
        this.recording
            .lock()
            .expect("teleport recording poisoned")
            .remove(&self.root);
        drop(self.held);
        result
    }
}

impl Teleport {
    /// Pushes the worktree at `path` to `session` (linking it, or linking it anew), and
    /// records the new version in the link before it returns.
    pub async fn push(
        self: &Arc<Self>,
        path: &str,
        session: &str,
        reporter: &Reporter,
    ) -> Result<TeleportOutcome, TeleportError> {
        self.push_committed(path, session, reporter)
            .await?
            .finish()
            .await
    }

    /// [`Teleport::push`] up to the relay's commit: the outcome is final once this
    /// returns (the session has the version, written in its workspace); what is left is
    /// the link's own record of it, with the worktree still held.
    pub async fn push_committed(
        self: &Arc<Self>,
        path: &str,
        session: &str,
        reporter: &Reporter,
    ) -> Result<Bookkeeping, TeleportError> {
        let root = super::canonical_root(path, false)?;
        let held = self.hold(&root).await;
        let mut storing = StoringIndex::Nothing;
        let result = self
            .push_attempts(
                &root,
                session,
                reporter,
                local::Start::Scan,
                false,
                &mut storing,
            )
            .await;
        match result {
            Ok(pushed) => {
                if let Some(agreement) = &pushed.agreement {
                    // What `teleport status` shows until the link records it.
                    let mut link = agreement.worktree.clone();
                    link.agree_on(agreement.info.version);
                    self.recording
                        .lock()
                        .expect("teleport recording poisoned")
                        .insert(root.clone(), link);
                }
                Ok(Bookkeeping {
                    teleport: Arc::clone(self),
                    outcome: pushed.outcome,
                    agreement: pushed.agreement,
                    storing,
                    index: pushed.index,
                    root,
                    held,
                })
            }
            Err(e) => {
                // The scan's index is stored whatever the outcome.
                let _ = storing.join().await;
                let failed = Err(e);
                self.record_result(&root, &failed).await;
                failed
            }
        }
    }

    /// Runs `bookkeeping` to its end in the background; the drain waits for it
    /// ([`Teleport::background_done`]). Its failure (the relay has the version, the link
    /// could not record it) is the link's `last_error`, and the next push or pull makes
    /// good: a base that is behind makes the relay answer `Stale`, and the merge settles
    /// what both sides already agree on.
    pub fn finish_in_background(&self, bookkeeping: Bookkeeping) {
        self.background.spawn(async move {
            if let Err(e) = bookkeeping.finish().await {
                tracing::warn!("a push's version could not be recorded in its link: {e}");
            }
        });
    }

    /// Records `agreement` in its link, then waits for the scan's index to be stored:
    /// the index, if one was.
    async fn finish_push(
        &self,
        agreement: Option<Agreement>,
        storing: &mut StoringIndex,
    ) -> Result<Option<cloud_tree::Index>, TeleportError> {
        let agreed = match agreement {
            Some(Agreement {
                mut worktree,
                agreed,
                info,
            }) => self.agreed(&mut worktree, agreed, &info).await,
            None => Ok(()),
        };
        // The scan's index is stored before the push ends, whatever its outcome.
        let stored = storing.join().await;
        agreed?;
        stored
    }

    /// Records the outcome of an operation on its link (its error, or none), closes
    /// teleport's database if a whole tree went through it (`Worktrees::settle`), and
    /// hands the memory the operation freed back to the system (`crate::memory::release`):
    /// every push, pull and watch step ends here.
    pub(super) async fn record_result<T>(&self, root: &str, result: &Result<T, TeleportError>) {
        let worktrees = self.worktrees.clone();
        let root = root.to_owned();
        let error = result.as_ref().err().map(|e| e.to_string());
        let _ = Self::blocking(move || {
            let recorded = (|| {
                if let Some(mut worktree) = worktrees.get(&root)? {
                    if worktree.last_error != error {
                        worktree.last_error = error;
                        worktrees.put(&worktree)?;
                    }
                }
                Ok::<_, TeleportError>(())
            })();
            worktrees.settle();
            crate::memory::release();
            recorded
        })
        .await;
    }

    /// The link of `root` to `session`: as stored, or new (a link to another session is
    /// replaced, and its agreed tree forgotten).
    pub(super) async fn link_to(
        &self,
        root: &str,
        session: &str,
    ) -> Result<Worktree, TeleportError> {
        let worktrees = self.worktrees.clone();
        let root = root.to_owned();
        let session = session.to_owned();
        Self::blocking(move || match worktrees.get(&root)? {
            Some(worktree) if worktree.session == session => Ok(worktree),
            Some(old) => {
                let base = worktrees.base(&root)?;
                worktrees.set_base(&root, &base, &Manifest::new())?;
                let worktree = Worktree {
                    watching: old.watching,
                    ..Worktree::new(&root, &session)
                };
                worktrees.put(&worktree)?;
                Ok(worktree)
            }
            None => {
                let worktree = Worktree::new(&root, &session);
                worktrees.put(&worktree)?;
                Ok(worktree)
            }
        })
        .await
    }

    /// Pushes the worktree at `root`, which the caller holds, to `session`. The first
    /// attempt starts from `start` (a full scan through the index, the tree a scan found,
    /// or changes already worked out); later attempts (a file changed while it was read,
    /// a merge of a newer version) scan in full. `quiet`: a tree that has not changed
    /// since the agreed version is not committed again (the watcher's pushes; an explicit
    /// push always makes a version).
    ///
    /// Trees are loaded, diffed and dropped on the blocking pool: the runtime's thread
    /// only sees the changes.
    pub(super) async fn push_held(
        self: &Arc<Self>,
        root: &str,
        session: &str,
        reporter: &Reporter,
        start: local::Start,
        quiet: bool,
    ) -> Result<Pushed, TeleportError> {
        let mut storing = StoringIndex::Nothing;
        let result = self
            .push_attempts(root, session, reporter, start, quiet, &mut storing)
            .await;
        let mut pushed = match result {
            Ok(pushed) => pushed,
            Err(e) => {
                // The scan's index is stored before the push ends, whatever its outcome.
                let _ = storing.join().await;
                return Err(e);
            }
        };
        if let Some(index) = self
            .finish_push(pushed.agreement.take(), &mut storing)
            .await?
        {
            pushed.index = Some(index);
        }
        Ok(pushed)
    }

    /// [`Teleport::push_held`]'s attempts. A full scan's index is stored after the push
    /// (`storing`), not before it nor beside its upload: writing a 20,000-file index took
    /// about a quarter of a second of a core the upload needed, and nothing else reads it
    /// until the scan or merge of a retry, which store it first.
    async fn push_attempts(
        self: &Arc<Self>,
        root: &str,
        session: &str,
        reporter: &Reporter,
        start: local::Start,
        quiet: bool,
        storing: &mut StoringIndex,
    ) -> Result<Pushed, TeleportError> {
        let mut worktree = self.link_to(root, session).await?;
        let mut outcome = TeleportOutcome {
            root: root.to_owned(),
            session: session.to_owned(),
            version: worktree.version,
            files: 0,
            blobs: 0,
            bytes: 0,
            conflicts: Vec::new(),
            problems: Vec::new(),
        };
        let mut index = None;
        let mut last_failure = String::new();
        let mut start = Some(start);
        for _ in 0..MAX_ATTEMPTS {
            let (worktrees, root_owned, reporter_owned) =
                (self.worktrees.clone(), root.to_owned(), reporter.clone());
            let first = start.take().unwrap_or(local::Start::Scan);
            if matches!(first, local::Start::Scan) {
                // A retry's scan starts from the index the last one stored.
                index = storing.join().await?.or(index);
            }
            let (changes, scanned) = Self::blocking(move || {
                Ok(match first {
                    local::Start::Changes(changes) => (changes, None),
                    local::Start::Found(found) => {
                        (found.changes_from_base(&worktrees, &root_owned)?, None)
                    }
                    local::Start::Scan => {
                        let (scanned, previous) =
                            local::scan_unstored(&worktrees, &root_owned, &reporter_owned)?;
                        let (found, index) = scanned.split();
                        (
                            found.changes_from_base(&worktrees, &root_owned)?,
                            Some((previous, index)),
                        )
                    }
                })
            })
            .await?;
            if let Some((previous, scanned)) = scanned {
                *storing = StoringIndex::Later {
                    worktrees: self.worktrees.clone(),
                    root: root.to_owned(),
                    previous,
                    scanned,
                };
            }
            let local::Changes {
                delta,
                problems,
                conflicts,
            } = changes;
            // Shared with the bulk pool, where everything that walks it is done: a first
            // push's 23,000 entries walked on the runtime's thread held every message for
            // 18 ms.
            let delta = Arc::new(delta);
            outcome.problems = problems;
            let conflicts_changed = worktree.conflicts != conflicts;
            worktree.conflicts = conflicts;
            if quiet && delta.is_empty() && worktree.version > 0 {
                if conflicts_changed {
                    // Conflict copies are not content: a removed one changes no version,
                    // but `teleport status` stops listing it.
                    let (worktrees, record) = (self.worktrees.clone(), worktree.clone());
                    Self::blocking(move || Ok(worktrees.put(&record)?)).await?;
                }
                return Ok(Pushed {
                    outcome,
                    committed: false,
                    index,
                    agreement: None,
                });
            }
            match self.upload(session, root, &delta, reporter).await {
                Ok((blobs, bytes)) => {
                    outcome.blobs += blobs;
                    outcome.bytes += bytes;
                }
                Err(TeleportError::ChangedDuringPush(path)) => {
                    last_failure = format!("{path} kept changing while it was sent");
                    continue;
                }
                Err(e) => return Err(e),
            }
            let git = self.git_state(session, root, &worktree, reporter).await?;
            let head = git.as_ref().map(|g| g.head.clone());
            reporter.report("commit", 0, 1, 0, 0);
            let changes = delta.changes.len() as u64;
            let sent = Arc::clone(&delta);
            let sent = Self::blocking(move || Ok(Delta::clone(&sent))).await?;
            let reply = self
                .request(TeleportRequest::Commit {
                    session: session.to_owned(),
                    base: worktree.version,
                    delta: sent,
                    git,
                })
                .await?;
            match reply {
                TeleportReply::Committed(info) => {
                    worktree.git_sent = head.or(worktree.git_sent.take());
                    outcome.version = info.version;
                    outcome.files += changes;
                    reporter.report("done", 1, 1, 0, 0);
                    return Ok(Pushed {
                        outcome,
                        committed: true,
                        index,
                        agreement: Some(Agreement {
                            worktree,
                            agreed: Agreed::Delta(delta),
                            info,
                        }),
                    });
                }
                TeleportReply::Stale { current } => {
                    // The session moved on (the agent's edits, another machine): take its
                    // changes in first, then push what is left on top.
                    last_failure = format!("the session moved on to version {current}");
                    // The merge rescans on top of the stored index.
                    index = storing.join().await?.or(index);
                    let pulled = self.pull_held(&mut worktree, reporter).await?;
                    outcome.conflicts.extend(pulled.conflicts);
                    outcome.problems.extend(pulled.problems);
                    if pulled.index.is_some() {
                        index = pulled.index;
                    }
                }
                other => {
                    return Err(TeleportError::Relay(format!(
                        "an answer to a commit that is not one: {other:?}"
                    )))
                }
            }
        }
        Err(TeleportError::GaveUp(format!(
            "gave up after {MAX_ATTEMPTS} attempts: {last_failure}"
        )))
    }

    /// Both sides agree on version `info`: the link's base from now on is the stored base
    /// changed as `agreed` says (written on the blocking pool, where the trees are also
    /// dropped).
    pub(super) async fn agreed(
        &self,
        worktree: &mut Worktree,
        agreed: Agreed,
        info: &VersionInfo,
    ) -> Result<(), TeleportError> {
        worktree.agree_on(info.version);
        let (worktrees, record) = (self.worktrees.clone(), worktree.clone());
        Self::blocking(move || {
            let began = std::time::Instant::now();
            match agreed {
                Agreed::Delta(delta) => worktrees.apply_base(&record.root, &delta)?,
                Agreed::Tree { old, new } => worktrees.set_base(&record.root, &old, &new)?,
            }
            worktrees.put(&record)?;
            tracing::debug!(root = %record.root, version = record.version, "the agreed base written in {:?}", began.elapsed());
            Ok(())
        })
        .await
    }

    /// Uploads the blobs `delta` needs that the relay lacks. Returns how many blobs and
    /// bytes went up.
    async fn upload(
        &self,
        session: &str,
        root: &str,
        delta: &Arc<Delta>,
        reporter: &Reporter,
    ) -> Result<(u64, u64), TeleportError> {
        // Every blob the delta needs is in one of the files it puts, where the scan found
        // it: looking only there keeps an edit's push from costing the whole tree.
        let puts = Arc::clone(delta);
        let (manifest, ids, sizes) = Self::blocking(move || {
            let manifest: Manifest = puts
                .changes
                .iter()
                .filter_map(|change| match change {
                    Change::Put(entry) => Some(entry.clone()),
                    Change::Remove(_) => None,
                })
                .collect();
            let sizes = blob_sizes(&manifest);
            Ok((manifest, puts.blobs(), sizes))
        })
        .await?;
        let (root, session_owned) = (root.to_owned(), session.to_owned());
        let uploaded = self
            .upload_with(session, ids, &sizes, reporter, move |ids, batches| {
                local::read_blobs(&root, &manifest, &session_owned, &ids, batches)
            })
            .await;
        match uploaded {
            // A file changed after the scan hashed it: the relay refused its bytes.
            Err(TeleportError::Transfer(TransferError::Mismatched(id))) => {
                Err(TeleportError::ChangedDuringPush(path_of(delta, &id)))
            }
            other => other,
        }
    }

    /// Uploads the blobs among `ids` that the relay lacks (asking first above
    /// [`ASK_ABOVE_BYTES`]), read by `read` on a blocking thread into batches. Returns
    /// how many blobs and bytes went up.
    async fn upload_with(
        &self,
        session: &str,
        mut ids: Vec<ContentId>,
        sizes: &HashMap<ContentId, u64>,
        reporter: &Reporter,
        read: impl FnOnce(Vec<ContentId>, mpsc::Sender<Batch>) -> Result<(), TeleportError>
            + Send
            + 'static,
    ) -> Result<(u64, u64), TeleportError> {
        if ids.is_empty() {
            return Ok((0, 0));
        }
        let size_of = |ids: &[ContentId]| -> u64 {
            ids.iter()
                .map(|id| sizes.get(id).copied().unwrap_or(0))
                .sum()
        };
        if size_of(&ids) > ASK_ABOVE_BYTES {
            let mut lacking = Vec::new();
            for chunk in ids.chunks(MAX_LACKS_IDS) {
                let reply = self
                    .request(TeleportRequest::Lacks {
                        session: session.to_owned(),
                        ids: chunk.to_vec(),
                    })
                    .await?;
                let TeleportReply::Lacks(missing) = reply else {
                    return Err(TeleportError::Relay(
                        "an answer to lacks that is not one".into(),
                    ));
                };
                lacking.extend(missing);
            }
            ids = lacking;
        }
        if ids.is_empty() {
            return Ok((0, 0));
        }
        let bytes_total = size_of(&ids);
        let n_total = ids.len() as u64;
        reporter.report("upload", 0, n_total, 0, bytes_total);
        let (batches_in, batches) = mpsc::channel(READ_AHEAD);
        let reading = cloud_tree::bulk::spawn(move || read(ids, batches_in));
        let reporter = reporter.clone();
        let sent = self
            .on_blob_socket(move |mut socket| async move {
                let (mut n_done, mut bytes_done) = (0u64, 0u64);
                let sent = socket
                    .put_all(batches, |n, bytes| {
                        n_done += n;
                        bytes_done += bytes;
                        reporter.report("upload", n_done, n_total, bytes_done, bytes_total);
                    })
                    .await;
                socket.close().await;
                sent.map(|()| (n_done, bytes_done))
            })
            .await;
        let read = reading
            .await
            .map_err(|e| TeleportError::Local(format!("reading blobs failed: {e}")))?;
        read?;
        sent
    }

    /// The git state to record with a push: HEAD and branch, and a bundle of the commits
    /// the relay has not taken yet (uploaded here). `None` outside a git repository.
    async fn git_state(
        &self,
        session: &str,
        root: &str,
        worktree: &Worktree,
        reporter: &Reporter,
    ) -> Result<Option<GitState>, TeleportError> {
        let (root, sent) = (root.to_owned(), worktree.git_sent.clone());
        let prepared = Self::blocking(move || {
            let Some(state) = cloud_tree::git::state(Path::new(&root)) else {
                return Ok(None);
            };
            if sent.as_deref() == Some(state.head.as_str()) {
                return Ok(Some((state, None)));
            }
            let file = tempfile::NamedTempFile::new()
                .map_err(|e| TeleportError::Local(format!("cannot make a temp file: {e}")))?;
            let have: Vec<String> = sent.into_iter().collect();
            let made = cloud_tree::git::bundle(Path::new(&root), "HEAD", &have, file.path())
                .map_err(TeleportError::Local)?;
            if !made {
                return Ok(Some((state, None)));
            }
            let content = cloud_tree::hash_file(file.path())
                .map_err(|e| TeleportError::Local(format!("reading the git bundle: {e}")))?;
            Ok(Some((state, Some((file, content)))))
        })
        .await?;
        let Some((mut state, bundle)) = prepared else {
            return Ok(None);
        };
        if let Some((file, content)) = bundle {
            let bundle = BundleRef {
                size: content.size,
                content: content.content,
                chunks: content.chunks,
            };
            let sizes: HashMap<ContentId, u64> = if bundle.chunks.is_empty() {
                HashMap::from([(bundle.content, bundle.size)])
            } else {
                bundle
                    .chunks
                    .iter()
                    .map(|c| (c.id, u64::from(c.len)))
                    .collect()
            };
            let (layout, session_owned) = (bundle.clone(), session.to_owned());
            self.upload_with(
                session,
                bundle.blobs(),
                &sizes,
                reporter,
                move |ids, batches| {
                    local::read_file_blobs(file.path(), &layout, &session_owned, &ids, batches)
                },
            )
            .await?;
            state.bundle = Some(bundle);
        }
        Ok(Some(state))
    }
}

/// The path of the file in `delta` that holds blob `id` (the id itself if none does).
fn path_of(delta: &Delta, id: &ContentId) -> String {
    delta
        .changes
        .iter()
        .find_map(|change| match change {
            Change::Put(entry) if entry.kind.blobs().contains(id) => Some(entry.path.to_string()),
            _ => None,
        })
        .unwrap_or_else(|| format!("blob {id}"))
}

/// Every blob of `manifest` and its size.
fn blob_sizes(manifest: &Manifest) -> std::collections::HashMap<ContentId, u64> {
    cloud_tree::blob_locations(manifest)
        .into_iter()
        .map(|(id, at)| (id, u64::from(at.len)))
        .collect()
}
