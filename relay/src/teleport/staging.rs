//! Staged files: a push's whole files, written beside the workspaces while the push is
//! still uploading (`WORKSPACES/.staging/<session>/<blob id>`), so that its commit renames
//! them into the workspace instead of writing them then. Without it a push's files were
//! all written after its last byte arrived: 0.6 s of a 2 s push of 20,000 files, on both
//! cores, while the daemon waited.
//!
//! Staging is only ever a shortcut: the blob store has every staged blob (it is staged
//! after it is stored, [`Stages::stage`]), and a file that is not staged, or whose move
//! fails, is written from the store as before. A staged file counts only once its id is
//! in its session's ready set: ids go in after the file is whole, and out when a commit
//! takes one ([`SessionStage::take`]), so a commit never moves a file still being written.
//! A commit links a taken file into the workspace ([`cloud_tree::Root::put_staged`]), so
//! its staged name stays until [`Stages::clear`] hands it, with what the commit did not
//! take, to [`Leftovers::remove`], which the commit runs after it answers. The whole
//! directory goes when the relay starts, and a session's with the session; the staged
//! files of a push that is never committed (its daemon went away) go once the session's
//! staging has been unused for [`STAGED_IDLE`] ([`Stages::expire`]). Nothing ever
//! writes into a staged name once it exists (a new one is made with `O_EXCL`), so a name
//! still linked to a workspace file is never given out again: a blob staged anew while its
//! old name waits for removal is written from the store.
//!
//! Blocking: every call does file IO (callers are on the blocking pool). This module must
//! never decide what a version holds or where a workspace's files go (that is
//! `snapshots` and `materialise`); it only keeps files by blob id.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use cloud_protocol::teleport::ContentId;
use cloud_tree::Staging;

use super::blobs::BlobBytes;

/// The staged files of every session.
#[derive(Debug)]
pub struct Stages {
    /// `WORKSPACES/.staging`: on the workspaces' file system, so a move is a rename.
    dir: PathBuf,
    sessions: Mutex<HashMap<String, Arc<SessionStage>>>,
}

/// How long a session's staged files stay unused before they are removed
/// ([`Stages::expire`]): far longer than any upload takes to reach its commit.
pub const STAGED_IDLE: Duration = Duration::from_secs(10 * 60);

/// One session's staged files.
#[derive(Debug)]
pub struct SessionStage {
    staging: Staging,
    /// When a put or a commit last used this stage (tokio's clock).
    used: Mutex<tokio::time::Instant>,
    /// The ids whose staged file is whole and not yet taken.
    ready: Mutex<HashSet<ContentId>>,
    /// The ids taken since the last [`Stages::clear`]: their names are to be removed.
    taken: Mutex<Vec<ContentId>>,
    /// Batches being staged now or waiting to be ([`Stages::stage_later`]).
    pending: Mutex<usize>,
    /// Held while a batch is written: one at a time per session. Files made in one
    /// directory by several threads at once contend for its lock, and the kernel spins
    /// for it: on two cores, with a file system that had just deleted a tree (whose
    /// inode allocation is slow for a while), four writers at once took 16 s of system
    /// time in an 8 s push that takes 1.4 s with one.
    writing: Mutex<()>,
    changed: Condvar,
}

/// Batches one session may have waiting to be staged; a put beyond waits (the upload then
/// slows to the pace of the staging, and the batches' memory stays bounded).
const MAX_PENDING: usize = 4;

/// How long a commit waits for its session's staging to finish before it writes the
/// files that are not staged yet from the store.
const SETTLE_WAIT: Duration = Duration::from_secs(10);

