//! One watch: the task that keeps a linked worktree and its session in step until it is
//! cancelled. It feeds the [`Schedule`] with what happens (file-system events, the relay
//! connection going up and down, the session's new versions announced in its log) and
//! runs what becomes due: a push of the changed paths (a rescan of just those on top of
//! the index), a full rescan and push, or a pull. Each goes through the same
//! [`Teleport::push_held`] / [`Teleport::pull_held`] as `teleport push` and `pull`, under
//! the worktree's operation lock, and is published on the teleport feed (its progress,
//! then [`Notification::Teleported`]).
//!
//! While the relay is unreachable nothing is sent and events are only counted: the full
//! rescan at reconnect finds the edits again (events are never replayed).
//!
//! This module must never scan, hash or write on the runtime's thread (the tree's work
//! goes to the blocking pool) and never writes worktree files itself (`pull` does).

use std::sync::{Arc, Mutex};

use cloud_protocol::ipc::{BridgeState, Notification, RelayStatus};
use cloud_protocol::session::SessionEvent;
use cloud_protocol::teleport::RelPath;
use tokio::sync::{broadcast, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::debounce::{Due, Schedule, PERIODIC_RESCAN};
use super::tree::WatchedTree;
use super::Health;
use crate::link::BridgeCommand;
use crate::teleport::local::Start;
use crate::teleport::worktrees::Worktrees;
use crate::teleport::{Reporter, Teleport, TeleportError};
use cloud_tree::watch::{self as fs, FsEvents, FsSignal};

/// What woke the watch up.
#[derive(Debug)]
enum Wake {
    Cancelled,
    Fs(Option<FsSignal>),
    Status(bool),
    Log(Result<Arc<Notification>, broadcast::error::RecvError>),
    Deadline,
}

/// A running watch's state.
struct Watch {
    teleport: Arc<Teleport>,
    root: String,
    /// The linked session (the link may be moved to another one by a push).
    session: String,
    /// The version both sides agreed on, as of the latest step.
    version: u64,
    /// The index and the watches; `None` while a step on the blocking pool holds them
    /// (and after that step died, until it is opened again).
    tree: Option<WatchedTree>,
    /// The watcher's events (`None` once it stopped sending).
    events: Option<FsEvents>,
    schedule: Schedule,
    health: Arc<Mutex<Health>>,
}

/// Runs the watch of the link at `root` until `cancel` (or until the link is gone or no
/// longer watched).
pub(super) async fn run(
    teleport: Arc<Teleport>,
    root: String,
    cancel: CancellationToken,
    health: Arc<Mutex<Health>>,
) {
    // Subscribed before anything else: an announcement made while the watch starts is
    // not missed.
    let mut log = Some(teleport.link.session_feed.subscribe());
    let mut status = teleport.link.watch_status();
    let Some(mut watch) = (tokio::select! {
        _ = cancel.cancelled() => None,
        watch = Watch::open(teleport, root, health, &status) => watch,
    }) else {
        return;
    };
    loop {
        watch.report_health();
        if let Some(due) = watch.schedule.next(Instant::now()) {
            let go_on = tokio::select! {
                _ = cancel.cancelled() => false,
                go_on = watch.perform(due) => go_on,
            };
            if !go_on {
                return;
            }
            continue;
        }
        let deadline = watch.schedule.deadline();
        let wake = tokio::select! {
            _ = cancel.cancelled() => Wake::Cancelled,
            signal = next_signal(&mut watch.events) => Wake::Fs(signal),
            changed = status.changed() => match changed {
                Ok(()) => Wake::Status(connected(&status.borrow_and_update())),
                // The link is gone: the daemon is stopping.
                Err(_) => Wake::Cancelled,
            },
            notice = next_notice(&mut log) => Wake::Log(notice),
            () = sleep_until(deadline) => Wake::Deadline,
        };
        let now = Instant::now();
        match wake {
            Wake::Cancelled => return,
            Wake::Fs(Some(FsSignal::Changed(paths))) => watch.schedule.changed(paths, now),
            Wake::Fs(Some(FsSignal::Rescan(why))) => {
                tracing::debug!(root = %watch.root, "rescanning the worktree: {why}");
                watch.schedule.overflowed(now);
            }
            Wake::Fs(None) => {
                // The watcher stopped sending: from now on periodic rescans find the
                // changes (the health says so).
                tracing::warn!(root = %watch.root, "the file-system watcher stopped");
                watch.events = None;
                watch.schedule.overflowed(now);
            }
            Wake::Status(up) => watch.schedule.set_connected(up, now),
            Wake::Log(Ok(notice)) => watch.on_log(&notice),
            Wake::Log(Err(broadcast::error::RecvError::Lagged(_))) => {
                // Announcements were missed: ask the session (a pull of nothing new
                // costs one question).
                watch.schedule.remote_changed();
            }
            Wake::Log(Err(broadcast::error::RecvError::Closed)) => log = None,
            Wake::Deadline => {}
        }
    }
}

fn connected(status: &RelayStatus) -> bool {
    status.state == BridgeState::Connected
}

async fn next_signal(events: &mut Option<FsEvents>) -> Option<FsSignal> {
    match events {
        Some(events) => events.recv().await,
        None => std::future::pending().await,
    }
}

async fn next_notice(
    log: &mut Option<broadcast::Receiver<Arc<Notification>>>,
) -> Result<Arc<Notification>, broadcast::error::RecvError> {
    match log {
        Some(log) => log.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

impl Watch {
    /// Opens the watch: the link as stored, the session followed (so its log, with the
    /// announcements of new versions, comes to this daemon), the watches in place. A
    /// worktree that cannot be watched now (its root is missing) is tried again every
    /// [`PERIODIC_RESCAN`]. `None`: the link is gone or no longer watched.
    async fn open(
        teleport: Arc<Teleport>,
        root: String,
        health: Arc<Mutex<Health>>,
        status: &watch::Receiver<RelayStatus>,
    ) -> Option<Watch> {
        loop {
            let worktrees = teleport.worktrees.clone();
            let stored_root = root.clone();
            let worktree = Teleport::blocking(move || Ok(worktrees.get(&stored_root)?)).await;
            let worktree = match worktree {
                Ok(Some(worktree)) if worktree.watching => worktree,
                Ok(_) => return None,
                Err(e) => {
                    set_health(&health, format!("cannot read the link: {e}"), 0);
                    tokio::time::sleep(PERIODIC_RESCAN).await;
                    continue;
                }
            };
            let (handler, events) = fs::channel(std::path::Path::new(&root));
            let worktrees = teleport.worktrees.clone();
            let tree_root = root.clone();
            let tree =
                Teleport::blocking(move || WatchedTree::open(&worktrees, &tree_root, handler))
                    .await;
            match tree {
                Ok(tree) => {
                    let watch = Watch {
                        schedule: Schedule::new(Instant::now(), connected(&status.borrow())),
                        teleport,
                        root,
                        session: worktree.session,
                        version: worktree.version,
                        tree: Some(tree),
                        events: Some(events),
                        health,
                    };
                    watch.follow();
                    return Some(watch);
                }
                Err(e) => {
                    set_health(
                        &health,
                        format!("cannot watch: {e}; trying again every {PERIODIC_RESCAN:?}"),
                        0,
                    );
                    tokio::time::sleep(PERIODIC_RESCAN).await;
                }
            }
        }
    }

    /// Makes sure the session's log comes to this daemon (the bridge rejoins every
    /// followed session at each connect; a join now when it is connected).
    fn follow(&self) {
        let link = &self.teleport.link;
        match link.inbound.is_followed(&self.session) {
            Ok(true) => {}
            Ok(false) => {
                if let Err(e) = link.inbound.follow(&self.session) {
                    tracing::error!(session = %self.session, "cannot follow the watched session: {e}");
                    return;
                }
                let _ = link.commands.try_send(BridgeCommand::Join {
                    session: self.session.clone(),
                });
            }
            Err(e) => tracing::error!("cannot read the followed sessions: {e}"),
        }
    }

    /// A session log entry: a version this side lacks makes a pull due (one this daemon
    /// just pushed is the agreed version already).
    fn on_log(&mut self, notice: &Notification) {
        let Notification::SessionLog { session, entry } = notice else {
            return;
        };
        if *session != self.session {
            return;
        }
        if let SessionEvent::Snapshot(info) = &entry.event {
            if info.version > self.version {
                self.schedule.remote_changed();
            }
        }
    }

    /// Publishes the watcher's health and the pending changes for `teleport status`, and
    /// tells the schedule whether periodic rescans are needed.
    fn report_health(&mut self) {
        let Some(tree) = &self.tree else {
            return;
        };
        let problem = match (tree.problem(), &self.events) {
            (Some(problem), _) => Some(problem.health(PERIODIC_RESCAN)),
            (None, None) => Some(format!(
                "degraded: the file-system watcher stopped; changes are found by a full rescan every {PERIODIC_RESCAN:?} meanwhile"
            )),
            (None, Some(_)) => None,
        };
        self.schedule
            .set_degraded(problem.is_some(), Instant::now());
        let (pending, _) = self.schedule.pending();
        set_health(
            &self.health,
            problem.unwrap_or_else(|| "ok".to_owned()),
            pending,
        );
    }

    /// Runs one due step under the worktree's operation lock. `false`: the link is gone or
    /// no longer watched, and the watch ends.
    async fn perform(&mut self, due: Due) -> bool {
        let teleport = Arc::clone(&self.teleport);
        let _held = teleport.hold(&self.root).await;
        // The link as stored now: another request may have stopped it, or moved it to
        // another session, or moved its version on.
        let (worktrees, root) = (self.teleport.worktrees.clone(), self.root.clone());
        let worktree = match Teleport::blocking(move || Ok(worktrees.get(&root)?)).await {
            Ok(Some(worktree)) if worktree.watching => worktree,
            Ok(_) => return false,
            Err(e) => {
                tracing::error!(root = %self.root, "cannot read the watched link: {e}");
                self.schedule.failed(&due, Instant::now());
                return true;
            }
        };
        if worktree.session != self.session {
            self.session = worktree.session.clone();
            self.follow();
        }
        self.version = worktree.version;
        let result = match &due {
            Due::Pull => self.pull().await,
            Due::Full => self.push(None).await,
            Due::Paths(paths) => self.push(Some(paths.clone())).await,
        };
        self.teleport.record_result(&self.root, &result).await;
        match result {
            Ok(()) => {}
            Err(e) => {
                tracing::warn!(root = %self.root, session = %self.session, "the watch's {} failed: {e}", if due == Due::Pull { "pull" } else { "push" });
                self.schedule.failed(&due, Instant::now());
            }
        }
        true
    }

    fn reporter(&self) -> Reporter {
        Reporter::new(
            &self.root,
            &self.session,
            None,
            Some(self.teleport.feed.clone()),
        )
    }

    /// Runs `work` on the tree, on the blocking pool. A tree lost to a step that died is
    /// opened again first (with a new watcher).
    async fn with_tree<T: Send + 'static>(
        &mut self,
        work: impl FnOnce(&mut WatchedTree, &Worktrees) -> Result<T, TeleportError> + Send + 'static,
    ) -> Result<T, TeleportError> {
        let mut tree = match self.tree.take() {
            Some(tree) => tree,
            None => {
                let (handler, events) = fs::channel(std::path::Path::new(&self.root));
                let (worktrees, root) = (self.teleport.worktrees.clone(), self.root.clone());
                let tree =
                    Teleport::blocking(move || WatchedTree::open(&worktrees, &root, handler))
                        .await?;
                self.events = Some(events);
                tree
            }
        };
        let worktrees = self.teleport.worktrees.clone();
        let (tree, result) = cloud_tree::bulk::spawn(move || {
            let result = work(&mut tree, &worktrees);
            (tree, result)
        })
        .await
        .map_err(|e| TeleportError::Local(format!("a watch step failed: {e}")))?;
        self.tree = Some(tree);
        result
    }

    /// Pushes: `paths` rescanned on top of the index, or (`None`) a full scan through it.
    /// After a rescan only what changed is diffed against the stored agreed tree (see
    /// [`WatchedTree::changes`]).
    async fn push(&mut self, paths: Option<Vec<RelPath>>) -> Result<(), TeleportError> {
        let reporter = self.reporter();
        let (root, scan_reporter) = (self.root.clone(), reporter.clone());
        let start = self
            .with_tree(move |tree, worktrees| {
                // Another operation (an explicit push or pull) scanned meanwhile: its
                // index is the newer one.
                if worktrees.index_stamp(&root)? != tree.stamp() {
                    tree.adopt(worktrees, worktrees.index(&root)?)?;
                }
                Ok(match paths {
                    Some(paths) => {
                        let problems = tree.rescan_paths(worktrees, &paths)?;
                        match tree.changes(worktrees, problems.clone())? {
                            Some(changes) => Start::Changes(changes),
                            None => Start::Found(tree.found(worktrees, problems)?),
                        }
                    }
                    None => Start::Found(tree.scan(worktrees, &scan_reporter)?),
                })
            })
            .await?;
        let pushed = self
            .teleport
            .push_held(&self.root, &self.session, &reporter, start, true)
            .await?;
        let index = pushed.index;
        let version = pushed.outcome.version;
        self.with_tree(move |tree, worktrees| {
            tree.pushed();
            match index {
                // A retry scanned again: the agreed tree is that scan's.
                Some(index) => tree.adopt_agreed(worktrees, index),
                None => Ok(()),
            }
        })
        .await?;
        self.version = version;
        self.schedule.pushed();
        if pushed.committed {
            tracing::debug!(root = %self.root, version = self.version, files = pushed.outcome.files, "the watch pushed");
            let _ = self
                .teleport
                .feed
                .send(Arc::new(Notification::Teleported(pushed.outcome)));
        }
        Ok(())
    }

    /// Pulls the session's newer version into the worktree.
    async fn pull(&mut self) -> Result<(), TeleportError> {
        let reporter = self.reporter();
        let mut worktree = self.teleport.link_to(&self.root, &self.session).await?;
        let pulled = self.teleport.pull_held(&mut worktree, &reporter).await?;
        self.version = worktree.version;
        if worktree.unapplied {
            // Some changes could not be written (a path in the way): tried again later.
            self.schedule.failed(&Due::Pull, Instant::now());
        } else {
            self.schedule.pulled();
        }
        let Some(index) = pulled.index else {
            // Nothing new.
            return Ok(());
        };
        self.with_tree(move |tree, worktrees| tree.adopt(worktrees, index))
            .await?;
        reporter.report("done", 1, 1, 0, 0);
        let _ = self.teleport.feed.send(Arc::new(Notification::Teleported(
            cloud_protocol::ipc::TeleportOutcome {
                root: self.root.clone(),
                session: self.session.clone(),
                version: pulled.version,
                files: pulled.files,
                blobs: pulled.blobs,
                bytes: pulled.bytes,
                conflicts: pulled.conflicts,
                problems: pulled.problems,
            },
        )));
        Ok(())
    }
}

fn set_health(health: &Mutex<Health>, watcher: String, pending: u64) {
    let mut health = health.lock().expect("health lock poisoned");
    health.watcher = watcher;
    health.pending = pending;
}
