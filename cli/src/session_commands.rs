//! The session commands of the `cloudctl` binary: login, sessions, messages, attach and
//! permission prompts. Each turns validated arguments into one or two requests and prints
//! the answer for people or, with `--json`, for programs.

use std::io::BufRead as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::bail;
use clap::{Args, Subcommand, ValueEnum};
use cloud_protocol::bridge::PermissionDecision;
use cloud_protocol::ipc::{BridgeState, Notification, Prompt, RelayStatus, Request, Response};
use cloud_protocol::jsonrpc::log_entry_value;
use cloud_protocol::paths::Paths;
use cloud_protocol::session::{
    Author, LogEntry, NetworkAccess, NewSession, RepoAccess, Session, SessionAction, SessionEvent,
    Visibility,
};
use cloud_protocol::teleport::VersionAuthor;
use cloudctl::client::Client;
use serde_json::{json, Value};

/// `cloudctl session ...`
#[derive(Debug, Subcommand)]
pub enum SessionCommand {
    /// Create a cloud session.
    Create(CreateArgs),
    /// List the sessions you can see (works offline, marked stale).
    List,
    /// Show one session, with its connected clients (daemons, viewers, terminals).
    Show {
        /// The session id.
        id: String,
    },
    /// Pause a running session (its agent stops; messages wait).
    Pause {
        /// The session id.
        id: String,
    },
    /// Resume a paused or failed session.
    Resume {
        /// The session id.
        id: String,
    },
    /// Complete a session for good.
    Complete {
        /// The session id.
        id: String,
    },
    /// Delete a session, its log and its workspace.
    Delete {
        /// The session id.
        id: String,
    },
    /// Stop following a session on this machine: its stored log copy is dropped (an
    /// `attach` or `send` follows it again).
    Unfollow {
        /// The session id.
        id: String,
    },
    /// Change who can see a session.
    Share {
        /// The session id.
        id: String,
        /// private (you), team (your org), public (anyone with the id, read-only).
        #[arg(long, value_enum)]
        visibility: VisibilityArg,
    },
    /// Open an interactive shell in a session's workspace, on the relay (exits with the
    /// shell's status; refused for viewers and for users who may not change the session).
    Shell {
        /// The session id.
        id: String,
    },
}

/// `session create` flags.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// What the session is for.
    #[arg(long, default_value = "")]
    task: String,
    /// Who can see it (default: the `visibility` setting, see `cloudctl settings get`).
    #[arg(long, value_enum)]
    visibility: Option<VisibilityArg>,
    /// What network its agent may use (default: the `network` setting).
    #[arg(long, value_enum)]
    network: Option<NetworkArg>,
    /// The hosts its agent may reach, comma-separated (default: the `allowed_domains`
    /// setting; recorded, not yet enforced).
    #[arg(long, value_delimiter = ',')]
    allowed_domains: Option<Vec<String>>,
    /// Pause it after this many minutes with no connected client and no activity, 0 never
    /// (default: the `auto_stop_minutes` setting, 30 unless set); a client attaching
    /// resumes it.
    #[arg(long)]
    auto_stop_minutes: Option<u32>,
    /// The image its workspace is made from.
    #[arg(long, default_value = "default")]
    image: String,
    /// Whether its agent may change the repository.
    #[arg(long, value_enum, default_value_t = RepoArg::Write)]
    repo_access: RepoArg,
    /// Push this worktree into the new session (as `teleport push` would).
    #[arg(long, value_name = "PATH")]
    teleport: Option<std::path::PathBuf>,
}

/// `--visibility`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum VisibilityArg {
    /// You only.
    Private,
    /// Your org.
    Team,
    /// Anyone with the id, read-only.
    Public,
}

impl From<VisibilityArg> for Visibility {
    fn from(v: VisibilityArg) -> Visibility {
        match v {
            VisibilityArg::Private => Visibility::Private,
            VisibilityArg::Team => Visibility::Team,
            VisibilityArg::Public => Visibility::Public,
        }
    }
}

/// `--network`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum NetworkArg {
    /// No network.
    None,
    /// Package registries and the like.
    Limited,
    /// Anything.
    Full,
}

/// `--repo-access`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum RepoArg {
    /// Read only.
    Read,
    /// Read and write.
    Write,
}

