//! The `cloud-relay` binary: `serve`, `token create|revoke` (API keys), `org
//! add-member|remove-member` (membership), `device approve|deny` (device logins, by the
//! operator), and the hidden `shell-agent` and `sandbox-forward` (the forwarder inside a
//! `limited` sandbox).
//!
//! Flags become validated arguments here and nowhere else. `serve` runs on a current-thread
//! runtime (see DESIGN.md's performance notes: cross-core wake-ups cost more than the work)
//! and shuts down gracefully on SIGTERM or SIGINT.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use cloud_relay::tokens::NewKey;
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
        /// How long an access token lives, e.g. 15m, 30s, 2s.
        #[arg(long, value_parser = parse_duration, default_value = "15m")]
        access_token_ttl: Duration,
        /// HTTP requests (and bridge session requests) per second each API key may make
        /// (0: no limit).
        #[arg(long, default_value_t = cloud_relay::limits::DEFAULT_REQUESTS.per_second)]
        requests_per_second: u32,
        /// How many requests above that rate an API key may make at once.
        #[arg(long, default_value_t = cloud_relay::limits::DEFAULT_REQUESTS.burst)]
        request_burst: u32,
        /// Journaled bridge events per second each API key may stream (0: no limit).
        #[arg(long, default_value_t = cloud_relay::limits::DEFAULT_EVENTS.per_second)]
        events_per_second: u32,
        /// How many events above that rate an API key may stream at once.
        #[arg(long, default_value_t = cloud_relay::limits::DEFAULT_EVENTS.burst)]
        event_burst: u32,
        /// How long a device login's code waits for approval, e.g. 10m.
        #[arg(long, value_parser = parse_duration, default_value = "10m")]
        device_code_ttl: Duration,
        /// How long a device login waits between polls, e.g. 5s.
        #[arg(long, value_parser = parse_duration, default_value = "5s")]
        device_poll_interval: Duration,
        /// How often clients of a session (daemons, viewers, terminals) are pinged and
        /// expected to answer; one silent for three intervals no longer counts.
        #[arg(long, value_parser = parse_duration, default_value = "10s")]
        heartbeat: Duration,
        /// How long one of a session's `auto_stop_minutes` lasts: a minute (tests shorten
        /// it).
        #[arg(long, value_parser = parse_duration, default_value = "1m", hide = true)]
        auto_stop_unit: Duration,
        /// Where sessions run: local (a directory and a process group on this host) or
        /// sandbox (bubblewrap: only its workspace, its own /tmp and a read-only system;
        /// network none, limited through the relay's filtering proxy, or full).
        #[arg(long, value_enum, default_value = "local")]
        provider: ProviderArg,
        /// The bubblewrap program of the sandbox provider.
        #[arg(long, default_value = "bwrap")]
        bwrap: PathBuf,
        /// A host every `limited` sandbox may reach besides its session's allowed domains
        /// (repeat for several; `*.example.org` for the hosts under it).
        #[arg(long)]
        allowed_domain: Vec<String>,
    },
    /// Manage API keys (works while a server runs).
    Token {
        #[command(subcommand)]
        command: TokenCommands,
    },
    /// Approve or deny a device login (`cloudctl login --relay URL` on the new machine
    /// shows the code); works while a server runs.
    Device {
        #[command(subcommand)]
        command: DeviceCommands,
    },
    /// The built-in shell agent on stdin/stdout (run by the relay, not by hand).
    #[command(hide = true)]
    ShellAgent,
    /// The forwarder inside a `limited` sandbox (run by the relay, not by hand).
    #[command(hide = true)]
    SandboxForward {
        /// The proxy socket, as bound inside the sandbox.
        #[arg(long)]
        socket: PathBuf,
        /// The loopback port to listen on.
        #[arg(long)]
        port: u16,
        /// The program and its arguments.
        #[arg(last = true, required = true)]
        program: Vec<String>,
    },
    /// Manage org membership (works while a server runs; takes effect at the user's next
    /// request, and ends their open connections in an org they left).
    Org {
        #[command(subcommand)]
        command: OrgCommands,
    },
}

/// `--provider`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum ProviderArg {
    /// A directory and a process group on the relay host.
    Local,
    /// A bubblewrap sandbox.
    Sandbox,
}

