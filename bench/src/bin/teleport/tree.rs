//! The benchmark's source tree, generated from a seed: the same tree for the same flags.
//!
//! `files` files in `dirs` directories (a random tree of directories, each file in a
//! uniformly drawn one), their sizes log-normal around a median of [`MEDIAN_FILE`] bytes,
//! with the spread chosen so the files come to `total` bytes in all (each capped at
//! [`MAX_SMALL_FILE`]); plus three incompressible files of 2, 4 and 8 MiB (scaled down with
//! `total` below 200 MB). Ordinary files hold random text-like bytes (every file distinct,
//! so nothing deduplicates); the large ones hold random bytes.
//!
//! This module only writes under the directory it is given.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

/// The median size of an ordinary file.
pub const MEDIAN_FILE: u64 = 4096;
/// The largest ordinary file.
pub const MAX_SMALL_FILE: u64 = 1024 * 1024;
/// The incompressible files at full size (200 MB), in MiB.
const BIG_FILES_MIB: [u64; 3] = [2, 4, 8];
/// The deepest a directory may be.
const MAX_DEPTH: usize = 6;

/// A seeded generator (splitmix64).
#[derive(Debug, Clone)]
pub struct Seeded(u64);

impl Seeded {
    pub fn new(seed: u64) -> Seeded {
        Seeded(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.unit() * n as f64) as usize).min(n.saturating_sub(1))
    }

    /// A standard normal draw (Box–Muller).
    fn normal(&mut self) -> f64 {
        let u1 = self.unit().max(f64::MIN_POSITIVE);
        let u2 = self.unit();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Fills `out` with random bytes.
    pub fn fill(&mut self, out: &mut [u8]) {
        for chunk in out.chunks_mut(8) {
            let word = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }

    /// Fills `out` with random text: printable characters in lines of up to 100.
    pub fn fill_text(&mut self, out: &mut [u8]) {
        const ALPHABET: &[u8; 64] =
            b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 _";
        self.fill(out);
        for b in out.iter_mut() {
            *b = ALPHABET[(*b & 63) as usize];
        }
        let mut at = 0;
        while at < out.len() {
            at += 20 + self.below(80);
            if at < out.len() {
                out[at] = b'\n';
            }
        }
    }
}

/// What to generate.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub files: usize,
    pub dirs: usize,
    /// Bytes in all, large files included.
    pub total: u64,
    pub seed: u64,
}

/// A generated tree.
#[derive(Debug)]
pub struct Tree {
    pub root: PathBuf,
    /// Every regular file, relative to `root`, with its size.
    pub files: Vec<(PathBuf, u64)>,
    /// Every directory below `root`, relative to it.
    pub dirs: Vec<PathBuf>,
    pub bytes: u64,
    pub median: u64,
    /// Directories that hold nothing.
    pub empty_dirs: usize,
    /// The log-normal spread the sizes were drawn with.
    pub sigma: f64,
}

impl Tree {
    /// Ordinary files (not the large ones) of at most `max` bytes: what edits touch.
    pub fn editable(&self, max: u64) -> Vec<&(PathBuf, u64)> {
        self.files
            .iter()
            .filter(|(path, size)| *size <= max && !path.starts_with("big"))
            .collect()
    }
}

/// The sizes of the three large files for a tree of `total` bytes.
pub fn big_sizes(total: u64) -> Vec<u64> {
    let scale = (total as f64 / 200e6).min(1.0);
    BIG_FILES_MIB
        .iter()
        .map(|mib| ((mib * 1024 * 1024) as f64 * scale) as u64)
        .collect()
}

/// Draws `n` sizes with median [`MEDIAN_FILE`], capped, summing to about `target`.
fn sizes(n: usize, target: u64, rng: &mut Seeded) -> (Vec<u64>, f64) {
    let z: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
    let at = |sigma: f64| -> Vec<u64> {
        z.iter()
            .map(|z| ((MEDIAN_FILE as f64) * (sigma * z).exp()).min(MAX_SMALL_FILE as f64) as u64)
            .collect()
    };
    let sum = |sigma: f64| -> u64 { at(sigma).iter().sum() };
    // The sum grows with the spread (the right tail outweighs the left): bisect.
    let (mut low, mut high) = (0.0f64, 4.0f64);
    for _ in 0..60 {
        let mid = (low + high) / 2.0;
        if sum(mid) < target {
            low = mid;
        } else {
            high = mid;
        }
    }
    let sigma = (low + high) / 2.0;
    (at(sigma), sigma)
}