/// Runs `session ...`.
pub async fn session(
    client: &mut Client,
    command: SessionCommand,
    json_output: bool,
) -> anyhow::Result<()> {
    let mut teleport = None;
    // Only `show`'s answer counts the session's clients.
    let showing = matches!(command, SessionCommand::Show { .. });
    let request = match command {
        SessionCommand::Create(mut args) => {
            teleport = args.teleport.take();
            Request::SessionCreate(NewSession {
                task: args.task,
                visibility: args.visibility.map(Into::into),
                network_access: args.network.map(|network| match network {
                    NetworkArg::None => NetworkAccess::None,
                    NetworkArg::Limited => NetworkAccess::Limited,
                    NetworkArg::Full => NetworkAccess::Full,
                }),
                repo_access: Some(match args.repo_access {
                    RepoArg::Read => RepoAccess::Read,
                    RepoArg::Write => RepoAccess::Write,
                }),
                vm_image: Some(args.image),
                allowed_domains: args.allowed_domains,
                auto_stop_minutes: args.auto_stop_minutes,
            })
        }
        SessionCommand::List => Request::SessionList,
        SessionCommand::Show { id } => Request::SessionShow { session: id },
        SessionCommand::Pause { id } => action(id, SessionAction::Pause),
        SessionCommand::Resume { id } => action(id, SessionAction::Resume),
        SessionCommand::Complete { id } => action(id, SessionAction::Complete),
        SessionCommand::Delete { id } => action(id, SessionAction::Delete),
        SessionCommand::Share { id, visibility } => Request::SessionShare {
            session: id,
            visibility: visibility.into(),
        },
        SessionCommand::Unfollow { id } => Request::Unfollow { session: id },
        SessionCommand::Shell { .. } => {
            unreachable!("main runs `session shell`: it takes the connection over")
        }
    };
    match client.request(request).await? {
        Response::Sessions { sessions, stale } => {
            if json_output {
                println!("{}", json!({"sessions": sessions, "stale": stale}));
            } else {
                if stale {
                    eprintln!("note: the relay is unreachable; this list may be out of date");
                }
                if sessions.is_empty() {
                    println!("no sessions (create one with `cloudctl session create`)");
                    return Ok(());
                }
                let header = ["ID", "STATUS", "VISIBLE", "ACTIVE", "TASK"].map(String::from);
                let rows = sessions.into_iter().map(|session| {
                    [
                        session.id,
                        session.status.as_str().to_owned(),
                        json!(session.visibility).as_str().unwrap_or("?").to_owned(),
                        ago(session.last_activity),
                        session.task,
                    ]
                });
                crate::table::print(std::iter::once(header).chain(rows));
            }
        }
        Response::Session { session, stale } => {
            if json_output {
                println!("{}", json!({"session": session, "stale": stale}));
            } else {
                print_session(&session, stale, showing);
            }
            if let Some(path) = teleport {
                crate::teleport_commands::push(client, &path, session.id.clone(), json_output)
                    .await?;
            }
        }
        Response::Pong => {
            if json_output {
                println!("{}", json!({"unfollowed": true}));
            } else {
                println!("no longer following");
            }
        }
        Response::SessionDeleted => {
            if json_output {
                println!("{}", json!({"deleted": true}));
            } else {
                println!("deleted");
            }
        }
        other => bail!("unexpected reply: {other:?}"),
    }
    Ok(())
}

fn action(session: String, action: SessionAction) -> Request {
    Request::SessionAction { session, action }
}

