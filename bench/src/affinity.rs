//! Where the client and the server of a one-client scenario run: on any CPU, on one shared
//! CPU, or on two different CPUs.
//!
//! On a 2-vCPU machine a one-client round trip is bimodal: a few µs when the scheduler
//! keeps both ends on one core, several more when each wake-up crosses cores. Unpinned,
//! which of the two a scenario gets changes from run to run, and a ratio between two
//! scenarios can flip from 0.5 to 2.5 on placement alone. Pinning both ends measures each
//! mode on its own, so daemon and baseline are compared in the same placement.

use std::sync::OnceLock;

/// The CPUs this process may run on when it started, in order.
static ALLOWED: OnceLock<Vec<usize>> = OnceLock::new();

/// Records the CPUs this process may use. Call once, before anything is pinned.
pub fn init() -> std::io::Result<()> {
    let cpus = get(0)?;
    let _ = ALLOWED.set(cpus);
    Ok(())
}

/// The CPUs this process may use (as recorded by [`init`]).
pub fn allowed() -> &'static [usize] {
    ALLOWED.get().map(Vec::as_slice).unwrap_or(&[])
}

/// Where the two ends of a one-client scenario run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Placement {
    /// Wherever the scheduler puts them (as in real use).
    Unpinned,
    /// Client and server on the first allowed CPU: no cross-core wake-ups.
    SameCore,
    /// Client on the first allowed CPU, server on the second: every wake-up crosses.
    CrossCore,
}

impl Placement {
    /// A short name for tables.
    pub fn label(self) -> &'static str {
        match self {
            Placement::Unpinned => "unpinned",
            Placement::SameCore => "same core",
            Placement::CrossCore => "cross core",
        }
    }

    /// The CPU the client is pinned to, if any.
    pub fn client_cpu(self) -> Option<usize> {
        match self {
            Placement::Unpinned => None,
            Placement::SameCore | Placement::CrossCore => allowed().first().copied(),
        }
    }

    /// The CPU the server is pinned to, if any.
    pub fn server_cpu(self) -> Option<usize> {
        match self {
            Placement::Unpinned => None,
            Placement::SameCore => allowed().first().copied(),
            Placement::CrossCore => allowed().get(1).copied(),
        }
    }

    /// Whether this machine can provide the placement.
    pub fn possible(self) -> bool {
        match self {
            Placement::Unpinned => true,
            Placement::SameCore => !allowed().is_empty(),
            Placement::CrossCore => allowed().len() >= 2,
        }
    }
}

/// The CPUs thread (or process) `tid` may run on; 0 is the calling thread.
fn get(tid: i32) -> std::io::Result<Vec<usize>> {
    // SAFETY: cpu_set_t is plain data; an all-zero value is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable cpu_set_t of the size passed.
    let result =
        unsafe { libc::sched_getaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if result != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let n_cpus = 8 * std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: CPU_ISSET reads `set` within its size (cpu < n_cpus).
    Ok((0..n_cpus)
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect())
}

/// Pins thread (or process) `tid` (0: the calling thread) to `cpu`, or lets it run on
/// every CPU this process started with (`None`).
pub fn pin(tid: i32, cpu: Option<usize>) -> std::io::Result<()> {
    // SAFETY: as in `get`.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let cpus = match cpu {
        Some(cpu) => std::slice::from_ref(&cpu).to_vec(),
        None => allowed().to_vec(),
    };
    for cpu in cpus {
        // SAFETY: CPU_SET writes within `set`; cpu comes from sched_getaffinity's range.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: `set` is a valid cpu_set_t of the size passed.
    let result =
        unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if result != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Pins every thread of process `pid` (see [`pin`]).
pub fn pin_process(pid: u32, cpu: Option<usize>) -> std::io::Result<()> {
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let Some(tid) = task?
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<i32>().ok())
        else {
            continue;
        };
        match pin(tid, cpu) {
            Ok(()) => {}
            // The thread exited meanwhile.
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
