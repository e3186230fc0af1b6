//! The `cloudctl` binary: turns flags into validated arguments in one place, runs the
//! command against the daemon, and prints the result for people or, with `--json`, for
//! programs. Exit codes: 0 success, 1 failure, 2 usage error (`session shell`: the
//! shell's own status).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};
use cloud_protocol::ipc::{Request, Response, Status};
use cloud_protocol::paths::Paths;
use cloudctl::client::{Client, ClientError};
use cloudctl::launcher::{self, Running};
use cloudctl::service;

mod account_commands;
mod device_commands;
mod metrics_commands;
mod session_commands;
mod shell_commands;
mod table;
mod teleport_commands;

use cloud_protocol::bridge::PermissionDecision;
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
    /// Run cloudd at login under systemd (Linux) or launchd (macOS).
    Service {
        #[command(subcommand)]
        action: ServiceAction,
    },
    /// Use a remote relay: with an API key (`--token`), or without one by approval from
    /// a machine already logged in (a code is shown to approve with `cloudctl device
    /// approve CODE`). The login is kept in the OS keychain when there is one, else in a
    /// 0600 file in the config directory.
    Login {
        /// The relay, like https://relay.example.com.
        #[arg(long)]
        relay: String,
        /// An API key (`cloud-relay token create` prints one); `-` reads it from stdin.
        /// Without it, log in by approval from another machine.
        #[arg(long)]
        token: Option<String>,
    },
    /// Forget the remote relay and use the embedded one.
    Logout,
    /// Which relay, as whom, whether it is connected, and where the login is kept.
    Whoami,
    /// Approve or deny another machine's login; list and revoke your machines' logins.
    Device {
        #[command(subcommand)]
        command: device_commands::DeviceCommand,
    },
    /// Create, list, show and manage cloud sessions.
    Session {
        #[command(subcommand)]
        command: session_commands::SessionCommand,
    },
    /// Send a message to a session's agent (queued while the relay is unreachable).
    Send {
        /// The session id.
        id: String,
        /// The message; `-` reads it from stdin (for one longer than a command line).
        text: String,
        /// The idempotency key (1 to 128 bytes; default: a fresh one per invocation). A
        /// script that retries a send whose outcome it does not know passes the same key
        /// again: the daemon and the relay take a repeat of a key as the same message.
        #[arg(long, value_name = "KEY")]
        idempotency_key: Option<String>,
    },
    /// Move a worktree to a session and back: push, pull, watch, stop, status.
    Teleport {
        #[command(subcommand)]
        command: teleport_commands::TeleportCommand,
    },
    /// Stream a session's messages and permission prompts.
    Attach {
        /// The session id.
        id: String,
        /// Replay the entries after this log sequence first.
        #[arg(long)]
        since: Option<u64>,
        /// Only watch: never send anything.
        #[arg(long)]
        viewer: bool,
        /// Print what is stored and exit instead of following.
        #[arg(long)]
        no_follow: bool,
    },
    /// Interrupt what a session's agent is doing.
    Interrupt {
        /// The session id.
        id: String,
    },
    /// List a session's pending permission prompts.
    Permissions {
        /// The session id.
        id: String,
    },
    /// Allow a permission prompt.
    Allow {
        /// The session id.
        id: String,
        /// The prompt's request id (see `cloudctl permissions`).
        request_id: String,
        /// Replace the tool's input with this JSON object.
        #[arg(long, value_parser = session_commands::json_object)]
        input: Option<String>,
    },
    /// Deny a permission prompt.
    Deny {
        /// The session id.
        id: String,
        /// The prompt's request id (see `cloudctl permissions`).
        request_id: String,
        /// Why, for the agent.
        #[arg(long, default_value = "denied by the user")]
        message: String,
    },
    /// Show the daemon's own health figures (they stay on this machine).
    Metrics,
    /// List your orgs and switch the current one.
    Org {
        #[command(subcommand)]
        command: account_commands::OrgCommand,
    },
    /// Get and set the settings shared across your machines and your org.
    Settings {
        #[command(subcommand)]
        command: account_commands::SettingsCommand,
    },
    /// Print a shell completion script to stdout (for example:
    /// `cloudctl completions bash > ~/.local/share/bash-completion/completions/cloudctl`).
    Completions {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
    /// Print cloudctl's man page (roff) to stdout (for example: `cloudctl man | man -l -`),
    /// or write it and one page per subcommand into a directory.
    Man {
        /// Write cloudctl.1 and a cloudctl-SUBCOMMAND.1 page for every subcommand into
        /// this directory (created if missing; for example `~/.local/share/man/man1`)
        /// instead.
        #[arg(long, value_name = "DIR")]
        out_dir: Option<std::path::PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum ServiceAction {
    /// Write the service files, enable them and start cloudd through the service manager.
    Install {
        /// Print what would be written and run, and do nothing.
        #[arg(long)]
        dry_run: bool,
        /// The service manager (default: this platform's).
        #[arg(long, value_parser = ["systemd", "launchd"])]
        manager: Option<String>,
    },
    /// Stop and disable the service and remove its files (state and config are kept).
    Uninstall {
        /// Print what would be removed and run, and do nothing.
        #[arg(long)]
        dry_run: bool,
        /// The service manager (default: this platform's).
        #[arg(long, value_parser = ["systemd", "launchd"])]
        manager: Option<String>,
    },
    /// Whether the service is installed, enabled and running.
    Status {
        /// The service manager (default: this platform's).
        #[arg(long, value_parser = ["systemd", "launchd"])]
        manager: Option<String>,
    },
    /// Show the service's log and follow it.
    Logs {
        /// Print the recent log and exit instead of following it.
        #[arg(long)]
        no_follow: bool,
        /// The service manager (default: this platform's).
        #[arg(long, value_parser = ["systemd", "launchd"])]
        manager: Option<String>,
    },
}

const CLIENT_NAME: &str = "cloudctl";

/// Writes the completion script for `shell`, generated from the same clap definitions
/// that parse the arguments (so it cannot fall behind a new subcommand or flag).
fn completions(shell: clap_complete::Shell) -> anyhow::Result<()> {
    let mut command = <Args as clap::CommandFactory>::command();
    // Into a buffer first: `generate` panics on a write error (a closed pipe).
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut command, "cloudctl", &mut script);
    let mut out = std::io::stdout().lock();
    std::io::Write::write_all(&mut out, &script)
        .and_then(|()| std::io::Write::flush(&mut out))
        .context("cannot write the completion script to stdout")
}

/// Writes the man page (roff) to stdout, or every page into `out_dir`, generated from the
/// same clap definitions. The `help` subcommand is left out: it has no page of its own.
fn man_page(out_dir: Option<&std::path::Path>) -> anyhow::Result<()> {
    let command = <Args as clap::CommandFactory>::command().disable_help_subcommand(true);
    match out_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .and_then(|()| clap_mangen::generate_to(command, dir))
                .with_context(|| {
                    format!(
                        "cannot write the man pages into {}; choose a directory you can write",
                        dir.display()
                    )
                })?;
            println!("wrote the man pages into {}", dir.display());
            Ok(())
        }
        None => {
            let mut out = std::io::stdout().lock();
            clap_mangen::Man::new(command)
                .render(&mut out)
                .and_then(|()| std::io::Write::flush(&mut out))
                .context("cannot write the man page to stdout")
        }
    }
}

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
    // Neither needs the daemon, nor a usable socket location.
    match args.command {
        Command::Completions { shell } => return completions(shell),
        Command::Man { out_dir } => return man_page(out_dir.as_deref()),
        _ => {}
    }
    let paths = Paths::from_env()?;
    let json_output = args.json;
    match args.command {
        Command::Completions { .. } | Command::Man { .. } => unreachable!("handled above"),
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
        Command::Service { action } => service(&paths, action, json_output).await,
        Command::Login { relay, token: None } => {
            let mut running = connect(&paths, true).await?;
            device_commands::device_login(&mut running.client, relay, json_output).await
        }
        Command::Device { command } => {
            let mut running = connect(&paths, true).await?;
            device_commands::device(&mut running.client, command, json_output).await
        }
        Command::Login {
            relay,
            token: Some(token),
        } => {
            let token = if token == "-" {
                let mut line = String::new();
                std::io::stdin().read_line(&mut line)?;
                line.trim().to_owned()
            } else {
                token
            };
            let mut running = connect(&paths, true).await?;
            let Response::Identity(identity) = running
                .client
                .request(Request::Login { relay, token })
                .await?
            else {
                bail!("unexpected reply to login");
            };
            if json_output {
                println!("{}", serde_json::to_string(&identity)?);
            } else {
                println!(
                    "logged in: {}",
                    session_commands::relay_line(&identity.relay)
                );
            }
            Ok(())
        }
        command @ (Command::Logout | Command::Whoami) => {
            let logout = matches!(command, Command::Logout);
            let mut running = connect(&paths, true).await?;
            let request = if logout {
                Request::Logout
            } else {
                Request::Whoami
            };
            let Response::Identity(identity) = running.client.request(request).await? else {
                bail!("unexpected reply");
            };
            let store = if logout {
                None
            } else {
                Some(device_commands::credential_store(&mut running.client).await?)
            };
            if json_output {
                let mut value = json!(identity);
                if let Some(store) = &store {
                    value["credentials"] = json!(store);
                }
                println!("{value}");
            } else {
                if logout {
                    println!("logged out; using the embedded relay");
                }
                println!("{}", session_commands::relay_line(&identity.relay));
                if let Some(store) = store {
                    match store.store.as_str() {
                        "none" => println!("credentials: none (the embedded relay needs none)"),
                        kind => println!("credentials: {kind} ({})", store.location),
                    }
                }
            }
            Ok(())
        }
        Command::Session {
            command: session_commands::SessionCommand::Shell { id },
        } => {
            let running = connect(&paths, true).await?;
            let code = shell_commands::shell(running.client, id).await?;
            // The shell's status is this command's (the terminal is restored by now).
            if code != 0 {
                std::process::exit(code);
            }
            Ok(())
        }
        Command::Session { command } => {
            let mut running = connect(&paths, true).await?;
            session_commands::session(&mut running.client, command, json_output).await
        }
        Command::Teleport { command } => {
            let mut running = connect(&paths, true).await?;
            teleport_commands::teleport(&mut running.client, command, json_output).await
        }
        Command::Org { command } => {
            let mut running = connect(&paths, true).await?;
            account_commands::org(&mut running.client, command, json_output).await
        }
        Command::Settings { command } => {
            let mut running = connect(&paths, true).await?;
            account_commands::settings(&mut running.client, command, json_output).await
        }
        Command::Send {
            id,
            text,
            idempotency_key,
        } => {
            let text = if text == "-" {
                message_from_stdin()?
            } else {
                text
            };
            let mut running = connect(&paths, true).await?;
            session_commands::send(
                &paths,
                &mut running.client,
                id,
                text,
                idempotency_key,
                json_output,
            )
            .await
        }
        Command::Attach {
            id,
            since,
            viewer,
            no_follow,
        } => {
            let mut running = connect(&paths, true).await?;
            session_commands::attach(
                &mut running.client,
                id,
                since,
                viewer,
                !no_follow,
                json_output,
            )
            .await
        }
        Command::Interrupt { id } => {
            let mut running = connect(&paths, true).await?;
            session_commands::interrupt(&paths, &mut running.client, id, json_output).await
        }
        Command::Metrics => {
            let mut running = connect(&paths, true).await?;
            metrics_commands::metrics(&mut running.client, json_output).await
        }
        Command::Permissions { id } => {
            let mut running = connect(&paths, true).await?;
            session_commands::permissions(&mut running.client, id, json_output).await
        }
        Command::Allow {
            id,
            request_id,
            input,
        } => {
            let decision = PermissionDecision::Allow {
                updated_input: input,
            };
            let mut running = connect(&paths, true).await?;
            session_commands::answer(
                &paths,
                &mut running.client,
                id,
                request_id,
                decision,
                json_output,
            )
            .await
        }
        Command::Deny {
            id,
            request_id,
            message,
        } => {
            let mut running = connect(&paths, true).await?;
            session_commands::answer(
                &paths,
                &mut running.client,
                id,
                request_id,
                PermissionDecision::Deny { message },
                json_output,
            )
            .await
        }
    }
}

