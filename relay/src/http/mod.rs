//! The HTTP surface: the router (every route in one table), the server, and what the
//! handlers share (the error answer, JSON bodies). Each resource has a module of its
//! own, and so does each WebSocket:
//!
//! - [`auth`]: the bearer token → the caller's [`Identity`](crate::access::Identity), and
//!   the token exchange (`POST /v1/auth/token`, the one route without a bearer).
//! - [`device`]: device login (start, approve, deny; `POST /v1/auth/device` is, with the
//!   token exchange, the other route without a bearer) and the user's logins (list,
//!   revoke).
//! - [`sessions`]: create, list, show, status actions, delete, share.
//! - [`events`]: messages, permission answers and interrupts, each one user event for the
//!   core, with an optional `Idempotency-Key` header: a repeat of a key by the same user
//!   is answered as the first and not applied again.
//! - [`log`]: reading a session's log.
//! - [`instances`]: the user's connected daemon instances, and commands sent to them.
//! - [`bridge`]: the daemons' WebSocket; [`viewer`]: the viewers' read-only one;
//!   [`terminal`]: the shell socket, one interactive shell in a session's workspace.
//! - [`error`]: [`ApiError`], how a refusal becomes a status and `{"error": "..."}`.
//! - [`metrics`]: `GET /metrics`, the operator's figures (admin scope); every answer is
//!   counted by status class on its way out.
//!
//! Every other route requires `Authorization: Bearer TOKEN` (401 otherwise, 403 without
//! the scope it needs). Bodies are JSON;
//! every error is `{"error": "..."}` with 400, 401, 403, 404, 409, 422, 429, 502, 503 or 504.
//! A session the user cannot see answers 404, exactly like one that does not exist, and
//! so does another user's instance, exactly like one that is not connected.
//!
//! Handlers never change state themselves: reads come from the published snapshots and
//! the store, changes go to the core as commands. Instance commands go to the instance's
//! bridge connection through [`crate::instances`].

mod auth;
mod blobs;
mod bridge;
mod device;
mod error;
mod events;
mod instances;
mod log;
mod metrics;
mod sessions;
mod terminal;
mod viewer;

use std::sync::Arc;

use axum::body::Bytes;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;

use crate::core::Shared;
use auth::Authenticated;
use error::ApiError;

/// Every endpoint: the REST resources, the bridge and the viewers' sockets.
fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/auth/token", post(auth::token))
        .route("/v1/auth/device", post(device::start))
        .route("/v1/auth/device/approve", post(device::approve))
        .route("/v1/auth/device/deny", post(device::deny))
        .route("/v1/devices", get(device::list))
        .route("/v1/devices/{id}", axum::routing::delete(device::revoke))
        .route("/v1/sessions", post(sessions::create).get(sessions::list))
        .route(
            "/v1/sessions/{id}",
            get(sessions::show).delete(sessions::delete),
        )
        .route("/v1/sessions/{id}/pause", post(sessions::pause))
        .route("/v1/sessions/{id}/resume", post(sessions::resume))
        .route("/v1/sessions/{id}/complete", post(sessions::complete))
        .route("/v1/sessions/{id}/share", post(sessions::share))
        .route("/v1/sessions/{id}/messages", post(events::send_message))
        .route(
            "/v1/sessions/{id}/permissions/{request_id}",
            post(events::answer_permission),
        )
        .route("/v1/sessions/{id}/interrupt", post(events::interrupt))
        .route("/v1/sessions/{id}/log", get(log::log))
        .route("/v1/instances", get(instances::list_instances))
        .route(
            "/v1/instances/{id}/commands",
            post(instances::instance_command),
        )
        .route("/v1/sessions/{id}/subscribe", get(viewer::subscribe))
        .route("/v1/sessions/{id}/shell", get(terminal::shell))
        .route(cloud_protocol::bridge::BRIDGE_PATH, get(bridge::connect))
        .route(cloud_protocol::blobs::BLOBS_PATH, get(blobs::connect))
        .route("/metrics", get(metrics::metrics))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&shared),
            count_answers,
        ))
        .with_state(shared)
}

/// Counts every answer by its status class, for `GET /metrics`.
async fn count_answers(
    axum::extract::State(shared): axum::extract::State<Arc<Shared>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let response = next.run(request).await;
    shared.metrics.http_answer(response.status().as_u16());
    response
}

/// Serves every endpoint on `listener` until the relay is cancelled (then lets requests
/// finish: the caller bounds the wait).
pub(crate) fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
) -> tokio::task::JoinHandle<()> {
    let cancel = shared.cancel.clone();
    let router = router(shared);
    tokio::spawn(async move {
        // Bridge and viewer messages are small and latency-bound: without TCP_NODELAY a
        // second small write waits for the peer's delayed ACK (~40 ms).
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::warn!(error = %e, "cannot set TCP_NODELAY");
            }
        });
        let serve = axum::serve(listener, router).with_graceful_shutdown(cancel.cancelled_owned());
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "the HTTP server failed");
        }
    })
}

/// The answer to a path no endpoint serves.
async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such endpoint")
}

/// Parses a JSON body, answering 400 with the parser's reason.
fn parse_body<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        body
    };
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}
