//! The viewers' endpoint: `GET /v1/sessions/{id}/subscribe?after=N`, a read-only
//! WebSocket that streams the session's log as JSON text messages, stored entries first,
//! then live ones.
//!
//! Anything a viewer sends is ignored: this endpoint never changes state. The stream ends
//! when the session is deleted or stops being visible, when the credential is revoked, or when
//! the relay shuts down.
//!
//! A viewer is a `viewer` client of the session ([`crate::presence`], labelled with its
//! `User-Agent`) while connected: the relay pings it every heartbeat interval, anything it
//! sends (its pongs included) is a beat, and one silent for three intervals is closed.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse as _, Response};
use cloud_protocol::session::ClientKind;
use tokio::time::Instant;

use super::log::After;
use super::{ApiError, Authenticated};
use crate::core::Shared;
use crate::follow::Follower;

/// Authenticates and checks view access (404 before upgrading), then streams.
pub async fn subscribe(
    State(shared): State<Arc<Shared>>,
    Authenticated(identity): Authenticated,
    Path(id): Path<String>,
    query: Result<Query<After>, QueryRejection>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    let query = match query {
        Ok(Query(query)) => query,
        Err(e) => return ApiError::bad_request(e.body_text()).into_response(),
    };
    let follower = match Follower::new(shared.clone(), identity.clone(), id, query.after) {
        Ok(follower) => follower,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let label = headers
        .get(header::USER_AGENT)
        .and_then(|agent| agent.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let guard = shared.connections.token();
    upgrade.on_upgrade(move |socket| async move {
        let _guard = guard;
        tracing::info!(user = %identity.user, session = %follower.session(), "viewer connected");
        let presence = shared.presence.join(
            follower.session(),
            ClientKind::Viewer,
            &identity.user,
            &label,
        );
        stream(shared, &identity, follower, socket, &presence).await;
        tracing::info!(user = %identity.user, "viewer disconnected");
    })
}

async fn stream(
    shared: Arc<Shared>,
    identity: &crate::access::Identity,
    mut follower: Follower,
    mut socket: WebSocket,
    presence: &crate::presence::PresenceGuard,
) {
    let mut token_generation = shared.auth.keys.subscribe();
    let mut ping = tokio::time::interval(shared.presence.heartbeat());
    let mut last_heard = Instant::now();
    loop {
        tokio::select! {
            _ = shared.cancel.cancelled() => break,
            _ = ping.tick() => {
                if last_heard.elapsed() > shared.presence.silent_after() {
                    tracing::info!(user = %identity.user, "viewer silent: closing");
                    break;
                }
                if socket.send(Message::Ping(Default::default())).await.is_err() {
                    return;
                }
            }
            changed = token_generation.changed() => {
                if changed.is_err() || !shared.auth.is_live(identity) {
                    break;
                }
            }
            entries = follower.next() => {
                let Some(entries) = entries else { break };
                for entry in entries.iter() {
                    let text = serde_json::to_string(entry).expect("a log entry always serialises");
                    if socket.send(Message::Text(text.into())).await.is_err() {
                        return;
                    }
                }
            }
            message = socket.recv() => match message {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                // Read-only: whatever a viewer sends is dropped, but it is alive.
                Some(Ok(_)) => {
                    last_heard = Instant::now();
                    presence.beat();
                }
            },
        }
    }
    let _ = socket.send(Message::Close(None)).await;
}
