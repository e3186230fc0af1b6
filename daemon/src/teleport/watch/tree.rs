//! A watched worktree's local half: the watches that follow its index's directories, and
//! which paths changed since the last push. It turns what the watcher saw into the tree a
//! push starts from: a rescan of just the changed paths on top of the stored index
//! ([`WatchedTree::rescan`]), or a full scan through it ([`WatchedTree::scan`]) after an
//! overflow, a reconnect or a failure; either way the index is stored as it goes.
//!
//! The index stays in the store: a rescan reads the entries of its paths and their parents
//! ([`Worktrees::index_of`]), and only a full scan reads it all. Held in memory, a
//! 20,000-file tree's index was about 5 MiB of a watching daemon's 34.
//!
//! New directories: a directory's watch exists only from when it is added, so what was
//! created in it before that raised no event. Every directory newly watched is rescanned
//! once its watch exists, until no new one turns up: nothing created in a new directory is
//! missed, however fast it came.
//!
//! Edits: the watch also keeps which paths changed in the index since the index last
//! matched the agreed tree, so an edit's push diffs those paths only
//! ([`WatchedTree::changes`], reading only their entries of the stored agreed tree), not
//! the whole tree: its cost follows the edit, not the tree's size, and the agreed tree is
//! never held in memory.
//!
//! Blocking (it scans and waits for notify's thread): runs on the blocking pool. This
//! module must never talk to the relay or write a worktree file.

use std::collections::BTreeSet;
use std::path::Path;

use cloud_protocol::teleport::{Delta, EntryKind, Manifest, RelPath};
use cloud_tree::{Index, IndexChange, Rescan};

use crate::teleport::local::{self, Changes, Found};
use crate::teleport::worktrees::Worktrees;
use crate::teleport::{Reporter, TeleportError};
use cloud_tree::watch::{FsWatch, Handler, WatchProblem};

/// At most this many rounds of "rescan the new directories" per batch (a tree that keeps
/// growing faster than it is watched is left to the next batch's events).
const NEW_DIR_ROUNDS: usize = 64;

/// A watched worktree's index and watches.
#[derive(Debug)]
pub struct WatchedTree {
    root: String,
    /// The scan stamp of the stored index this watch follows: another one means another
    /// operation scanned (see [`WatchedTree::stamp`]).
    stamp: i64,
    pub fs: FsWatch,
    /// Conflict copies in the worktree, as far as the scans know.
    conflicts: BTreeSet<String>,
    /// The paths whose index entries changed since the index last matched the agreed
    /// tree: the next push's changes are under them. `None`: not known (another operation
    /// scanned or pulled), and the next push diffs the whole tree.
    unpushed: Option<BTreeSet<RelPath>>,
    /// Tests: runs between a rescan's walk and the watches it adds (the race window).
    #[cfg(test)]
    after_walk: Option<tests::Hook>,
}

impl WatchedTree {
    /// Starts watching `root`: its directories as the stored index knows them, then a
    /// scan through the index (only stats, unless files changed) and the directories it
    /// found, so the watches are complete even before the relay is reachable. The first
    /// push is the caller's.
    pub fn open(
        worktrees: &Worktrees,
        root: &str,
        handler: Handler,
    ) -> Result<WatchedTree, TeleportError> {
        let index = worktrees.index(root)?;
        let conflicts = worktrees
            .get(root)?
            .map(|w| w.conflicts.into_iter().collect())
            .unwrap_or_default();
        let mut fs = FsWatch::start(Path::new(root), handler);
        fs.sync(&index);
        let mut tree = WatchedTree {
            root: root.to_owned(),
            stamp: index.scanned_at_ns(),
            fs,
            conflicts,
            unpushed: None,
            #[cfg(test)]
            after_walk: None,
        };
        tree.scan(worktrees, &Reporter::silent())?;
        Ok(tree)
    }

