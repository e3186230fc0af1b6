//! The pool that runs teleport's bulk work — scans, hashing, reading and writing files,
//! encoding and decoding blob batches — on threads of a lower CPU priority (nice
//! [`BULK_NICE`]), apart from the blocking pool that the runtime's short jobs use.
//!
//! On a machine whose cores a 200 MB push keeps busy, a message crosses several threads
//! of the daemon and the relay, and each had to wait for a core behind the push's work: a
//! message took 4–6 ms during an upload against 1–2 ms idle, though a journal flush did
//! not get slower (measured beside 200 MB of writes). A lower priority lets the threads
//! that carry messages run first while bulk work still gets every idle cycle (Syncthing
//! lowers its own priority in the same way). A thread's priority cannot be raised back
//! without privilege, which is why these threads are a pool of their own.
//!
//! The program can ask for something to be done on each of this crate's worker threads
//! ([`set_thread_hooks`]): the daemon turns its allocator's thread cache on there, and
//! empties it after each job, so that the threads do not contend for the allocator's one
//! arena while a push runs and hold nothing between jobs.
//!
//! Blob sockets run on a thread of their own at the same priority ([`spawn_io`], a
//! runtime of one thread): a 4 MB batch is framed, masked and copied through the socket on
//! the thread that handles it, and on the runtime thread that carries a program's messages
//! that held each message up for a millisecond or two at a time (a message took 4–5 ms
//! during an upload against 1.2 ms idle).
//!
//! This module owns the pool, the blob sockets' thread and the worker threads' hooks, and
//! nothing else. Neither must ever run work that a message or the bridge waits on (a
//! journal flush, a socket's reply): only teleport's own steps, whose callers accept that
//! they yield to messages. The one bridge work it takes is decoding a message over
//! [`INLINE_BYTES`] ([`sized`]), which only teleport's messages are: the connection that
//! carries it waits for it either way, and the runtime's thread is left to the others.

use std::sync::OnceLock;

/// The nice value of the bulk pool's threads (0 is the default, 19 the lowest).
pub const BULK_NICE: i32 = 10;

/// At most this many bulk threads at once; more work waits in the pool's queue.
const MAX_THREADS: usize = 16;

/// What the program wants done on this crate's worker threads (the bulk pool's and the
/// scanner's hashing threads).
#[derive(Debug, Clone, Copy)]
pub struct ThreadHooks {
    /// Run on each worker thread when it starts.
    pub started: fn(),
    /// Run on a bulk pool thread after each job (a hashing thread ends with its scan).
    pub job_done: fn(),
}

static HOOKS: OnceLock<ThreadHooks> = OnceLock::new();

/// Sets the worker threads' hooks, once, before any work runs (threads started earlier
/// miss `started`). Returns false if they were set already.
pub fn set_thread_hooks(hooks: ThreadHooks) -> bool {
    HOOKS.set(hooks).is_ok()
}

/// Runs the `started` hook on the calling thread (a worker thread of this crate).
pub(crate) fn worker_started() {
    if let Some(hooks) = HOOKS.get() {
        (hooks.started)();
    }
}

/// Runs `work` on the bulk pool; its handle is awaited like
/// [`tokio::task::spawn_blocking`]'s. Callable from inside or outside a runtime.
pub fn spawn<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> tokio::task::JoinHandle<T> {
    pool().spawn_blocking(move || {
        let done = work();
        if let Some(hooks) = HOOKS.get() {
            (hooks.job_done)();
        }
        done
    })
}

/// Input of at most this many bytes is worked on where it is ([`sized`]): decoding 64 KiB
/// takes tens of microseconds.
pub const INLINE_BYTES: usize = 64 * 1024;

/// Runs `work` over `len` bytes of input (decoding a message): on the calling thread when
/// they are at most [`INLINE_BYTES`], on the bulk pool otherwise. Only teleport's
/// messages are that large (a batch of blobs, a commit's delta, a pull's tree), and
/// decoding megabytes on a runtime's thread held up every ping and message behind it.
pub async fn sized<T: Send + 'static>(
    len: usize,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, tokio::task::JoinError> {
    if len <= INLINE_BYTES {
        Ok(work())
    } else {
        spawn(work).await
    }
}

/// Runs `future` on the bulk I/O thread (a runtime of one thread at [`BULK_NICE`], with
/// its own I/O and timers), where sockets that carry megabytes are opened and driven; its
/// handle is awaited from any runtime. Dropping the handle does not stop the future.
pub fn spawn_io<F>(future: F) -> tokio::task::JoinHandle<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    io().spawn(future)
}

/// The bulk I/O thread's runtime, started on first use and run until the process ends.
fn io() -> &'static tokio::runtime::Handle {
    static IO: OnceLock<tokio::runtime::Handle> = OnceLock::new();
    IO.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("the bulk I/O runtime cannot be built");
        let handle = runtime.handle().clone();
        std::thread::Builder::new()
            .name("bulk-io".into())
            .spawn(move || {
                lower_this_thread();
                worker_started();
                runtime.block_on(std::future::pending::<()>());
            })
            .expect("the bulk I/O thread cannot be started");
        handle
    })
}