async fn service(paths: &Paths, action: ServiceAction, json_output: bool) -> anyhow::Result<()> {
    let (ServiceAction::Install { manager, .. }
    | ServiceAction::Uninstall { manager, .. }
    | ServiceAction::Status { manager }
    | ServiceAction::Logs { manager, .. }) = &action;
    let manager = service::manager(manager.as_deref())?;
    let context = service::Context::from_env(paths.clone())?;
    match action {
        ServiceAction::Install { dry_run, .. } => {
            service_plan(
                paths,
                manager.as_ref(),
                &context,
                true,
                dry_run,
                json_output,
            )
            .await
        }
        ServiceAction::Uninstall { dry_run, .. } => {
            service_plan(
                paths,
                manager.as_ref(),
                &context,
                false,
                dry_run,
                json_output,
            )
            .await
        }
        ServiceAction::Status { .. } => {
            service_status(paths, manager.as_ref(), &context, json_output).await
        }
        ServiceAction::Logs { no_follow, .. } => {
            service_logs(manager.as_ref(), &context, !no_follow)
        }
    }
}

/// `service install` and `service uninstall`: prints the plan with `--dry-run`, else
/// carries it out.
async fn service_plan(
    paths: &Paths,
    manager: &dyn service::ServiceManager,
    context: &service::Context,
    install: bool,
    dry_run: bool,
    json_output: bool,
) -> anyhow::Result<()> {
    let plan = if install {
        manager.install_plan(context)
    } else {
        manager.uninstall_plan(context)
    };
    if dry_run {
        if json_output {
            println!("{}", serde_json::to_string_pretty(&plan.to_json())?);
        } else {
            print!("{}", plan.render());
        }
        return Ok(());
    }
    let mut stopped = None;
    if install {
        // Everything that can be checked is, before anything changes: a failure leaves
        // the files, and a daemon started by hand, as they were.
        service::preflight(manager, context, &plan)?;
        // A daemon started by hand holds the socket path the service will listen
        // on: drain it first (its journal is on disk and the service picks it up).
        if let Ok(client) = Client::connect(paths, CLIENT_NAME).await {
            if client.daemon().supervisor == cloud_protocol::ipc::Supervisor::None {
                let pid = client.daemon().pid;
                drop(client);
                eprintln!(
                    "stopping cloudd (pid {pid}) so {} can take over",
                    manager.name()
                );
                stopped = launcher::stop(paths, CLIENT_NAME).await?;
            }
        }
    }
    if let Err(e) = plan.execute(manager) {
        if stopped.is_some() {
            // What the checks could not foresee failed: start the daemon again by hand
            // rather than leave nothing running.
            match connect(paths, false).await {
                Ok(running) => eprintln!(
                    "cloudctl: the install failed; started cloudd again (pid {})",
                    running.client.daemon().pid
                ),
                Err(restart) => eprintln!(
                    "cloudctl: the install failed and cloudd could not be started again: {restart:#}"
                ),
            }
        }
        return Err(e.into());
    }
    if install {
        let running = connect(paths, false).await?;
        let hello = running.client.daemon();
        if json_output {
            println!(
                "{}",
                json!({"installed": true, "manager": manager.name(), "pid": hello.pid})
            );
        } else {
            println!(
                "cloudd is installed under {} and running (pid {})",
                manager.name(),
                hello.pid
            );
        }
    } else if json_output {
        println!(
            "{}",
            json!({"uninstalled": true, "manager": manager.name()})
        );
    } else {
        println!("cloudd's {} service is uninstalled", manager.name());
    }
    Ok(())
}

