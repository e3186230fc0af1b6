//! The daemon's allocator: jemalloc on Linux, with what an operation freed handed back to
//! the operating system when the operation ends ([`release`]).
//!
//! A push or a full scan of a large worktree allocates and frees tens of megabytes (the
//! index, the trees, blob batches) on the blocking pool's threads. glibc kept what was
//! freed in its arenas and the threads' caches: a daemon watching a 20,000-file tree sat
//! at about 53 MiB after twenty pushes (and grew with each), though it used less than
//! half of that. jemalloc with one arena (`narenas:1`) keeps the pool's threads from
//! holding an arena each, and no per-thread caches (`tcache:false`) keeps them from
//! holding freed objects.
//!
//! Freed pages are kept for reuse for a second (`dirty_decay_ms:1000`) while an operation
//! runs: with no delay at all, a 200 MB push faulted its upload buffers and sled's pages
//! in again for every batch, and took about twice as long. When an operation ends (the
//! teleport operations call [`release`]), everything free is returned at once; what other
//! work frees (the sessions' logs, the socket's clients) jemalloc's background thread
//! returns within about a second (`background_thread:true`: without it, decay only
//! advances when something allocates, and an idle daemon kept what it freed last). So an
//! idle daemon holds what it uses and no more.
//!
//! Thread caches are off by default (`tcache:false`): left on and never emptied, the
//! blocking pool's and the scanner's threads kept what a large push freed (54 MiB against
//! 34 MiB for the same steps). The threads that run a runtime — the daemon's and the embedded relay's —
//! turn theirs on ([`cache_this_thread`]): they make and free the small objects of every
//! message, and without a cache each one took the arena's lock (the bridge's throughput
//! fell to 0.77× raw sled inserts with the embedded relay, against 1.04× with it).
//!
//! The bulk pool's and the scanner's threads (`cloud_tree::bulk`), where a push's work
//! runs, turn theirs on too, and the pool's threads empty theirs after each job ([`flush_this_thread`], set up by
//! [`install`]): a 200 MB push spent about 8% of the daemon's CPU waiting for the arena's
//! lock without them, and emptied caches hold nothing between jobs (a hashing thread's
//! goes when its scan ends).
//!
//! Elsewhere the system allocator is used and these functions do nothing. This module must
//! never allocate.

#[cfg(target_os = "linux")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read at its first allocation (`malloc_conf`; the `_rjem_` prefix
/// is the crate's).
#[cfg(target_os = "linux")]
#[used]
#[export_name = "_rjem_malloc_conf"]
static MALLOC_CONF: Conf = Conf(
    c"narenas:1,tcache:false,background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0".as_ptr(),
);

/// A C string pointer that may live in a static.
#[cfg(target_os = "linux")]
#[repr(transparent)]
struct Conf(*const std::ffi::c_char);

// SAFETY: the pointer is to a string literal, immutable for the program's life.
#[cfg(target_os = "linux")]
unsafe impl Sync for Conf {}

/// Returns every free page of every arena to the operating system (jemalloc's
/// `arena.<all>.purge`). Called when an operation ends, on the blocking pool: it is a
/// walk of the free extents and an `madvise` each, a few milliseconds after a large push.
pub fn release() {
    #[cfg(target_os = "linux")]
    {
        /// `arena.<MALLCTL_ARENAS_ALL>.purge` (4096 is "all arenas").
        const PURGE_ALL: &std::ffi::CStr = c"arena.4096.purge";
        // SAFETY: a "void" mallctl takes no old or new value: null pointers, length 0.
        let status = unsafe {
            tikv_jemalloc_sys::mallctl(
                PURGE_ALL.as_ptr(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                0,
            )
        };
        debug_assert_eq!(status, 0, "jemalloc's purge failed");
    }
}

/// Sets up the worker threads of `cloud_tree` (see the module's documentation): call
/// once, before any teleport work.
pub fn install() {
    cloud_tree::bulk::set_thread_hooks(cloud_tree::bulk::ThreadHooks {
        started: cache_this_thread,
        job_done: flush_this_thread,
    });
}

/// Empties the calling thread's jemalloc cache into the arena (`thread.tcache.flush`;
/// nothing to do for a thread without one).
pub fn flush_this_thread() {
    #[cfg(target_os = "linux")]
    {
        const TCACHE_FLUSH: &std::ffi::CStr = c"thread.tcache.flush";
        // SAFETY: a "void" mallctl takes no old or new value: null pointers, length 0. It
        // fails (harmlessly) on a thread whose cache is off.
        let _ = unsafe {
            tikv_jemalloc_sys::mallctl(
                TCACHE_FLUSH.as_ptr(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                0,
            )
        };
    }
}

/// Turns on jemalloc's cache for the calling thread (`thread.tcache.enabled`): for the
/// threads that run a runtime, where small allocations come and go with every message.
pub fn cache_this_thread() {
    #[cfg(target_os = "linux")]
    {
        const TCACHE_ENABLED: &std::ffi::CStr = c"thread.tcache.enabled";
        let mut enabled = true;
        // SAFETY: `thread.tcache.enabled` takes a bool; no old value is read.
        let status = unsafe {
            tikv_jemalloc_sys::mallctl(
                TCACHE_ENABLED.as_ptr(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                (&raw mut enabled).cast(),
                std::mem::size_of::<bool>(),
            )
        };
        debug_assert_eq!(status, 0, "jemalloc's thread.tcache.enabled failed");
    }
}
