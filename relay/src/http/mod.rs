//! The HTTP surface: routing, bearer-token authentication, and the REST handlers for
//! sessions and for the user's connected daemon instances. The two WebSocket endpoints
//! live in [`crate::bridge`] and [`crate::viewer`], which use this module's extractors; the
//! relay's assembly (`crate::start`) puts all the routes together.
//!
//! Every route requires `Authorization: Bearer TOKEN` (401 otherwise). The three event
//! routes (messages, permission answers, interrupts) take an optional `Idempotency-Key`
//! header: a repeat of a key by the same user is answered as the first and not applied
//! again (see [`crate::idempotency`]). Bodies are JSON;
//! every error is `{"error": "..."}` with 400, 401, 403, 404, 409, 422, 502, 503 or 504.
//! A session the user cannot see answers 404, exactly like one that does not exist, and
//! so does another user's instance, exactly like one that is not connected.
//!
//! Handlers never change state themselves: reads come from the published snapshots and
//! the store, changes go to the core as commands. Instance commands go to the instance's
//! bridge connection through [`crate::instances`].

pub(crate) mod bridge;
pub(crate) mod viewer;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use cloud_protocol::bridge::{Outbound, PermissionDecision};
use cloud_protocol::session::{
    CreateSession, LogEntry, NetworkAccess, RepoAccess, Session, SessionAction, Visibility,
};
use serde::Deserialize;
use serde_json::json;

use crate::access::Identity;
use crate::core::{Command, CoreError, Shared};
use crate::instances::{CommandError, InstanceInfo};

/// The most log entries one `GET .../log` returns; ask again with a larger `after`.
pub const MAX_LOG_PAGE: usize = 10_000;

/// How long `POST /v1/instances/{id}/commands` waits for the daemon's answer.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// The REST endpoints. The WebSocket ones (the bridge, viewers) are added beside them
/// where the relay is assembled (`crate::start`), so this module needs nothing of theirs.
pub fn rest_routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/v1/sessions", post(create).get(list))
        .route("/v1/sessions/{id}", get(show).delete(delete))
        .route("/v1/sessions/{id}/pause", post(pause))
        .route("/v1/sessions/{id}/resume", post(resume))
        .route("/v1/sessions/{id}/complete", post(complete))
        .route("/v1/sessions/{id}/share", post(share))
        .route("/v1/sessions/{id}/messages", post(send_message))
        .route(
            "/v1/sessions/{id}/permissions/{request_id}",
            post(answer_permission),
        )
        .route("/v1/sessions/{id}/interrupt", post(interrupt))
        .route("/v1/sessions/{id}/log", get(log))
        .route("/v1/instances", get(list_instances))
        .route("/v1/instances/{id}/commands", post(instance_command))
}

/// The answer to a path no endpoint serves.
pub async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such endpoint")
}

/// An error answer: a status and `{"error": message}`.
#[derive(Debug)]
pub struct ApiError {
    /// The HTTP status.
    status: StatusCode,
    /// Shown to the user.
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }
}

impl From<CoreError> for ApiError {
    fn from(error: CoreError) -> ApiError {
        let status = match &error {
            CoreError::NotFound(_) => StatusCode::NOT_FOUND,
            CoreError::Forbidden(_) => StatusCode::FORBIDDEN,
            CoreError::Transition(_) | CoreError::Conflict(_) => StatusCode::CONFLICT,
            CoreError::Invalid(_) => StatusCode::BAD_REQUEST,
            CoreError::Store | CoreError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError::new(status, error.to_string())
    }
}

impl From<CommandError> for ApiError {
    fn from(error: CommandError) -> ApiError {
        let status = match &error {
            CommandError::Failed(_) => StatusCode::UNPROCESSABLE_ENTITY,
            CommandError::NotConnected(_) => StatusCode::NOT_FOUND,
            CommandError::Disconnected(_) => StatusCode::BAD_GATEWAY,
            CommandError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            CommandError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError::new(status, error.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(json!({"error": self.message}))).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

/// An authenticated request's user.
#[derive(Debug)]
pub struct Authenticated(pub Identity);

impl FromRequestParts<Arc<Shared>> for Authenticated {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        shared: &Arc<Shared>,
    ) -> Result<Authenticated, ApiError> {
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .map(str::trim);
        let Some(token) = token else {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing bearer token: send `Authorization: Bearer TOKEN`",
            ));
        };
        shared
            .tokens
            .authenticate(token)
            .map(Authenticated)
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "invalid or revoked token: ask the relay's operator for a new one",
                )
            })
    }
}

/// The `Idempotency-Key` header of an event request, if it has one.
#[derive(Debug)]
pub struct IdempotencyKey(Option<String>);

impl FromRequestParts<Arc<Shared>> for IdempotencyKey {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        _shared: &Arc<Shared>,
    ) -> Result<IdempotencyKey, ApiError> {
        match parts.headers.get("idempotency-key") {
            None => Ok(IdempotencyKey(None)),
            Some(value) => value
                .to_str()
                .map(|key| IdempotencyKey(Some(key.to_owned())))
                .map_err(|_| {
                    ApiError::bad_request("the Idempotency-Key header must be visible ASCII")
                }),
        }
    }
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

