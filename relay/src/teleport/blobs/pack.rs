//! The pack file format: many blobs in one file, so storing a push's 20,000 small files
//! costs a few file creations rather than 20,000 (on ext4 a new inode is the dominant cost
//! of a small write).
//!
//! A pack is the blobs' bytes back to back, then a trailer that names them:
//!
//! ```text
//! bytes of blob 0 | bytes of blob 1 | … | entry 0 | entry 1 | … | count: u32 LE | MAGIC
//! entry = id: [u8; 32] | offset: u64 LE | len: u32 LE
//! ```
//!
//! A pack is written whole under a temp name and renamed into place, so a pack that has a
//! name is complete; [`read_trailer`] still checks everything it reads (a disk can rot, a
//! file can be cut) and refuses a trailer that points outside the data. Readers check each
//! blob's hash again when they read it.
//!
//! This module only encodes and decodes packs: it never decides where packs live or which
//! blobs go in one (that is the store, [`super`]).

use std::io::{IoSlice, Read, Seek, SeekFrom, Write};

use cloud_protocol::teleport::ContentId;

/// The last bytes of every pack.
pub const MAGIC: &[u8; 8] = b"CLDPACK1";
/// Bytes per trailer entry.
const ENTRY: usize = 32 + 8 + 4;
/// Bytes after the entries: the count and the magic.
const TAIL: usize = 4 + MAGIC.len();
/// At most this many blobs in one pack (a trailer claiming more is refused unread).
pub const MAX_ENTRIES: usize = 1 << 20;

/// Where one blob lies in its pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub offset: u64,
    pub len: u32,
}

/// Why a pack's trailer cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("not a pack (no trailer)")]
    NoTrailer,
    #[error("the trailer is inconsistent: {0}")]
    Inconsistent(&'static str),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// How many slices one vectored write passes (Linux's `IOV_MAX`).
const SLICES_PER_WRITE: usize = 1024;
/// About how many bytes one vectored write passes. The kernel copies a write into the page
/// cache without giving up the core (Linux built without kernel preemption, as this VM's
/// is): a 4 MB write held a core for 1–6 ms, while a message's thread waited for it.
const BYTES_PER_WRITE: usize = 256 * 1024;

/// Writes `blobs` as one pack to `out`; returns where each one is, in their order. The
/// blobs go out by vectored writes straight from where they are (a buffered writer copied
/// every one first: 200 MB of copies in a 200 MB push).
pub fn write<'a>(
    out: &mut impl Write,
    blobs: impl IntoIterator<Item = (ContentId, &'a [u8])>,
) -> std::io::Result<Vec<(ContentId, Span)>> {
    let mut spans = Vec::new();
    let mut offset = 0u64;
    let mut slices: Vec<IoSlice<'a>> = Vec::with_capacity(SLICES_PER_WRITE);
    let mut pending = 0;
    for (id, bytes) in blobs {
        let len = u32::try_from(bytes.len())
            .map_err(|_| std::io::Error::other("a blob over 4 GiB cannot be packed"))?;
        if slices.len() == SLICES_PER_WRITE || pending >= BYTES_PER_WRITE {
            write_all_vectored(out, &mut slices)?;
            pending = 0;
        }
        pending += bytes.len();
        slices.push(IoSlice::new(bytes));
        spans.push((id, Span { offset, len }));
        offset += u64::from(len);
    }
    if spans.len() > MAX_ENTRIES {
        return Err(std::io::Error::other("too many blobs for one pack"));
    }
    let mut trailer = Vec::with_capacity(spans.len() * ENTRY + TAIL);
    for (id, span) in &spans {
        trailer.extend_from_slice(&id.0);
        trailer.extend_from_slice(&span.offset.to_le_bytes());
        trailer.extend_from_slice(&span.len.to_le_bytes());
    }
    trailer.extend_from_slice(&(spans.len() as u32).to_le_bytes());
    trailer.extend_from_slice(MAGIC);
    write_all_vectored(out, &mut slices)?;
    out.write_all(&trailer)?;
    Ok(spans)
}

