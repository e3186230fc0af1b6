//! Watches: the daemon keeps a linked worktree and its session in step, both ways, until
//! stopped. A watch is the daemon's: it outlives the client that started it, and the link
//! records it (`watching`), so [`Teleport::resume_watches`] starts it again when the
//! daemon starts.
//!
//! The pieces:
//! - [`cloud_tree::watch`] (shared with the relay): notify, one non-recursive watch per
//!   directory the scanner includes; events become worktree paths, and lost events a rescan.
//! - [`tree`]: the worktree's index in memory and the watches that follow it; a batch of
//!   changed paths becomes the tree a push starts from (a rescan of just those paths).
//! - [`debounce`]: when to act: the trailing 15 ms debounce, full rescans (overflow,
//!   reconnect, failure, every 2 s while degraded), pulls of the session's new versions,
//!   the back-off after a failure.
//! - [`task`]: the watch itself, one task per worktree, which runs the schedule's batches
//!   as pushes and pulls (the same ones `teleport push` and `pull` make) and reports them
//!   on the teleport feed.
//!
//! This module owns the registry of running watches (one per root) and their health, as
//! `teleport status` shows it. It must never write worktree files itself: changes go
//! through `push` and `pull`.

pub mod debounce;
pub mod task;
pub mod tree;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cloud_protocol::ipc::TeleportLink;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{Reporter, Teleport, TeleportError};

/// How long stopping a watch waits for its current push or pull to end before leaving it
/// to finish on its own.
pub const STOP_WAIT: Duration = Duration::from_secs(2);

/// A running watch's health, as `teleport status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// `ok`, or what is wrong, what the watch does meanwhile, and the fix.
    pub watcher: String,
    /// Paths changed and not pushed yet.
    pub pending: u64,
}

impl Default for Health {
    fn default() -> Health {
        Health {
            watcher: "starting".to_owned(),
            pending: 0,
        }
    }
}

/// A running watch.
#[derive(Debug)]
pub(super) struct WatchHandle {
    /// Stops the task.
    cancel: CancellationToken,
    task: JoinHandle<()>,
    /// What the task reports of itself.
    health: Arc<Mutex<Health>>,
}

/// The running watches, by root.
pub(super) type Watches = Mutex<HashMap<String, WatchHandle>>;

impl Teleport {
    /// Starts watching the worktree at `path` for `session`: pushes it first, then the
    /// daemon keeps it in step until [`Teleport::stop`].
    pub async fn watch(
        self: &Arc<Self>,
        path: &str,
        session: &str,
        reporter: &Reporter,
    ) -> Result<TeleportLink, TeleportError> {
        let outcome = self.push(path, session, reporter).await?;
        self.set_watching(&outcome.root, true).await?;
        self.start_watch(&outcome.root).await;
        self.link_of(&outcome.root)
            .await?
            .ok_or_else(|| TeleportError::NotLinked(outcome.root.clone()))
    }

    /// Stops watching the worktree at `path`.
    pub async fn stop(self: &Arc<Self>, path: &str) -> Result<TeleportLink, TeleportError> {
        let root = super::canonical_root(path, false)?;
        // The task first (it lets go of the worktree mid-step), then the record.
        self.stop_watch(&root).await;
        self.set_watching(&root, false).await?;
        self.link_of(&root)
            .await?
            .ok_or_else(|| TeleportError::NotLinked(root.clone()))
    }

    /// Starts the watch of every link that records one (at daemon start, once the bridge
    /// runs). Returns how many started.
    pub async fn resume_watches(self: &Arc<Self>) -> Result<usize, TeleportError> {
        let worktrees = self.worktrees.clone();
        let watched = Self::blocking(move || Ok(worktrees.list()?)).await?;
        let mut started = 0;
        for worktree in watched.into_iter().filter(|w| w.watching) {
            tracing::info!(root = %worktree.root, session = %worktree.session, "resuming the watch");
            self.start_watch(&worktree.root).await;
            started += 1;
        }
        Ok(started)
    }

