//! One-file edit propagation: a file of the tree is rewritten locally, and the clock runs
//! from just before the write until the session's workspace holds the new content (polled
//! every [`POLL`]; the relay writes a temp file and renames it, so a read sees the old
//! content or the new, never part of it).
//!
//! How the edit travels: the daemon's watch (nothing but the write), or an explicit push
//! after each write (a `teleport/push` request on the socket, or a `cloudctl teleport push`
//! process).
//!
//! This module writes only the tree's files it picks, with new content of the same size.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use cloudd_e2e::Home;

use crate::ipc::Connection;
use crate::tree::Seeded;

/// How often the workspace is read while waiting for an edit.
pub const POLL: Duration = Duration::from_micros(500);

/// How an edit reaches the relay.
pub enum Via<'a> {
    /// The daemon's watch: nothing to do after the write.
    Watch,
    /// A `teleport/push` request on a socket connection after each write.
    PushRequest(&'a mut Connection),
    /// `cloudctl --json teleport push ROOT --session S` after each write.
    Cloudctl(&'a Home),
}

/// The edits' propagation times, and for pushes through `cloudctl` the relay's commit
/// within each (from its `commit` progress step to `done`), in nanoseconds.
#[derive(Debug, Clone, Default)]
pub struct EditTimes {
    pub times: Vec<u64>,
    pub commits: Vec<u64>,
}

/// Where edits are made and looked for.
#[derive(Debug, Clone)]
pub struct Edits<'a> {
    pub root: &'a Path,
    pub workspace: &'a Path,
    pub session: &'a str,
    /// The files edits pick from (relative to `root`), with their sizes.
    pub files: &'a [(PathBuf, u64)],
    /// Waited after each edit arrived, before the next.
    pub gap: Duration,
    /// How long one edit may take to arrive.
    pub deadline: Duration,
}

impl Edits<'_> {
    /// Makes `n` edits (texts tagged `label`), returns each one's propagation time, in
    /// order.
    pub fn run(
        &self,
        label: &str,
        n: usize,
        via: &mut Via<'_>,
        rng: &mut Seeded,
    ) -> anyhow::Result<EditTimes> {
        let mut times = EditTimes::default();
        let mut content = Vec::new();
        for i in 0..n {
            let (path, size) = &self.files[rng.below(self.files.len())];
            let head = format!("edit {label} {i}\n");
            content.clear();
            content.extend_from_slice(head.as_bytes());
            let mut rest = vec![0u8; (*size as usize).saturating_sub(head.len())];
            rng.fill_text(&mut rest);
            content.extend_from_slice(&rest);
            let began = Instant::now();
            std::fs::write(self.root.join(path), &content)
                .with_context(|| format!("write {}", path.display()))?;
            match via {
                Via::Watch => {}
                Via::PushRequest(connection) => {
                    connection.push(self.root, self.session)?;
                }
                Via::Cloudctl(home) => {
                    let pushed = crate::push::push(home, self.root, self.session)?;
                    if let Some(commit) = pushed.commit() {
                        times.commits.push(commit.as_nanos() as u64);
                    }
                }
            }
            self.arrived(path, &content, began)
                .with_context(|| format!("edit {label} {i} of {}", path.display()))?;
            times.times.push(began.elapsed().as_nanos() as u64);
            std::thread::sleep(self.gap);
        }
        Ok(times)
    }

    /// Waits until the workspace's `path` holds `content`.
    fn arrived(&self, path: &Path, content: &[u8], began: Instant) -> anyhow::Result<()> {
        let target = self.workspace.join(path);
        loop {
            if std::fs::read(&target).is_ok_and(|got| got == content) {
                return Ok(());
            }
            if began.elapsed() > self.deadline {
                bail!(
                    "the new content did not reach {} within {:?}",
                    target.display(),
                    self.deadline
                );
            }
            std::thread::sleep(POLL);
        }
    }
}