    /// The scan stamp of the stored index as this watch last saw it.
    pub fn stamp(&self) -> i64 {
        self.stamp
    }

    /// The watcher's problem, if it has one.
    pub fn problem(&self) -> Option<&WatchProblem> {
        self.fs.problem()
    }

    /// Rescans `paths` (what the watcher saw change) on top of the index; the tree as the
    /// index has it then.
    pub fn rescan(
        &mut self,
        worktrees: &Worktrees,
        paths: &[RelPath],
    ) -> Result<Found, TeleportError> {
        let problems = self.rescan_paths(worktrees, paths)?;
        self.found(worktrees, problems)
    }

    /// Rescans `paths` on top of the index (and, until none turns up, the directories
    /// newly watched), recording the paths that changed. Returns what it found wrong.
    pub fn rescan_paths(
        &mut self,
        worktrees: &Worktrees,
        paths: &[RelPath],
    ) -> Result<Vec<String>, TeleportError> {
        let mut problems = Vec::new();
        let mut targets = paths.to_vec();
        for _ in 0..NEW_DIR_ROUNDS {
            if targets.is_empty() {
                break;
            }
            let rescan = self.rescan_stored(worktrees, &targets)?;
            problems.extend(local::rescan_problems(&rescan));
            self.conflicts
                .extend(rescan.conflict_copies.iter().map(|p| p.to_string()));
            if let Some(unpushed) = &mut self.unpushed {
                unpushed.extend(rescan.changes.iter().map(|c| c.path().clone()));
            }
            #[cfg(test)]
            if let Some(hook) = &mut self.after_walk {
                (hook.0)();
            }
            targets = self.fs.update(&rescan.changes);
        }
        // A conflict copy stays listed until it is removed.
        let root = Path::new(&self.root);
        self.conflicts
            .retain(|copy| root.join(copy).symlink_metadata().is_ok());
        Ok(problems)
    }

    /// The changes from the stored agreed tree to the index, when which paths changed is
    /// known: only those are diffed, and only their entries of the agreed tree are read.
    /// `None` when not known.
    pub fn changes(
        &self,
        worktrees: &Worktrees,
        problems: Vec<String>,
    ) -> Result<Option<Changes>, TeleportError> {
        let Some(unpushed) = &self.unpushed else {
            return Ok(None);
        };
        let base = worktrees.base_under(&self.root, unpushed)?;
        let index = worktrees.index_of(&self.root, unpushed, false)?;
        Ok(Some(Changes {
            delta: changes_under(&base, &index, unpushed),
            problems,
            conflicts: self.conflicts.iter().cloned().collect(),
        }))
    }

    /// A push agreed on a version where the index matched the agreed tree: nothing is
    /// left to push.
    pub fn pushed(&mut self) {
        self.unpushed = Some(BTreeSet::new());
    }

    /// Scans the whole worktree through the index (only what changed is read).
    pub fn scan(
        &mut self,
        worktrees: &Worktrees,
        reporter: &Reporter,
    ) -> Result<Found, TeleportError> {
        let (found, index) = local::scan(worktrees, &self.root, reporter)?.split();
        self.stamp = index.scanned_at_ns();
        self.conflicts = found.conflicts.iter().cloned().collect();
        let added = self.fs.sync(&index);
        drop(index);
        if added.is_empty() {
            return Ok(found);
        }
        let mut rescanned = self.rescan(worktrees, &added)?;
        rescanned.problems.splice(0..0, found.problems);
        Ok(rescanned)
    }

    /// Takes up `index`, which another operation (a pull, a push that scanned again)
    /// stored: the watches follow it, and what appeared in new directories meanwhile is
    /// rescanned.
    pub fn adopt(&mut self, worktrees: &Worktrees, index: Index) -> Result<(), TeleportError> {
        self.stamp = index.scanned_at_ns();
        // What differs from the agreed tree is not known any more.
        self.unpushed = None;
        let added = self.fs.sync(&index);
        drop(index);
        if !added.is_empty() {
            self.rescan(worktrees, &added)?;
        }
        Ok(())
    }

