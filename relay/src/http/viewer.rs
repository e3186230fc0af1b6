//! The viewers' endpoint: `GET /v1/sessions/{id}/subscribe?after=N`, a read-only
//! WebSocket that streams the session's log as JSON text messages, stored entries first,
//! then live ones.
//!
//! Anything a viewer sends is ignored: this endpoint never changes state. The stream ends
//! when the session is deleted or stops being visible, when the credential is revoked, or when
//! the relay shuts down.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse as _, Response};

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
    let guard = shared.connections.token();
    upgrade.on_upgrade(move |socket| async move {
        let _guard = guard;
        tracing::info!(user = %identity.user, session = %follower.session(), "viewer connected");
        stream(shared, &identity, follower, socket).await;
        tracing::info!(user = %identity.user, "viewer disconnected");
    })
}

async fn stream(
    shared: Arc<Shared>,
    identity: &crate::access::Identity,
    mut follower: Follower,
    mut socket: WebSocket,
) {
    let mut token_generation = shared.auth.keys.subscribe();
    loop {
        tokio::select! {
            _ = shared.cancel.cancelled() => break,
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
                // Read-only: whatever a viewer sends is dropped.
                Some(Ok(_)) => {}
            },
        }
    }
    let _ = socket.send(Message::Close(None)).await;
}