/// Writes every byte of `slices` (emptied after), however many each write takes.
fn write_all_vectored(out: &mut impl Write, slices: &mut Vec<IoSlice<'_>>) -> std::io::Result<()> {
    let mut rest: &mut [IoSlice<'_>] = slices;
    IoSlice::advance_slices(&mut rest, 0);
    while !rest.is_empty() {
        match out.write_vectored(rest) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    slices.clear();
    Ok(())
}

/// Reads the trailer of the pack `file`: every blob it holds and where. Reads only the
/// trailer, never more than [`MAX_ENTRIES`] entries' worth, and refuses any entry that
/// reaches past the data.
pub fn read_trailer(file: &mut (impl Read + Seek)) -> Result<Vec<(ContentId, Span)>, PackError> {
    let len = file.seek(SeekFrom::End(0))?;
    if len < TAIL as u64 {
        return Err(PackError::NoTrailer);
    }
    let mut tail = [0u8; TAIL];
    file.seek(SeekFrom::Start(len - TAIL as u64))?;
    file.read_exact(&mut tail)?;
    if &tail[4..] != MAGIC {
        return Err(PackError::NoTrailer);
    }
    let count = u32::from_le_bytes(tail[..4].try_into().expect("4 bytes")) as usize;
    if count > MAX_ENTRIES {
        return Err(PackError::Inconsistent("more entries than a pack may hold"));
    }
    let entries_len = (count * ENTRY) as u64;
    let Some(data_len) = (len - TAIL as u64).checked_sub(entries_len) else {
        return Err(PackError::Inconsistent("more entries than the file holds"));
    };
    let mut entries = vec![0u8; count * ENTRY];
    file.seek(SeekFrom::Start(data_len))?;
    file.read_exact(&mut entries)?;
    entries
        .chunks_exact(ENTRY)
        .map(|entry| {
            let id = ContentId(entry[..32].try_into().expect("32 bytes"));
            let offset = u64::from_le_bytes(entry[32..40].try_into().expect("8 bytes"));
            let len = u32::from_le_bytes(entry[40..].try_into().expect("4 bytes"));
            match offset.checked_add(u64::from(len)) {
                Some(end) if end <= data_len => Ok((id, Span { offset, len })),
                _ => Err(PackError::Inconsistent("an entry reaches past the data")),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Cursor;

    #[test]
    fn a_pack_round_trips() {
        let blobs: Vec<Vec<u8>> = vec![b"hello".to_vec(), Vec::new(), vec![7; 10_000]];
        let ids: Vec<ContentId> = blobs.iter().map(|b| ContentId::of(b)).collect();
        let mut out = Vec::new();
        let spans = write(
            &mut out,
            ids.iter().copied().zip(blobs.iter().map(|b| b.as_slice())),
        )
        .unwrap();
        let read = read_trailer(&mut Cursor::new(&out)).unwrap();
        assert_eq!(read, spans);
        for ((id, span), bytes) in read.iter().zip(&blobs) {
            let at = span.offset as usize;
            assert_eq!(&out[at..at + span.len as usize], bytes.as_slice());
            assert_eq!(*id, ContentId::of(bytes));
        }
        // Cut anywhere, it is refused rather than misread.
        for cut in 0..out.len() {
            if let Ok(entries) = read_trailer(&mut Cursor::new(&out[..cut])) {
                panic!("a pack cut at {cut} read as {entries:?}");
            }
        }
    }

    /// A writer that takes at most a few bytes of a few slices per call, as a short
    /// `writev` does.
    struct Stingy(Vec<u8>);

    impl Write for Stingy {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let n = buf.len().min(5);
            self.0.extend_from_slice(&buf[..n]);
            Ok(n)
        }

        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize> {
            let mut n = 0;
            for buf in bufs.iter().take(3) {
                let take = buf.len().min(7 - n.min(7));
                self.0.extend_from_slice(&buf[..take]);
                n += take;
            }
            Ok(n)
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A writer that takes everything and remembers how many bytes each call passed.
    #[derive(Default)]
    struct Counting {
        out: Vec<u8>,
        calls: Vec<usize>,
    }

    impl Write for Counting {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.calls.push(buf.len());
            self.out.extend_from_slice(buf);
            Ok(buf.len())
        }

        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize> {
            let n = bufs.iter().map(|b| b.len()).sum();
            self.calls.push(n);
            bufs.iter().for_each(|b| self.out.extend_from_slice(b));
            Ok(n)
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn no_write_passes_much_more_than_its_share_of_bytes() {
        let blobs: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i; 100_000]).collect();
        let ids: Vec<ContentId> = blobs.iter().map(|b| ContentId::of(b)).collect();
        let mut out = Counting::default();
        let spans = write(
            &mut out,
            ids.iter().copied().zip(blobs.iter().map(|b| b.as_slice())),
        )
        .unwrap();
        // At most one blob past the share: a blob is never split.
        let most = out.calls.iter().max().copied().unwrap();
        assert!(most < BYTES_PER_WRITE + 100_000, "a write of {most} bytes");
        assert!(out.calls.len() > 4_000_000 / (BYTES_PER_WRITE + 100_000));
        assert_eq!(read_trailer(&mut Cursor::new(&out.out)).unwrap(), spans);
        for ((_, span), bytes) in spans.iter().zip(&blobs) {
            let at = span.offset as usize;
            assert_eq!(&out.out[at..at + span.len as usize], bytes.as_slice());
        }
    }

    #[test]
    fn a_pack_of_more_blobs_than_one_write_takes_is_whole_through_short_writes() {
        let blobs: Vec<Vec<u8>> = (0..2 * SLICES_PER_WRITE as u32 + 3)
            .map(|i| (0..i % 13).map(|b| (b as u8) ^ (i as u8)).collect())
            .collect();
        let ids: Vec<ContentId> = blobs.iter().map(|b| ContentId::of(b)).collect();
        let mut out = Stingy(Vec::new());
        let spans = write(
            &mut out,
            ids.iter().copied().zip(blobs.iter().map(|b| b.as_slice())),
        )
        .unwrap();
        let out = out.0;
        assert_eq!(read_trailer(&mut Cursor::new(&out)).unwrap(), spans);
        for ((id, span), bytes) in spans.iter().zip(&blobs) {
            let at = span.offset as usize;
            assert_eq!(&out[at..at + span.len as usize], bytes.as_slice());
            assert_eq!(*id, ContentId::of(bytes));
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_point_outside_the_data(bytes in proptest::collection::vec(any::<u8>(), 0..512), with_magic in any::<bool>(), count in 0u32..8) {
            let mut file = bytes.clone();
            if with_magic {
                file.extend_from_slice(&count.to_le_bytes());
                file.extend_from_slice(MAGIC);
            }
            if let Ok(entries) = read_trailer(&mut Cursor::new(&file)) {
                let data = file.len() - TAIL - entries.len() * ENTRY;
                for (_, span) in entries {
                    prop_assert!(span.offset + u64::from(span.len) <= data as u64);
                }
            }
        }
    }
}