impl Stages {
    /// The stages under `workspaces/.staging`; whatever an earlier run left there is
    /// removed (no commit can want it: the ready sets were in memory).
    pub fn open(workspaces: &Path) -> Stages {
        let dir = workspaces.join(".staging");
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                tracing::warn!(path = %dir.display(), "cannot remove the files an earlier run staged: {e}");
            }
            _ => {}
        }
        Stages {
            dir,
            sessions: Mutex::default(),
        }
    }

    /// `session`'s stage, opened (its directory made) on first use. Session ids are the
    /// relay's own, checked anyway: one plain component.
    fn session(&self, session: &str) -> std::io::Result<Arc<SessionStage>> {
        let plain = !session.is_empty()
            && session != "."
            && session != ".."
            && !session.contains(['/', '\\', '\0']);
        if !plain {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "a session id that cannot be a directory",
            ));
        }
        let mut sessions = self.sessions.lock().expect("stages poisoned");
        if let Some(stage) = sessions.get(session) {
            stage.touch();
            return Ok(Arc::clone(stage));
        }
        let stage = Arc::new(SessionStage {
            staging: Staging::open(&self.dir.join(session))?,
            used: Mutex::new(tokio::time::Instant::now()),
            ready: Mutex::default(),
            taken: Mutex::default(),
            pending: Mutex::new(0),
            writing: Mutex::new(()),
            changed: Condvar::new(),
        });
        sessions.insert(session.to_owned(), Arc::clone(&stage));
        Ok(stage)
    }

    /// Stages `blobs` (stored already, each a whole file) for `session`'s next commit, on
    /// a thread of the bulk pool, so the put that stored them is answered now; a commit
    /// waits for it ([`SessionStage::settle`]). Waits first while [`MAX_PENDING`] batches
    /// of the session are being staged.
    pub fn stage_later<B: BlobBytes + Send + 'static>(&self, session: &str, blobs: Vec<B>) {
        let stage = match self.session(session) {
            Ok(stage) => stage,
            Err(e) => {
                tracing::debug!(%session, "cannot stage files: {e}");
                return;
            }
        };
        {
            let mut pending = stage.pending.lock().expect("stage poisoned");
            if *pending >= MAX_PENDING {
                let began = std::time::Instant::now();
                while *pending >= MAX_PENDING {
                    pending = stage.changed.wait(pending).expect("stage poisoned");
                }
                tracing::debug!(%session, "a put waited {:?} for the staging", began.elapsed());
            }
            *pending += 1;
        }
        let session = session.to_owned();
        // Not awaited: `settle` is how a commit waits for it.
        drop(cloud_tree::bulk::spawn(move || {
            stage.write(&session, &blobs);
            *stage.pending.lock().expect("stage poisoned") -= 1;
            stage.changed.notify_all();
        }));
    }

    /// Stages `blobs` (stored already, each a whole file) for `session`'s next commit, on
    /// the calling thread.
    #[cfg(test)]
    pub fn stage<B: BlobBytes>(&self, session: &str, blobs: &[B]) {
        match self.session(session) {
            Ok(stage) => stage.write(session, blobs),
            Err(e) => tracing::debug!(%session, "cannot stage files: {e}"),
        }
    }

    /// `session`'s stage, if it has one (a use of it).
    pub fn get(&self, session: &str) -> Option<Arc<SessionStage>> {
        let stage = self
            .sessions
            .lock()
            .expect("stages poisoned")
            .get(session)
            .cloned();
        if let Some(stage) = &stage {
            stage.touch();
        }
        stage
    }

    /// The staged files of every session whose staging no put or commit used for `idle`
    /// and that has nothing being staged: a push that will not be committed. Cleared as
    /// a commit clears them; the caller removes them ([`Leftovers::remove`]). A commit
    /// that comes later anyway writes its files from the store.
    pub fn expire(&self, idle: Duration) -> Vec<Leftovers> {
        let quiet: Vec<String> = self
            .sessions
            .lock()
            .expect("stages poisoned")
            .iter()
            .filter(|(_, stage)| {
                stage.used.lock().expect("stage poisoned").elapsed() >= idle
                    && *stage.pending.lock().expect("stage poisoned") == 0
            })
            .map(|(session, _)| session.clone())
            .collect();
        quiet
            .iter()
            .map(|session| self.clear(session))
            .filter(|leftovers| !leftovers.ids.is_empty())
            .collect()
    }

    /// What `session`'s commit leaves in its staging: the names it took (linked into the
    /// workspace) and what it did not take (blobs of a push that will not be committed, or
    /// that the store had already). No later commit can take them; the caller removes
    /// them ([`Leftovers::remove`]) when it has time.
    pub fn clear(&self, session: &str) -> Leftovers {
        let Some(stage) = self.get(session) else {
            return Leftovers::default();
        };
        let mut ids: Vec<ContentId> = stage
            .ready
            .lock()
            .expect("stage poisoned")
            .drain()
            .collect();
        ids.append(&mut stage.taken.lock().expect("stage poisoned"));
        // One put back after a failed move is in both: removed once (a second removal
        // could take a file staged anew meanwhile).
        ids.sort_unstable();
        ids.dedup();
        Leftovers {
            stage: Some(stage),
            ids,
        }
    }

    /// Forgets `session`'s stage and removes its directory (the session is gone).
    pub fn forget(&self, session: &str) {
        if self
            .sessions
            .lock()
            .expect("stages poisoned")
            .remove(session)
            .is_none()
        {
            return;
        }
        let dir = self.dir.join(session);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %dir.display(), "cannot remove staged files: {e}");
            }
        }
    }
}

