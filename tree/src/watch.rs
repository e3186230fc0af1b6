//! The OS watcher: `notify` (inotify on Linux, FSEvents on macOS, kqueue on the BSDs) with
//! one NON-recursive watch per directory the scanner includes (the daemon's worktrees, the
//! relay's session workspaces) (the root and every `Dir` of
//! the index), so `.git`, `target/`, `node_modules` and every other ignored tree cost no
//! watch and raise no event. [`FsWatch::sync`] and [`FsWatch::update`] keep the watches in
//! step with the index: a new directory gets a watch, a gone one loses it, a directory
//! replaced by another of the same name (a new inode) is watched anew.
//!
//! Events arrive on notify's thread; [`Handler`] turns them into worktree paths (dropping
//! teleport's own temp files, [`TEMP_PREFIX`]) and hands them to the watch's task on a bounded queue ([`FsEvents`]). A full queue, the kernel's
//! overflow (notify's rescan flag) and a watcher error all become one
//! [`FsSignal::Rescan`]: the task then rescans through the index, nothing is lost.
//! Hitting the watch limit is a [`WatchProblem`] whose text says how to fix it.
//!
//! Blocking: adding a watch waits for notify's thread, so [`FsWatch`] runs on the blocking
//! pool. This module must never read a file, decide what is content (the index does) or
//! talk to a peer.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use cloud_protocol::teleport::{EntryKind, RelPath};

use crate::{Index, IndexChange};
use notify::event::{AccessKind, AccessMode};
use notify::{Event, EventKind, RecursiveMode, Watcher as _};
use tokio::sync::mpsc;

use crate::write::TEMP_PREFIX;

/// Event batches that wait for the watch's task; beyond, a rescan replaces them.
pub const SIGNAL_QUEUE: usize = 1024;

/// The fix for the inotify watch limit, as `teleport status` shows it.
pub const WATCH_LIMIT_FIX: &str =
    "raise fs.inotify.max_user_watches, e.g. sysctl fs.inotify.max_user_watches=524288";

/// The fix for the inotify instance limit.
pub const INSTANCE_LIMIT_FIX: &str =
    "raise fs.inotify.max_user_instances, e.g. sysctl fs.inotify.max_user_instances=1024";

/// What the watcher tells the watch's task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FsSignal {
    /// These paths (relative to the root) changed.
    Changed(Vec<RelPath>),
    /// Events were lost: rescan everything. Says why.
    Rescan(String),
}

/// Why some directories are not watched. While there is one, the watch rescans the whole
/// worktree periodically.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchProblem {
    /// The inotify watch limit is reached.
    Limit { watched: usize, wanted: usize },
    /// No watcher could be made (the inotify instance limit, most likely).
    NoWatcher(String),
    /// A directory could not be watched for another reason.
    Other { dir: String, error: String },
}

impl WatchProblem {
    /// What `teleport status` says: what is wrong, what the watch does meanwhile, the fix.
    pub fn health(&self, every: std::time::Duration) -> String {
        let meanwhile = format!("changes are found by a full rescan every {every:?} meanwhile");
        match self {
            WatchProblem::Limit { watched, wanted } => format!(
                "degraded: the inotify watch limit is reached ({watched} of {wanted} directories watched); {meanwhile}. Fix: {WATCH_LIMIT_FIX}"
            ),
            WatchProblem::NoWatcher(error) => format!(
                "degraded: no file-system watcher ({error}); {meanwhile}. Fix: {INSTANCE_LIMIT_FIX}"
            ),
            WatchProblem::Other { dir, error } => {
                format!("degraded: cannot watch {dir}: {error}; {meanwhile}")
            }
        }
    }
}

/// notify's side of the queue: runs on notify's thread.
#[derive(Debug, Clone)]
pub struct Handler {
    root: PathBuf,
    queue: mpsc::Sender<FsSignal>,
    /// Set when the queue was full: the task's side turns it into a rescan.
    overflowed: Arc<AtomicBool>,
}

/// The watch's task's side of the queue.
#[derive(Debug)]
pub struct FsEvents {
    queue: mpsc::Receiver<FsSignal>,
    overflowed: Arc<AtomicBool>,
}

/// A queue from a watcher of `root` to the watch's task.
pub fn channel(root: &Path) -> (Handler, FsEvents) {
    channel_with_capacity(root, SIGNAL_QUEUE)
}

