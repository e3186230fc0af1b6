//! The teleport family: push, pull, watch, stop, status.
//!
//! A push or a pull takes seconds on a large tree: it runs as a task of its own and is
//! answered later ([`super::client::Deferred`]), with progress notifications to the
//! connection meanwhile, so the connection keeps serving and the socket's thread never
//! scans, hashes or writes files.
//!
//! This module must never touch a worktree itself: [`crate::teleport`] does the work.

use std::sync::Arc;

use cloud_protocol::ipc::{ErrorBody, ErrorCode, Request, Response};
use tokio::sync::{mpsc, oneshot};

use super::client::{ClientState, Deferred, MAX_DEFERRED};
use crate::state::Shared;
use crate::teleport::{Reporter, Teleport, TeleportError, PROGRESS_QUEUE};

/// The error a client sees for a failed teleport operation.
fn failure(error: TeleportError) -> ErrorBody {
    let code = match &error {
        TeleportError::Relay(_) | TeleportError::Transfer(_) => ErrorCode::RelayUnavailable,
        TeleportError::NotADirectory { .. }
        | TeleportError::NotLinked(_)
        | TeleportError::LinkedElsewhere { .. } => ErrorCode::InvalidParams,
        _ => ErrorCode::Internal,
    };
    ErrorBody::new(code, error.to_string())
}

/// Starts `work` as a task answered later.
fn defer<F, Fut>(shared: &Shared, client: &mut ClientState, work: F) -> Result<Response, ErrorBody>
where
    F: FnOnce(Arc<Teleport>, Reporter) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<Response, ErrorBody>> + Send + 'static,
{
    if client.deferred >= MAX_DEFERRED {
        return Err(ErrorBody::new(
            ErrorCode::Busy,
            format!("this connection already waits for {MAX_DEFERRED} teleport operations"),
        ));
    }
    let (progress_tx, progress) = mpsc::channel(PROGRESS_QUEUE);
    let (answer_tx, answer) = oneshot::channel();
    let teleport = Arc::clone(&shared.teleport);
    let reporter = Reporter::new("", "", Some(progress_tx), None);
    tokio::spawn(async move {
        let _ = answer_tx.send(work(teleport, reporter).await);
    });
    client.deferring = Some(Deferred { answer, progress });
    // Ignored: the connection answers with what the task sends.
    Ok(Response::Pong)
}

/// Answers a teleport request.
pub async fn handle(
    shared: &Shared,
    client: &mut ClientState,
    request: Request,
) -> Result<Response, ErrorBody> {
    match request {
        Request::TeleportPush { path, session } => {
            defer(shared, client, move |teleport, reporter| async move {
                let reporter = reporter.for_link(&path, &session);
                // Answered once the relay committed the version; the link records it
                // meanwhile, holding the worktree (the next operation on it waits).
                let bookkeeping = teleport
                    .push_committed(&path, &session, &reporter)
                    .await
                    .map_err(failure)?;
                let outcome = bookkeeping.outcome().clone();
                teleport.finish_in_background(bookkeeping);
                Ok(Response::Teleported(outcome))
            })
        }
        Request::TeleportPull { path, session } => {
            defer(shared, client, move |teleport, reporter| async move {
                let reporter = reporter.for_link(&path, session.as_deref().unwrap_or(""));
                teleport
                    .pull(&path, session.as_deref(), &reporter)
                    .await
                    .map(Response::Teleported)
                    .map_err(failure)
            })
        }
        Request::TeleportWatch { path, session } => {
            defer(shared, client, move |teleport, reporter| async move {
                let reporter = reporter.for_link(&path, &session);
                teleport
                    .watch(&path, &session, &reporter)
                    .await
                    .map(|link| Response::TeleportLinks(vec![link]))
                    .map_err(failure)
            })
        }
        Request::TeleportStop { path } => shared
            .teleport
            .stop(&path)
            .await
            .map(|link| Response::TeleportLinks(vec![link]))
            .map_err(failure),
        Request::TeleportStatus => shared
            .teleport
            .status()
            .await
            .map(Response::TeleportLinks)
            .map_err(failure),
        other => Err(ErrorBody::new(
            ErrorCode::MethodNotFound,
            format!("{} is not a teleport request", other.method()),
        )),
    }
}
