//! `cloudctl teleport …`: push, pull, watch, stop and status, with progress (an
//! `indicatif` bar on a terminal, JSON lines with `--json`). Paths are made absolute here,
//! against this process's working directory; the daemon resolves them further.
//!
//! This module never touches the files itself: the daemon scans, uploads and writes.

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use clap::Subcommand;
use cloud_protocol::ipc::{
    Notification, Request, Response, Subscribe, TeleportLink, TeleportOutcome, TeleportProgress,
    Topic,
};
use cloudctl::client::Client;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

#[derive(Debug, Subcommand)]
pub enum TeleportCommand {
    /// Send the worktree as it is now (uncommitted and untracked files included) to a
    /// session: a new snapshot version.
    Push {
        /// The worktree (default: the current directory).
        path: Option<PathBuf>,
        /// The session id.
        #[arg(long)]
        session: String,
    },
    /// Bring the session's newest version into the worktree; local changes are never
    /// overwritten (a change on both sides keeps both: NAME.cloud-conflict-vN beside it).
    Pull {
        /// The worktree (default: the current directory; created if absent).
        path: Option<PathBuf>,
        /// The session id (default: the one the worktree is linked to).
        #[arg(long)]
        session: Option<String>,
    },
    /// Keep the worktree and the session in step both ways: local edits go up, the
    /// agent's edits come down. Shows progress until Ctrl-C, which stops the watch.
    Watch {
        /// The worktree (default: the current directory).
        path: Option<PathBuf>,
        /// The session id.
        #[arg(long)]
        session: String,
        /// Leave the watch to the daemon and return at once (it survives restarts;
        /// `cloudctl teleport stop` ends it).
        #[arg(long)]
        detach: bool,
    },
    /// Stop watching a worktree (its link stays for later pushes and pulls).
    Stop {
        /// The worktree (default: the current directory).
        path: Option<PathBuf>,
    },
    /// Linked worktrees: session, versions, pending changes, conflicts, watcher health.
    Status,
}

/// `path` (or the working directory) as an absolute path.
pub fn absolute(path: Option<PathBuf>) -> anyhow::Result<String> {
    let cwd = std::env::current_dir().context("cannot read the current directory")?;
    let path = match path {
        Some(path) if path.is_absolute() => path,
        Some(path) => cwd.join(path),
        None => cwd,
    };
    path.to_str()
        .map(str::to_owned)
        .with_context(|| format!("{} is not valid UTF-8", path.display()))
}

pub async fn teleport(
    client: &mut Client,
    command: TeleportCommand,
    json_output: bool,
) -> anyhow::Result<()> {
    match command {
        TeleportCommand::Push { path, session } => {
            let request = Request::TeleportPush {
                path: absolute(path)?,
                session,
            };
            let outcome = with_progress(client, request, json_output).await?;
            print_outcome("pushed", &outcome, json_output)
        }
        TeleportCommand::Pull { path, session } => {
            let request = Request::TeleportPull {
                path: absolute(path)?,
                session,
            };
            let outcome = with_progress(client, request, json_output).await?;
            print_outcome("pulled", &outcome, json_output)
        }
        TeleportCommand::Watch {
            path,
            session,
            detach,
        } => watch(client, absolute(path)?, session, detach, json_output).await,
        TeleportCommand::Stop { path } => {
            let request = Request::TeleportStop {
                path: absolute(path)?,
            };
            let Response::TeleportLinks(links) = client.request(request).await? else {
                bail!("unexpected reply to teleport stop");
            };
            print_links(&links, json_output);
            Ok(())
        }
        TeleportCommand::Status => {
            let Response::TeleportLinks(links) = client.request(Request::TeleportStatus).await?
            else {
                bail!("unexpected reply to teleport status");
            };
            print_links(&links, json_output);
            Ok(())
        }
    }
}

/// Pushes the worktree at `path` to a session just created (`session create --teleport`).
pub async fn push(
    client: &mut Client,
    path: &Path,
    session: String,
    json_output: bool,
) -> anyhow::Result<()> {
    let request = Request::TeleportPush {
        path: absolute(Some(path.to_owned()))?,
        session,
    };
    let outcome = with_progress(client, request, json_output).await?;
    print_outcome("pushed", &outcome, json_output)
}

/// Runs a push or pull, showing its progress.
async fn with_progress(
    client: &mut Client,
    request: Request,
    json_output: bool,
) -> anyhow::Result<TeleportOutcome> {
    let mut view = ProgressView::new(json_output);
    let response = client
        .request_with(request, |notification| {
            if let Notification::TeleportProgress(progress) = notification {
                view.show(progress);
            }
        })
        .await;
    view.finish();
    match response? {
        Response::Teleported(outcome) => Ok(outcome),
        _ => bail!("unexpected reply"),
    }
}

/// Progress on stderr: a bar on a terminal, nothing otherwise; JSON lines on stdout with
/// `--json`.
struct ProgressView {
    json: bool,
    bar: Option<ProgressBar>,
    phase: String,
}