fn print_session(session: &Session, stale: bool, showing: bool) {
    let rows = [
        ("id", session.id.clone()),
        (
            "status",
            match &session.failure {
                Some(reason) => format!("{} ({reason})", session.status.as_str()),
                None => session.status.as_str().to_owned(),
            },
        ),
        ("task", session.task.clone()),
        ("owner", format!("{} ({})", session.owner, session.org)),
        (
            "visibility",
            json!(session.visibility).as_str().unwrap_or("?").to_owned(),
        ),
        (
            "network",
            json!(session.network_access)
                .as_str()
                .unwrap_or("?")
                .to_owned(),
        ),
        (
            "repo",
            json!(session.repo_access)
                .as_str()
                .unwrap_or("?")
                .to_owned(),
        ),
        ("image", session.vm_image.clone()),
        ("provider", session.provider.as_str().to_owned()),
        ("created", ago(session.created_at)),
        ("active", ago(session.last_activity)),
        ("log", format!("{} entries", session.last_seq)),
        (
            "auto-stop",
            match session.auto_stop_minutes {
                0 => "never".to_owned(),
                1 => "after 1 idle minute".to_owned(),
                minutes => format!("after {minutes} idle minutes"),
            },
        ),
    ];
    // Only the relay's answer to `show` lists clients: offline there is nothing to say.
    let clients = (showing && !stale).then(|| {
        let value = if session.clients.is_empty() {
            "none".to_owned()
        } else {
            session
                .clients
                .iter()
                .map(|c| {
                    let who = if c.label.is_empty() {
                        c.user.clone()
                    } else {
                        format!("{} ({})", c.user, c.label)
                    };
                    format!(
                        "{} {who}, connected {}, heard {}",
                        c.kind.as_str(),
                        ago(c.connected_at),
                        ago(c.last_heartbeat)
                    )
                })
                .collect::<Vec<_>>()
                .join("; ")
        };
        ("clients", value)
    });
    let snapshot = session.snapshot.as_ref().map(|v| {
        let git = match &v.git {
            Some(git) => format!(
                ", HEAD {}{}",
                &git.head[..git.head.len().min(12)],
                git.branch
                    .as_deref()
                    .map(|b| format!(" on {b}"))
                    .unwrap_or_else(|| " (detached)".to_owned())
            ),
            None => String::new(),
        };
        (
            "snapshot",
            format!("v{} ({} files, {} bytes{git})", v.version, v.files, v.bytes),
        )
    });
    // The hosts a limited session may reach (enforced by the sandbox provider).
    let domains = (session.network_access == cloud_protocol::session::NetworkAccess::Limited
        && !session.allowed_domains.is_empty())
    .then(|| ("allowed domains", session.allowed_domains.join(", ")));
    let note = stale.then(|| {
        (
            "note",
            "the relay is unreachable; this may be out of date".to_owned(),
        )
    });
    crate::table::print(
        rows.into_iter()
            .chain(domains)
            .chain(snapshot)
            .chain(clients)
            .chain(note)
            .map(|(name, value)| [name.to_owned(), value]),
    );
}

/// "12s ago", "3m ago", ...
fn ago(unix_ms: u64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let seconds = now.saturating_sub(unix_ms) / 1000;
    match seconds {
        0..=59 => format!("{seconds}s ago"),
        60..=3599 => format!("{}m ago", seconds / 60),
        3600..=86399 => format!("{}h ago", seconds / 3600),
        _ => format!("{}d ago", seconds / 86400),
    }
}

/// Describes the relay connection in one line.
pub fn relay_line(relay: &RelayStatus) -> String {
    let mode = json!(relay.mode).as_str().unwrap_or("?").to_owned();
    let state = json!(relay.state).as_str().unwrap_or("?").to_owned();
    let who = match (&relay.user, &relay.org) {
        (Some(user), Some(org)) => format!(" as {user}@{org}"),
        _ => String::new(),
    };
    let reason = relay
        .reason
        .as_deref()
        // A connected bridge has a reason only while the relay asks it to slow down.
        .filter(|r| relay.state != BridgeState::Connected || r.starts_with("rate limited"))
        .map(|r| format!(": {r}"))
        .unwrap_or_default();
    // The embedded relay has no URL until it listens.
    let url = if relay.url.is_empty() {
        "starting"
    } else {
        &relay.url
    };
    format!("{mode}, {state} ({url}){who}{reason}")
}

/// `cloudctl send`: queues the message and waits for the relay's verdict when it is
/// reachable, in one round trip.
pub async fn send(
    paths: &Paths,
    client: &mut Client,
    session: String,
    text: String,
    key: Option<String>,
    json_output: bool,
) -> anyhow::Result<()> {
    let response = journaled(paths, client, key, |key| Request::Send {
        session: session.clone(),
        text: text.clone(),
        key: Some(key),
        wait: true,
    })
    .await?;
    report(response, "sent", json_output)
}

