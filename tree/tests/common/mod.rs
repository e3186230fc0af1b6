//! What the tree tests share: deterministic bytes, building files, and a byte-for-byte
//! picture of a directory to compare before and after.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use cloud_protocol::teleport::{EntryKind, Manifest, RelPath};

/// Deterministic bytes that neither compress nor repeat (xorshift).
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

pub fn p(path: &str) -> RelPath {
    RelPath::new(path).unwrap()
}

/// Writes `bytes` at `root/rel`, making parents.
pub fn write(root: &Path, rel: &str, bytes: &[u8]) {
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

pub fn chmod(root: &Path, rel: &str, mode: u32) {
    std::fs::set_permissions(root.join(rel), std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Sets a file's mtime an hour back: older than any scan's racy window.
pub fn age(root: &Path, rel: &str) {
    let file = std::fs::File::options()
        .write(true)
        .open(root.join(rel))
        .unwrap();
    file.set_modified(SystemTime::now() - Duration::from_secs(3600))
        .unwrap();
}

/// The manifest's paths.
pub fn paths(manifest: &Manifest) -> Vec<String> {
    manifest.iter().map(|(p, _)| p.to_string()).collect()
}

pub fn file_content(
    manifest: &Manifest,
    path: &str,
) -> Option<cloud_protocol::teleport::ContentId> {
    match manifest.get(&p(path)) {
        Some(EntryKind::File { content, .. }) => Some(*content),
        _ => None,
    }
}

/// One node of a directory picture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Dir { mode: u32 },
    File { mode: u32, bytes: Vec<u8> },
    Symlink { target: std::path::PathBuf },
    Other { mode: u32 },
}

/// Everything under `dir` (not following links): path → node.
pub fn picture(dir: &Path) -> BTreeMap<String, Node> {
    let mut out = BTreeMap::new();
    picture_into(dir, dir, &mut out);
    out
}

fn picture_into(base: &Path, dir: &Path, out: &mut BTreeMap<String, Node>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries {
        let entry = entry.unwrap();
        let path = entry.path();
        let rel = path
            .strip_prefix(base)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let metadata = std::fs::symlink_metadata(&path).unwrap();
        let mode = metadata.permissions().mode();
        let node = if metadata.file_type().is_symlink() {
            Node::Symlink {
                target: std::fs::read_link(&path).unwrap(),
            }
        } else if metadata.is_dir() {
            picture_into(base, &path, out);
            Node::Dir { mode }
        } else if metadata.is_file() {
            Node::File {
                mode,
                bytes: std::fs::read(&path).unwrap(),
            }
        } else {
            Node::Other { mode }
        };
        out.insert(rel, node);
    }
}
