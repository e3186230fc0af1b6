//! Workspace watches: while a session's agent runs in a teleported workspace (one with at
//! least one version), its edits become versions as it makes them, not only when its turn
//! ends.
//!
//! One task per watched session: [`cloud_tree::watch`] (the daemon's watcher: notify, one
//! non-recursive watch per directory the scanner includes, so `.git/` and ignored trees
//! cost nothing) feeds a [`schedule::Schedule`], and each capture it makes due goes
//! through [`Teleport::capture`], the one capture path (after a turn, before a `Changes`
//! answer, and here), which announces the new version. A capture compares the workspace
//! with the newest version's tree, so the relay's own writes (a push's materialisation)
//! make no version; and it holds the session like a commit does, so it never scans a
//! materialisation half done.
//!
//! The core decides when a session is watched ([`Teleport::watch`] when its agent starts
//! on a workspace with a version, or a first version comes while its agent runs;
//! [`Teleport::unwatch`] when the agent stops or exits, or the session is deleted); both
//! only start or cancel a task, so the core never waits. Scans and watch changes run on
//! the blocking pool.
//!
//! This module must never write a workspace or commit a version itself.

pub mod schedule;

use std::path::Path;
use std::sync::Arc;

use cloud_tree::watch::{self as fs, FsSignal, FsWatch, WatchProblem};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Teleport;
use crate::core::Shared;
use schedule::{Schedule, PERIODIC};

/// A running watch, as the registry holds it.
#[derive(Debug)]
pub(super) struct Running {
    /// Tells its task to end.
    cancel: CancellationToken,
}

impl Teleport {
    /// Watches the session's workspace, unless it is watched already. Never waits: the
    /// watch is a task of its own.
    pub fn watch(self: &Arc<Self>, shared: &Arc<Shared>, session: &str, org: &str) {
        let mut watches = self.watches.lock().expect("teleport watches poisoned");
        if watches.contains_key(session) {
            return;
        }
        let cancel = CancellationToken::new();
        watches.insert(
            session.to_owned(),
            Running {
                cancel: cancel.clone(),
            },
        );
        drop(watches);
        tracing::debug!(%session, "watching the workspace");
        let (this, shared) = (Arc::clone(self), Arc::clone(shared));
        let (session, org) = (session.to_owned(), org.to_owned());
        tokio::spawn(async move {
            Arc::clone(&this)
                .run_watch(&shared, &session, &org, cancel.clone())
                .await;
            if !cancel.is_cancelled() {
                // Ended on its own (a blocking task panicked): the next agent start or
                // version may start it again; captures after each turn go on meanwhile.
                tracing::warn!(%session, "the workspace watch ended");
                this.watches
                    .lock()
                    .expect("teleport watches poisoned")
                    .remove(&session);
            }
        });
    }

    /// Stops watching the session's workspace (a capture under way finishes).
    pub fn unwatch(&self, session: &str) {
        let running = self
            .watches
            .lock()
            .expect("teleport watches poisoned")
            .remove(session);
        if let Some(running) = running {
            tracing::debug!(%session, "no longer watching the workspace");
            running.cancel.cancel();
        }
    }

    async fn run_watch(
        self: Arc<Self>,
        shared: &Arc<Shared>,
        session: &str,
        org: &str,
        cancel: CancellationToken,
    ) {
        let root = self.workspaces.join(session);
        let (handler, events) = fs::channel(&root);
        let start = {
            let root = root.clone();
            tokio::task::spawn_blocking(move || FsWatch::start(&root, handler))
        };
        let Ok(watcher) = start.await else {
            return;
        };
        // Watched before the first capture scans: an edit made after the scan raises an
        // event, one made before is in the scan.
        let Some((mut watcher, _)) = self.follow_index(watcher, session).await else {
            return;
        };
        // Without a watcher, its handler is gone and the queue is closed: only periodic
        // captures are left.
        let mut events = Some(events);
        let mut problem: Option<WatchProblem> = None;
        let mut schedule = Schedule::new(Instant::now());
        loop {
            let deadline = schedule.deadline();
            tokio::select! {
                () = cancel.cancelled() => return,
                signal = next_signal(&mut events) => match signal {
                    // The echo of a push the relay just wrote is not the agent's edit.
                    Some(FsSignal::Changed(paths)) if self.only_own_writes(session, &paths) => {}
                    Some(FsSignal::Changed(_)) => schedule.changed(Instant::now()),
                    Some(FsSignal::Rescan(why)) => {
                        // Every capture scans the whole workspace: nothing is lost.
                        tracing::debug!(%session, "workspace events were lost ({why}); capturing all");
                        schedule.changed(Instant::now());
                    }
                    None => events = None,
                },
                () = sleep_until(deadline), if deadline.is_some() => {
                    if !schedule.take(Instant::now()) {
                        continue;
                    }
                    let captured = Arc::clone(&self).capture(shared, session, org).await;
                    let (back, added) = match self.follow_index(watcher, session).await {
                        Some(followed) => followed,
                        None => return,
                    };
                    watcher = back;
                    let now = Instant::now();
                    schedule.captured(captured, now);
                    if !added.is_empty() {
                        // What was made in them before their watch existed raised no event.
                        schedule.changed(now);
                    }
                    report(session, &root, &mut problem, watcher.problem());
                    schedule.set_degraded(problem.is_some(), now);
                }
            }
        }
    }

    /// Watches the root and exactly the directories of the session's index (what its last
    /// capture saw; none before the first); returns the watcher and the directories newly
    /// watched.
    async fn follow_index(
        self: &Arc<Self>,
        mut watcher: FsWatch,
        session: &str,
    ) -> Option<(FsWatch, Vec<cloud_protocol::teleport::RelPath>)> {
        let (this, session) = (Arc::clone(self), session.to_owned());
        tokio::task::spawn_blocking(move || {
            let indexes = this.indexes.lock().expect("teleport indexes poisoned");
            let added = match indexes.get(&session) {
                Some(index) => watcher.sync(index),
                None => watcher.sync(&cloud_tree::Index::default()),
            };
            drop(indexes);
            (watcher, added)
        })
        .await
        .ok()
    }
}

/// The watcher's next signal; pending forever once it has none to give.
async fn next_signal(events: &mut Option<fs::FsEvents>) -> Option<FsSignal> {
    match events {
        Some(events) => events.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    if let Some(deadline) = deadline {
        tokio::time::sleep_until(deadline).await;
    }
}

/// Logs a change of the watch's health: a degraded watch says why, that it captures
/// periodically meanwhile, and the fix; a recovery is logged too.
fn report(
    session: &str,
    root: &Path,
    reported: &mut Option<WatchProblem>,
    now: Option<&WatchProblem>,
) {
    if reported.as_ref() == now {
        return;
    }
    match now {
        Some(problem) => tracing::warn!(
            %session,
            workspace = %root.display(),
            "the workspace watch is {}",
            problem.health(PERIODIC)
        ),
        None => {
            tracing::info!(%session, "the workspace watch recovered: every directory is watched")
        }
    }
    *reported = now.cloned();
}