/// `service status`: the manager's view and the daemon's.
async fn service_status(
    paths: &Paths,
    manager: &dyn service::ServiceManager,
    context: &service::Context,
    json_output: bool,
) -> anyhow::Result<()> {
    let rows = manager.status(context);
    let daemon = match Client::connect(paths, CLIENT_NAME).await {
        Ok(client) => format!(
            "running (pid {}, supervised by {:?})",
            client.daemon().pid,
            client.daemon().supervisor
        )
        .to_lowercase(),
        Err(e) if e.is_not_running() => "not running".into(),
        Err(e) => format!("unreachable: {e}"),
    };
    if json_output {
        let mut object = serde_json::Map::new();
        for row in &rows {
            object.insert(row.name.clone(), json!(row.value));
        }
        object.insert("daemon".into(), json!(daemon));
        println!("{}", serde_json::Value::Object(object));
    } else {
        table::print(
            rows.into_iter()
                .map(|row| [row.name, row.value])
                .chain([["daemon".to_owned(), daemon]]),
        );
    }
    Ok(())
}

/// `service logs`: becomes the manager's log viewer.
fn service_logs(
    manager: &dyn service::ServiceManager,
    context: &service::Context,
    follow: bool,
) -> anyhow::Result<()> {
    let argv = manager.logs_command(context, follow);
    let mut command = std::process::Command::new(&argv[0]);
    command.args(&argv[1..]);
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt as _;
        let error = command.exec();
        Err(anyhow::anyhow!(
            "cannot run `{}`: {error}; {}",
            argv.join(" "),
            manager.missing_tool_fix(&argv[0])
        ))
    }
    #[cfg(not(unix))]
    {
        let status = command.status()?;
        if !status.success() {
            bail!("`{}` exited with {status}", argv.join(" "));
        }
        Ok(())
    }
}