    /// Takes up `index`, the scan a push just agreed on (a retry scanned again): it
    /// matches the agreed tree, and what turns up in new directories is recorded as
    /// changed.
    pub fn adopt_agreed(
        &mut self,
        worktrees: &Worktrees,
        index: Index,
    ) -> Result<(), TeleportError> {
        self.stamp = index.scanned_at_ns();
        self.unpushed = Some(BTreeSet::new());
        let added = self.fs.sync(&index);
        drop(index);
        if !added.is_empty() {
            self.rescan_paths(worktrees, &added)?;
        }
        Ok(())
    }

    /// The tree as the stored index has it (read whole).
    pub fn found(
        &self,
        worktrees: &Worktrees,
        problems: Vec<String>,
    ) -> Result<Found, TeleportError> {
        Ok(Found {
            manifest: worktrees.index(&self.root)?.manifest(),
            problems,
            conflicts: self.conflicts.iter().cloned().collect(),
        })
    }

    /// Rescans `targets` on top of the stored index, reading only the entries the rescan
    /// compares: those at and under each target (under its directory for an ignore file,
    /// the whole index for one at the root) and at their parents. A rescan that finds a
    /// parent is no longer a directory answers for everything under it, which was not
    /// read: it is rescanned with the whole index, so nothing under it stays stored.
    fn rescan_stored(
        &self,
        worktrees: &Worktrees,
        targets: &[RelPath],
    ) -> Result<Rescan, TeleportError> {
        // What the rescan answers for (`None`: the whole tree) is what it must read.
        if let Some(read) = cloud_tree::rescan_targets(targets) {
            let mut index = worktrees.index_of(&self.root, &read, true)?;
            let rescan = local::rescan(worktrees, &self.root, targets, &mut index)?;
            let read_all_of = |path: &RelPath| read.iter().any(|r| path.starts_with(r));
            let widened = rescan.changes.iter().any(|change| match change {
                IndexChange::Put(path, indexed) => {
                    indexed.kind != EntryKind::Dir && !read_all_of(path)
                }
                IndexChange::Remove(path) => !read_all_of(path),
            });
            if !widened {
                return Ok(rescan);
            }
        }
        let mut index = worktrees.index(&self.root)?;
        local::rescan(worktrees, &self.root, targets, &mut index)
    }
}

