//! Authentication: the `Authorization: Bearer TOKEN` header → the caller's [`Identity`],
//! looked up in the live tokens; 401 when the token is missing, unknown or revoked.
//!
//! Every endpoint takes [`Authenticated`], the sockets before they upgrade. This module
//! never logs a token and never puts one in an answer.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, StatusCode};

use super::ApiError;
use crate::access::Identity;
use crate::core::Shared;

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