/// Connects, starting the daemon when it is absent. `announce` tells the user on stderr
/// when a command had to start it.
async fn connect(paths: &Paths, announce: bool) -> anyhow::Result<Running> {
    let running = launcher::ensure_running(paths, CLIENT_NAME).await?;
    if let Some(reason) = &running.restarted {
        eprintln!(
            "cloudctl: restarted cloudd: {reason} (now pid {})",
            running.client.daemon().pid
        );
    } else if running.started && announce {
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
    let binary = cloudctl::cloudd_binary();
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
        ("relay", session_commands::relay_line(&status.relay)),
        (
            "journal",
            format!(
                "{} event(s) not yet acknowledged",
                status.relay.journal_depth
            ),
        ),
    ];
    let refused = (status.relay.refused_events > 0).then(|| {
        (
            "refused",
            format!(
                "{} event(s) not delivered, latest: {}",
                status.relay.refused_events,
                status
                    .relay
                    .last_refusal
                    .as_deref()
                    .unwrap_or("no reason given")
            ),
        )
    });
    table::print(
        rows.into_iter()
            .chain(refused)
            .map(|(name, value)| [name.to_owned(), value]),
    );
}

/// `send ID -`: the message is all of stdin, less the one line ending a file or `echo`
/// leaves at its end.
fn message_from_stdin() -> anyhow::Result<String> {
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
        .context("cannot read the message from stdin")?;
    let text = text
        .strip_suffix('\n')
        .map(|t| t.strip_suffix('\r').unwrap_or(t))
        .unwrap_or(&text);
    if text.is_empty() {
        bail!("stdin held no message: pipe one in, like `cloudctl send ID - < message.txt`");
    }
    Ok(text.to_owned())
}