fn channel_with_capacity(root: &Path, capacity: usize) -> (Handler, FsEvents) {
    let (queue, receiver) = mpsc::channel(capacity);
    let overflowed = Arc::new(AtomicBool::new(false));
    (
        Handler {
            root: root.to_owned(),
            queue,
            overflowed: Arc::clone(&overflowed),
        },
        FsEvents {
            queue: receiver,
            overflowed,
        },
    )
}

impl FsEvents {
    /// The next signal; `None` once the watcher is gone.
    pub async fn recv(&mut self) -> Option<FsSignal> {
        if self.overflowed.swap(false, Ordering::AcqRel) {
            return Some(FsSignal::Rescan("the event queue overflowed".into()));
        }
        let signal = self.queue.recv().await;
        if self.overflowed.swap(false, Ordering::AcqRel) {
            return Some(FsSignal::Rescan("the event queue overflowed".into()));
        }
        signal
    }
}

impl Handler {
    /// Takes one of notify's events.
    pub fn handle(&self, event: notify::Result<Event>) {
        let signal = match event {
            Err(e) => FsSignal::Rescan(format!("the watcher failed: {e}")),
            Ok(event) if event.need_rescan() => {
                FsSignal::Rescan("the kernel's event queue overflowed".into())
            }
            Ok(event) => match event.kind {
                // Opens and reads (the scanner's own among them) change nothing.
                EventKind::Access(AccessKind::Close(AccessMode::Write)) => self.paths(&event),
                EventKind::Access(_) => return,
                _ => self.paths(&event),
            },
        };
        if let FsSignal::Changed(paths) = &signal {
            if paths.is_empty() {
                return;
            }
        }
        if let Err(mpsc::error::TrySendError::Full(_)) = self.queue.try_send(signal) {
            self.overflowed.store(true, Ordering::Release);
        }
    }

    /// The event's paths under the root. A path that is not content (`.git`, a name that
    /// is not a `RelPath`) is dropped; an event about the root itself (moved, removed)
    /// is a rescan.
    fn paths(&self, event: &Event) -> FsSignal {
        let mut paths = Vec::new();
        for path in &event.paths {
            let Ok(relative) = path.strip_prefix(&self.root) else {
                continue;
            };
            if relative.as_os_str().is_empty() {
                return FsSignal::Rescan("the worktree's root itself changed".into());
            }
            // A temp file of the safe writer comes and goes within one write; the rename
            // that ends it is an event of the real name.
            if relative
                .file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with(TEMP_PREFIX))
            {
                continue;
            }
            if let Some(path) = relative.to_str().and_then(|s| RelPath::new(s).ok()) {
                paths.push(path);
            }
        }
        FsSignal::Changed(paths)
    }
}

impl notify::EventHandler for Handler {
    fn handle_event(&mut self, event: notify::Result<Event>) {
        self.handle(event);
    }
}

/// The watches of one worktree.
#[derive(Debug)]
pub struct FsWatch {
    root: PathBuf,
    /// `None` when no watcher could be made (degraded from the start).
    watcher: Option<notify::RecommendedWatcher>,
    /// Whether the root itself is watched.
    root_watched: bool,
    /// Watched directories and the inode each watch is on.
    watched: BTreeMap<RelPath, u64>,
    /// Directories wanted and not watched (the limit was hit), by inode.
    unwatched: BTreeMap<RelPath, u64>,
    problem: Option<WatchProblem>,
}

/// Whether a watch error is the watch limit.
fn is_limit(error: &notify::Error) -> bool {
    match &error.kind {
        notify::ErrorKind::MaxFilesWatch => true,
        notify::ErrorKind::Io(e) => e.raw_os_error() == Some(libc::ENOSPC),
        _ => false,
    }
}

/// Whether a watch error says the directory is gone (a later event or rescan tells).
fn is_gone(error: &notify::Error) -> bool {
    match &error.kind {
        notify::ErrorKind::PathNotFound => true,
        notify::ErrorKind::Io(e) => e.kind() == std::io::ErrorKind::NotFound,
        _ => false,
    }
}

/// The directories `index` holds, with their inodes.
fn dirs_of(index: &Index) -> impl Iterator<Item = (&RelPath, u64)> {
    index
        .iter()
        .filter(|(_, indexed)| indexed.kind == EntryKind::Dir)
        .map(|(path, indexed)| (path, indexed.stat.ino))
}