/// `cloudctl interrupt`.
pub async fn interrupt(
    paths: &Paths,
    client: &mut Client,
    session: String,
    json_output: bool,
) -> anyhow::Result<()> {
    let response = journaled(paths, client, None, |key| Request::Interrupt {
        session: session.clone(),
        key: Some(key),
        wait: true,
    })
    .await?;
    report(response, "interrupt sent", json_output)
}

/// A fresh idempotency key: one per invocation, so a retry is recognised as the same event.
fn new_key() -> String {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).expect("the OS random source works");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Sends a journaled request with an idempotency key (the caller's, else one chosen for
/// this invocation). When the
/// reply is lost (the daemon died or closed the connection before answering), the client
/// cannot tell whether the event was queued: it reconnects (restarting the daemon if
/// need be) and sends the request once more with the same key, which the daemon and the
/// relay take as the same event.
async fn journaled(
    paths: &Paths,
    client: &mut Client,
    key: Option<String>,
    make: impl Fn(String) -> Request,
) -> anyhow::Result<Response> {
    let key = key.unwrap_or_else(new_key);
    match client.request(make(key.clone())).await {
        Err(e) if e.reply_lost() => {
            eprintln!(
                "cloudctl: the reply was lost ({e}); sending again with the same idempotency key"
            );
            *client = cloudctl::launcher::ensure_running(paths, crate::CLIENT_NAME)
                .await?
                .client;
            Ok(client.request(make(key)).await?)
        }
        result => Ok(result?),
    }
}

/// Prints the outcome of a journaled request.
fn report(response: Response, what: &str, json_output: bool) -> anyhow::Result<()> {
    let (seq, state) = match response {
        Response::Delivered { seq } => (seq, "delivered"),
        Response::Queued { seq } => (seq, "queued"),
        other => bail!("unexpected reply: {other:?}"),
    };
    if json_output {
        println!("{}", json!({"seq": seq, "state": state}));
    } else if state == "queued" {
        println!(
            "queued (seq {seq}): the relay is not connected; it will be delivered when it is back"
        );
    } else {
        println!("{what} (seq {seq})");
    }
    Ok(())
}

/// `cloudctl permissions`.
pub async fn permissions(
    client: &mut Client,
    session: String,
    json_output: bool,
) -> anyhow::Result<()> {
    let Response::Prompts(prompts) = client
        .request(Request::Permissions {
            session: session.clone(),
        })
        .await?
    else {
        bail!("unexpected reply to permissions");
    };
    if json_output {
        println!(
            "{}",
            Value::Array(prompts.iter().map(prompt_value).collect())
        );
    } else if prompts.is_empty() {
        println!("no pending permission prompts in {session}");
    } else {
        let header = ["REQUEST", "TOOL", "INPUT"].map(String::from);
        let rows = prompts
            .into_iter()
            .map(|prompt| [prompt.request_id, prompt.tool_name, prompt.input]);
        crate::table::print(std::iter::once(header).chain(rows));
        println!("answer with `cloudctl allow {session} REQUEST` or `cloudctl deny {session} REQUEST --message WHY`");
    }
    Ok(())
}

/// `cloudctl allow` / `cloudctl deny`.
pub async fn answer(
    paths: &Paths,
    client: &mut Client,
    session: String,
    request_id: String,
    decision: PermissionDecision,
    json_output: bool,
) -> anyhow::Result<()> {
    let verb = match decision {
        PermissionDecision::Allow { .. } => "allowed",
        PermissionDecision::Deny { .. } => "denied",
    };
    let response = journaled(paths, client, None, |key| Request::Answer {
        session: session.clone(),
        request_id: request_id.clone(),
        decision: decision.clone(),
        key: Some(key),
    })
    .await?;
    let (seq, state) = match response {
        Response::Delivered { seq } => (seq, "delivered"),
        Response::Queued { seq } => (seq, "queued"),
        other => bail!("unexpected reply: {other:?}"),
    };
    if json_output {
        println!(
            "{}",
            json!({"seq": seq, "state": state, "request_id": request_id, "decision": verb})
        );
    } else if state == "queued" {
        println!("{verb} {request_id} (queued: the relay is unreachable; it will be delivered when it is back)");
    } else {
        println!("{verb} {request_id}");
    }
    Ok(())
}

/// A prompt for programs: the daemon carries the tool's input as JSON text, and a
/// program wants the object itself.
fn prompt_value(prompt: &Prompt) -> Value {
    let input = serde_json::from_str::<Value>(&prompt.input)
        .unwrap_or_else(|_| Value::String(prompt.input.clone()));
    json!({
        "request_id": prompt.request_id,
        "tool_name": prompt.tool_name,
        "input": input,
        "seq": prompt.seq,
    })
}

/// `allow --input`: clap's value parser, so text that is not a JSON object is a usage
/// error (exit 2) before the daemon is contacted. Returns the object as compact JSON.
pub fn json_object(text: &str) -> Result<String, String> {
    const EXAMPLE: &str = r#"like '{"command": "ls -a"}'"#;
    match serde_json::from_str::<Value>(text) {
        Ok(value) if value.is_object() => Ok(value.to_string()),
        Ok(_) => Err(format!("not a JSON object; give one {EXAMPLE}")),
        Err(e) => Err(format!("not JSON ({e}); give a JSON object {EXAMPLE}")),
    }
}

/// `cloudctl attach`: prints the session's log as it grows. Unless `viewer`, lines typed
/// on stdin are sent as messages, `y`/`n` answer the latest prompt, `/interrupt`
/// interrupts.
pub async fn attach(
    client: &mut Client,
    session: String,
    since: Option<u64>,
    viewer: bool,
    follow: bool,
    json_output: bool,
) -> anyhow::Result<()> {
    let Response::Attached { last_seq, .. } = client
        .request(Request::Attach {
            session: session.clone(),
            since,
        })
        .await?
    else {
        bail!("unexpected reply to attach");
    };
    if !follow {
        // Print what is stored, then stop.
        while let Some(notification) = next_within(client, Duration::from_millis(200)).await? {
            if let Notification::SessionLog { entry, .. } = notification {
                print_entry(&session, &entry, json_output);
                if entry.seq >= last_seq {
                    break;
                }
            }
        }
        return Ok(());
    }
    let (lines_tx, mut lines) = tokio::sync::mpsc::channel::<String>(16);
    if !viewer {
        // stdin blocks: read it on a thread.
        std::thread::spawn(move || {
            for line in std::io::stdin().lock().lines() {
                let Ok(line) = line else { break };
                if lines_tx.blocking_send(line).is_err() {
                    break;
                }
            }
        });
    } else {
        drop(lines_tx);
    }
    let mut latest_prompt: Option<String> = None;
    let mut stdin_open = !viewer;
    loop {
        tokio::select! {
            notification = client.next_notification() => {
                let Some(notification) = notification? else {
                    bail!("cloudd closed the connection");
                };
                if let Notification::SessionLog { entry, .. } = notification {
                    if let Some(request_id) = prompt_of(&entry) {
                        latest_prompt = Some(request_id);
                    }
                    print_entry(&session, &entry, json_output);
                }
            }
            line = lines.recv(), if stdin_open => {
                let Some(line) = line else {
                    // End of input: keep following, without polling stdin again.
                    stdin_open = false;
                    continue;
                };
                let line = line.trim().to_owned();
                let request = match (line.as_str(), &latest_prompt) {
                    ("", _) => continue,
                    ("y" | "yes", Some(request_id)) => Request::Answer {
                        session: session.clone(),
                        request_id: request_id.clone(),
                        decision: PermissionDecision::Allow { updated_input: None },
                        key: Some(new_key()),
                    },
                    ("n" | "no", Some(request_id)) => Request::Answer {
                        session: session.clone(),
                        request_id: request_id.clone(),
                        decision: PermissionDecision::Deny { message: "denied from cloudctl attach".into() },
                        key: Some(new_key()),
                    },
                    ("/interrupt", _) => Request::Interrupt { session: session.clone(), key: Some(new_key()), wait: false },
                    _ => Request::Send { session: session.clone(), text: line, key: Some(new_key()), wait: false },
                };
                if let Err(e) = client.request(request).await {
                    eprintln!("cloudctl: {e}");
                }
            }
        }
    }
}

async fn next_within(client: &mut Client, wait: Duration) -> anyhow::Result<Option<Notification>> {
    match tokio::time::timeout(wait, client.next_notification()).await {
        Ok(notification) => Ok(notification?),
        Err(_) => Ok(None),
    }
}

/// The request id of a permission prompt entry.
fn prompt_of(entry: &LogEntry) -> Option<String> {
    let SessionEvent::Message(text) = &entry.event else {
        return None;
    };
    match cloud_protocol::agent::control(text)? {
        cloud_protocol::agent::Control::Prompt { request_id, .. } => Some(request_id),
        _ => None,
    }
}

fn print_entry(session: &str, entry: &LogEntry, json_output: bool) {
    if json_output {
        println!("{}", log_entry_value(entry));
        return;
    }
    let who = match &entry.author {
        Author::User(user) => user.clone(),
        Author::Agent => "agent".into(),
        Author::Relay => "relay".into(),
    };
    let text = match &entry.event {
        SessionEvent::Status { status, reason } => match reason {
            Some(reason) => format!("session {} ({reason})", status.as_str()),
            None => format!("session {}", status.as_str()),
        },
        SessionEvent::Message(text) => describe_message(session, text),
        SessionEvent::Snapshot(version) => {
            let by = match &version.author {
                VersionAuthor::Instance(id) => format!("pushed by {id}"),
                VersionAuthor::Agent => "the agent's edits".to_owned(),
            };
            format!(
                "snapshot v{} ({by}; {} files, {} bytes)",
                version.version, version.files, version.bytes
            )
        }
    };
    println!("[{}] {who}: {text}", entry.seq);
}

/// A stream-json message in one line for people.
fn describe_message(session: &str, text: &str) -> String {
    let Ok(value) = serde_json::from_str::<Value>(text) else {
        return text.to_owned();
    };
    match value["type"].as_str().unwrap_or("") {
        "user" => value["message"]["content"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| value["message"]["content"].to_string()),
        "assistant" => {
            let content = &value["message"]["content"];
            match content.as_array() {
                Some(blocks) => blocks
                    .iter()
                    .filter_map(|b| b["text"].as_str())
                    .collect::<Vec<_>>()
                    .join(""),
                None => content.as_str().unwrap_or_default().to_owned(),
            }
        }
        "result" => format!(
            "result {}{}",
            value["subtype"].as_str().unwrap_or("?"),
            value
                .get("exit_code")
                .map(|c| format!(" (exit {c})"))
                .unwrap_or_default()
        ),
        "control_request" => {
            let request_id = value["request_id"].as_str().unwrap_or("?");
            match value["request"]["subtype"].as_str() {
                Some("can_use_tool") => format!(
                    "asks to use {} {} — answer: `cloudctl allow {session} {request_id}` or `cloudctl deny {session} {request_id}` (or y/n here)",
                    value["request"]["tool_name"].as_str().unwrap_or("?"),
                    value["request"]["input"]
                ),
                Some(subtype) => format!("control request {subtype} ({request_id})"),
                None => text.to_owned(),
            }
        }
        "control_response" => {
            let response = &value["response"];
            let behavior = response["response"]["behavior"].as_str();
            match behavior {
                Some(behavior) => format!(
                    "{behavior} {}",
                    response["request_id"].as_str().unwrap_or("?")
                ),
                None => format!(
                    "control response {} {}",
                    response["subtype"].as_str().unwrap_or("?"),
                    response["request_id"].as_str().unwrap_or("?")
                ),
            }
        }
        "control_cancel_request" => format!(
            "withdrew prompt {}",
            value["request_id"].as_str().unwrap_or("?")
        ),
        "system" => {
            let subtype = value["subtype"].as_str().unwrap_or("");
            // The relay's word on a message or an event it could not pass on.
            match (subtype, value["message"].as_str(), value["reason"].as_str()) {
                ("not_processed", Some(message), Some(reason)) => {
                    format!("not processed: {message} ({reason})")
                }
                ("not_delivered", Some(what), Some(reason)) => {
                    format!("not delivered: {reason} ({what})")
                }
                (_, Some(message), _) => format!("system {subtype}: {message}"),
                _ => format!("system {subtype}"),
            }
        }
        _ => text.to_owned(),
    }
}
