//! `cloud-tree`: teleport's file-system primitives, shared by the daemon and the relay.
//!
//! - [`bulk`]: the lower-priority pool that bulk file work runs on.
//! - [`stat`]: what `lstat` says, reduced to what teleport compares.
//! - [`content`]: hashing and FastCDC chunking of files; reading a blob back, verified.
//! - [`index`]: the scanner's memory (path → stat and entry), persisted by the daemon.
//! - [`mod@scan`]: the ignore-aware scanner (full scans, and rescans of some paths).
//! - [`root`]: a tree's root held open; every path reached from it without following a
//!   symlink.
//! - [`mod@write`]: the safe writer (temp file + rename, re-checked expectations).
//! - [`git`]: HEAD and branch, and history as `git bundle`s, through the git CLI.
//! - [`watch`]: the OS watcher (`notify`) of the directories an index holds; its events
//!   reach an async task on a bounded tokio queue.
//!
//! Architecture invariant: nothing here is async (but [`watch`]'s queue, which an async
//! task reads, and [`bulk`]'s handles, which async callers await) or talks to the
//! network; callers run scans and writes on [`bulk`]'s pool. Every path from a peer is a
//! [`cloud_protocol::teleport::RelPath`] and reaches disk only through [`root::Root`].

pub mod bulk;
pub mod content;
pub mod git;
pub mod index;
pub mod root;
pub mod scan;
pub mod stat;
mod sys;
pub mod watch;
pub mod write;

pub use content::{
    blob_locations, hash_file, read_blob, read_span_into, BlobLocation, ContentError, FileContent,
};
pub use index::{Index, IndexChange, IndexError, Indexed};
pub use root::{Root, RootError};
pub use scan::{
    plan, rescan_paths, rescan_targets, scan, Plan, Rescan, Scan, ScanError, ScanOptions,
    ScanStats, SkipReason, Skipped, Unreadable,
};
pub use stat::{FileKind, Stat};
pub use write::{Expect, Staging, WriteError};