impl FsWatch {
    /// Starts a watcher of `root` whose events go to `handler`. Never fails: a watcher
    /// that cannot be made is a [`WatchProblem`] (the watch rescans periodically).
    pub fn start(root: &Path, handler: Handler) -> FsWatch {
        let (watcher, problem) =
            match notify::RecommendedWatcher::new(handler, notify::Config::default()) {
                Ok(watcher) => (Some(watcher), None),
                Err(e) => (None, Some(WatchProblem::NoWatcher(e.to_string()))),
            };
        FsWatch {
            root: root.to_owned(),
            watcher,
            root_watched: false,
            watched: BTreeMap::new(),
            unwatched: BTreeMap::new(),
            problem,
        }
    }

    /// Why some directories are not watched, if any are not.
    pub fn problem(&self) -> Option<&WatchProblem> {
        self.problem.as_ref()
    }

    /// The watched directories (the root is not listed).
    pub fn watched(&self) -> impl Iterator<Item = &RelPath> {
        self.watched.keys()
    }

    /// Whether the root is watched.
    pub fn root_watched(&self) -> bool {
        self.root_watched
    }

    /// Watches exactly the root and the directories of `index` (after a full scan).
    /// Returns the directories newly watched: what was created in them before their watch
    /// existed raised no event, so the caller rescans them.
    pub fn sync(&mut self, index: &Index) -> Vec<RelPath> {
        let wanted: BTreeMap<&RelPath, u64> = dirs_of(index).collect();
        let gone: Vec<RelPath> = self
            .watched
            .keys()
            .filter(|path| !wanted.contains_key(path))
            .cloned()
            .collect();
        for path in gone {
            self.unwatch(&path);
        }
        self.unwatched.retain(|path, _| wanted.contains_key(path));
        let mut add: Vec<(RelPath, u64)> = Vec::new();
        for (path, ino) in wanted {
            if self.watched.get(path) != Some(&ino) {
                add.push((path.clone(), ino));
            }
        }
        self.add(add)
    }

    /// Follows a rescan's `changes` (an incremental [`FsWatch::sync`]). Returns the
    /// directories newly watched.
    pub fn update(&mut self, changes: &[IndexChange]) -> Vec<RelPath> {
        let mut add = Vec::new();
        for change in changes {
            match change {
                IndexChange::Remove(path) => self.unwatch_under(path),
                IndexChange::Put(path, indexed) if indexed.kind == EntryKind::Dir => {
                    if self.watched.get(path) != Some(&indexed.stat.ino) {
                        add.push((path.clone(), indexed.stat.ino));
                    }
                }
                IndexChange::Put(path, _) => self.unwatch_under(path),
            }
        }
        // The limit may have been lifted: try those left out again, too.
        add.extend(std::mem::take(&mut self.unwatched));
        self.add(add)
    }

    fn unwatch_under(&mut self, top: &RelPath) {
        let under: Vec<RelPath> = self
            .watched
            .range(top.clone()..)
            .take_while(|(path, _)| path.as_str().starts_with(top.as_str()))
            .filter(|(path, _)| path.starts_with(top))
            .map(|(path, _)| path.clone())
            .collect();
        for path in under {
            self.unwatch(&path);
        }
        self.unwatched.retain(|path, _| !path.starts_with(top));
    }

    fn unwatch(&mut self, path: &RelPath) {
        self.watched.remove(path);
        if let Some(watcher) = &mut self.watcher {
            // Already gone when the directory was removed: nothing to undo.
            let _ = watcher.unwatch(&self.root.join(path.as_str()));
        }
    }

