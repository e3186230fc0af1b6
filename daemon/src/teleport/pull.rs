//! A pull: the session's newest version comes into the worktree, three-way.
//!
//! The session's changes since the version both sides agreed on → the remote tree; the
//! worktree is scanned → [`merge`] against the agreed tree: a path changed only in the
//! session is written, a path changed here stays, a path changed on both sides keeps both
//! (the session's beside it as `NAME.cloud-conflict-vN`). Blobs the worktree already holds
//! are read from it; the rest come over the blob socket. Then the session's tree is the
//! agreed one.
//!
//! This module decides nothing about individual writes: `apply` does them.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use cloud_protocol::ipc::TeleportOutcome;
use cloud_protocol::teleport::{
    merge, Change, ContentId, Delta, EntryKind, Manifest, TeleportReply, TeleportRequest,
};

use super::worktrees::Worktree;
use super::{apply, local, Reporter, Teleport, TeleportError};

/// What a pull did, for the outcome of a push that merged first, too.
#[derive(Debug, Default)]
pub struct Pulled {
    pub version: u64,
    pub files: u64,
    pub blobs: u64,
    pub bytes: u64,
    pub conflicts: Vec<String>,
    pub problems: Vec<String>,
    /// The worktree's index after the pull, if it scanned (a pull that found nothing new
    /// does not).
    pub index: Option<cloud_tree::Index>,
}

impl Teleport {
    /// Pulls `session` (or the linked one) into the worktree at `path` (created if absent).
    pub async fn pull(
        self: &Arc<Self>,
        path: &str,
        session: Option<&str>,
        reporter: &Reporter,
    ) -> Result<TeleportOutcome, TeleportError> {
        let root = super::canonical_root(path, true)?;
        let _held = self.hold(&root).await;
        let result = async {
            let linked = {
                let (worktrees, root) = (self.worktrees.clone(), root.clone());
                Self::blocking(move || Ok(worktrees.get(&root)?)).await?
            };
            let session = match (session, &linked) {
                (Some(session), _) => session.to_owned(),
                (None, Some(worktree)) => worktree.session.clone(),
                (None, None) => return Err(TeleportError::NotLinked(root.clone())),
            };
            let mut worktree = self.link_to(&root, &session).await?;
            let reporter = Reporter {
                root: root.clone(),
                session: session.clone(),
                ..reporter.clone()
            };
            let pulled = self.pull_held(&mut worktree, &reporter).await?;
            reporter.report("done", 1, 1, 0, 0);
            Ok(TeleportOutcome {
                root: root.clone(),
                session,
                version: pulled.version,
                files: pulled.files,
                blobs: pulled.blobs,
                bytes: pulled.bytes,
                conflicts: pulled.conflicts,
                problems: pulled.problems,
            })
        }
        .await;
        self.record_result(&root, &result).await;
        result
    }

    /// Pulls into `worktree`, which the caller holds.
    pub(super) async fn pull_held(
        &self,
        worktree: &mut Worktree,
        reporter: &Reporter,
    ) -> Result<Pulled, TeleportError> {
        let reply = self
            .request(TeleportRequest::Changes {
                session: worktree.session.clone(),
                // After changes that could not be written, the whole tree: the agreed one
                // differs from the version's there, so a delta would not bring them again.
                since: if worktree.unapplied {
                    0
                } else {
                    worktree.version
                },
            })
            .await?;
        let TeleportReply::Changes { newest, delta } = reply else {
            return Err(TeleportError::Relay(
                "an answer to changes that is not one".into(),
            ));
        };
        delta
            .validate()
            .map_err(|e| TeleportError::Relay(format!("a malformed delta: {e}")))?;
        worktree.remote_version = worktree.remote_version.max(newest.version);
        if delta.is_empty() && newest.version <= worktree.version && !worktree.unapplied {
            // Nothing new: the worktree is not scanned for it.
            return Ok(Pulled {
                version: worktree.version,
                ..Pulled::default()
            });
        }
        let (worktrees, root, scan_reporter) = (
            self.worktrees.clone(),
            worktree.root.clone(),
            reporter.clone(),
        );
        let (base, scanned) = Self::blocking(move || {
            let base = worktrees.base(&root)?;
            let scanned = local::scan(&worktrees, &root, &scan_reporter)?;
            Ok((base, scanned))
        })
        .await?;
        let mut remote = if worktree.unapplied {
            Manifest::new()
        } else {
            base.clone()
        };
        remote.apply(&delta);
        let merged = merge(&base, &scanned.manifest, &remote);
        // The blobs the writes need: from the worktree where it has them, else fetched.
        let mut needed: Vec<ContentId> = merged.apply.blobs();
        for (_, kind) in &merged.conflicts {
            if let Some(kind @ EntryKind::File { .. }) = kind {
                needed.extend(kind.blobs());
            }
        }
        needed.sort_unstable();
        needed.dedup();
        let mut blobs: HashMap<ContentId, Vec<u8>> = {
            let (root, manifest, needed) = (
                worktree.root.clone(),
                scanned.manifest.clone(),
                needed.clone(),
            );
            Self::blocking(move || Ok(local::local_blobs(&root, &manifest, &needed))).await?
        };
        let fetch: Vec<ContentId> = needed
            .iter()
            .filter(|id| !blobs.contains_key(id))
            .copied()
            .collect();
        let mut pulled = Pulled {
            version: newest.version,
            ..Pulled::default()
        };
        if !fetch.is_empty() {
            reporter.report("download", 0, fetch.len() as u64, 0, 0);
            let fetched = self.fetch_blobs(&worktree.session, fetch.clone()).await?;
            for blob in fetched {
                pulled.blobs += 1;
                pulled.bytes += blob.bytes.len() as u64;
                blobs.insert(blob.id, blob.bytes);
            }
            reporter.report(
                "download",
                pulled.blobs,
                fetch.len() as u64,
                pulled.bytes,
                pulled.bytes,
            );
        }
        reporter.report("apply", 0, merged.apply.changes.len() as u64, 0, 0);
        let (worktrees, root, version) = (
            self.worktrees.clone(),
            worktree.root.clone(),
            newest.version,
        );
        let mut index = scanned.index;
        let (applied, index) = Self::blocking(move || {
            let applied = apply::apply(&root, &index, &merged, version, &blobs)?;
            local::rescan(&worktrees, &root, &applied.touched, &mut index)?;
            Ok((applied, index))
        })
        .await?;
        // `teleport status` lists the conflict copies, the ones just written included.
        let mut copies = scanned.conflicts;
        copies.extend(applied.copies.iter().map(|copy| copy.to_string()));
        copies.sort_unstable();
        copies.dedup();
        worktree.conflicts = copies;
        let applied_failed = applied.failed;
        worktree.unapplied = !applied_failed.is_empty();
        pulled.files = applied.changed;
        pulled.conflicts = applied.conflicts;
        pulled.problems = scanned.problems;
        pulled.problems.extend(applied.problems);
        pulled.index = Some(index);
        if let Some(git) = &newest.git {
            if let Err(e) = self.fetch_history(worktree, &git.head).await {
                pulled
                    .problems
                    .push(format!("the session's git history: {e}"));
            }
        }
        // Agreed on: the session's tree, but where a change could not be written, what was
        // agreed before (so the next pull tries it again, and a push does not take the
        // missing file for a local deletion).
        let mut agreed = remote;
        for path in &applied_failed {
            agreed.apply(&Delta {
                changes: vec![Change::Remove(path.clone())],
            });
            for (under, kind) in base.under(path) {
                agreed.insert(under.clone(), kind.clone());
            }
        }
        self.agreed(
            worktree,
            super::push::Agreed::Tree {
                old: base,
                new: agreed,
            },
            &newest,
        )
        .await?;
        Ok(pulled)
    }