async fn create(
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

async fn list(
    State(shared): State<Arc<Shared>>,
    Authenticated(identity): Authenticated,
) -> Json<Vec<Session>> {
    Json(shared.list_for(&identity))
}

async fn show(
    State(shared): State<Arc<Shared>>,
    Authenticated(identity): Authenticated,
    Path(id): Path<String>,
) -> Result<Json<Session>, ApiError> {
    Ok(Json(shared.session_for(&identity, &id)?.0))
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

async fn pause(
    State(shared): State<Arc<Shared>>,
    Authenticated(identity): Authenticated,
    Path(id): Path<String>,
) -> Result<Json<Session>, ApiError> {
    status_action(&shared, identity, id, SessionAction::Pause).await
}

async fn resume(
    State(shared): State<Arc<Shared>>,
    Authenticated(identity): Authenticated,
    Path(id): Path<String>,
) -> Result<Json<Session>, ApiError> {
    status_action(&shared, identity, id, SessionAction::Resume).await
}

async fn complete(
    State(shared): State<Arc<Shared>>,
    Authenticated(identity): Authenticated,
    Path(id): Path<String>,
) -> Result<Json<Session>, ApiError> {
    status_action(&shared, identity, id, SessionAction::Complete).await
}

async fn delete(
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

async fn share(
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

/// Sends one user event through the core, as a daemon's journal would; answers its log seq.
async fn event(
    shared: &Shared,
    identity: Identity,
    event: Outbound,
) -> Result<Json<serde_json::Value>, ApiError> {
    let outcome = shared
        .call(|reply| Command::Events {
            identity,
            instance: None,
            events: vec![(0, event)],
            reply,
        })
        .await?;
    let (_, result) = outcome
        .results
        .into_iter()
        .next()
        .ok_or(CoreError::ShuttingDown)?;
    Ok(Json(json!({"seq": result?})))
}

#[derive(Debug, Deserialize)]
struct MessageBody {
    text: String,
}

async fn send_message(
    State(shared): State<Arc<Shared>>,
    Authenticated(identity): Authenticated,
    IdempotencyKey(key): IdempotencyKey,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let MessageBody { text } = parse_body(&body)?;
    event(
        &shared,
        identity,
        Outbound::UserMessage {
            session: id,
            text,
            key,
        },
    )
    .await
}

#[derive(Debug, Deserialize)]
#[serde(tag = "behavior", rename_all = "snake_case")]
enum PermissionBody {
    Allow {
        #[serde(default)]
        updated_input: Option<serde_json::Value>,
    },
    Deny {
        #[serde(default)]
        message: String,
    },
}

async fn answer_permission(
    State(shared): State<Arc<Shared>>,
    Authenticated(identity): Authenticated,
    IdempotencyKey(key): IdempotencyKey,
    Path((id, request_id)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let decision = match parse_body::<PermissionBody>(&body)? {
        PermissionBody::Allow { updated_input } => PermissionDecision::Allow {
            updated_input: updated_input.map(|input| input.to_string()),
        },
        PermissionBody::Deny { message } => PermissionDecision::Deny { message },
    };
    event(
        &shared,
        identity,
        Outbound::PermissionAnswer {
            session: id,
            request_id,
            decision,
            key,
        },
    )
    .await
}

async fn interrupt(
    State(shared): State<Arc<Shared>>,
    Authenticated(identity): Authenticated,
    IdempotencyKey(key): IdempotencyKey,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    event(&shared, identity, Outbound::Interrupt { session: id, key }).await
}

/// `?after=N&limit=M` on log reads and subscriptions.
#[derive(Debug, Deserialize)]
pub struct After {
    /// Entries after this seq (0 for all).
    #[serde(default)]
    pub after: u64,
    /// At most this many (log reads only).
    #[serde(default)]
    pub limit: Option<usize>,
}

async fn log(
    State(shared): State<Arc<Shared>>,
    Authenticated(identity): Authenticated,
    Path(id): Path<String>,
    query: Result<Query<After>, QueryRejection>,
) -> Result<Json<Vec<LogEntry>>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let (session, _) = shared.session_for(&identity, &id)?;
    let limit = query.limit.unwrap_or(MAX_LOG_PAGE).min(MAX_LOG_PAGE);
    let entries = shared
        .store
        .read_log(&id, query.after, session.last_seq, limit)
        .map_err(|e| {
            tracing::error!(error = %e, "log read failed");
            ApiError::from(CoreError::Store)
        })?;
    Ok(Json(entries))
}

/// `GET /v1/instances`: the caller's connected daemon instances.
async fn list_instances(
    State(shared): State<Arc<Shared>>,
    Authenticated(identity): Authenticated,
) -> Json<Vec<InstanceInfo>> {
    Json(shared.instances.list(&identity.user))
}

/// `POST /v1/instances/{id}/commands`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CommandBody {
    name: String,
}

/// Sends a command to one of the caller's instances and answers the daemon's result.
async fn instance_command(
    State(shared): State<Arc<Shared>>,
    Authenticated(identity): Authenticated,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let CommandBody { name } = parse_body(&body)?;
    let result = shared
        .instances
        .command(&identity.user, &id, name.clone(), COMMAND_TIMEOUT)
        .await?;
    Ok(Json(
        json!({"instance": id, "name": name, "result": result}),
    ))
}
