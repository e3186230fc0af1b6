//! The shell socket: `GET /v1/sessions/{id}/shell?cols=C&rows=R&term=T`, a WebSocket that
//! carries one interactive shell in the session's workspace ([`crate::terminal`]). Each
//! binary message is one terminal frame (`cloud_protocol::terminal`): `ToShell` from the
//! client (input, resize), `FromShell` from the relay (output, then `Exit` or `Ended`).
//!
//! Only a user who may change the session gets one: the token needs `sessions:write`, and
//! viewers (read-only access) are refused with 403 before the upgrade, a session the user
//! cannot see with 404, a completed one with 409. The shell ends (`Ended`, then the
//! socket closes) when the relay shuts down, the credential is revoked, the session is
//! deleted or the user loses write access to it; when the client goes away it is hung up.
//!
//! Input waits in a bounded buffer while the shell does not read it, and the socket is not
//! read meanwhile; output is read only as fast as the client takes it. So neither a slow
//! client nor a slow shell costs the relay more than a frame or two of memory.

use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse as _, Response};
use cloud_protocol::session::{ClientKind, SessionStatus};
use cloud_protocol::terminal::{
    self, FromShell, ToShell, WindowSize, MAX_CHUNK, MAX_TERMINAL_FRAME,
};
use serde::Deserialize;

use super::{ApiError, Authenticated};
use crate::access::{Access, Identity, Scope};
use crate::core::{Notice, Shared};
use crate::terminal::{Shell, DEFAULT_TERM, HANG_UP_GRACE};

/// Input received and not yet taken by the shell, at most; the socket is not read while
/// this much waits.
const MAX_PENDING_INPUT: usize = 256 * 1024;

/// How many reads of what is left on the terminal follow the shell's exit, at most.
const MAX_DRAIN_READS: usize = 64;

/// The shell socket's query.
#[derive(Debug, Deserialize)]
pub struct ShellQuery {
    /// The client terminal's columns (0 or none: 80).
    #[serde(default)]
    cols: u16,
    /// Its rows (0 or none: 24).
    #[serde(default)]
    rows: u16,
    /// Its `TERM` (none: `xterm-256color`).
    #[serde(default)]
    term: Option<String>,
}

/// Authenticates, checks write access (403/404/409 before upgrading), starts the shell,
/// then serves it.
pub async fn shell(
    State(shared): State<Arc<Shared>>,
    Authenticated(identity): Authenticated,
    Path(id): Path<String>,
    Query(query): Query<ShellQuery>,
    upgrade: WebSocketUpgrade,
) -> Response {
    if !identity.may(Scope::SessionsWrite) {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "this token lacks the sessions:write scope a shell needs: ask the relay's operator for an API key with it",
        )
        .into_response();
    }
    let session =
        match shared.session_for(&identity, &id) {
            Ok((_, Access::View)) => return ApiError::new(
                StatusCode::FORBIDDEN,
                "viewers cannot open a shell in a session: ask its owner to share it with your org",
            )
            .into_response(),
            Ok((session, _)) => session,
            Err(e) => return ApiError::from(e).into_response(),
        };
    if session.status == SessionStatus::Completed {
        return ApiError::new(
            StatusCode::CONFLICT,
            format!("session {id} is completed: a completed session is final and takes no shell"),
        )
        .into_response();
    }
    let term = query
        .term
        .filter(|t| !t.is_empty() && t.len() <= 64)
        .unwrap_or_else(|| DEFAULT_TERM.to_owned());
    let size = WindowSize {
        cols: query.cols,
        rows: query.rows,
    }
    .or_default();
    let (shell, unenforced) = match shared
        .terminals
        .open(&shared.provider, &session, size, &term)
    {
        Ok(opened) => opened,
        Err(e @ crate::terminal::TerminalError::TooMany) => {
            return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response()
        }
        Err(e @ crate::terminal::TerminalError::NoWorkspace) => {
            return ApiError::new(StatusCode::CONFLICT, e.to_string()).into_response()
        }
        Err(e) => {
            tracing::error!(session = %id, error = %e, "cannot start a shell");
            return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response();
        }
    };
    let guard = shared.connections.token();
    upgrade
        .max_message_size(MAX_TERMINAL_FRAME)
        .max_frame_size(MAX_TERMINAL_FRAME)
        .on_upgrade(move |socket| async move {
            let _guard = guard;
            tracing::info!(user = %identity.user, session = %id, "terminal opened");
            let outcome = serve(&shared, &identity, &id, shell, unenforced, socket).await;
            tracing::info!(user = %identity.user, session = %id, outcome, "terminal closed");
        })
}

/// Why a shell's socket loop stopped.
enum Stop {
    /// The shell exited with this status.
    Exited(i32),
    /// The relay ends the shell, for this reason (told to the client).
    Ended(String),
    /// The client went away.
    ClientGone,
}

