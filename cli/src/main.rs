//! The `cloudctl` binary: turns flags into validated arguments in one place, runs the
//! command against the daemon, and prints the result for people or, with `--json`, for
//! programs. Exit codes: 0 success, 1 failure, 2 usage error.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};
use cloud_protocol::ipc::{Request, Response, Status};
use cloud_protocol::paths::Paths;
use cloudctl::client::{Client, ClientError};
use cloudctl::launcher::{self, Running};
use serde_json::json;

/// Control cloudd, the agent that ties this machine to a cloud relay.
#[derive(Debug, Parser)]
#[command(name = "cloudctl", version = cloudctl::VERSION)]
struct Args {
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start the daemon (detached) and wait until it answers; does nothing if it runs.
    Up {
        /// Run the daemon in this terminal instead, logging to stderr.
        #[arg(long)]
        foreground: bool,
    },
    /// Stop the daemon: it finishes in-flight requests and exits.
    Down,
    /// Show the daemon's state (starts it if needed).
    Status,
    /// Measure a round trip to the daemon (starts it if needed).
    Ping {
        /// How many pings to send.
        #[arg(long, short = 'c', default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        count: u32,
    },
}

const CLIENT_NAME: &str = "cloudctl";

fn main() -> ExitCode {
    let args = Args::parse();
    let json_output = args.json;
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("cloudctl: error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if json_output {
                println!("{}", json!({ "error": format!("{e:#}") }));
            }
            eprintln!("cloudctl: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let paths = Paths::from_env()?;
    let json_output = args.json;
    match args.command {
        Command::Up { foreground: true } => run_foreground(&paths).await,
        Command::Up { foreground: false } => {
            let running = connect(&paths, false).await?;
            let hello = running.client.daemon();
            if json_output {
                println!(
                    "{}",
                    json!({ "pid": hello.pid, "version": hello.daemon_version, "started": running.started, "socket": paths.socket })
                );
            } else if running.started {
                println!(
                    "cloudd started (pid {}, version {})",
                    hello.pid, hello.daemon_version
                );
            } else {
                println!(
                    "cloudd is already running (pid {}, version {})",
                    hello.pid, hello.daemon_version
                );
            }
            Ok(())
        }
        Command::Down => {
            let stopped = launcher::stop(&paths, CLIENT_NAME).await?;
            if json_output {
                println!(
                    "{}",
                    json!({ "stopped": stopped.is_some(), "pid": stopped })
                );
            } else {
                match stopped {
                    Some(pid) => println!("cloudd stopped (pid {pid})"),
                    None => println!("cloudd is not running"),
                }
            }
            Ok(())
        }
        Command::Status => {
            let mut running = connect(&paths, true).await?;
            let Response::Status(status) = running.client.request(Request::Status).await? else {
                bail!("unexpected reply to status");
            };
            if json_output {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print_status(&status);
            }
            Ok(())
        }
        Command::Ping { count } => {
            let mut running = connect(&paths, true).await?;
            ping(&mut running.client, count, json_output).await
        }
    }
}

/// Connects, starting the daemon when it is absent. `announce` tells the user on stderr
/// when a command had to start it.
async fn connect(paths: &Paths, announce: bool) -> anyhow::Result<Running> {
    let running = launcher::ensure_running(paths, CLIENT_NAME).await?;
    if running.started && announce {
        eprintln!(
            "cloudctl: started cloudd (pid {})",
            running.client.daemon().pid
        );
    }
    Ok(running)
}

/// `up --foreground`: becomes the daemon (exec), unless one already runs.
async fn run_foreground(paths: &Paths) -> anyhow::Result<()> {
    match Client::connect(paths, CLIENT_NAME).await {
        Ok(client) => bail!(
            "cloudd is already running (pid {}); stop it with `cloudctl down`",
            client.daemon().pid
        ),
        Err(e) if e.is_not_running() => {}
        Err(e) => return Err(e.into()),
    }
    let binary = launcher::cloudd_binary();
    let mut command = std::process::Command::new(&binary);
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt as _;
        let error = command.exec();
        Err(error).with_context(|| format!("cannot run {}", binary.display()))
    }
    #[cfg(not(unix))]
    {
        let status = command
            .status()
            .with_context(|| format!("cannot run {}", binary.display()))?;
        if !status.success() {
            bail!("cloudd exited with {status}");
        }
        Ok(())
    }
}

async fn ping(client: &mut Client, count: u32, json_output: bool) -> anyhow::Result<()> {
    let mut round_trips = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let start = Instant::now();
        match client.request(Request::Ping).await {
            Ok(Response::Pong) => round_trips.push(start.elapsed()),
            Ok(other) => bail!("unexpected reply to ping: {other:?}"),
            Err(e @ ClientError::Closed(_)) => return Err(e.into()),
            Err(e) => return Err(e.into()),
        }
    }
    round_trips.sort();
    let median = round_trips[round_trips.len() / 2];
    let pid = client.daemon().pid;
    if json_output {
        println!(
            "{}",
            json!({
                "pid": pid,
                "count": count,
                "min_us": micros(round_trips[0]),
                "median_us": micros(median),
                "max_us": micros(round_trips[round_trips.len() - 1]),
            })
        );
    } else if count == 1 {
        println!("pong from cloudd (pid {pid}) in {}", human(median));
    } else {
        println!(
            "{count} pongs from cloudd (pid {pid}): min {}, median {}, max {}",
            human(round_trips[0]),
            human(median),
            human(round_trips[round_trips.len() - 1])
        );
    }
    Ok(())
}

fn micros(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e6
}

fn human(duration: Duration) -> String {
    if duration < Duration::from_millis(1) {
        format!("{:.0} µs", micros(duration))
    } else {
        format!("{:.2} ms", duration.as_secs_f64() * 1e3)
    }
}

fn print_status(status: &Status) {
    let uptime = Duration::from_millis(status.uptime_ms);
    let rows = [
        (
            "cloudd",
            format!(
                "running (pid {}, version {}, protocol {})",
                status.pid, status.version, status.protocol
            ),
        ),
        ("state", format!("{:?}", status.state).to_lowercase()),
        ("uptime", format!("{}s", uptime.as_secs())),
        ("socket", status.socket.clone()),
        ("state dir", status.state_dir.clone()),
        (
            "config",
            format!(
                "{} (generation {})",
                status.config_file, status.config_generation
            ),
        ),
        (
            "log",
            format!(
                "{} ({})",
                status.log_file.as_deref().unwrap_or("stderr"),
                status.log_filter
            ),
        ),
        ("clients", status.clients.to_string()),
    ];
    for (name, value) in rows {
        println!("{name:<10} {value}");
    }
}