    /// Stops every watch (the daemon is stopping): each finishes its current step, for
    /// at most [`STOP_WAIT`]. The links keep `watching`, so they resume at the next start.
    pub async fn stop_watches(&self) {
        let handles: Vec<WatchHandle> = {
            let mut watches = self.watches.lock().expect("watches lock poisoned");
            watches.drain().map(|(_, handle)| handle).collect()
        };
        for handle in &handles {
            handle.cancel.cancel();
        }
        for handle in handles {
            finish(handle).await;
        }
    }

    /// The running watch's health at `root`, if one runs.
    pub(super) fn watch_health(&self, root: &str) -> Option<Health> {
        let watches = self.watches.lock().expect("watches lock poisoned");
        let handle = watches.get(root)?;
        if handle.task.is_finished() {
            return None;
        }
        let health = handle.health.lock().expect("health lock poisoned").clone();
        Some(health)
    }

    /// Starts (or restarts) the watch of the link at `root`.
    async fn start_watch(self: &Arc<Self>, root: &str) {
        self.stop_watch(root).await;
        let cancel = CancellationToken::new();
        let health = Arc::new(Mutex::new(Health::default()));
        let task = tokio::spawn(task::run(
            Arc::clone(self),
            root.to_owned(),
            cancel.clone(),
            Arc::clone(&health),
        ));
        let handle = WatchHandle {
            cancel,
            task,
            health,
        };
        let previous = self
            .watches
            .lock()
            .expect("watches lock poisoned")
            .insert(root.to_owned(), handle);
        if let Some(previous) = previous {
            // Started by a concurrent request meanwhile: one watch per root.
            previous.cancel.cancel();
            finish(previous).await;
        }
    }

    /// Stops the watch of `root`, if one runs.
    async fn stop_watch(&self, root: &str) {
        let handle = self
            .watches
            .lock()
            .expect("watches lock poisoned")
            .remove(root);
        if let Some(handle) = handle {
            handle.cancel.cancel();
            finish(handle).await;
        }
    }

