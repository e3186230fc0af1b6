//! The daemon's journal on disk beside the data it holds.
//!
//! "On disk" is the sum over every file under the journal directory (`state/journal/`,
//! every generation, `g-…` and compacted `c-…`), both as the files' lengths and as the blocks allocated to them
//! (sled's files may be sparse). "Live data" is what the journal must keep: the keys and
//! values of the records holding an unacknowledged event, plus the `acked` marker (13
//! bytes), read by opening a copy of every generation after the daemon has stopped.

use std::os::unix::fs::MetadataExt as _;
use std::path::Path;

use anyhow::Context as _;

/// Sizes of the files under a directory.
#[derive(Debug, Clone, Copy, Default)]
pub struct DiskSize {
    /// The sum of the files' lengths.
    pub apparent: u64,
    /// The sum of the blocks allocated to them (`st_blocks` × 512).
    pub allocated: u64,
    /// How many files.
    pub files: usize,
}

/// The sizes of every file under `dir` (recursively).
pub fn size(root: &Path) -> anyhow::Result<DiskSize> {
    let mut total = DiskSize::default();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let listing = match std::fs::read_dir(&dir) {
            Ok(listing) => listing,
            // A generation deleted (or a compacted one renamed into place) while walking.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && dir != root => continue,
            Err(e) => return Err(e).with_context(|| format!("read {}", dir.display())),
        };
        for entry in listing {
            let entry = entry?;
            let metadata = match entry.metadata() {
                Ok(metadata) => metadata,
                // The daemon deletes generations and renames compacted ones as it runs: a
                // file listed a moment ago may be gone. It no longer takes space.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(e).with_context(|| format!("stat {}", entry.path().display()))
                }
            };
            if metadata.is_dir() {
                stack.push(entry.path());
            } else {
                total.apparent += metadata.len();
                total.allocated += metadata.blocks() * 512;
                total.files += 1;
            }
        }
    }
    Ok(total)
}

/// The journal's logical contents.
#[derive(Debug, Clone, Copy, Default)]
pub struct JournalData {
    /// Generations (sled databases).
    pub generations: usize,
    /// The highest acknowledged seq.
    pub acked: u64,
    /// Records still holding an unacknowledged event.
    pub records: u64,
    /// Unacknowledged events in them.
    pub events: u64,
    /// The live bytes: those records' keys and values, and the `acked` marker.
    pub bytes: u64,
}

/// The segment size a sled database in `dir` was created with (sled refuses another).
fn segment_size(dir: &Path) -> anyhow::Result<usize> {
    // The file ends with a binary checksum.
    let conf =
        std::fs::read(dir.join("conf")).with_context(|| format!("read {}/conf", dir.display()))?;
    let conf = String::from_utf8_lossy(&conf);
    conf.lines()
        .find_map(|line| line.strip_prefix("segment_size: "))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no segment_size in {}/conf", dir.display()))
}

/// Copies the files under `from` to `to` (recursively).
fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from).with_context(|| format!("read {}", from.display()))? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.metadata()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// The logical contents of the journal in `journal`. The daemon must have stopped. The
/// generations are opened in a copy: opening a sled database adds a segment to it, and the
/// journal on disk must stay as the daemon left it.
pub fn journal_live(journal: &Path) -> anyhow::Result<JournalData> {
    let copy = tempfile::tempdir()?;
    // Only the generations: a compaction cut short by the stop may have left a `tmp-`.
    for entry in
        std::fs::read_dir(journal).with_context(|| format!("read {}", journal.display()))?
    {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("g-") || name.starts_with("c-") {
            copy_dir(&entry.path(), &copy.path().join(&*name))?;
        }
    }
    let dir = copy.path();
    let mut generations = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let path = entry?.path();
        let generation = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("g-") || n.starts_with("c-"));
        if generation && path.is_dir() {
            let db = sled::Config::new()
                .path(&path)
                .segment_size(segment_size(&path)?)
                .cache_capacity(super::baseline::SLED_CACHE_BYTES)
                .mode(sled::Mode::LowSpace)
                .flush_every_ms(None)
                .open()
                .with_context(|| format!("open the generation {}", path.display()))?;
            generations.push(db);
        }
    }
    let mut data = JournalData {
        generations: generations.len(),
        bytes: 13,
        ..JournalData::default()
    };
    for db in &generations {
        if let Some(acked) = db.get(b"acked")? {
            data.acked = data
                .acked
                .max(u64::from_be_bytes(acked.as_ref().try_into()?));
        }
    }
    for db in &generations {
        for item in db.scan_prefix(b"r") {
            let (key, value) = item?;
            let last = u64::from_be_bytes(key[1..9].try_into()?);
            if last > data.acked {
                let events: Vec<cloud_protocol::bridge::Outbound> = postcard::from_bytes(&value)?;
                let first = last + 1 - events.len() as u64;
                data.records += 1;
                data.events += last - first.max(data.acked + 1) + 1;
                data.bytes += (key.len() + value.len()) as u64;
            }
        }
    }
    Ok(data)
}
