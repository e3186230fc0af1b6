//! Watches: the daemon keeps a linked worktree and its session in step, both ways, until
//! stopped; a watch is the daemon's, so it outlives the client that started it and daemon
//! restarts (the link records it).
//!
//! This module must never write worktree files itself: changes go through `push` and
//! `pull`.

use std::sync::Arc;

use cloud_protocol::ipc::TeleportLink;

use super::{Reporter, Teleport, TeleportError};

impl Teleport {
    /// Starts watching the worktree at `path` for `session`: pushes it first.
    pub async fn watch(
        self: &Arc<Self>,
        path: &str,
        session: &str,
        reporter: &Reporter,
    ) -> Result<TeleportLink, TeleportError> {
        let outcome = self.push(path, session, reporter).await?;
        self.set_watching(&outcome.root, true).await?;
        self.link_of(&outcome.root)
            .await?
            .ok_or_else(|| TeleportError::NotLinked(outcome.root.clone()))
    }

    /// Stops watching the worktree at `path`.
    pub async fn stop(self: &Arc<Self>, path: &str) -> Result<TeleportLink, TeleportError> {
        let root = super::canonical_root(path, false)?;
        self.set_watching(&root, false).await?;
        self.link_of(&root)
            .await?
            .ok_or_else(|| TeleportError::NotLinked(root.clone()))
    }

    async fn set_watching(&self, root: &str, watching: bool) -> Result<(), TeleportError> {
        let (worktrees, root) = (self.worktrees.clone(), root.to_owned());
        Self::blocking(move || {
            let mut worktree = worktrees
                .get(&root)?
                .ok_or_else(|| TeleportError::NotLinked(root.clone()))?;
            worktree.watching = watching;
            worktrees.put(&worktree)?;
            Ok(())
        })
        .await
    }
}
