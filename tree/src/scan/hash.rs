//! Hashing the files a walk left pending, on scoped threads that take batches of
//! neighbours (so each keeps one parent directory open for a run of files).
//!
//! Architecture invariant: every file is opened through [`Root`] (never through a
//! symlink), stat'ed from its descriptor before it is read, and read once.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};

use cloud_protocol::teleport::RelPath;

use crate::content::{hash_reader, FileContent};
use crate::root::{open_file_in, Parent, Root, RootError};
use crate::stat::Stat;

/// Files a hashing thread takes at a time: neighbours, so they share a parent directory.
const BATCH: usize = 16;

type Hashed = io::Result<(Stat, FileContent)>;

/// Hashes `pending` on up to `threads` threads; results in `pending`'s order.
pub(super) fn hash_all(root: &Root, pending: &[(RelPath, Stat)], threads: usize) -> Vec<Hashed> {
    let threads = threads.max(1).min(pending.len().div_ceil(BATCH));
    if threads <= 1 {
        let mut hasher = Hasher::new(root);
        return pending.iter().map(|(path, _)| hasher.hash(path)).collect();
    }
    let next = AtomicUsize::new(0);
    let mut results: Vec<Option<Hashed>> = Vec::new();
    results.resize_with(pending.len(), || None);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                let next = &next;
                std::thread::Builder::new()
                    .name("cloud-tree-hash".into())
                    .spawn_scoped(scope, move || {
                        crate::bulk::worker_started();
                        take_batches(root, pending, next)
                    })
            })
            .collect();
        for worker in workers {
            let done = match worker {
                Ok(handle) => handle
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
                // No thread could be started: what is left is hashed here.
                Err(_) => take_batches(root, pending, &next),
            };
            for (i, result) in done {
                results[i] = Some(result);
            }
        }
    });
    results
        .into_iter()
        .map(|r| r.expect("every pending file is hashed once"))
        .collect()
}

/// A hashing thread's loop: takes batches of neighbours until none is left.
fn take_batches(
    root: &Root,
    pending: &[(RelPath, Stat)],
    next: &AtomicUsize,
) -> Vec<(usize, Hashed)> {
    let mut hasher = Hasher::new(root);
    let mut done = Vec::new();
    loop {
        let start = next.fetch_add(BATCH, Ordering::Relaxed);
        if start >= pending.len() {
            return done;
        }
        let end = (start + BATCH).min(pending.len());
        for (i, (path, _)) in pending[start..end].iter().enumerate() {
            done.push((start + i, hasher.hash(path)));
        }
    }
}

/// Opens and hashes files under a root, keeping the last parent directory open (files
/// come in walk order, so neighbours share it).
struct Hasher<'r> {
    root: &'r Root,
    parent: Option<(Option<RelPath>, Parent<'r>)>,
}

impl<'r> Hasher<'r> {
    fn new(root: &'r Root) -> Hasher<'r> {
        Hasher { root, parent: None }
    }

    /// The file's stat (from its descriptor, before reading) and content.
    fn hash(&mut self, path: &RelPath) -> Hashed {
        let parent_path = path.parent();
        let cached = matches!(&self.parent, Some((p, _)) if *p == parent_path);
        if !cached {
            self.parent = None;
            match self.root.parent(path, false) {
                Ok(Some(parent)) => self.parent = Some((parent_path, parent)),
                Ok(None) => return Err(io::Error::from(io::ErrorKind::NotFound)),
                Err(e) => return Err(into_io(e)),
            }
        }
        let (_, parent) = self.parent.as_ref().expect("opened above");
        let file = open_file_in(parent.dir(), path).map_err(into_io)?;
        let metadata = file.metadata()?;
        let stat = Stat::from_metadata(&metadata);
        let content = hash_reader(&file, stat.size)?;
        Ok((stat, content))
    }
}

/// An error reaching a file, as the `io::Error` an [`Unreadable`] carries (its kind
/// kept where there is one).
fn into_io(error: RootError) -> io::Error {
    match error {
        RootError::Io { source, .. } | RootError::Open { source, .. } => source,
        other => io::Error::other(other.to_string()),
    }
}