    /// Adds watches (the root's first, if missing), stopping at the watch limit; returns
    /// those added.
    fn add(&mut self, add: Vec<(RelPath, u64)>) -> Vec<RelPath> {
        let Some(watcher) = &mut self.watcher else {
            return Vec::new();
        };
        self.problem = None;
        if !self.root_watched {
            match watcher.watch(&self.root, RecursiveMode::NonRecursive) {
                Ok(()) => self.root_watched = true,
                Err(e) if is_limit(&e) => {
                    self.unwatched.extend(add);
                    self.problem = Some(WatchProblem::Limit {
                        watched: self.watched.len(),
                        wanted: self.watched.len() + self.unwatched.len() + 1,
                    });
                    return Vec::new();
                }
                Err(e) => {
                    self.unwatched.extend(add);
                    self.problem = Some(WatchProblem::Other {
                        dir: self.root.display().to_string(),
                        error: e.to_string(),
                    });
                    return Vec::new();
                }
            }
        }
        // Directories replaced under the same name first: the old watch is on the old
        // directory, which may live on under another name that is about to be watched
        // (the kernel gives one directory one watch, whatever the name).
        for (path, _) in &add {
            if self.watched.remove(path).is_some() {
                let _ = watcher.unwatch(&self.root.join(path.as_str()));
            }
        }
        let mut added = Vec::new();
        let mut pending = add.into_iter();
        for (path, ino) in pending.by_ref() {
            let dir = self.root.join(path.as_str());
            match watcher.watch(&dir, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    self.watched.insert(path.clone(), ino);
                    added.push(path);
                }
                Err(e) if is_limit(&e) => {
                    self.unwatched.insert(path, ino);
                    break;
                }
                // Removed since the scan: the event of its removal is on its way.
                Err(e) if is_gone(&e) => {}
                Err(e) => {
                    self.problem.get_or_insert(WatchProblem::Other {
                        dir: path.to_string(),
                        error: e.to_string(),
                    });
                    self.unwatched.insert(path, ino);
                }
            }
        }
        self.unwatched.extend(pending);
        if !self.unwatched.is_empty() && !matches!(self.problem, Some(WatchProblem::Other { .. })) {
            self.problem = Some(WatchProblem::Limit {
                watched: self.watched.len() + 1,
                wanted: self.watched.len() + self.unwatched.len() + 1,
            });
        }
        added
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{CreateKind, Flag, ModifyKind};

    fn event(kind: EventKind, path: &Path) -> notify::Result<Event> {
        Ok(Event::new(kind).add_path(path.to_owned()))
    }

    #[tokio::test]
    async fn the_handler_keeps_content_paths_and_turns_losses_into_rescans() {
        let root = Path::new("/w/root");
        let (handler, mut events) = channel(root);
        handler.handle(event(
            EventKind::Create(CreateKind::File),
            &root.join("src/a.rs"),
        ));
        // Not content, or not an edit: nothing.
        handler.handle(event(
            EventKind::Modify(ModifyKind::Any),
            &root.join(".git/index"),
        ));
        handler.handle(event(
            EventKind::Access(AccessKind::Open(AccessMode::Read)),
            &root.join("src/a.rs"),
        ));
        handler.handle(event(
            EventKind::Create(CreateKind::File),
            &root.join("src/.cloudd-tmp-00112233deadbeef"),
        ));
        handler.handle(event(
            EventKind::Modify(ModifyKind::Any),
            Path::new("/elsewhere/x"),
        ));
        handler.handle(event(
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            &root.join("b"),
        ));
        // notify's rescan flag (the kernel's queue overflowed).
        handler.handle(Ok(Event::new(EventKind::Other).set_flag(Flag::Rescan)));
        handler.handle(Err(notify::Error::generic("read failed")));
        handler.handle(event(
            EventKind::Remove(notify::event::RemoveKind::Folder),
            root,
        ));
        let p = |s: &str| RelPath::new(s).unwrap();
        assert_eq!(
            events.recv().await,
            Some(FsSignal::Changed(vec![p("src/a.rs")]))
        );
        assert_eq!(events.recv().await, Some(FsSignal::Changed(vec![p("b")])));
        for _ in 0..3 {
            assert!(matches!(events.recv().await, Some(FsSignal::Rescan(_))));
        }
        drop(handler);
        assert_eq!(events.recv().await, None);
    }

    #[tokio::test]
    async fn a_full_queue_becomes_one_rescan() {
        let root = Path::new("/w/root");
        let (handler, mut events) = channel_with_capacity(root, 2);
        for name in ["a", "b", "c", "d"] {
            handler.handle(event(EventKind::Modify(ModifyKind::Any), &root.join(name)));
        }
        assert!(matches!(events.recv().await, Some(FsSignal::Rescan(_))));
        assert!(matches!(events.recv().await, Some(FsSignal::Changed(_))));
        assert!(matches!(events.recv().await, Some(FsSignal::Changed(_))));
        drop(handler);
        assert_eq!(events.recv().await, None);
    }

    #[test]
    fn the_limit_is_reported_with_its_fix() {
        let health = WatchProblem::Limit {
            watched: 10,
            wanted: 12,
        }
        .health(std::time::Duration::from_secs(2));
        assert!(health.contains("watch limit"), "{health}");
        assert!(health.contains("every 2s"), "{health}");
        assert!(
            health.contains("sysctl fs.inotify.max_user_watches=524288"),
            "{health}"
        );
    }
}
