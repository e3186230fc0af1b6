//! Device login and the user's logins, over HTTP:
//!
//! - `POST /v1/auth/device` (no bearer): `{"name": "laptop"}` → a device code, a user code
//!   and how to poll (RFC 8628, 3.2); the machine then polls `POST /v1/auth/token` with
//!   `grant_type` `device_code` ([`super::auth::token`]; its refusals: [`poll_error`]).
//! - `POST /v1/auth/device/approve` and `/deny`: `{"user_code": "ABCD-EFGH"}`, as a
//!   logged-in user: the new machine gets a login of its own for this user, org and
//!   scopes, or is refused.
//! - `GET /v1/devices`: the caller's logins (refresh-token families); `DELETE
//!   /v1/devices/{id}` revokes one (its id, or a prefix only it has).
//!
//! No answer or log line here carries a device code or a token.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse as _, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::auth::{auth_error, Authenticated};
use super::{parse_body, ApiError};
use crate::auth::device::{DecideError, PollError};
use crate::auth::refresh::Family;
use crate::core::Shared;

/// The longest machine name kept.
const MAX_NAME: usize = 128;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct StartBody {
    #[serde(default)]
    name: String,
}

/// `POST /v1/auth/device`.
pub async fn start(
    State(shared): State<Arc<Shared>>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let body: StartBody = parse_body(&body)?;
    let name: String = body.name.chars().take(MAX_NAME).collect();
    let started = tokio::task::spawn_blocking(move || shared.auth.start_device(&name))
        .await
        .map_err(|_| unavailable())?
        .map_err(auth_error)?;
    Ok(Json(json!({
        "device_code": started.device_code,
        "user_code": started.user_code,
        "verification": format!(
            "on a machine logged in to this relay, run `cloudctl device approve {}`",
            started.user_code
        ),
        "expires_in": started.expires_in.as_secs(),
        "expires_in_ms": started.expires_in.as_millis() as u64,
        "interval": started.interval.as_secs(),
        "interval_ms": started.interval.as_millis() as u64,
    })))
}

/// A device poll's refusal: 400 `{"error": CODE, "error_description": ...}` (RFC 8628,
/// 3.5); 503 when the relay could not read its logins.
pub(super) fn poll_error(error: PollError) -> Response {
    let status = match error {
        PollError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::BAD_REQUEST,
    };
    (
        status,
        Json(json!({"error": error.code(), "error_description": error.to_string()})),
    )
        .into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DecideBody {
    user_code: String,
}

/// `POST /v1/auth/device/approve`.
pub async fn approve(
    State(shared): State<Arc<Shared>>,
    Authenticated(identity): Authenticated,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    decide(shared, Some(identity), body).await
}

/// `POST /v1/auth/device/deny`.
pub async fn deny(
    State(shared): State<Arc<Shared>>,
    Authenticated(identity): Authenticated,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    drop(identity);
    decide(shared, None, body).await
}

async fn decide(
    shared: Arc<Shared>,
    approver: Option<crate::access::Identity>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let body: DecideBody = parse_body(&body)?;
    let approved = approver.is_some();
    let user_code = body.user_code.clone();
    let name = tokio::task::spawn_blocking(move || {
        shared
            .auth
            .decide_device(&body.user_code, approver.as_ref())
    })
    .await
    .map_err(|_| unavailable())?
    .map_err(|e| {
        let status = match e {
            DecideError::Unknown(_) => StatusCode::NOT_FOUND,
            DecideError::AlreadyDecided(_) => StatusCode::CONFLICT,
            DecideError::Expired(_) => StatusCode::GONE,
            DecideError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError::new(status, e.to_string())
    })?;
    tracing::info!(approved, machine = %name, "device login decided");
    Ok(Json(
        json!({"user_code": user_code, "name": name, "approved": approved}),
    ))
}

fn family_json(family: &Family, current: Option<&str>) -> Value {
    json!({
        "id": family.id,
        "name": family.name,
        "org": family.org,
        "created_at": family.created_at,
        "last_used_at": family.last_used_at,
        "current": current == Some(family.id.as_str()),
    })
}

/// `GET /v1/devices`: `{"devices": [...]}`, oldest first.
pub async fn list(
    State(shared): State<Arc<Shared>>,
    Authenticated(identity): Authenticated,
) -> Json<Value> {
    let devices: Vec<Value> = shared
        .auth
        .families(&identity.user)
        .iter()
        .map(|family| family_json(family, identity.family.as_deref()))
        .collect();
    Json(json!({ "devices": devices }))
}

/// `DELETE /v1/devices/{id}`: the revoked login; 404 when the caller has no login with
/// that id (or several start with it).
pub async fn revoke(
    State(shared): State<Arc<Shared>>,
    Authenticated(identity): Authenticated,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let user = identity.user.clone();
    let lookup = id.clone();
    let revoked = tokio::task::spawn_blocking(move || shared.auth.revoke_family(&user, &lookup))
        .await
        .map_err(|_| unavailable())?
        .map_err(auth_error)?;
    match revoked {
        Some(family) => {
            tracing::info!(user = %identity.user, machine = %family.name, "login revoked");
            Ok(Json(family_json(&family, identity.family.as_deref())))
        }
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "you have no login {id:?} (or several start with it): see `cloudctl device list`"
            ),
        )),
    }
}

fn unavailable() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "the relay could not use its device logins; try again",
    )
}