/// Staged names no commit will take ([`Stages::clear`]).
#[derive(Debug, Default)]
#[must_use = "left-overs stay on disk until removed"]
pub struct Leftovers {
    stage: Option<Arc<SessionStage>>,
    ids: Vec<ContentId>,
}

impl Leftovers {
    /// Removes the names.
    pub fn remove(self) {
        let Some(stage) = self.stage else { return };
        for id in self.ids {
            if let Err(e) = stage.staging.remove(&id.to_hex()) {
                tracing::debug!(blob = %id, "cannot remove a staged file: {e}");
            }
        }
    }
}

impl SessionStage {
    fn touch(&self) {
        *self.used.lock().expect("stage poisoned") = tokio::time::Instant::now();
    }

    /// Writes `blobs` as staged files and marks them ready. A blob staged already is
    /// skipped; one that cannot be written is left to the store (logged at debug: its
    /// commit writes it as before).
    fn write<B: BlobBytes>(&self, session: &str, blobs: &[B]) {
        let _one_at_a_time = self.writing.lock().expect("stage poisoned");
        for blob in blobs {
            let id = blob.id();
            if self.ready.lock().expect("stage poisoned").contains(&id) {
                continue;
            }
            match self.staging.write(&id.to_hex(), blob.bytes()) {
                Ok(true) => {
                    self.ready.lock().expect("stage poisoned").insert(id);
                }
                // Being written by another upload (it marks it ready), or left by one.
                Ok(false) => {}
                Err(e) => tracing::debug!(%session, blob = %id, "cannot stage a file: {e}"),
            }
        }
    }

    /// Waits until no batch of the session is being staged (at most [`SETTLE_WAIT`]: what
    /// is not staged by then is written from the store).
    pub fn settle(&self) {
        let pending = self.pending.lock().expect("stage poisoned");
        let (pending, waited) = self
            .changed
            .wait_timeout_while(pending, SETTLE_WAIT, |pending| *pending > 0)
            .expect("stage poisoned");
        if waited.timed_out() {
            tracing::warn!(
                batches = *pending,
                "staging did not finish in time; the commit writes those files from the store"
            );
        }
    }

    /// Takes the staged file of blob `id`, if one is ready: its name in [`Self::staging`].
    /// The caller moves or links it, or puts it back ([`Self::put_back`]) when it could
    /// not; the name is removed with the commit's left-overs either way.
    pub fn take(&self, id: &ContentId) -> Option<String> {
        if !self.ready.lock().expect("stage poisoned").remove(id) {
            return None;
        }
        self.taken.lock().expect("stage poisoned").push(*id);
        Some(id.to_hex())
    }

    /// Puts back a file [`Self::take`] gave out and the caller did not move.
    pub fn put_back(&self, id: ContentId) {
        self.ready.lock().expect("stage poisoned").insert(id);
    }

