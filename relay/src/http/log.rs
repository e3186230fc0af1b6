//! `GET /v1/sessions/{id}/log?after=N&limit=M`: a page of a session's log, read from the
//! store up to the published log seq (so nothing unflushed is shown), at most
//! [`MAX_LOG_PAGE`] entries; ask again with a larger `after`.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::Json;
use cloud_protocol::session::LogEntry;
use serde::Deserialize;

use super::{ApiError, Authenticated};
use crate::core::{CoreError, Shared};

/// The most log entries one `GET .../log` returns; ask again with a larger `after`.
pub const MAX_LOG_PAGE: usize = 10_000;

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

pub(super) async fn log(
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
