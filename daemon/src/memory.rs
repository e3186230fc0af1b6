//! The allocator's settings, and handing memory that large operations freed back to the
//! operating system (glibc on Linux; elsewhere these do nothing).
//!
//! A push or a full scan of a large worktree allocates and frees tens of megabytes (the
//! index, the trees, blob batches) on the blocking pool's threads; glibc keeps what was
//! freed in its arenas, so without this the daemon's resident size stays at its peak for
//! as long as it runs. This module must never allocate, and is only ever called off the
//! socket's thread (a trim walks the heap).

/// Allocations of this size and up get fresh pages from the kernel (glibc's `mmap`
/// threshold).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 1024 * 1024;

/// At most this many malloc arenas: each thread of the blocking pool would otherwise get
/// one of its own, which keeps what that thread freed.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const ARENA_MAX: libc::c_int = 2;

/// Sets the allocator up; call before any other thread exists.
///
/// Fixes glibc's `mmap` threshold, which it otherwise raises to the size of every large
/// block freed. sled gives each database a 6 MiB page table, zeroed (`calloc`), and the
/// journal opens a database for every 128 KiB of events: once the threshold has risen
/// past 6 MiB, each table comes from the heap and is cleared with `memset`, which cost the
/// daemon about a tenth of its CPU under a sustained load of events. Fresh pages are zero
/// already, and only the few the table touches are ever faulted in. The trim threshold
/// stays at twice it, as glibc's own adjustment keeps it. Arenas are capped at
/// [`ARENA_MAX`].
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn tune_allocator() {
    // SAFETY: called before any other thread exists; mallopt only sets allocator
    // parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD);
        libc::mallopt(libc::M_ARENA_MAX, ARENA_MAX);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn tune_allocator() {}

/// Returns the free memory of every arena to the operating system: after an operation
/// that freed a lot (a push, a pull, a full scan). It walks the heap: a few milliseconds
/// for a large one, so it runs on the blocking pool.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn give_back() {
    // SAFETY: malloc_trim only releases free memory; it is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn give_back() {}