/// Carries frames between the socket and the shell until one side ends; returns what
/// happened, for the log.
async fn serve(
    shared: &Shared,
    identity: &Identity,
    session: &str,
    mut shell: Shell,
    unenforced: Option<String>,
    mut socket: WebSocket,
) -> &'static str {
    if let Some(why) = &unenforced {
        tracing::warn!(session, reason = %why, "a shell of a session without network has network");
        let notice = format!("cloud-relay: this shell is not cut off from the network: {why}\r\n");
        if send(&mut socket, &FromShell::Output(notice.into_bytes()))
            .await
            .is_err()
        {
            shell.hang_up().await;
            return "client gone";
        }
    }
    // A client of the session while it runs (it counts against idle auto-stop), pinged
    // every heartbeat interval: anything it sends, its pongs included, is a beat.
    let presence = shared
        .presence
        .join(session, ClientKind::Terminal, &identity.user, "shell");
    let mut ping = tokio::time::interval(shared.presence.heartbeat());
    let mut last_heard = tokio::time::Instant::now();
    let mut token_generation = shared.auth.keys.subscribe();
    let mut notices = shared.notices.subscribe();
    let mut pending: Vec<u8> = Vec::new();
    let mut output = vec![0u8; MAX_CHUNK];
    let stop = loop {
        tokio::select! {
            _ = shared.cancel.cancelled() => break Stop::Ended("the relay is shutting down".into()),
            _ = ping.tick() => {
                // (While its input is backed up the socket is not read: not silence.)
                if last_heard.elapsed() > shared.presence.silent_after()
                    && pending.len() < MAX_PENDING_INPUT
                {
                    break Stop::Ended("the terminal stopped answering the relay's heartbeats".into());
                }
                if socket.send(Message::Ping(Default::default())).await.is_err() {
                    break Stop::ClientGone;
                }
            }
            changed = token_generation.changed() => {
                if changed.is_err() || !shared.auth.is_live(identity) {
                    break Stop::Ended("the credential was revoked; log in again".into());
                }
            }
            notice = notices.recv() => match notice {
                Ok(Notice::Removed(id)) if id == session => {
                    break Stop::Ended("the session was deleted".into());
                }
                Ok(Notice::Changed(changed)) if changed.id == session
                    && identity.access(&changed) != Access::Write => {
                    break Stop::Ended("you may no longer change this session".into());
                }
                Ok(_) => {}
                // Missed notices: look at the session as it is now.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    if !matches!(shared.session_for(identity, session), Ok((_, Access::Write))) {
                        break Stop::Ended("you may no longer change this session".into());
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                    break Stop::Ended("the relay is shutting down".into());
                }
            },
            message = socket.recv(), if pending.len() < MAX_PENDING_INPUT => {
                if let Some(Ok(_)) = &message {
                    last_heard = tokio::time::Instant::now();
                    presence.beat();
                }
                match message {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break Stop::ClientGone,
                Some(Ok(Message::Binary(body))) => match terminal::decode::<ToShell>(&body) {
                    Ok(ToShell::Input(bytes)) => pending.extend_from_slice(&bytes),
                    Ok(ToShell::Resize(size)) => {
                        if let Err(e) = shell.master.resize(size.or_default()) {
                            tracing::debug!(session, error = %e, "cannot resize a terminal");
                        }
                    }
                    Err(e) => {
                        tracing::debug!(session, error = %e, "a bad terminal frame");
                        break Stop::Ended(format!("the client sent {e}"));
                    }
                },
                // Pings are answered by the socket itself; text and pongs mean nothing here
                // (but that the client is there).
                Some(Ok(_)) => {}
                }
            }
            written = shell.master.write(&pending), if !pending.is_empty() => match written {
                Ok(n) => {
                    pending.drain(..n);
                }
                Err(e) => {
                    tracing::debug!(session, error = %e, "cannot write to a terminal");
                    pending.clear();
                }
            },
            read = shell.master.read(&mut output) => match read {
                Ok(n) if n > 0 => {
                    if send(&mut socket, &FromShell::Output(output[..n].to_vec())).await.is_err() {
                        break Stop::ClientGone;
                    }
                }
                // The terminal hung up: every process on it is gone or let it go. A shell
                // that let it go and lives on is hung up below (its status: SIGHUP's).
                _ => {
                    let exited = tokio::time::timeout(HANG_UP_GRACE, shell.process.wait()).await;
                    break Stop::Exited(exited.unwrap_or(128 + libc::SIGHUP));
                }
            },
            code = shell.process.wait() => break Stop::Exited(code),
        }
    };
    match stop {
        Stop::Exited(code) => {
            // What the shell wrote before it exited is all in the terminal already (read a
            // bounded amount: a job it left running may write on).
            let mut n_reads = 0;
            while let Ok(Some(n)) = shell.master.try_read(&mut output) {
                n_reads += 1;
                if n == 0
                    || n_reads > MAX_DRAIN_READS
                    || send(&mut socket, &FromShell::Output(output[..n].to_vec()))
                        .await
                        .is_err()
                {
                    break;
                }
            }
            // Whatever it left running on the terminal goes with it.
            shell.hang_up().await;
            let _ = send(&mut socket, &FromShell::Exit { code }).await;
            let _ = socket.send(Message::Close(None)).await;
            "exited"
        }
        Stop::Ended(reason) => {
            shell.hang_up().await;
            let _ = send(&mut socket, &FromShell::Ended { reason }).await;
            let _ = socket.send(Message::Close(None)).await;
            "ended by the relay"
        }
        Stop::ClientGone => {
            shell.hang_up().await;
            "client gone"
        }
    }
}

async fn send(socket: &mut WebSocket, frame: &FromShell) -> Result<(), axum::Error> {
    let body = terminal::encode(frame).expect("a chunk of at most MAX_CHUNK bytes always fits");
    socket.send(Message::Binary(body.into())).await
}
