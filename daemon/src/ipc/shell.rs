//! The terminal family: `session/shell`, a shell in a session's workspace, carried
//! between the client's connection and the relay's shell socket
//! (`/v1/sessions/{id}/shell`, beside the bridge, with the bridge's access token).
//!
//! [`handle`] opens the relay's socket (waiting, bounded, for a bridge that is connecting)
//! and leaves it in the client's state; the connection answers `ShellOpened`, then hands
//! itself to [`pipe`], which carries terminal frames both ways until the shell exits, and
//! the connection ends with it. The client never sees a token: the daemon connects for it.
//!
//! Architecture invariant: every frame is checked against the terminal protocol's size
//! limit and decoded before it is passed on, every wait is bounded, and only this
//! connection waits. The relay decides who may open a shell; this module only reports its
//! refusal.

use std::time::Duration;

use cloud_protocol::ipc::{ErrorBody, ErrorCode, Response};
use cloud_protocol::terminal::{self, FromShell, ToShell, WindowSize, MAX_TERMINAL_FRAME};
use futures_util::{SinkExt as _, StreamExt as _};
use interprocess::local_socket::tokio::Stream;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_tungstenite::tungstenite::Message;

use super::client::ClientState;
use crate::state::Shared;
use crate::teleport::transfer::{BlobEndpoint, OpenError, RelaySocket};

/// How long opening the relay's shell socket may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// How long a frame may wait for the client, or for the relay, to take it before the
/// shell is given up. Longer than a request's write deadline: a terminal may be scrolled
/// back or suspended for a while.
const FRAME_DEADLINE: Duration = Duration::from_secs(60);

/// How often an idle shell socket is pinged, so that proxies and NATs keep it open.
const KEEPALIVE: Duration = Duration::from_secs(30);

type Socket = RelaySocket;

/// An open shell socket, waiting for the connection to hand itself over.
pub struct ShellSocket(Socket);

impl std::fmt::Debug for ShellSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ShellSocket")
    }
}

/// `session/shell`: opens the relay's shell socket for `session` and keeps it in the
/// client's state for [`pipe`].
pub async fn handle(
    shared: &Shared,
    client: &mut ClientState,
    session: String,
    size: WindowSize,
    term: Option<String>,
) -> Result<Response, ErrorBody> {
    super::relay::wait_connected(&shared.link).await?;
    let endpoint = shared.link.blob_endpoint().ok_or_else(|| {
        ErrorBody::new(
            ErrorCode::RelayUnavailable,
            "the relay connection dropped; try again when `cloudctl status` shows it connected",
        )
    })?;
    let path = terminal::shell_path(
        &session,
        size.or_default(),
        term.as_deref().unwrap_or("xterm-256color"),
    );
    let socket = connect(&endpoint, &path).await?;
    tracing::info!(%session, "shell opened");
    client.shell = Some(ShellSocket(socket));
    Ok(Response::ShellOpened { session })
}

/// Opens the relay's shell socket at `path` ([`BlobEndpoint::open`]: the bridge's access
/// token, refreshed once if the relay refuses it); a refusal is the client's error.
async fn connect(endpoint: &BlobEndpoint, path: &str) -> Result<Socket, ErrorBody> {
    match endpoint
        .open(path, MAX_TERMINAL_FRAME, CONNECT_TIMEOUT)
        .await
    {
        Ok(socket) => Ok(socket),
        Err(OpenError::TimedOut) => Err(ErrorBody::new(
            ErrorCode::Timeout,
            format!("the relay did not open the shell within {CONNECT_TIMEOUT:?}; try again"),
        )),
        Err(OpenError::Failed(reason)) => Err(ErrorBody::new(
            ErrorCode::RelayUnavailable,
            format!("cannot open the relay's shell socket: {reason}"),
        )),
        Err(OpenError::Refused(response)) => {
            let status = response.status().as_u16();
            if status == 401 {
                return Err(ErrorBody::new(
                    ErrorCode::Refused,
                    "the relay refused a fresh access token; run `cloudctl login` again",
                ));
            }
            // The relay's refusal is `{"error": "..."}`, shown as it is (it never holds a
            // token).
            let message = response
                .body()
                .as_deref()
                .and_then(|body| serde_json::from_slice::<serde_json::Value>(body).ok())
                .and_then(|body| body["error"].as_str().map(str::to_owned))
                .unwrap_or_else(|| format!("the relay refused the shell (HTTP {status})"));
            let code = match status {
                404 => ErrorCode::NotFound,
                429 => ErrorCode::RateLimited,
                503 => ErrorCode::RelayUnavailable,
                _ => ErrorCode::Refused,
            };
            Err(ErrorBody::new(code, message))
        }
    }
}