/// The pool: a runtime that is never driven, used for its blocking threads only.
fn pool() -> &'static tokio::runtime::Handle {
    static POOL: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    POOL.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .thread_name("bulk")
            .max_blocking_threads(MAX_THREADS)
            .on_thread_start(|| {
                lower_this_thread();
                worker_started();
            })
            .build()
            .expect("the bulk pool's runtime cannot be built")
    })
    .handle()
}

/// Lowers the calling thread's CPU priority to [`BULK_NICE`], unless it is lower already
/// (a thread's own nice value on Linux; elsewhere nothing). Threads it starts inherit it.
/// Failing to lower it is harmless.
fn lower_this_thread() {
    #[cfg(target_os = "linux")]
    {
        let nice = this_thread_nice();
        if nice < BULK_NICE {
            // SAFETY: a plain system call on the calling thread's id.
            unsafe { libc::setpriority(libc::PRIO_PROCESS, this_thread_id(), BULK_NICE) };
        }
    }
}

#[cfg(target_os = "linux")]
fn this_thread_id() -> libc::id_t {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as libc::id_t }
}

/// The calling thread's nice value (0 if it cannot be read).
#[cfg(target_os = "linux")]
fn this_thread_nice() -> i32 {
    // SAFETY: getpriority on the calling thread's id; -1 is a valid answer, so errno is
    // cleared first and read after.
    unsafe {
        *libc::__errno_location() = 0;
        let nice = libc::getpriority(libc::PRIO_PROCESS, this_thread_id());
        if nice == -1 && *libc::__errno_location() != 0 {
            0
        } else {
            nice
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn small_input_is_worked_on_in_place_and_large_input_on_the_pool() {
        let here = std::thread::current().id();
        let small = sized(INLINE_BYTES, || std::thread::current().id());
        assert_eq!(small.await.unwrap(), here);
        let large = sized(INLINE_BYTES + 1, || {
            std::thread::current().name().map(str::to_owned)
        });
        assert_eq!(large.await.unwrap().as_deref(), Some("bulk"));
    }

    #[tokio::test]
    async fn a_socket_made_on_one_runtime_is_driven_on_the_io_thread_with_its_timers() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        // Made and accepted here (this runtime's I/O driver), as the relay's sockets are.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut served, _) = listener.accept().await.unwrap();
        let echo = spawn_io(async move {
            let mut buf = [0u8; 5];
            served.read_exact(&mut buf).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            served.write_all(&buf).await.unwrap();
            std::thread::current().name().map(str::to_owned)
        });
        client.write_all(b"hello").await.unwrap();
        let mut back = [0u8; 5];
        client.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"hello");
        assert_eq!(echo.await.unwrap().as_deref(), Some("bulk-io"));
        #[cfg(target_os = "linux")]
        {
            let nice = spawn_io(async { this_thread_nice() }).await.unwrap();
            assert!(nice >= BULK_NICE, "nice {nice}");
        }
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn work_runs_on_a_thread_of_lower_priority() {
        let nice = spawn(this_thread_nice).await.unwrap();
        assert!(nice >= BULK_NICE, "nice {nice}");
        assert!(this_thread_nice() < BULK_NICE || nice == this_thread_nice());
    }

    #[test]
    fn the_hooks_run_on_a_new_worker_thread_and_after_each_job() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static STARTED: AtomicUsize = AtomicUsize::new(0);
        static DONE: AtomicUsize = AtomicUsize::new(0);
        thread_local! {
            static STARTED_HERE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
        }
        fn started() {
            STARTED.fetch_add(1, Ordering::SeqCst);
            STARTED_HERE.with(|here| here.set(true));
        }
        fn job_done() {
            DONE.fetch_add(1, Ordering::SeqCst);
        }
        // The one test in this binary that sets them (they are the process's).
        assert!(set_thread_hooks(ThreadHooks { started, job_done }));
        assert!(!set_thread_hooks(ThreadHooks { started, job_done }));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let before = DONE.load(Ordering::SeqCst);
        // A scanner's hashing thread runs `started` too.
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    worker_started();
                    assert!(STARTED_HERE.with(|here| here.get()));
                })
                .join()
                .unwrap();
        });
        runtime.block_on(spawn(|| ())).unwrap();
        runtime.block_on(spawn(|| ())).unwrap();
        assert!(DONE.load(Ordering::SeqCst) >= before + 2);
        assert!(STARTED.load(Ordering::SeqCst) >= 1);
    }

    #[test]
    fn work_runs_outside_a_runtime_too() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert_eq!(runtime.block_on(spawn(|| 6 * 7)).unwrap(), 42);
    }
}
