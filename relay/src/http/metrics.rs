//! `GET /metrics`: the relay's figures ([`crate::metrics`]) in Prometheus' text format, for
//! its operator: a token with the `admin` scope only (401 without a token, 403 without the
//! scope), and counted against its key's requests limit like any other request.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

use super::{ApiError, Authenticated};
use crate::access::Scope;
use crate::core::Shared;

/// The content type of Prometheus' text format.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// `GET /metrics`.
pub async fn metrics(
    State(shared): State<Arc<Shared>>,
    Authenticated(identity): Authenticated,
) -> Result<Response, ApiError> {
    if !identity.may(Scope::Admin) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "the relay's metrics are for its operator: use a token with the admin scope",
        ));
    }
    let sessions = shared.sessions.read().unwrap().len();
    let text = shared.metrics.render(sessions, shared.instances.count());
    Ok(([(header::CONTENT_TYPE, PROMETHEUS_TEXT)], text).into_response())
}
