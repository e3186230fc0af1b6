//! The session event endpoints: `POST /v1/sessions/{id}/messages`,
//! `POST .../permissions/{request_id}` and `POST .../interrupt`. Each sends one user event
//! through the core, as a daemon's journal would, and answers its log seq.
//!
//! Each takes an optional `Idempotency-Key` header: a repeat of a key by the same user is
//! answered as the first and not applied again (the core keeps the records).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::Json;
use cloud_protocol::bridge::{Outbound, PermissionDecision};
use serde::Deserialize;
use serde_json::json;

use super::{parse_body, ApiError, Authenticated};
use crate::access::Identity;
use crate::core::{Command, CoreError, Shared};

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

pub(super) async fn send_message(
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

pub(super) async fn answer_permission(
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

pub(super) async fn interrupt(
    State(shared): State<Arc<Shared>>,
    Authenticated(identity): Authenticated,
    IdempotencyKey(key): IdempotencyKey,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    event(&shared, identity, Outbound::Interrupt { session: id, key }).await
}
