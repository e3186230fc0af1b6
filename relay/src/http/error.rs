//! The error answer of every endpoint: an HTTP status and `{"error": message}`, and how
//! the core's and instance commands' refusals map to statuses (a session the user cannot
//! see is 404, like one that does not exist). A 401 also says `WWW-Authenticate: Bearer`,
//! a 429 `Retry-After` (whole seconds).
//!
//! The message is shown to users as it is: it never carries a token.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::core::CoreError;
use crate::instances::CommandError;

/// An error answer: a status and `{"error": message}`.
#[derive(Debug)]
pub struct ApiError {
    /// The HTTP status.
    status: StatusCode,
    /// Shown to the user.
    message: String,
    /// For a 429: whole seconds until a retry can succeed (`Retry-After`).
    retry_after: Option<u64>,
}

impl ApiError {
    pub(super) fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            retry_after: None,
        }
    }

    /// 429 with `Retry-After`: the caller's API key is over the requests limit.
    pub(super) fn rate_limited(limited: crate::limits::Limited) -> ApiError {
        // Whole seconds, rounded up: a client that waits exactly that long finds a token.
        let seconds = limited.next_token.as_millis().div_ceil(1000).max(1) as u64;
        ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: format!(
                "rate limited: this API key makes requests faster than the relay allows; retry in {seconds} s (Retry-After)"
            ),
            retry_after: Some(seconds),
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
            CoreError::Store | CoreError::ShuttingDown | CoreError::Unavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
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
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from(seconds));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}
