//! The local side of a worktree: scanning it through its persisted index (so an unchanged
//! file is never read again), and reading the blobs a push uploads. Everything here is
//! blocking and runs on the blocking pool, never on the socket's thread.
//!
//! This module must never write a worktree's files (that is `apply`).

use std::collections::{HashMap, HashSet};
use std::path::Path;

use cloud_protocol::blobs::{PutWriter, BATCH_BYTES};
use cloud_protocol::teleport::{ContentId, Delta, EntryKind, Manifest, RelPath};
use cloud_tree::{
    BlobLocation, ContentError, Index, Rescan, Root, Scan, ScanOptions, Skipped, Unreadable,
};

use super::transfer::Batch;
use super::worktrees::Worktrees;
use super::{Reporter, TeleportError};

/// A scan of a worktree, with what it found wrong.
#[derive(Debug)]
pub struct Scanned {
    pub manifest: Manifest,
    pub index: Index,
    /// Paths skipped or unreadable, each with why.
    pub problems: Vec<String>,
    /// Conflict copies found in the worktree.
    pub conflicts: Vec<String>,
}

/// What a push starts from: the worktree's tree as a scan (full, or a rescan of some
/// paths on top of the index) found it.
#[derive(Debug, Clone, Default)]
pub struct Found {
    pub manifest: Manifest,
    /// Paths skipped or unreadable, each with why.
    pub problems: Vec<String>,
    /// Conflict copies in the worktree.
    pub conflicts: Vec<String>,
}

/// The changes a push commits: the delta from the agreed tree to the worktree, with what
/// the scan found wrong.
#[derive(Debug, Clone, Default)]
pub struct Changes {
    pub delta: Delta,
    /// Paths skipped or unreadable, each with why.
    pub problems: Vec<String>,
    /// Conflict copies in the worktree.
    pub conflicts: Vec<String>,
}

/// What a push starts from.
#[derive(Debug)]
pub enum Start {
    /// A full scan through the index.
    Scan,
    /// The tree as a scan found it (diffed against the agreed tree off the runtime's
    /// thread).
    Found(Found),
    /// The changes already worked out (a watcher that keeps the agreed tree in memory
    /// diffs only what changed).
    Changes(Changes),
}

impl Found {
    /// The changes from the stored base of `root` to this tree. The base is not read when
    /// its digest says it is this tree (a no-op push after a restart reads no base).
    pub fn changes_from_base(
        self,
        worktrees: &Worktrees,
        root: &str,
    ) -> Result<Changes, TeleportError> {
        let delta = match worktrees.base_unless(root, &self.manifest)? {
            Some(base) => base.diff(&self.manifest),
            None => Delta::default(),
        };
        Ok(Changes {
            delta,
            problems: self.problems,
            conflicts: self.conflicts,
        })
    }
}

impl Scanned {
    /// The tree found, and the index that vouches for it.
    pub fn split(self) -> (Found, Index) {
        (
            Found {
                manifest: self.manifest,
                problems: self.problems,
                conflicts: self.conflicts,
            },
            self.index,
        )
    }
}

/// Hashing threads: two cores are what these machines have, and the socket's thread must
/// stay free.
fn options() -> ScanOptions {
    ScanOptions { threads: 2 }
}

/// Scans `root` through its stored index, stores the new index, reports progress.
pub fn scan(
    worktrees: &Worktrees,
    root: &str,
    reporter: &Reporter,
) -> Result<Scanned, TeleportError> {
    let (scanned, previous) = scan_unstored(worktrees, root, reporter)?;
    worktrees.set_index(root, &previous, &scanned.index)?;
    Ok(scanned)
}

/// [`scan`] without storing the new index: the scan, and the stored index it started
/// from, for the caller to store (`Worktrees::set_index`) before anything else reads or
/// writes the index of `root`.
pub fn scan_unstored(
    worktrees: &Worktrees,
    root: &str,
    reporter: &Reporter,
) -> Result<(Scanned, Index), TeleportError> {
    let previous = worktrees.index(root)?;
    let plan = cloud_tree::plan(Path::new(root), &previous, &options())
        .map_err(|e| TeleportError::Local(e.to_string()))?;
    let (files, bytes) = plan.pending();
    reporter.report("scan", 0, files, 0, bytes);
    let scan: Scan = plan.finish(&options());
    reporter.report("scan", files, files, bytes, bytes);
    Ok((scanned(scan), previous))
}