    /// Records whether the link at `root` is watched, under the worktree's operation lock
    /// (an operation in flight writes the whole record when it ends).
    async fn set_watching(&self, root: &str, watching: bool) -> Result<(), TeleportError> {
        let _held = self.hold(root).await;
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

/// Waits (bounded) for a cancelled watch's task to end.
async fn finish(handle: WatchHandle) {
    let mut task = handle.task;
    if tokio::time::timeout(STOP_WAIT, &mut task).await.is_err() {
        tracing::warn!("a watch did not stop within {STOP_WAIT:?}; stopping it mid-step");
        task.abort();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use cloud_protocol::ipc::RelayMode;
    use cloudd_test_support::wait_for_async;
    use tokio::sync::mpsc;

    use super::*;
    use crate::journal::Journal;
    use crate::link::{BridgeCommand, Link};
    use crate::sessions::inbound::Inbound;
    use crate::sessions::replica::Replica;
    use crate::store::Meta;
    use crate::teleport::db::TeleportDb;
    use crate::teleport::worktrees::{Worktree, Worktrees};

    const DEADLINE: Duration = Duration::from_secs(20);

    /// A teleport service on a real store whose bridge never connects (the relay side of
    /// teleport is not there yet): the watches run their local half.
    fn teleport(dir: &std::path::Path) -> (Arc<Teleport>, mpsc::Receiver<BridgeCommand>) {
        let db = crate::store::open(&dir.join("store")).unwrap();
        let journal = Journal::open(&dir.join("journal"), &db).unwrap();
        let (link, commands) = Link::new(
            journal,
            Inbound::open(&db).unwrap(),
            Replica::open(&db).unwrap(),
            (
                Meta::open(&db).unwrap(),
                crate::account::Account::open(&db).unwrap(),
            ),
            RelayMode::Embedded,
            String::new(),
            "i-test".into(),
        );
        let worktrees = Worktrees::new(TeleportDb::open(&dir.join("teleport")).unwrap());
        let teleport = Teleport::new(worktrees, Arc::new(link));
        (Arc::new(teleport), commands)
    }

    async fn link_of(teleport: &Teleport, root: &str) -> TeleportLink {
        teleport.link_of(root).await.unwrap().unwrap()
    }

    #[tokio::test]
    async fn watches_resume_report_their_health_and_pending_changes_and_stop() {
        let dir = tempfile::tempdir().unwrap();
        let (teleport, mut commands) = teleport(dir.path());
        let root_dir = dir.path().join("wt");
        std::fs::create_dir_all(root_dir.join("src")).unwrap();
        std::fs::write(root_dir.join("src/a.rs"), "a").unwrap();
        let root = crate::teleport::canonical_root(root_dir.to_str().unwrap(), false).unwrap();
        let other = dir.path().join("not-watched");
        std::fs::create_dir_all(&other).unwrap();
        let other = crate::teleport::canonical_root(other.to_str().unwrap(), false).unwrap();
        // What a `teleport watch` before a daemon restart left: a link that is watched,
        // and one that is not.
        teleport
            .worktrees
            .put(&Worktree {
                watching: true,
                version: 3,
                ..Worktree::new(&root, "s-watched")
            })
            .unwrap();
        teleport
            .worktrees
            .put(&Worktree::new(&other, "s-other"))
            .unwrap();

        assert_eq!(teleport.resume_watches().await.unwrap(), 1);
        let ok = wait_for_async("the watch to run", DEADLINE, || async {
            let link = link_of(&teleport, &root).await;
            if link.watcher == "ok" {
                Ok(link)
            } else {
                Err(link.watcher)
            }
        })
        .await;
        assert!(ok.watching);
        assert_eq!(link_of(&teleport, &other).await.watcher, "-");
        // The watched session is followed, so its announcements of new versions come.
        assert!(teleport.link.inbound.is_followed("s-watched").unwrap());
        match commands.try_recv() {
            Ok(BridgeCommand::Join { session }) => assert_eq!(session, "s-watched"),
            other => panic!("expected a join, got {other:?}"),
        }

        // The relay is unreachable: edits are counted as pending, not sent.
        std::fs::write(root_dir.join("src/a.rs"), "edited").unwrap();
        std::fs::write(root_dir.join("b.rs"), "new").unwrap();
        wait_for_async("the edits to be pending", DEADLINE, || async {
            let link = link_of(&teleport, &root).await;
            if link.pending >= 2 {
                Ok(())
            } else {
                Err(format!("pending {}", link.pending))
            }
        })
        .await;
        assert_eq!(
            link_of(&teleport, &root).await.version,
            3,
            "nothing was pushed"
        );

        // The daemon stops: the watch ends, the link still records it.
        teleport.stop_watches().await;
        let stopped = link_of(&teleport, &root).await;
        assert!(stopped.watching);
        assert!(
            stopped.watcher.starts_with("not running"),
            "{}",
            stopped.watcher
        );

        // Started again, then stopped by `teleport stop`.
        assert_eq!(teleport.resume_watches().await.unwrap(), 1);
        assert!(teleport.watch_health(&root).is_some());
        let link = teleport.stop(&root).await.unwrap();
        assert!(!link.watching);
        assert_eq!(link.watcher, "-");
        assert!(teleport.watch_health(&root).is_none());
        assert_eq!(teleport.resume_watches().await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_watch_whose_link_is_no_longer_watched_ends_by_itself() {
        let dir = tempfile::tempdir().unwrap();
        let (teleport, _commands) = teleport(dir.path());
        let root_dir = dir.path().join("wt");
        std::fs::create_dir_all(&root_dir).unwrap();
        let root = crate::teleport::canonical_root(root_dir.to_str().unwrap(), false).unwrap();
        teleport
            .worktrees
            .put(&Worktree::new(&root, "s-1"))
            .unwrap();
        // Not watching: the task finds that out when it opens, and ends.
        teleport.start_watch(&root).await;
        wait_for_async("the watch to end", DEADLINE, || async {
            if teleport.watch_health(&root).is_none() {
                Ok(())
            } else {
                Err("still running".to_owned())
            }
        })
        .await;
    }
}
