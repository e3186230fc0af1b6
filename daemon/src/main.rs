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
    // Before any thread exists: this reads and clears the service manager's variables.
    let handoff = cloudd::supervisor::Handoff::from_env();
    let result = (|| -> anyhow::Result<()> {
        let paths = Paths::from_env()?;
        // This thread runs the runtime (see memory.rs).
        cloudd::memory::cache_this_thread();
        cloudd::memory::install();
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