/// Carries terminal frames between the client's connection (its bytes after the
/// `ShellOpened` reply start in `buf`) and the relay's shell socket, until the shell exits
/// or either side goes away; the daemon's drain ends it with `Ended`.
pub async fn pipe(
    mut stream: Stream,
    mut buf: Vec<u8>,
    ShellSocket(mut socket): ShellSocket,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut keepalive = tokio::time::interval(KEEPALIVE);
    keepalive.reset();
    let ended = |reason: &str| FromShell::Ended {
        reason: reason.to_owned(),
    };
    let last = loop {
        // Every whole frame the client sent, checked, goes to the relay in order.
        loop {
            match terminal::frame_body(&buf) {
                Ok(None) => break,
                Ok(Some((body, used))) => {
                    if let Err(e) = terminal::decode::<ToShell>(body) {
                        break_with(&mut socket).await;
                        let _ = write(&mut stream, &ended(&format!("cloudd: {e}"))).await;
                        return;
                    }
                    let message = Message::Binary(body.to_vec().into());
                    buf.drain(..used);
                    match tokio::time::timeout(FRAME_DEADLINE, socket.send(message)).await {
                        Ok(Ok(())) => {}
                        _ => {
                            let _ = write(
                                &mut stream,
                                &ended("the relay stopped taking input; the shell was given up"),
                            )
                            .await;
                            return;
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!("closing a shell: {e}");
                    break_with(&mut socket).await;
                    let _ = write(&mut stream, &ended(&format!("cloudd: {e}"))).await;
                    return;
                }
            }
        }
        buf.reserve(8192);
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break ended("cloudd is shutting down"),
            read = stream.read_buf(&mut buf) => match read {
                Ok(n) if n > 0 => {}
                // The client went away: the relay hangs the shell up.
                _ => {
                    break_with(&mut socket).await;
                    return;
                }
            },
            message = socket.next() => match message {
                Some(Ok(Message::Binary(body))) => match terminal::decode::<FromShell>(&body) {
                    Ok(frame @ (FromShell::Exit { .. } | FromShell::Ended { .. })) => break frame,
                    Ok(frame) => {
                        if !write(&mut stream, &frame).await {
                            break_with(&mut socket).await;
                            return;
                        }
                    }
                    Err(e) => {
                        tracing::warn!("the relay sent a bad terminal frame: {e}");
                        break ended(&format!("the relay sent {e}"));
                    }
                },
                Some(Ok(Message::Close(_))) | None => {
                    break ended("the relay closed the shell without an exit status");
                }
                Some(Err(e)) => {
                    break ended(&format!("the connection to the relay was lost: {e}"));
                }
                // Pings are answered by the socket itself.
                Some(Ok(_)) => {}
            },
            _ = keepalive.tick() => {
                let ping = socket.send(Message::Ping(Vec::new().into()));
                if !matches!(tokio::time::timeout(FRAME_DEADLINE, ping).await, Ok(Ok(()))) {
                    break ended("the connection to the relay was lost");
                }
            }
        }
    };
    let _ = write(&mut stream, &last).await;
    let _ = stream.flush().await;
    break_with(&mut socket).await;
}

/// Writes one frame to the client within [`FRAME_DEADLINE`]; false when it is gone.
async fn write(stream: &mut Stream, frame: &FromShell) -> bool {
    let mut out = Vec::new();
    if terminal::encode_framed(frame, &mut out).is_err() {
        return false;
    }
    matches!(
        tokio::time::timeout(FRAME_DEADLINE, stream.write_all(&out)).await,
        Ok(Ok(()))
    )
}

/// Closes the relay's socket, without waiting long for the relay to agree.
async fn break_with(socket: &mut Socket) {
    let _ = tokio::time::timeout(Duration::from_secs(1), socket.close(None)).await;
}