/// Generates the tree of `shape` under `root` (which must exist and be empty).
pub fn generate(root: &Path, shape: Shape) -> anyhow::Result<Tree> {
    let mut rng = Seeded::new(shape.seed);
    // Directories: each new one under a random existing one not yet at the deepest level.
    let mut dirs: Vec<(PathBuf, usize)> = vec![(PathBuf::new(), 0)];
    for i in 1..shape.dirs.max(1) {
        let parent = loop {
            let candidate = &dirs[rng.below(dirs.len())];
            if candidate.1 < MAX_DEPTH {
                break candidate.clone();
            }
        };
        dirs.push((parent.0.join(format!("d{i:04}")), parent.1 + 1));
    }
    for (dir, _) in &dirs[1..] {
        std::fs::create_dir_all(root.join(dir))
            .with_context(|| format!("create {}", root.join(dir).display()))?;
    }
    let bigs = big_sizes(shape.total);
    let small_total = shape.total.saturating_sub(bigs.iter().sum());
    let (small, sigma) = sizes(shape.files, small_total, &mut rng);
    const EXTENSIONS: [&str; 6] = ["rs", "rs", "md", "json", "txt", "toml"];
    let mut files = Vec::with_capacity(shape.files + bigs.len());
    let mut used = vec![false; dirs.len()];
    let mut buf = Vec::new();
    for (j, size) in small.iter().enumerate() {
        let d = rng.below(dirs.len());
        used[d] = true;
        let ext = EXTENSIONS[rng.below(EXTENSIONS.len())];
        let path = dirs[d].0.join(format!("f{j:05}.{ext}"));
        buf.resize(*size as usize, 0);
        rng.fill_text(&mut buf);
        std::fs::write(root.join(&path), &buf)
            .with_context(|| format!("write {}", path.display()))?;
        files.push((path, *size));
    }
    std::fs::create_dir_all(root.join("big"))?;
    for size in &bigs {
        let path = PathBuf::from("big").join(format!("blob-{}k.bin", size / 1024));
        buf.resize(*size as usize, 0);
        rng.fill(&mut buf);
        std::fs::write(root.join(&path), &buf)
            .with_context(|| format!("write {}", path.display()))?;
        files.push((path, *size));
    }
    // A directory is empty if no file is in it and no directory under it.
    let mut holds = used;
    for (i, (dir, _)) in dirs.iter().enumerate().skip(1) {
        if holds[i] {
            continue;
        }
        holds[i] = dirs
            .iter()
            .any(|(other, _)| other != dir && other.starts_with(dir));
    }
    let empty_dirs = holds.iter().skip(1).filter(|h| !**h).count();
    let mut sorted: Vec<u64> = small.clone();
    sorted.sort_unstable();
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0);
    let mut dir_list: Vec<PathBuf> = dirs.into_iter().skip(1).map(|(d, _)| d).collect();
    dir_list.push(PathBuf::from("big"));
    Ok(Tree {
        root: root.to_owned(),
        bytes: files.iter().map(|(_, s)| s).sum(),
        files,
        dirs: dir_list,
        median,
        empty_dirs,
        sigma,
    })
}

/// Checks that `copy` holds every file and directory of `tree`, byte for byte, and
/// nothing else. Returns what differs (empty: equal).
pub fn compare(tree: &Tree, copy: &Path) -> anyhow::Result<Vec<String>> {
    let mut problems = Vec::new();
    for dir in &tree.dirs {
        if !copy.join(dir).is_dir() {
            problems.push(format!("directory {} is missing", dir.display()));
        }
    }
    for (path, _) in &tree.files {
        let want = std::fs::read(tree.root.join(path))?;
        match std::fs::read(copy.join(path)) {
            Ok(got) if got == want => {}
            Ok(_) => problems.push(format!("{} differs", path.display())),
            Err(e) => problems.push(format!("{}: {e}", path.display())),
        }
    }
    let (files, dirs) = count(copy)?;
    if files != tree.files.len() || dirs != tree.dirs.len() {
        problems.push(format!(
            "{files} files and {dirs} directories where the tree has {} and {}",
            tree.files.len(),
            tree.dirs.len()
        ));
    }
    Ok(problems)
}

/// Files and directories under `dir` (not counting `dir`), skipping `.git`.
pub fn count(dir: &Path) -> anyhow::Result<(usize, usize)> {
    let (mut files, mut dirs) = (0, 0);
    let mut stack = vec![dir.to_owned()];
    while let Some(at) = stack.pop() {
        for entry in std::fs::read_dir(&at).with_context(|| format!("read {}", at.display()))? {
            let entry = entry?;
            if entry.file_name() == ".git" {
                continue;
            }
            let kind = entry.file_type()?;
            if kind.is_dir() {
                dirs += 1;
                stack.push(entry.path());
            } else {
                files += 1;
            }
        }
    }
    Ok((files, dirs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_tree() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let shape = Shape {
            files: 300,
            dirs: 40,
            total: 3_000_000,
            seed: 5,
        };
        let ta = generate(a.path(), shape).unwrap();
        let tb = generate(b.path(), shape).unwrap();
        assert_eq!(ta.files, tb.files);
        assert!(compare(&ta, b.path()).unwrap().is_empty());
        let small: u64 = ta.files.iter().take(300).map(|(_, s)| s).sum();
        let want = 3_000_000 - big_sizes(3_000_000).iter().sum::<u64>();
        assert!(small.abs_diff(want) < want / 50, "{small} vs {want}");
    }
}
