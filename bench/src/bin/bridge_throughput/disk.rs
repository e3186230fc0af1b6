//! The daemon's store on disk beside the data it holds.
//!
//! "On disk" is the sum over every file under the store directory, both as the files'
//! lengths and as the blocks allocated to them (sled's files may be sparse). "Live data" is
//! what the store logically holds: the sum of key and value lengths over every entry of
//! every tree (the journal, the inbound session logs, the follows, the replica, the meta
//! tree, sled's default tree), read by opening the store after the daemon has stopped.

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
pub fn size(dir: &Path) -> anyhow::Result<DiskSize> {
    let mut total = DiskSize::default();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).with_context(|| format!("read {}", dir.display()))? {
            let entry = entry?;
            let metadata = entry.metadata()?;
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

/// One tree's logical contents.
#[derive(Debug, Clone, Default)]
pub struct TreeData {
    /// The tree's name.
    pub name: String,
    /// Its entries.
    pub entries: u64,
    /// The sum of its keys' and values' lengths.
    pub bytes: u64,
}

/// The logical contents of every tree of the sled store in `dir`. The store must not be
/// open elsewhere (stop the daemon first). Opening it is what the daemon does at start,
/// with the daemon's configuration.
pub fn live_data(dir: &Path) -> anyhow::Result<Vec<TreeData>> {
    let db = sled::Config::new()
        .path(dir)
        .cache_capacity(super::baseline::SLED_CACHE_BYTES)
        .mode(sled::Mode::LowSpace)
        .open()
        .with_context(|| format!("open the store {}", dir.display()))?;
    let mut trees = Vec::new();
    for name in db.tree_names() {
        let tree = db.open_tree(&name)?;
        let mut data = TreeData {
            name: String::from_utf8_lossy(&name).into_owned(),
            ..TreeData::default()
        };
        for item in tree.iter() {
            let (key, value) = item?;
            data.entries += 1;
            data.bytes += (key.len() + value.len()) as u64;
        }
        trees.push(data);
    }
    Ok(trees)
}