fn scanned(scan: Scan) -> Scanned {
    let problems = problems(&scan.skipped, &scan.unreadable);
    Scanned {
        manifest: scan.manifest,
        index: scan.index,
        problems,
        conflicts: scan.conflict_copies.iter().map(|p| p.to_string()).collect(),
    }
}

/// Re-examines only `paths` (after writing them, or after the watcher saw them change),
/// updating `index` and the stored one (only the entries that changed are written).
pub fn rescan(
    worktrees: &Worktrees,
    root: &str,
    paths: &[RelPath],
    index: &mut Index,
) -> Result<Rescan, TeleportError> {
    if paths.is_empty() {
        return Ok(Rescan {
            changes: Vec::new(),
            delta: Default::default(),
            skipped: Vec::new(),
            unreadable: Vec::new(),
            conflict_copies: Vec::new(),
            stats: Default::default(),
        });
    }
    let rescan = cloud_tree::rescan_paths(Path::new(root), paths, index, &options())
        .map_err(|e| TeleportError::Local(e.to_string()))?;
    worktrees.apply_index(root, index, &rescan.changes)?;
    index.apply(&rescan.changes);
    Ok(rescan)
}

/// What a rescan found wrong, worded as a scan's problems.
pub fn rescan_problems(rescan: &Rescan) -> Vec<String> {
    problems(&rescan.skipped, &rescan.unreadable)
}

fn problems(skipped: &[Skipped], unreadable: &[Unreadable]) -> Vec<String> {
    let mut problems: Vec<String> = skipped
        .iter()
        .map(|s| format!("{}: skipped ({:?})", s.path.display(), s.reason))
        .collect();
    problems.extend(
        unreadable
            .iter()
            .map(|u| format!("{}: cannot be read ({})", u.path, u.error)),
    );
    problems
}

/// Reads the blobs `ids` from the worktree (where `manifest` says they are) and sends
/// them in batches of about [`BATCH_BYTES`] on `batches`. A file that is shorter than at
/// the scan fails with [`TeleportError::ChangedDuringPush`]; one whose bytes changed is
/// found by the relay's check ([`super::transfer::TransferError::Mismatched`]).
pub fn read_blobs(
    root: &str,
    manifest: &Manifest,
    session: &str,
    ids: &[ContentId],
    batches: tokio::sync::mpsc::Sender<Batch>,
) -> Result<(), TeleportError> {
    let locations: HashMap<ContentId, BlobLocation> = cloud_tree::blob_locations(manifest);
    // Whole files go first, in batches of their own (the relay stages them for the
    // commit), then the chunks of large files.
    let whole: HashSet<ContentId> = manifest
        .iter()
        .filter_map(|(_, kind)| match kind {
            EntryKind::File {
                content, chunks, ..
            } if chunks.is_empty() => Some(*content),
            _ => None,
        })
        .collect();
    let mut located = Vec::with_capacity(ids.len());
    for id in ids {
        let Some(at) = locations.get(id) else {
            return Err(TeleportError::Local(format!(
                "blob {id} is in no file of the scan"
            )));
        };
        located.push((*id, at));
    }
    // In path order, not the ids' (random) order: the reader's `Root` keeps the
    // directories of the last path open, so neighbours cost one `openat` each; in id order
    // every file reopened its whole chain of directories (95,000 `openat`s for 20,000 files).
    located.sort_by(|(_, a), (_, b)| (&a.path, a.offset).cmp(&(&b.path, b.offset)));
    let (files, chunks): (Vec<_>, Vec<_>) =
        located.into_iter().partition(|(id, _)| whole.contains(id));
    let root = Root::open(Path::new(root)).map_err(|e| TeleportError::Local(e.to_string()))?;
    for (blobs, files) in [(files, true), (chunks, false)] {
        let sent = send_batches(&blobs, files, session, &batches, |at, into| {
            // Unhashed: the relay checks every blob, and a file changed since the scan
            // comes back as `TransferError::Mismatched` (then the push scans again).
            match cloud_tree::read_span_into(&root, &at.path, at.offset, at.len as usize, into) {
                Ok(()) => Ok(()),
                Err(ContentError::Changed { .. }) => {
                    Err(TeleportError::ChangedDuringPush(at.path.to_string()))
                }
                Err(e) => Err(TeleportError::Local(e.to_string())),
            }
        })?;
        if !sent {
            return Ok(());
        }
    }
    Ok(())
}