impl ProgressView {
    fn new(json: bool) -> ProgressView {
        ProgressView {
            json,
            bar: None,
            phase: String::new(),
        }
    }

    fn show(&mut self, progress: &TeleportProgress) {
        if self.json {
            println!("{}", json!({ "progress": progress }));
            return;
        }
        if !std::io::stderr().is_terminal() {
            return;
        }
        if self.phase != progress.phase {
            self.finish();
            self.phase = progress.phase.clone();
            let bar = if progress.bytes_total > 0 {
                ProgressBar::new(progress.bytes_total).with_style(
                    ProgressStyle::with_template(
                        "{msg:>8} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
                    )
                    .expect("a valid template")
                    .progress_chars("=> "),
                )
            } else {
                ProgressBar::new(progress.total).with_style(
                    ProgressStyle::with_template("{msg:>8} [{bar:30}] {pos}/{len}")
                        .expect("a valid template")
                        .progress_chars("=> "),
                )
            };
            bar.set_message(progress.phase.clone());
            self.bar = Some(bar);
        }
        if let Some(bar) = &self.bar {
            if progress.bytes_total > 0 {
                bar.set_length(progress.bytes_total);
                bar.set_position(progress.bytes_done);
            } else {
                bar.set_length(progress.total);
                bar.set_position(progress.done);
            }
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

fn print_outcome(verb: &str, outcome: &TeleportOutcome, json_output: bool) -> anyhow::Result<()> {
    if json_output {
        println!("{}", serde_json::to_string(outcome)?);
        return Ok(());
    }
    println!(
        "{verb} {} ↔ session {} at version {}: {} file(s) changed, {} blob(s), {} bytes",
        outcome.root, outcome.session, outcome.version, outcome.files, outcome.blobs, outcome.bytes
    );
    for conflict in &outcome.conflicts {
        println!("conflict: {conflict}");
    }
    for problem in &outcome.problems {
        eprintln!("cloudctl: warning: {problem}");
    }
    Ok(())
}

fn print_links(links: &[TeleportLink], json_output: bool) {
    if json_output {
        println!("{}", json!({ "links": links }));
        return;
    }
    if links.is_empty() {
        println!("no linked worktrees (cloudctl teleport push PATH --session ID links one)");
        return;
    }
    let header = [
        "ROOT", "SESSION", "VERSION", "REMOTE", "WATCH", "PENDING", "WATCHER",
    ];
    let rows = links.iter().map(|link| {
        vec![
            link.root.clone(),
            link.session.clone(),
            link.version.to_string(),
            link.remote_version.to_string(),
            if link.watching { "yes" } else { "no" }.to_owned(),
            link.pending.to_string(),
            link.watcher.clone(),
        ]
    });
    crate::table::print(
        std::iter::once(header.iter().map(|h| (*h).to_owned()).collect::<Vec<_>>()).chain(rows),
    );
    for link in links {
        for conflict in &link.conflicts {
            println!("conflict in {}: {conflict}", link.root);
        }
        if let Some(error) = &link.last_error {
            println!("last error in {}: {error}", link.root);
        }
    }
}

/// `teleport watch`: starts the daemon's watch, then shows what it does until Ctrl-C
/// (which stops it), or returns at once with `--detach`.
async fn watch(
    client: &mut Client,
    root: String,
    session: String,
    detach: bool,
    json_output: bool,
) -> anyhow::Result<()> {
    if !detach {
        client
            .request(Request::Subscribe(Subscribe {
                topics: vec![Topic::Teleport],
            }))
            .await?;
    }
    let mut view = ProgressView::new(json_output);
    let response = client
        .request_with(
            Request::TeleportWatch {
                path: root.clone(),
                session,
            },
            |notification| {
                if let Notification::TeleportProgress(progress) = notification {
                    view.show(progress);
                }
            },
        )
        .await;
    view.finish();
    let Response::TeleportLinks(links) = response? else {
        bail!("unexpected reply to teleport watch");
    };
    print_links(&links, json_output);
    if detach {
        return Ok(());
    }
    if !json_output {
        eprintln!("watching {root}; Ctrl-C stops");
    }
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    loop {
        tokio::select! {
            _ = &mut interrupted => break,
            notification = client.next_notification() => match notification? {
                None => bail!("the daemon closed the connection"),
                Some(Notification::TeleportProgress(progress)) if progress.root == root => {
                    view.show(&progress);
                    if progress.phase == "done" {
                        view.finish();
                    }
                }
                Some(Notification::Teleported(outcome)) if outcome.root == root => {
                    view.finish();
                    print_outcome("synced", &outcome, json_output)?;
                }
                Some(_) => {}
            },
        }
    }
    view.finish();
    let Response::TeleportLinks(links) =
        client.request(Request::TeleportStop { path: root }).await?
    else {
        bail!("unexpected reply to teleport stop");
    };
    if !json_output {
        eprintln!("stopped watching");
    }
    print_links(&links, json_output);
    Ok(())
}
