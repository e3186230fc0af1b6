//! The `cloudd` binary: parses its flags and runs the daemon on a current-thread runtime.
//!
//! A current-thread runtime keeps a request's wake-ups on one core: on the two-vCPU
//! machines this is built on, a cross-core wake-up costs about 60 µs, ten times the work
//! of answering a request.

use std::process::ExitCode;

use clap::Parser;
use cloud_protocol::paths::Paths;
use cloudd::daemon::{self, Options, StartError};

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
    keep_large_allocations_mapped();
    // Before any thread exists: this reads and clears the service manager's variables.
    let handoff = cloudd::supervisor::Handoff::from_env();
    let result = (|| -> anyhow::Result<()> {
        let paths = Paths::from_env()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(daemon::run(
            paths,
            Options {
                detached: args.detached,
                handoff,
            },
        ))?;
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