    /// The directory the staged files are in.
    pub fn staging(&self) -> &Staging {
        &self.staging
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloud_protocol::blobs::Blob;
    use cloud_protocol::teleport::RelPath;
    use cloud_tree::{Expect, Root};

    fn blob(bytes: &[u8]) -> Blob {
        Blob {
            id: ContentId::of(bytes),
            bytes: bytes.to_vec(),
        }
    }

    #[test]
    fn a_staged_file_moves_in_once_and_what_is_left_is_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let workspaces = dir.path().join("workspaces");
        std::fs::create_dir_all(workspaces.join("s-1")).unwrap();
        let stages = Stages::open(&workspaces);
        let (a, b) = (blob(b"alpha"), blob(b"beta"));
        stages.stage_later("s-1", vec![a.clone(), b.clone()]);
        let stage = stages.get("s-1").unwrap();
        stage.settle();
        // Staging again leaves what is there.
        stages.stage("s-1", std::slice::from_ref(&a));

        let name = stage.take(&a.id).expect("a is ready");
        assert!(stage.take(&a.id).is_none(), "taken once");
        let root = Root::open(&workspaces.join("s-1")).unwrap();
        let path = RelPath::new("src/a.sh").unwrap();
        root.put_staged(&path, true, stage.staging(), &name, Expect::Anything)
            .unwrap();
        let moved = workspaces.join("s-1/src/a.sh");
        assert_eq!(std::fs::read(&moved).unwrap(), b"alpha");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&moved).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o755);
        }

        // What the commit took and what it did not take go; the directory stays for the
        // next push, the linked file in the workspace.
        let staged = workspaces.join(".staging/s-1");
        assert_eq!(std::fs::read_dir(&staged).unwrap().count(), 2);
        let leftovers = stages.clear("s-1");
        assert!(stage.take(&b.id).is_none());
        leftovers.remove();
        assert_eq!(std::fs::read_dir(&staged).unwrap().count(), 0);
        assert_eq!(std::fs::read(&moved).unwrap(), b"alpha");

        // A relay that starts again finds no staged file of an earlier run.
        stages.stage("s-1", std::slice::from_ref(&b));
        assert_eq!(std::fs::read_dir(&staged).unwrap().count(), 1);
        drop(stages);
        let _ = Stages::open(&workspaces);
        assert!(!workspaces.join(".staging").exists());
    }

    #[tokio::test(start_paused = true)]
    async fn the_staged_files_of_a_push_never_committed_go_after_a_quiet_while() {
        let dir = tempfile::tempdir().unwrap();
        let workspaces = dir.path().join("workspaces");
        let stages = Stages::open(&workspaces);
        let staged = workspaces.join(".staging/s-1");
        let (a, b) = (blob(b"alpha"), blob(b"beta"));
        stages.stage("s-1", std::slice::from_ref(&a));
        stages.stage("s-2", std::slice::from_ref(&b));
        let count = |dir: &std::path::Path| std::fs::read_dir(dir).unwrap().count();
        // Expires what is quiet, removes it, and says how many sessions' files went.
        let sweep = |stages: &Stages| {
            let expired = stages.expire(STAGED_IDLE);
            let n = expired.len();
            expired.into_iter().for_each(Leftovers::remove);
            n
        };

        // Just short of the quiet time nothing goes; a use of s-2 starts its wait again.
        tokio::time::advance(STAGED_IDLE - Duration::from_secs(1)).await;
        assert!(stages.expire(STAGED_IDLE).is_empty());
        assert!(stages.get("s-2").is_some());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(sweep(&stages), 1, "s-1 only");
        assert_eq!(count(&staged), 0);
        assert_eq!(count(&workspaces.join(".staging/s-2")), 1);

        // A commit that comes later finds nothing staged (it writes from the store), and
        // the session stages again as before.
        assert!(stages.get("s-1").unwrap().take(&a.id).is_none());
        stages.stage("s-1", std::slice::from_ref(&a));
        assert!(stages.get("s-1").unwrap().take(&a.id).is_some());
        // Nothing being staged is a condition: a stage with a batch pending stays.
        *stages.get("s-2").unwrap().pending.lock().unwrap() += 1;
        tokio::time::advance(STAGED_IDLE).await;
        assert_eq!(sweep(&stages), 1, "s-1 (taken, not cleared) only");
        assert_eq!(count(&staged), 0);
        assert_eq!(count(&workspaces.join(".staging/s-2")), 1);
    }

    #[test]
    fn a_session_id_that_is_not_one_plain_component_stages_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let stages = Stages::open(dir.path());
        for session in ["", ".", "..", "a/b", "..\\x"] {
            stages.stage(session, &[blob(b"x")]);
            assert!(stages.get(session).is_none(), "{session:?}");
        }
    }
}