/// The delta from `base` to `index` under `paths` (everything else is the same on both).
fn changes_under(base: &Manifest, index: &Index, paths: &BTreeSet<RelPath>) -> Delta {
    let (mut old, mut new) = (Manifest::new(), Manifest::new());
    for path in paths {
        for (under, kind) in base.under(path) {
            old.insert(under.clone(), kind.clone());
        }
        for (under, indexed) in index.under(path) {
            new.insert(under.clone(), indexed.kind.clone());
        }
    }
    old.diff(&new)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::time::Duration;

    use cloud_protocol::teleport::{EntryKind, Manifest};
    use notify::event::{Event, EventKind, Flag};

    use super::super::debounce::{Due, Schedule, DEBOUNCE};
    use super::*;
    use cloud_tree::watch::{channel, FsEvents, FsSignal};

    /// How long a test waits for the kernel's events before it fails.
    const EVENTS_DEADLINE: Duration = Duration::from_secs(20);

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    /// Something a test does at a chosen moment.
    pub(super) struct Hook(pub Box<dyn FnMut() + Send>);

    impl std::fmt::Debug for Hook {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("Hook")
        }
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        root: std::path::PathBuf,
        worktrees: Worktrees,
    }

    /// A worktree with a `.git`, ignored trees (`target/`, `node_modules/`) and sources.
    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let worktrees = Worktrees::new(
            crate::teleport::db::TeleportDb::open(&dir.path().join("teleport")).unwrap(),
        );
        let root = dir.path().join("wt");
        for d in [".git/objects", "target/debug", "node_modules/pkg", "src"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        for (file, text) in [
            (".gitignore", "target/\nnode_modules/\n"),
            (".git/HEAD", "ref: refs/heads/main\n"),
            ("target/debug/app", "binary"),
            ("node_modules/pkg/index.js", "js"),
            ("src/a.rs", "fn a() {}\n"),
            ("src/b.rs", "fn b() {}\n"),
        ] {
            std::fs::write(root.join(file), text).unwrap();
        }
        let root = std::fs::canonicalize(root).unwrap();
        Fixture {
            _dir: dir,
            root,
            worktrees,
        }
    }

    fn root_str(fixture: &Fixture) -> &str {
        fixture.root.to_str().unwrap()
    }

    /// Collects changed paths until every one of `wanted` was seen (failing after
    /// [`EVENTS_DEADLINE`]); rescan signals are counted.
    async fn collect_until(events: &mut FsEvents, wanted: &[&str]) -> (BTreeSet<RelPath>, usize) {
        let mut seen = BTreeSet::new();
        let mut rescans = 0;
        let deadline = tokio::time::Instant::now() + EVENTS_DEADLINE;
        while !wanted.iter().all(|w| seen.contains(&p(w))) {
            let signal = tokio::time::timeout_at(deadline, events.recv())
                .await
                .unwrap_or_else(|_| panic!("no event for {wanted:?} in time; seen {seen:?}"))
                .expect("the watcher is running");
            match signal {
                FsSignal::Changed(paths) => seen.extend(paths),
                FsSignal::Rescan(_) => rescans += 1,
            }
        }
        (seen, rescans)
    }

    /// The tree at `root` as a scan with no index finds it.
    fn fresh_scan(root: &Path) -> Manifest {
        let options = cloud_tree::ScanOptions { threads: 1 };
        cloud_tree::scan(root, &Index::default(), &options)
            .unwrap()
            .manifest
    }

    fn watched(tree: &WatchedTree) -> BTreeSet<String> {
        tree.fs.watched().map(|p| p.to_string()).collect()
    }

    fn file_text(manifest: &Manifest, path: &str, root: &Path) -> Option<String> {
        match manifest.get(&p(path))? {
            EntryKind::File { .. } => Some(std::fs::read_to_string(root.join(path)).unwrap()),
            other => panic!("{path} is {other:?}"),
        }
    }

    #[tokio::test]
    async fn events_of_content_are_collected_and_ignored_trees_raise_none() {
        let fixture = fixture();
        let (root, worktrees) = (&fixture.root, &fixture.worktrees);
        let (handler, mut events) = channel(root);
        let mut tree = WatchedTree::open(worktrees, root_str(&fixture), handler).unwrap();
        let found = tree.scan(worktrees, &Reporter::silent()).unwrap();
        assert!(found.manifest.get(&p("src/a.rs")).is_some());
        // Exactly the directories the scanner includes: never .git, never ignored trees.
        assert!(tree.fs.root_watched());
        assert_eq!(watched(&tree), BTreeSet::from(["src".to_owned()]));

        // Writes in .git and ignored trees raise nothing: the sentinel written after them
        // is the first event that arrives (one inotify queue keeps the order).
        std::fs::write(root.join(".git/objects/ab"), "object").unwrap();
        std::fs::write(root.join(".git/index"), "index").unwrap();
        std::fs::write(root.join("target/debug/app"), "rebuilt").unwrap();
        std::fs::create_dir(root.join("target/debug/deps")).unwrap();
        std::fs::write(root.join("node_modules/pkg/other.js"), "more js").unwrap();
        std::fs::write(root.join("src/sentinel"), "s").unwrap();
        let (seen, rescans) = collect_until(&mut events, &["src/sentinel"]).await;
        assert_eq!(seen, BTreeSet::from([p("src/sentinel")]));
        assert_eq!(rescans, 0);

        // Created, modified and removed files, a new directory and a file created in it
        // at once (before its watch can exist).
        std::fs::write(root.join("new.txt"), "new").unwrap();
        std::fs::write(root.join("src/a.rs"), "fn a() { changed() }\n").unwrap();
        std::fs::remove_file(root.join("src/b.rs")).unwrap();
        std::fs::create_dir(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/early.txt"), "early").unwrap();
        let (seen, _) =
            collect_until(&mut events, &["new.txt", "src/a.rs", "src/b.rs", "sub"]).await;
        let paths: Vec<RelPath> = seen.into_iter().collect();
        let found = tree.rescan(worktrees, &paths).unwrap();
        let m = &found.manifest;
        assert_eq!(file_text(m, "new.txt", root).as_deref(), Some("new"));
        assert_eq!(
            file_text(m, "src/a.rs", root).as_deref(),
            Some("fn a() { changed() }\n")
        );
        assert!(m.get(&p("src/b.rs")).is_none());
        assert_eq!(m.get(&p("sub")), Some(&EntryKind::Dir));
        assert_eq!(
            file_text(m, "sub/early.txt", root).as_deref(),
            Some("early")
        );
        assert!(
            watched(&tree).contains("sub"),
            "the new directory is watched"
        );

        // Its watch exists now: a file created in it raises its own event, and a
        // directory created in it is watched in turn.
        std::fs::write(root.join("sub/late.txt"), "late").unwrap();
        std::fs::create_dir(root.join("sub/deeper")).unwrap();
        std::fs::write(root.join("sub/deeper/f"), "deep").unwrap();
        let (seen, _) = collect_until(&mut events, &["sub/late.txt", "sub/deeper"]).await;
        let paths: Vec<RelPath> = seen.into_iter().collect();
        let found = tree.rescan(worktrees, &paths).unwrap();
        assert_eq!(
            file_text(&found.manifest, "sub/late.txt", root).as_deref(),
            Some("late")
        );
        assert_eq!(
            file_text(&found.manifest, "sub/deeper/f", root).as_deref(),
            Some("deep")
        );
        assert_eq!(
            watched(&tree),
            BTreeSet::from(["src", "sub", "sub/deeper"].map(str::to_owned))
        );
        std::fs::write(root.join("sub/deeper/g"), "g").unwrap();
        collect_until(&mut events, &["sub/deeper/g"]).await;

        // A directory removed with what it held: gone from the tree and unwatched.
        std::fs::remove_dir_all(root.join("sub")).unwrap();
        let (seen, _) = collect_until(&mut events, &["sub"]).await;
        let paths: Vec<RelPath> = seen.into_iter().collect();
        let found = tree.rescan(worktrees, &paths).unwrap();
        assert!(found.manifest.under(&p("sub")).next().is_none());
        assert_eq!(watched(&tree), BTreeSet::from(["src".to_owned()]));

        // The stored index is the tree as a full scan finds it: a restart starts from it.
        assert_eq!(
            worktrees.index(root_str(&fixture)).unwrap().manifest(),
            fresh_scan(root)
        );
    }

    #[tokio::test]
    async fn a_file_made_in_a_new_directory_before_its_watch_exists_is_found() {
        let fixture = fixture();
        let (root, worktrees) = (&fixture.root, &fixture.worktrees);
        let (handler, mut events) = channel(root);
        let mut tree = WatchedTree::open(worktrees, root_str(&fixture), handler).unwrap();
        std::fs::create_dir_all(root.join("fresh/inner")).unwrap();
        collect_until(&mut events, &["fresh"]).await;
        // Made after the rescan walked `fresh` and before its watch exists: no event
        // will ever tell of it.
        let racing = root.to_owned();
        let mut once = false;
        tree.after_walk = Some(Hook(Box::new(move || {
            if !std::mem::replace(&mut once, true) {
                std::fs::write(racing.join("fresh/racing.txt"), "r").unwrap();
                std::fs::write(racing.join("fresh/inner/deep.txt"), "d").unwrap();
            }
        })));
        let found = tree.rescan(worktrees, &[p("fresh")]).unwrap();
        assert_eq!(
            file_text(&found.manifest, "fresh/racing.txt", root).as_deref(),
            Some("r")
        );
        assert_eq!(
            file_text(&found.manifest, "fresh/inner/deep.txt", root).as_deref(),
            Some("d")
        );
        assert!(watched(&tree).contains("fresh/inner"));
    }

    #[tokio::test]
    async fn a_rescan_flag_makes_a_full_rescan_that_finds_what_no_event_told() {
        let fixture = fixture();
        let (root, worktrees) = (&fixture.root, &fixture.worktrees);
        let (handler, mut events) = channel(root);
        let inject = handler.clone();
        let mut tree = WatchedTree::open(worktrees, root_str(&fixture), handler).unwrap();
        tree.scan(worktrees, &Reporter::silent()).unwrap();
        let mut schedule = Schedule::new(tokio::time::Instant::now(), true);
        let now = tokio::time::Instant::now();
        assert_eq!(schedule.next(now), Some(Due::Pull));
        assert_eq!(schedule.next(now), Some(Due::Full));

        // Changes whose events are lost (the kernel's queue overflowed): never handed on.
        std::fs::write(root.join("src/a.rs"), "fn a() { lost() }\n").unwrap();
        std::fs::create_dir(root.join("made")).unwrap();
        std::fs::write(root.join("made/f"), "f").unwrap();
        std::fs::remove_file(root.join("src/b.rs")).unwrap();
        // notify's rescan flag, as its inotify backend raises it on IN_Q_OVERFLOW.
        inject.handle(Ok(Event::new(EventKind::Other).set_flag(Flag::Rescan)));
        let deadline = tokio::time::Instant::now() + EVENTS_DEADLINE;
        loop {
            let signal = tokio::time::timeout_at(deadline, events.recv())
                .await
                .expect("the rescan signal in time")
                .expect("the watcher is running");
            // The lost events: dropped.
            if let FsSignal::Rescan(_) = signal {
                break;
            }
        }
        let now = tokio::time::Instant::now();
        schedule.overflowed(now);
        assert_eq!(schedule.next(now), None, "debounced");
        let due = schedule.next(now + DEBOUNCE);
        assert_eq!(due, Some(Due::Full));
        let found = tree.scan(worktrees, &Reporter::silent()).unwrap();
        let m = &found.manifest;
        assert_eq!(
            file_text(m, "src/a.rs", root).as_deref(),
            Some("fn a() { lost() }\n")
        );
        assert_eq!(file_text(m, "made/f", root).as_deref(), Some("f"));
        assert!(m.get(&p("src/b.rs")).is_none());
        assert!(watched(&tree).contains("made"));
        assert!(
            m.iter()
                .all(|(path, _)| !path.as_str().starts_with("target")
                    && !path.as_str().starts_with("node_modules")),
            "ignored trees are not content"
        );
    }

    #[tokio::test]
    async fn a_directory_replaced_under_the_same_name_is_watched_anew() {
        let fixture = fixture();
        let (root, worktrees) = (&fixture.root, &fixture.worktrees);
        let (handler, mut events) = channel(root);
        let mut tree = WatchedTree::open(worktrees, root_str(&fixture), handler).unwrap();
        tree.scan(worktrees, &Reporter::silent()).unwrap();
        // Replaced while nobody looked: the old watch went with the old directory.
        std::fs::rename(root.join("src"), root.join("old-src")).unwrap();
        std::fs::create_dir(root.join("src")).unwrap();
        collect_until(&mut events, &["src", "old-src"]).await;
        tree.rescan(worktrees, &[p("src"), p("old-src")]).unwrap();
        std::fs::write(root.join("src/c.rs"), "c").unwrap();
        std::fs::write(root.join("old-src/d.rs"), "d").unwrap();
        collect_until(&mut events, &["src/c.rs", "old-src/d.rs"]).await;
    }

    #[test]
    fn the_changes_of_what_was_rescanned_are_the_whole_trees_diff() {
        let fixture = fixture();
        let (root, worktrees) = (&fixture.root, &fixture.worktrees);
        let root_s = root_str(&fixture);
        let (handler, _events) = channel(root);
        let mut tree = WatchedTree::open(worktrees, root_s, handler).unwrap();
        // Not known before a push agreed on the index.
        assert!(tree.changes(worktrees, Vec::new()).unwrap().is_none());
        // The agreed tree: the scan's, at version 1 (as a full push would store it).
        let agreed = tree.found(worktrees, Vec::new()).unwrap().manifest;
        worktrees
            .set_base(root_s, &Manifest::new(), &agreed)
            .unwrap();
        tree.pushed();

        let whole_diff = |_: &WatchedTree| {
            let stored = worktrees.index(root_s).unwrap();
            worktrees.base(root_s).unwrap().diff(&stored.manifest())
        };
        // An edit, a removal, a directory that becomes a file, a new directory with files.
        std::fs::write(root.join("src/a.rs"), "fn a() { edited() }\n").unwrap();
        std::fs::remove_file(root.join("src/b.rs")).unwrap();
        std::fs::create_dir_all(root.join("lib/deep")).unwrap();
        std::fs::write(root.join("lib/deep/x.rs"), "x").unwrap();
        let problems = tree
            .rescan_paths(worktrees, &[p("src/a.rs"), p("src/b.rs"), p("lib")])
            .unwrap();
        let changes = tree.changes(worktrees, problems).unwrap().unwrap();
        assert_eq!(changes.delta, whole_diff(&tree));
        assert!(!changes.delta.is_empty());

        // The push failed: the next one still carries these changes, with the new ones.
        std::fs::remove_dir_all(root.join("src")).unwrap();
        std::fs::write(root.join("src"), "now a file").unwrap();
        tree.rescan_paths(worktrees, &[p("src")]).unwrap();
        let changes = tree.changes(worktrees, Vec::new()).unwrap().unwrap();
        assert_eq!(changes.delta, whole_diff(&tree));

        // It is agreed: nothing is left.
        worktrees.apply_base(root_s, &changes.delta).unwrap();
        tree.pushed();
        let after = tree.changes(worktrees, Vec::new()).unwrap().unwrap();
        assert!(after.delta.is_empty());
        assert!(whole_diff(&tree).is_empty());

        // Another operation's index: not known again until a push agrees.
        let index = worktrees.index(root_s).unwrap();
        tree.adopt(worktrees, index).unwrap();
        assert!(tree.changes(worktrees, Vec::new()).unwrap().is_none());
    }

    /// A rescan reads only its paths' entries: one that finds a parent is no longer a
    /// directory must still drop everything that was under it from the stored index.
    #[test]
    fn a_parent_that_became_a_file_takes_what_was_under_it_from_the_stored_index() {
        let fixture = fixture();
        let (root, worktrees) = (&fixture.root, &fixture.worktrees);
        let root_s = root_str(&fixture);
        let (handler, _events) = channel(root);
        let mut tree = WatchedTree::open(worktrees, root_s, handler).unwrap();
        std::fs::remove_dir_all(root.join("src")).unwrap();
        std::fs::write(root.join("src"), "now a file").unwrap();
        // Only the child's event is rescanned, as when the others were lost or merged.
        tree.rescan_paths(worktrees, &[p("src/a.rs")]).unwrap();
        let stored = worktrees.index(root_s).unwrap();
        assert!(stored.get(&p("src/b.rs")).is_none(), "{stored:?}");
        assert_eq!(stored.manifest(), fresh_scan(root));
    }
}