#[derive(Debug, Subcommand)]
enum OrgCommands {
    /// Add a user to an org (or change their role in it).
    AddMember {
        /// The org.
        org: String,
        /// The user.
        user: String,
        /// member, or admin (may change and lock the org's settings).
        #[arg(long, value_enum, default_value = "member")]
        role: cloud_relay::orgs::Role,
        /// The data directory.
        #[arg(long)]
        data: PathBuf,
    },
    /// Remove a user from an org (also one their API key names).
    RemoveMember {
        /// The org.
        org: String,
        /// The user.
        user: String,
        /// The data directory.
        #[arg(long)]
        data: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommands {
    /// Mint a long-lived API key and print it (only this once). Clients exchange it for
    /// short-lived access tokens (`POST /v1/auth/token`).
    Create {
        /// The user it authenticates.
        #[arg(long)]
        user: String,
        /// The user's orgs (repeat for several; the first is the default).
        #[arg(long, required = true)]
        org: Vec<String>,
        /// What it may do (repeat for several): sessions:read, sessions:write, admin.
        #[arg(long, default_values = ["sessions:read", "sessions:write"])]
        scope: Vec<cloud_relay::access::Scope>,
        /// How long it works, e.g. 90d (default: until revoked).
        #[arg(long, value_parser = parse_duration)]
        expires_in: Option<Duration>,
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

#[derive(Debug, Subcommand)]
enum DeviceCommands {
    /// Let the machine showing CODE log in as a user (a new API key is made for that
    /// login; `token revoke --user` cuts it off with the user's other keys).
    Approve {
        /// The code the new machine shows, like BCDF-GHJK.
        code: String,
        /// The user it logs in as.
        #[arg(long)]
        user: String,
        /// The user's orgs (repeat for several; the first is the default).
        #[arg(long, required = true)]
        org: Vec<String>,
        /// What it may do (repeat for several): sessions:read, sessions:write, admin.
        #[arg(long, default_values = ["sessions:read", "sessions:write"])]
        scope: Vec<cloud_relay::access::Scope>,
        /// The data directory.
        #[arg(long)]
        data: PathBuf,
    },
    /// Refuse the machine showing CODE.
    Deny {
        /// The code the new machine shows.
        code: String,
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
            access_token_ttl,
            requests_per_second,
            request_burst,
            events_per_second,
            event_burst,
            device_code_ttl,
            device_poll_interval,
            heartbeat,
            auto_stop_unit,
            provider,
            bwrap,
            allowed_domain,
        } => {
            let rate = |per_second: u32, burst: u32| {
                (per_second > 0).then_some(cloud_relay::limits::Rate {
                    per_second,
                    burst: burst.max(1),
                })
            };
            let limits = cloud_relay::limits::Limits {
                requests: rate(requests_per_second, request_burst),
                events: rate(events_per_second, event_burst),
            };
            let device = cloud_relay::auth::DeviceConfig {
                code_ttl: device_code_ttl,
                poll_interval: device_poll_interval,
            };
            let presence = cloud_relay::presence::PresenceConfig {
                heartbeat,
                auto_stop_unit,
            };
            let provider = cloud_relay::providers::ProviderConfig {
                kind: match provider {
                    ProviderArg::Local => cloud_protocol::session::ProviderKind::Local,
                    ProviderArg::Sandbox => cloud_protocol::session::ProviderKind::Sandbox,
                },
                bwrap,
                helper: std::env::current_exe().ok(),
                allowed_domains: allowed_domain,
            };
            serve(RelayConfig {
                listen,
                data_dir: data,
                agent_command,
                access_token_ttl,
                limits,
                device,
                presence,
                provider,
            })
        }
        Commands::Token { command } => token(command),
        Commands::Org { command } => org(command),
        Commands::Device { command } => device(command),
        Commands::ShellAgent => cloud_relay::shell_agent::run().map_err(anyhow::Error::from),
        Commands::SandboxForward {
            socket,
            port,
            program,
        } => {
            return match cloud_relay::providers::forward::run(socket, port, program) {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("cloud-relay: error: {e}");
                    ExitCode::from(127)
                }
            }
        }
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
        TokenCommands::Create {
            user,
            org,
            scope,
            expires_in,
            data,
        } => {
            let key = NewKey {
                user,
                orgs: org,
                scopes: scope,
                expires_at: expires_in.map(|ttl| {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap_or_default();
                    (now + ttl).as_millis() as u64
                }),
            };
            let token = cloud_relay::tokens::create(&data, &key)?;
            println!("{token}");
        }
        TokenCommands::Revoke { user, data } => {
            let n_revoked = cloud_relay::tokens::revoke_user(&data, &user)?;
            eprintln!("revoked {n_revoked} token(s) of {user}");
        }
    }
    Ok(())
}

fn org(command: OrgCommands) -> anyhow::Result<()> {
    match command {
        OrgCommands::AddMember {
            org,
            user,
            role,
            data,
        } => {
            cloud_relay::orgs::add_member(&data, &org, &user, role)?;
            eprintln!(
                "{user} is a member of {org} ({})",
                match role {
                    cloud_relay::orgs::Role::Admin => "admin",
                    cloud_relay::orgs::Role::Member => "member",
                }
            );
        }
        OrgCommands::RemoveMember { org, user, data } => {
            cloud_relay::orgs::remove_member(&data, &org, &user)?;
            eprintln!("{user} is no longer a member of {org}");
        }
    }
    Ok(())
}

fn device(command: DeviceCommands) -> anyhow::Result<()> {
    use cloud_relay::auth::device::{Approval, DeviceStore};
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64;
    // Timing is the server's business: these only decide.
    let store =
        |data: &std::path::Path| DeviceStore::for_commands(data, Duration::ZERO, Duration::ZERO);
    match command {
        DeviceCommands::Approve {
            code,
            user,
            org,
            scope,
            data,
        } => {
            let key = NewKey {
                user: user.clone(),
                orgs: org.clone(),
                scopes: scope.clone(),
                expires_at: None,
            };
            // The login descends from a key of its own, never shown: revoking the user's
            // keys cuts it off like their other machines.
            let token = cloud_relay::tokens::create(&data, &key)?;
            let approval = Approval {
                user: user.clone(),
                org: org[0].clone(),
                scopes: scope,
                key: cloud_relay::tokens::token_hash(&token),
            };
            drop(token);
            let name = store(&data).decide(&code, Some(approval), now)?;
            eprintln!(
                "approved: {} logs in as {user} in {}",
                machine(&name),
                org[0]
            );
        }
        DeviceCommands::Deny { code, data } => {
            let name = store(&data).decide(&code, None, now)?;
            eprintln!("denied: {} will not log in", machine(&name));
        }
    }
    Ok(())
}

/// How a device login's machine is named in messages.
fn machine(name: &str) -> String {
    if name.is_empty() {
        "the machine".into()
    } else {
        format!("the machine {name:?}")
    }
}

/// Serves `config` until SIGTERM or SIGINT (an empty agent command: the built-in shell
/// agent, this program's `shell-agent`).
fn serve(mut config: RelayConfig) -> anyhow::Result<()> {
    init_logging();
    if config.agent_command.is_empty() {
        let exe = std::env::current_exe().context("cannot find this program's path")?;
        config.agent_command = vec![exe.to_string_lossy().into_owned(), "shell-agent".to_owned()];
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(async move {
        let relay = cloud_relay::start(config).await?;
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

/// `500ms`, `2s`, `15m`, `12h`, `90d` → a duration (not zero).
fn parse_duration(text: &str) -> Result<Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("invalid duration {text:?}: use e.g. 500ms, 2s, 15m, 12h or 90d"))?;
    let unit_ms: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => {
            return Err(format!(
                "invalid duration {text:?}: use e.g. 500ms, 2s, 15m, 12h or 90d"
            ))
        }
    };
    match number.checked_mul(unit_ms) {
        Some(0) => Err("a duration must be more than zero".into()),
        Some(ms) => Ok(Duration::from_millis(ms)),
        None => Err(format!("duration {text:?} is too long")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloud_relay::auth::DEFAULT_ACCESS_TOKEN_TTL;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("15m"), Ok(DEFAULT_ACCESS_TOKEN_TTL));
        assert_eq!(parse_duration("90d"), Ok(Duration::from_secs(90 * 86_400)));
        for bad in ["", "2", "s", "0s", "2 s", "-1s", "2w"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