    /// Downloads `ids` (every one must exist) from `session`, on the blob socket.
    async fn fetch_blobs(
        &self,
        session: &str,
        ids: Vec<ContentId>,
    ) -> Result<Vec<cloud_protocol::blobs::Blob>, TeleportError> {
        let session = session.to_owned();
        self.on_blob_socket(move |mut socket| async move {
            let fetched = socket.get_all(&session, &ids).await;
            socket.close().await;
            fetched
        })
        .await
    }

    /// Brings the session's commit `head` (the agent's commits) into the worktree's
    /// repository as `refs/cloudd/<session>`, fetching the history it lacks as a bundle.
    /// Never moves HEAD or a branch; nothing to do outside a git repository or when HEAD
    /// is `head` already.
    async fn fetch_history(&self, worktree: &Worktree, head: &str) -> Result<(), TeleportError> {
        let root = worktree.root.clone();
        let name = format!("refs/cloudd/{}", worktree.session);
        let local = {
            let (root, head, name) = (root.clone(), head.to_owned(), name.clone());
            Self::blocking(move || {
                let root = Path::new(&root);
                let Some(state) = cloud_tree::git::state(root) else {
                    return Ok(None);
                };
                if state.head == head {
                    return Ok(None);
                }
                if cloud_tree::git::has_commit(root, &head) {
                    cloud_tree::git::set_ref(root, &name, &head).map_err(TeleportError::Local)?;
                    return Ok(None);
                }
                Ok(Some(state.head))
            })
            .await?
        };
        let Some(local_head) = local else {
            return Ok(());
        };
        let reply = self
            .request(TeleportRequest::GitBundle {
                session: worktree.session.clone(),
                head: head.to_owned(),
                have: vec![local_head],
            })
            .await?;
        let TeleportReply::GitBundle(bundle) = reply else {
            return Err(TeleportError::Relay(
                "an answer to a bundle request that is not one".into(),
            ));
        };
        let ids = bundle.blobs();
        let fetched = self.fetch_blobs(&worktree.session, ids.clone()).await?;
        let blobs: HashMap<ContentId, Vec<u8>> =
            fetched.into_iter().map(|b| (b.id, b.bytes)).collect();
        Self::blocking(move || {
            let mut file = tempfile::NamedTempFile::new()
                .map_err(|e| TeleportError::Local(format!("cannot make a temp file: {e}")))?;
            for id in &ids {
                let bytes = blobs
                    .get(id)
                    .ok_or_else(|| TeleportError::Local(format!("blob {id} was not fetched")))?;
                std::io::Write::write_all(&mut file, bytes)
                    .map_err(|e| TeleportError::Local(e.to_string()))?;
            }
            cloud_tree::git::receive(
                Path::new(&root),
                file.path(),
                "refs/cloudd/export",
                &name,
                false,
            )
            .map_err(TeleportError::Local)
        })
        .await
    }
}
