//! The sessions resource: `POST /v1/sessions` (every field optional), `GET /v1/sessions`
//! (the caller's listing), `GET` and `DELETE /v1/sessions/{id}`, the status actions
//! (`POST .../pause`, `.../resume`, `.../complete`) and `POST .../share`.
//!
//! Listing and showing read the published sessions (showing one adds its connected
//! clients, from [`crate::presence`]); every change is a core command.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use cloud_protocol::session::{
    CreateSession, NetworkAccess, RepoAccess, Session, SessionAction, Visibility,
};
use serde::Deserialize;

use super::{parse_body, ApiError, Authenticated};
use crate::access::Identity;
use crate::core::{Command, CoreError, Shared};

/// `POST /v1/sessions`: every field optional.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    #[serde(default)]
    task: String,
    #[serde(default = "default_visibility")]
    visibility: Visibility,
    #[serde(default = "default_network_access")]
    network_access: NetworkAccess,
    #[serde(default = "default_repo_access")]
    repo_access: RepoAccess,
    #[serde(default = "default_vm_image")]
    vm_image: String,
    #[serde(default)]
    allowed_domains: Vec<String>,
    #[serde(default = "default_auto_stop_minutes")]
    auto_stop_minutes: u32,
}

fn default_auto_stop_minutes() -> u32 {
    CreateSession::default().auto_stop_minutes
}

fn default_visibility() -> Visibility {
    Visibility::Private
}

/// Limited, not none: the built-in agent cannot yet enforce `none`, and promising it by
/// default would be dishonest.
fn default_network_access() -> NetworkAccess {
    NetworkAccess::Limited
}

fn default_repo_access() -> RepoAccess {
    RepoAccess::Write
}

fn default_vm_image() -> String {
    "default".to_owned()
}

pub(super) async fn create(
    State(shared): State<Arc<Shared>>,
    Authenticated(identity): Authenticated,
    body: Bytes,
) -> Result<(StatusCode, Json<Session>), ApiError> {
    let body: CreateBody = parse_body(&body)?;
    let request = CreateSession {
        task: body.task,
        visibility: body.visibility,
        network_access: body.network_access,
        repo_access: body.repo_access,
        vm_image: body.vm_image,
        allowed_domains: body.allowed_domains,
        auto_stop_minutes: body.auto_stop_minutes,
    };
    let session = shared
        .call(|reply| Command::Create {
            identity,
            request,
            reply,
        })
        .await??;
    Ok((StatusCode::CREATED, Json(session)))
}

pub(super) async fn list(
    State(shared): State<Arc<Shared>>,
    Authenticated(identity): Authenticated,
) -> Json<Vec<Session>> {
    Json(shared.list_for(&identity))
}

pub(super) async fn show(
    State(shared): State<Arc<Shared>>,
    Authenticated(identity): Authenticated,
    Path(id): Path<String>,
) -> Result<Json<Session>, ApiError> {
    let mut session = shared.session_for(&identity, &id)?.0;
    session.clients = shared.presence.clients(&id);
    Ok(Json(session))
}

async fn act(
    shared: &Shared,
    identity: Identity,
    session: String,
    action: SessionAction,
) -> Result<Option<Session>, ApiError> {
    Ok(shared
        .call(|reply| Command::Action {
            identity,
            session,
            action,
            reply,
        })
        .await??)
}

async fn status_action(
    shared: &Shared,
    identity: Identity,
    session: String,
    action: SessionAction,
) -> Result<Json<Session>, ApiError> {
    act(shared, identity, session.clone(), action)
        .await?
        .map(Json)
        .ok_or_else(|| CoreError::NotFound(session).into())
}

pub(super) async fn pause(
    State(shared): State<Arc<Shared>>,
    Authenticated(identity): Authenticated,
    Path(id): Path<String>,
) -> Result<Json<Session>, ApiError> {
    status_action(&shared, identity, id, SessionAction::Pause).await
}

pub(super) async fn resume(
    State(shared): State<Arc<Shared>>,
    Authenticated(identity): Authenticated,
    Path(id): Path<String>,
) -> Result<Json<Session>, ApiError> {
    status_action(&shared, identity, id, SessionAction::Resume).await
}

pub(super) async fn complete(
    State(shared): State<Arc<Shared>>,
    Authenticated(identity): Authenticated,
    Path(id): Path<String>,
) -> Result<Json<Session>, ApiError> {
    status_action(&shared, identity, id, SessionAction::Complete).await
}

pub(super) async fn delete(
    State(shared): State<Arc<Shared>>,
    Authenticated(identity): Authenticated,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    act(&shared, identity, id, SessionAction::Delete).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
struct ShareBody {
    visibility: Visibility,
}

pub(super) async fn share(
    State(shared): State<Arc<Shared>>,
    Authenticated(identity): Authenticated,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<Session>, ApiError> {
    let ShareBody { visibility } = parse_body(&body)?;
    let session = shared
        .call(|reply| Command::Share {
            identity,
            session: id,
            visibility,
            reply,
        })
        .await??;
    Ok(Json(session))
}
