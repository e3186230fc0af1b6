//! The instances resource: `GET /v1/instances` (the caller's connected daemon instances)
//! and `POST /v1/instances/{id}/commands`, which sends a command to one of them through
//! the instance registry ([`crate::instances`]) and answers the daemon's result, waiting
//! at most [`COMMAND_TIMEOUT`].
//!
//! A user only ever lists and commands their own instances.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::{parse_body, ApiError, Authenticated};
use crate::core::Shared;
use crate::instances::InstanceInfo;

/// How long `POST /v1/instances/{id}/commands` waits for the daemon's answer.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// `GET /v1/instances`: the caller's connected daemon instances.
pub(super) async fn list_instances(
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
pub(super) async fn instance_command(
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
