//! Authentication: the `Authorization: Bearer TOKEN` header → the caller's [`Identity`]
//! (an access token, or an API key, see [`crate::auth`]); 401 when the token is missing,
//! unknown, expired or revoked, 403 when it lacks the scope the request needs
//! (`sessions:read` for reads, `sessions:write` for changes and the daemons' bridge), 429
//! with `Retry-After` when its API key is over the requests limit ([`crate::limits`]).
//!
//! Also `POST /v1/auth/token`: an API key, a refresh token or an approved device code
//! ([`super::device`]) → an access token and the next refresh token; with `org`, acting in
//! that org (403 when the user is not a member).
//!
//! Every endpoint takes [`Authenticated`], the sockets before they upgrade. This module
//! never logs a token and never puts one in an error: a body it cannot parse is refused
//! without quoting it.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{header, Method, StatusCode};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::ApiError;
use crate::access::{Identity, Scope};
use crate::auth::{AuthError, Tokens};
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
        let identity = shared.auth.authenticate(token).map_err(auth_error)?;
        // The daemons' bridge and the blob socket change sessions, though they are GETs.
        let path = parts.uri.path();
        let writes = parts.method != Method::GET
            || path == cloud_protocol::bridge::BRIDGE_PATH
            || path == cloud_protocol::blobs::BLOBS_PATH;
        let needed = if writes {
            Scope::SessionsWrite
        } else {
            Scope::SessionsRead
        };
        if !identity.may(needed) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "this token lacks the {} scope: ask the relay's operator for an API key with it",
                    needed.name()
                ),
            ));
        }
        // Counted once the caller is known and allowed: a request refused for its token or
        // scope costs its key nothing.
        if let Err(limited) = shared.limits.requests.take(&identity.key_hash) {
            shared
                .metrics
                .requests_rate_limited
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Err(ApiError::rate_limited(limited));
        }
        Ok(Authenticated(identity))
    }
}

/// A refused credential: 401, or 503 when the relay could not record a refresh.
pub(super) fn auth_error(error: AuthError) -> ApiError {
    match error {
        AuthError::Rejected(message) => ApiError::new(StatusCode::UNAUTHORIZED, message),
        AuthError::Unavailable(message) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{message}; try again"),
        ),
        AuthError::NotMember(message) => ApiError::new(StatusCode::FORBIDDEN, message),
    }
}

/// `POST /v1/auth/token`'s body.
#[derive(Deserialize)]
#[serde(tag = "grant_type", rename_all = "snake_case", deny_unknown_fields)]
enum TokenRequest {
    /// Exchange an API key (starts a new refresh-token family: the login of the machine
    /// called `name`).
    ApiKey {
        api_key: String,
        #[serde(default)]
        name: String,
        /// The org the access token acts in (default: the user's default org).
        #[serde(default)]
        org: Option<String>,
    },
    /// Rotate a refresh token.
    RefreshToken {
        refresh_token: String,
        /// As for `ApiKey`.
        #[serde(default)]
        org: Option<String>,
    },
    /// Poll a device authorization (RFC 8628, 3.4).
    DeviceCode { device_code: String },
}

/// `POST /v1/auth/token`'s answer.
#[derive(Serialize)]
pub struct TokenAnswer {
    token_type: &'static str,
    access_token: String,
    /// Seconds, rounded down (OAuth's unit).
    expires_in: u64,
    /// The same lifetime in milliseconds.
    expires_in_ms: u64,
    refresh_token: String,
    user: String,
    org: String,
    orgs: Vec<String>,
    scopes: Vec<Scope>,
}

/// `POST /v1/auth/token`: `{"grant_type": "api_key", "api_key": K}`,
/// `{"grant_type": "refresh_token", "refresh_token": R}` or
/// `{"grant_type": "device_code", "device_code": D}` → new tokens; 401 when the
/// credential is not (or no longer) valid; a device code not (yet) good for tokens is
/// answered 400 with RFC 8628's `error` (`authorization_pending`, `slow_down`, ...).
pub async fn token(
    State(shared): State<Arc<Shared>>,
    body: Bytes,
) -> Result<Json<TokenAnswer>, axum::response::Response> {
    use axum::response::IntoResponse as _;
    // serde's messages may quote the values, which are secrets: say what is expected.
    let request: TokenRequest = serde_json::from_slice(&body).map_err(|_| {
        ApiError::bad_request(
            "invalid token request: send {\"grant_type\": \"api_key\", \"api_key\": ...}, {\"grant_type\": \"refresh_token\", \"refresh_token\": ...} or {\"grant_type\": \"device_code\", \"device_code\": ...}",
        )
        .into_response()
    })?;
    // Each writes to disk (the refresh-token and device logs): off the async threads.
    let tokens = tokio::task::spawn_blocking(move || match request {
        TokenRequest::ApiKey { api_key, name, org } => shared
            .auth
            .exchange_key(&api_key, &name, org.as_deref())
            .map_err(Ok),
        TokenRequest::RefreshToken { refresh_token, org } => shared
            .auth
            .refresh(&refresh_token, org.as_deref())
            .map_err(Ok),
        TokenRequest::DeviceCode { device_code } => {
            shared.auth.redeem_device(&device_code).map_err(Err)
        }
    })
    .await
    .map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the token exchange failed; try again",
        )
        .into_response()
    })?
    // A refused credential (`Ok`), or a device code not good for tokens (`Err`).
    .map_err(|refusal| match refusal {
        Ok(auth) => auth_error(auth).into_response(),
        Err(poll) => super::device::poll_error(poll),
    })?;
    let Tokens {
        access_token,
        expires_in,
        refresh_token,
        user,
        org,
        orgs,
        scopes,
    } = tokens;
    Ok(Json(TokenAnswer {
        token_type: "Bearer",
        access_token,
        expires_in: expires_in.as_secs(),
        expires_in_ms: expires_in.as_millis() as u64,
        refresh_token,
        user,
        org,
        orgs,
        scopes,
    }))
}
