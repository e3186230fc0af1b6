//! The blob socket: `GET /v1/blobs`, a WebSocket beside the bridge that carries teleport's
//! file contents (`cloud_protocol::blobs`), so they never wait in (or hold up) the
//! bridge's ordered stream.
//!
//! One request at a time per socket, answered in order. A request is decoded in place: a
//! put's blobs stay slices of the message they came in (`SharedBlob`), never copied out.
//! `Put` stores blobs for the session's org after checking each against its id
//! (`Mismatched` names one that fails, and nothing is stored); `PutFiles` does the same,
//! then hands the blobs to the session's staging (`teleport::staging`, on its own
//! thread); `Get` sends as many of the asked blobs as fit one message. The session
//! decides the org and who may do what: a put needs write access to it, a `Get` read
//! access. The socket is served on the bulk I/O thread (`cloud_tree::bulk::spawn_io`),
//! store work on the bulk pool. A malformed or oversized message ends this socket only.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use cloud_protocol::blobs::{self, Blob, BlobAnswer, BlobReply, BlobRequestRef, MAX_BLOB_MESSAGE};
use cloud_protocol::teleport::ContentId;

use super::Authenticated;
use crate::access::{Access, Identity};
use crate::core::Shared;
use crate::teleport::blobs::{BlobStoreError, SharedBlob};

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
            // Served on the bulk I/O thread: a put's megabytes are read and unmasked there,
            // never on the runtime's thread, which carries every session's messages.
            let _ = cloud_tree::bulk::spawn_io(serve(shared, identity, socket)).await;
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
        // thread (every session's messages) never waits for it; its blobs stay where they
        // arrived, as slices of the message (`SharedBlob`).
        let decoded =
            match cloud_tree::bulk::sized(bytes.len(), move || Request::decode(&bytes)).await {
                Ok(decoded) => decoded,
                Err(_) => return,
            };
        let (id, request) = match decoded {
            Ok(message) => message,
            Err(e) => {
                tracing::debug!("a malformed blob message ({e}); closing the socket");
                return;
            }
        };
        let result = answer(&shared, &identity, request).await;
        let reply = BlobReply { id, result };
        let Ok(bytes) = blobs::encode(&reply) else {
            return;
        };
        if socket.send(Message::Binary(bytes.into())).await.is_err() {
            return;
        }
    }
}

/// A request as the relay serves it: [`BlobRequest`] with its blobs left in the message.
enum Request {
    Put {
        session: String,
        blobs: Vec<SharedBlob>,
        files: bool,
    },
    Get {
        session: String,
        ids: Vec<ContentId>,
    },
}

impl Request {
    /// Decodes `bytes` (one message) in place: its id and request.
    fn decode(bytes: &Bytes) -> Result<(u64, Request), blobs::BlobError> {
        let message = blobs::decode_ref(bytes)?;
        let shared = |blobs: Vec<blobs::BlobRef<'_>>| {
            blobs
                .into_iter()
                .map(|b| SharedBlob {
                    id: b.id,
                    bytes: bytes.slice_ref(b.bytes),
                })
                .collect()
        };
        let request = match message.request {
            BlobRequestRef::Put { session, blobs } => Request::Put {
                session,
                blobs: shared(blobs),
                files: false,
            },
            BlobRequestRef::PutFiles { session, blobs } => Request::Put {
                session,
                blobs: shared(blobs),
                files: true,
            },
            BlobRequestRef::Get { session, ids } => Request::Get { session, ids },
        };
        Ok((message.id, request))
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
    blobs: Vec<SharedBlob>,
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
    request: Request,
) -> Result<BlobAnswer, String> {
    let teleport = Arc::clone(&shared.teleport);
    match request {
        Request::Put {
            session,
            blobs,
            files,
        } => put(shared, identity, session, blobs, files).await,
        Request::Get { session, ids } => {
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
