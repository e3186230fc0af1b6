//! The daemon's allocator: jemalloc on Linux, set to hand freed memory back to the
//! operating system at once.
//!
//! A push or a full scan of a large worktree allocates and frees tens of megabytes (the
//! index, the trees, blob batches) on the blocking pool's threads. glibc kept what was
//! freed in its arenas and the threads' caches: a daemon watching a 20,000-file tree sat
//! at about 53 MiB after twenty pushes (and grew with each), though it used less than
//! half of that. jemalloc with no decay delay (`dirty_decay_ms:0`, `muzzy_decay_ms:0`)
//! returns whole free pages as soon as they are free, one arena (`narenas:1`) keeps the
//! pool's threads from holding an arena each, and no per-thread caches (`tcache:false`)
//! keeps them from holding freed objects: the same steps end at about 35 MiB. The cost is
//! a page fault when freed memory is used again, small beside the file system work that
//! frees it.
//!
//! Elsewhere the system allocator is used. This module must never allocate.

#[cfg(target_os = "linux")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read at its first allocation (`malloc_conf`; the `_rjem_` prefix
/// is the crate's).
#[cfg(target_os = "linux")]
#[used]
#[export_name = "_rjem_malloc_conf"]
static MALLOC_CONF: Conf =
    Conf(c"narenas:1,tcache:false,dirty_decay_ms:0,muzzy_decay_ms:0".as_ptr());

/// A C string pointer that may live in a static.
#[cfg(target_os = "linux")]
#[repr(transparent)]
struct Conf(*const std::ffi::c_char);

// SAFETY: the pointer is to a string literal, immutable for the program's life.
#[cfg(target_os = "linux")]
unsafe impl Sync for Conf {}
