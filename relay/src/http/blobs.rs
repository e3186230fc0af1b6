//! The blob socket: `GET /v1/blobs`, a WebSocket beside the bridge that carries teleport's
//! file contents (`cloud_protocol::blobs`), so they never wait in (or hold up) the
//! bridge's ordered stream.
//!
//! One request at a time per socket, answered in order: `Put` stores blobs for the
//! session's org after checking each against its id (`Mismatched` names one that fails,
//! and nothing is stored); `PutFiles` does the same, then hands the blobs to the session's
//! staging (`teleport::staging`, on its own thread); `Get` sends as many of the asked
//! blobs as fit one message. The session decides the org and who may do what: a put
//! needs write access to it, a `Get` read access. Store work runs on the blocking pool.
//! A malformed or oversized message ends this socket only.

use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use cloud_protocol::blobs::{
    self, Blob, BlobAnswer, BlobMessage, BlobReply, BlobRequest, INLINE_DECODE_BYTES,
    MAX_BLOB_MESSAGE,
};

use super::Authenticated;
use crate::access::{Access, Identity};
use crate::core::Shared;
use crate::teleport::blobs::BlobStoreError;

/// A `Get` answer holds at most this many bytes of blobs (the rest is asked again).
const GET_REPLY_BYTES: usize = 8 * 1024 * 1024;

/// `GET /v1/blobs`: authenticates (401 before upgrading), then serves the socket.
pub async fn connect(
    State(shared): State<Arc<Shared>>,
    Authenticated(identity): Authenticated,
    upgrade: WebSocketUpgrade,
) -> Response {
    let guard = shared.connections.token();
    upgrade
        .max_message_size(MAX_BLOB_MESSAGE)
        .max_frame_size(MAX_BLOB_MESSAGE)
        .on_upgrade(move |socket| async move {
            let _guard = guard;
            serve(shared, identity, socket).await;
        })
}

async fn serve(shared: Arc<Shared>, identity: Identity, mut socket: WebSocket) {
    let cancel = shared.cancel.clone();
    loop {
        let message = tokio::select! {
            _ = cancel.cancelled() => return,
            message = socket.recv() => message,
        };
        let bytes = match message {
            None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
            Some(Ok(Message::Binary(bytes))) => bytes,
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(Message::Text(_))) => {
                tracing::debug!("a text message on the blob socket; closing it");
                return;
            }
        };
        // A batch of blobs is megabytes: decoded on the bulk pool, so the runtime's
        // thread (every session's messages) never waits for the copy.
        let decoded = if bytes.len() > INLINE_DECODE_BYTES {
            match cloud_tree::bulk::spawn(move || blobs::decode::<BlobMessage>(&bytes)).await {
                Ok(decoded) => decoded,
                Err(_) => return,
            }
        } else {
            blobs::decode(&bytes)
        };
        let message: BlobMessage = match decoded {
            Ok(message) => message,
            Err(e) => {
                tracing::debug!("a malformed blob message ({e}); closing the socket");
                return;
            }
        };
        let result = answer(&shared, &identity, message.request).await;
        let reply = BlobReply {
            id: message.id,
            result,
        };
        let Ok(bytes) = blobs::encode(&reply) else {
            return;
        };
        if socket.send(Message::Binary(bytes.into())).await.is_err() {
            return;
        }
    }
}

/// The session's org, if `identity` has `needed` access to it.
fn org_of(
    shared: &Shared,
    identity: &Identity,
    session: &str,
    write: bool,
) -> Result<String, String> {
    let (session, access) = shared
        .session_for(identity, session)
        .map_err(|e| e.to_string())?;
    if write && access != Access::Write {
        return Err(format!("you may not change session {}", session.id));
    }
    Ok(session.org)
}

/// Stores `blobs` for `session`'s org; `files`: each is a whole file of a push about to be
/// committed, staged for the commit too once stored.
async fn put(
    shared: &Arc<Shared>,
    identity: &Identity,
    session: String,
    blobs: Vec<Blob>,
    files: bool,
) -> Result<BlobAnswer, String> {
    let org = org_of(shared, identity, &session, true)?;
    let teleport = Arc::clone(&shared.teleport);
    cloud_tree::bulk::spawn(move || match teleport.blobs.put(&org, &blobs) {
        Ok(new) => {
            if files {
                // Beside the socket's next batches, not before them.
                teleport.stages.stage_later(&session, blobs);
            }
            Ok(BlobAnswer::Stored { new: new as _ })
        }
        // The daemon does not hash what it uploads: this check is the one.
        Err(BlobStoreError::Mismatch(id)) => Ok(BlobAnswer::Mismatched { id }),
        Err(e) => Err(e.to_string()),
    })
    .await
    .map_err(|e| format!("storing blobs failed: {e}"))?
}

async fn answer(
    shared: &Arc<Shared>,
    identity: &Identity,
    request: BlobRequest,
) -> Result<BlobAnswer, String> {
    let teleport = Arc::clone(&shared.teleport);
    match request {
        BlobRequest::Put { session, blobs } => put(shared, identity, session, blobs, false).await,
        BlobRequest::PutFiles { session, blobs } => {
            put(shared, identity, session, blobs, true).await
        }
        BlobRequest::Get { session, ids } => {
            let org = org_of(shared, identity, &session, false)?;
            cloud_tree::bulk::spawn(move || {
                let mut found = Vec::new();
                let mut missing = Vec::new();
                let mut bytes = 0;
                for id in ids {
                    if bytes >= GET_REPLY_BYTES {
                        break;
                    }
                    match teleport.blobs.get(&org, &id).map_err(|e| e.to_string())? {
                        Some(data) => {
                            bytes += data.len();
                            found.push(Blob { id, bytes: data });
                        }
                        None => missing.push(id),
                    }
                }
                Ok(BlobAnswer::Blobs {
                    blobs: found,
                    missing,
                })
            })
            .await
            .map_err(|e| format!("reading blobs failed: {e}"))?
        }
    }
}
