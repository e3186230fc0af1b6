//! The `cloudd` binary: parses its flags and runs the daemon on a current-thread runtime.
//!
//! A current-thread runtime keeps a request's wake-ups on one core: on the two-vCPU
//! machines this is built on, a cross-core wake-up costs about 60 µs, ten times the work
//! of answering a request.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use cloud_protocol::paths::Paths;
use cloudd::daemon::{self, Options, StartError};

/// How long the blocking tasks left at exit get to finish.
const EXIT_DEADLINE: Duration = Duration::from_secs(1);

/// The cloudd agent. Usually started by `cloudctl up` or the service manager.
#[derive(Debug, Parser)]
#[command(name = "cloudd", version = cloudd::VERSION)]
struct Args {
    /// Log to `cloudd.log` in the state directory instead of stderr (set by `cloudctl up`).
    #[arg(long)]
    detached: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// The built-in shell agent on stdio (run by the embedded relay for each session).
    #[command(hide = true)]
    ShellAgent,
}

/// Allocations of this size and up get fresh pages from the kernel (glibc's `mmap`
/// threshold).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 1024 * 1024;

/// Fixes glibc's `mmap` threshold, which it otherwise raises to the size of every large
/// block freed. sled gives each database a 6 MiB page table, zeroed (`calloc`), and the
/// journal opens a database for every 128 KiB of events: once the threshold has risen
/// past 6 MiB, each table comes from the heap and is cleared with `memset`, which cost the
/// daemon about a tenth of its CPU under a sustained load of events. Fresh pages are zero
/// already, and only the few the table touches are ever faulted in. The trim threshold
/// stays at twice it, as glibc's own adjustment keeps it.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_large_allocations_mapped() {
    // SAFETY: called before any other thread exists; mallopt only sets allocator
    // parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_large_allocations_mapped() {}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Command::ShellAgent) = args.command {
        return match cloud_relay::shell_agent::run() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("cloudd shell-agent: {e}");
                ExitCode::FAILURE
            }
        };
    }
    // Everything the daemon creates is the user's alone, whoever creates it: sled makes its
    // own files and directories (the store, the journal's generations, the embedded
    // relay's), so the umask is what makes them 0600 and 0700. The agents the embedded
    // relay runs inherit it, which keeps their workspaces, inside the state directory,
    // private too.
    #[cfg(unix)]
    // SAFETY: umask only sets the process's file mode mask; it cannot fail.
    unsafe {
        libc::umask(0o077);
    }
    keep_large_allocations_mapped();
    // Before any thread exists: this reads and clears the service manager's variables.
    let handoff = cloudd::supervisor::Handoff::from_env();
    let result = (|| -> anyhow::Result<()> {
        let paths = Paths::from_env()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let ran = runtime.block_on(daemon::run(
            paths,
            Options {
                detached: args.detached,
                handoff,
            },
        ));
        // Not the default drop, which waits for every blocking task: one stuck on a disk
        // that stopped answering must not keep the daemon from exiting.
        runtime.shutdown_timeout(EXIT_DEADLINE);
        ran?;
        Ok(())
    })();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(StartError::Lock(_)) = e.downcast_ref::<StartError>() {
                eprintln!("cloudd: {e}");
            } else {
                eprintln!("cloudd: error: {e:#}");
            }
            ExitCode::FAILURE
        }
    }
}