/// Sends `blobs` (each with where it is) on `batches` in puts of about [`BATCH_BYTES`],
/// each blob read by `read` straight into its put. False when the receiver is gone.
fn send_batches<T>(
    blobs: &[(ContentId, T)],
    files: bool,
    session: &str,
    batches: &tokio::sync::mpsc::Sender<Batch>,
    mut read: impl FnMut(&T, &mut Vec<u8>) -> Result<(), TeleportError>,
) -> Result<bool, TeleportError>
where
    T: Located,
{
    let mut rest = blobs;
    while !rest.is_empty() {
        // As many as make a batch: the put says how many blobs it holds before them.
        let (mut n, mut bytes) = (0, 0usize);
        while n < rest.len() && (n == 0 || bytes < BATCH_BYTES) {
            bytes += rest[n].1.len();
            n += 1;
        }
        let (batch, later) = rest.split_at(n);
        rest = later;
        let mut put = PutWriter::new(files, session, n, bytes);
        for (id, at) in batch {
            put.push(*id, at.len(), |into| read(at, into))?;
        }
        let batch = Batch {
            put,
            blobs: n as u64,
            bytes: bytes as u64,
        };
        if batches.blocking_send(batch).is_err() {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Where a blob to upload is: its length is all [`send_batches`] needs to plan a put.
trait Located {
    fn len(&self) -> usize;
}

impl Located for &BlobLocation {
    fn len(&self) -> usize {
        self.len as usize
    }
}

impl Located for (u64, u64) {
    fn len(&self) -> usize {
        self.1 as usize
    }
}

/// Reads the blobs `ids` of the file at `path` laid out as `layout` (a git bundle) and
/// sends them in batches, as [`read_blobs`] does for a worktree.
pub fn read_file_blobs(
    path: &Path,
    layout: &cloud_protocol::teleport::BundleRef,
    session: &str,
    ids: &[ContentId],
    batches: tokio::sync::mpsc::Sender<Batch>,
) -> Result<(), TeleportError> {
    let mut file = std::fs::File::open(path)
        .map_err(|e| TeleportError::Local(format!("{}: {e}", path.display())))?;
    let mut at = HashMap::new();
    if layout.chunks.is_empty() {
        at.insert(layout.content, (0u64, layout.size));
    } else {
        let mut offset = 0u64;
        for chunk in &layout.chunks {
            at.entry(chunk.id).or_insert((offset, u64::from(chunk.len)));
            offset += u64::from(chunk.len);
        }
    }
    let mut located = Vec::with_capacity(ids.len());
    for id in ids {
        let &place = at
            .get(id)
            .ok_or_else(|| TeleportError::Local(format!("blob {id} is not in the bundle")))?;
        located.push((*id, place));
    }
    send_batches(
        &located,
        false,
        session,
        &batches,
        |&(offset, len), into| {
            let whole = cloud_tree::content::append_span(&mut file, offset, len as usize, into)
                .map_err(|e| TeleportError::Local(format!("{}: {e}", path.display())))?;
            if !whole {
                return Err(TeleportError::Local(format!(
                    "{}: shorter than its layout",
                    path.display()
                )));
            }
            Ok(())
        },
    )?;
    Ok(())
}

/// Blobs found in the worktree itself (a pull reuses what it already has rather than
/// download it): id → bytes, read through the index's manifest, checked.
pub fn local_blobs(
    root: &str,
    manifest: &Manifest,
    ids: &[ContentId],
) -> HashMap<ContentId, Vec<u8>> {
    let locations = cloud_tree::blob_locations(manifest);
    let mut found = HashMap::new();
    let Ok(root) = Root::open(Path::new(root)) else {
        return found;
    };
    for id in ids {
        if let Some(at) = locations.get(id) {
            if let Ok(bytes) = cloud_tree::read_blob(&root, &at.path, at.offset, at.len, *id) {
                found.insert(*id, bytes);
            }
        }
    }
    found
}
