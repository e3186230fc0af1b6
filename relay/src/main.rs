//! The `cloud-relay` binary: `serve`, `token create|revoke`, and the hidden `shell-agent`.
//!
//! Flags become validated arguments here and nowhere else. `serve` runs on a current-thread
//! runtime (see DESIGN.md's performance notes: cross-core wake-ups cost more than the work)
//! and shuts down gracefully on SIGTERM or SIGINT.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use cloud_relay::{RelayConfig, VERSION};

/// The cloud relay: sessions, their agents, and the routing to daemons and viewers.
#[derive(Debug, Parser)]
#[command(name = "cloud-relay", version = VERSION)]
struct Args {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Debug, Subcommand)]
enum Commands {
    /// Run the relay.
    Serve {
        /// The address to listen on, e.g. 127.0.0.1:8080.
        #[arg(long)]
        listen: SocketAddr,
        /// The data directory (tokens, store, workspaces).
        #[arg(long)]
        data: PathBuf,
        /// The agent command line, run in each session's workspace (default: this
        /// program's built-in shell agent).
        #[arg(long, num_args = 1.., allow_hyphen_values = true)]
        agent_command: Vec<String>,
    },
    /// Manage bearer tokens (works while a server runs).
    Token {
        #[command(subcommand)]
        command: TokenCommands,
    },
    /// The built-in shell agent on stdin/stdout (run by the relay, not by hand).
    #[command(hide = true)]
    ShellAgent,
}

#[derive(Debug, Subcommand)]
enum TokenCommands {
    /// Mint a token and print it (only this once).
    Create {
        /// The user it authenticates.
        #[arg(long)]
        user: String,
        /// The user's org.
        #[arg(long)]
        org: String,
        /// The data directory.
        #[arg(long)]
        data: PathBuf,
    },
    /// Revoke every token of a user.
    Revoke {
        /// The user.
        #[arg(long)]
        user: String,
        /// The data directory.
        #[arg(long)]
        data: PathBuf,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match args.command {
        Commands::Serve {
            listen,
            data,
            agent_command,
        } => serve(listen, data, agent_command),
        Commands::Token { command } => token(command),
        Commands::ShellAgent => cloud_relay::shell_agent::run().map_err(anyhow::Error::from),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cloud-relay: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn token(command: TokenCommands) -> anyhow::Result<()> {
    match command {
        TokenCommands::Create { user, org, data } => {
            let token = cloud_relay::tokens::create(&data, &user, &org)?;
            println!("{token}");
        }
        TokenCommands::Revoke { user, data } => {
            let n_revoked = cloud_relay::tokens::revoke_user(&data, &user)?;
            eprintln!("revoked {n_revoked} token(s) of {user}");
        }
    }
    Ok(())
}

fn serve(listen: SocketAddr, data: PathBuf, agent_command: Vec<String>) -> anyhow::Result<()> {
    init_logging();
    let agent_command = if agent_command.is_empty() {
        let exe = std::env::current_exe().context("cannot find this program's path")?;
        vec![exe.to_string_lossy().into_owned(), "shell-agent".to_owned()]
    } else {
        agent_command
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(async move {
        let relay = cloud_relay::start(RelayConfig {
            listen,
            data_dir: data,
            agent_command,
        })
        .await?;
        let signal = wait_for_signal().await?;
        tracing::info!(%signal, "stopping");
        relay.shutdown().await;
        Ok(())
    })
}

/// Waits for SIGTERM or SIGINT; returns its name.
async fn wait_for_signal() -> anyhow::Result<&'static str> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
        let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
        tokio::select! {
            _ = terminate.recv() => Ok("SIGTERM"),
            _ = interrupt.recv() => Ok("SIGINT"),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c()
            .await
            .context("cannot handle Ctrl-C")?;
        Ok("Ctrl-C")
    }
}

/// Logs to stderr, filtered by `RELAY_LOG` (default `info`).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RELAY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
