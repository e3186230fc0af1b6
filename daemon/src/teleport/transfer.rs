//! The blob socket's client: teleport's file contents go to and come from the relay on a
//! WebSocket of their own (`/v1/blobs`, the bridge's access token), never inside the bridge's
//! ordered task stream, so a large push never delays a message or a permission answer.
//!
//! Uploads are pipelined (up to [`IN_FLIGHT`] batches unanswered); downloads ask for up to
//! [`GET_IDS`] blobs at a time and ask again for any a reply left out.
//!
//! This module only moves bytes: it never reads or writes a worktree (its callers hand it
//! blobs read off the socket's thread) and never decides what to send.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use cloud_protocol::blobs::{
    self, Blob, BlobAnswer, BlobMessage, BlobReply, BlobRequest, PutWriter, BLOBS_PATH,
    MAX_BLOB_MESSAGE,
};
use cloud_protocol::teleport::ContentId;
use futures_util::{SinkExt as _, StreamExt as _};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

/// Upload batches sent and not yet answered, at most.
pub const IN_FLIGHT: usize = 4;
/// Blob ids asked for in one download request.
pub const GET_IDS: usize = 64;
/// How long any one step (connect, a reply) may take before the transfer fails.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// Blobs uploaded in one request: the put, encoded as its blobs were read into it
/// (`Put`, or `PutFiles` for whole files of a push about to be committed, which the relay
/// may stage for the commit).
#[derive(Debug)]
pub struct Batch {
    pub put: PutWriter,
    /// How many blobs and bytes of blobs it holds.
    pub blobs: u64,
    pub bytes: u64,
}

/// Where and how to reach the relay's blob socket (what the bridge connected with).
#[derive(Clone)]
pub struct BlobEndpoint {
    /// The relay's base URL (`ws://…` or `wss://…`, no path).
    pub base: String,
    /// The relay's base URL as the credentials name it.
    pub relay: String,
    /// The bridge's access tokens.
    pub keeper: Arc<crate::auth::Keeper>,
    /// The TLS configuration the bridge uses.
    pub tls: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for BlobEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobEndpoint")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

/// Why a transfer failed.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("cannot connect to the relay's blob socket at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("the relay's blob socket: {0}")]
    Socket(String),
    #[error("the relay refused blobs: {0}")]
    Refused(String),
    #[error("the relay does not have blob {0}")]
    Missing(ContentId),
    #[error("blob {0} does not match its id (its file changed after it was hashed)")]
    Mismatched(ContentId),
}

/// How long a blob socket waits out the relay's requests limit before giving up.
const RATE_LIMITED_PATIENCE: std::time::Duration = std::time::Duration::from_secs(60);

/// How opening one of the relay's sockets failed ([`BlobEndpoint::open`]).
#[derive(Debug)]
pub enum OpenError {
    /// No answer within the time allowed.
    TimedOut,
    /// The relay answered the upgrade with an HTTP error (a 401 only after the token was
    /// refreshed once): its status, headers and body.
    Refused(tokio_tungstenite::tungstenite::http::Response<Option<Vec<u8>>>),
    /// No access token, no connection, or a bad URL: why, in words.
    Failed(String),
}

/// A socket to the relay.
pub type RelaySocket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

impl BlobEndpoint {
    /// Opens the relay's WebSocket at `path` (under its base URL) with the bridge's access
    /// token, refreshed once when the relay refuses it (401), its messages at most
    /// `max_message` bytes, each attempt within `timeout`. The one way the daemon opens a
    /// relay socket beside the bridge (the blob socket, a session's shell).
    pub async fn open(
        &self,
        path: &str,
        max_message: usize,
        timeout: Duration,
    ) -> Result<RelaySocket, OpenError> {
        let url = format!("{}{path}", self.base.trim_end_matches('/'));
        let access = self
            .keeper
            .access(&self.relay, None)
            .await
            .map_err(|e| OpenError::Failed(format!("no access token: {e}")))?;
        match self
            .open_with(&url, &access.token, max_message, timeout)
            .await
        {
            Err(OpenError::Refused(response)) if response.status().as_u16() == 401 => {
                let access = self
                    .keeper
                    .access(&self.relay, Some(&access.token))
                    .await
                    .map_err(|e| OpenError::Failed(format!("no access token: {e}")))?;
                self.open_with(&url, &access.token, max_message, timeout)
                    .await
            }
            result => result,
        }
    }

    async fn open_with(
        &self,
        url: &str,
        token: &str,
        max_message: usize,
        timeout: Duration,
    ) -> Result<RelaySocket, OpenError> {
        let mut request = url
            .into_client_request()
            .map_err(|e| OpenError::Failed(format!("invalid relay URL: {e}")))?;
        let authorization = format!("Bearer {token}")
            .parse()
            .map_err(|_| OpenError::Failed("the token cannot be a header".into()))?;
        request.headers_mut().insert("authorization", authorization);
        let config = WebSocketConfig::default()
            .max_message_size(Some(max_message))
            .max_frame_size(Some(max_message));
        let connect = tokio_tungstenite::connect_async_tls_with_config(
            request,
            Some(config),
            true,
            Some(tokio_tungstenite::Connector::Rustls(Arc::clone(&self.tls))),
        );
        match tokio::time::timeout(timeout, connect).await {
            Err(_) => Err(OpenError::TimedOut),
            Ok(Err(tokio_tungstenite::tungstenite::Error::Http(response))) => {
                Err(OpenError::Refused(*response))
            }
            Ok(Err(e)) => Err(OpenError::Failed(e.to_string())),
            Ok(Ok((socket, _))) => Ok(socket),
        }
    }
}

type Socket = RelaySocket;

/// One connection to the blob socket.
#[derive(Debug)]
pub struct BlobSocket {
    socket: Socket,
    next_id: u64,
}

impl BlobSocket {
    /// Connects with the bridge's credentials ([`BlobEndpoint::open`]: a refused access
    /// token is refreshed once); an upgrade over the relay's requests limit is tried again
    /// after its `Retry-After`, for up to [`RATE_LIMITED_PATIENCE`] in all.
    pub async fn connect(endpoint: &BlobEndpoint) -> Result<BlobSocket, TransferError> {
        let started = tokio::time::Instant::now();
        loop {
            let reason = match endpoint
                .open(BLOBS_PATH, MAX_BLOB_MESSAGE, STEP_TIMEOUT)
                .await
            {
                Ok(socket) => return Ok(BlobSocket { socket, next_id: 1 }),
                Err(OpenError::Refused(response)) if response.status().as_u16() == 429 => {
                    let delay = crate::bridge::retry_after(response.headers());
                    if started.elapsed() + delay <= RATE_LIMITED_PATIENCE {
                        tracing::info!(
                            delay_ms = delay.as_millis() as u64,
                            "the relay rate-limits the blob socket; trying again after its Retry-After"
                        );
                        tokio::time::sleep(delay).await;
                        continue;
                    }
                    format!(
                        "rate limited by the relay (retry in {} s); try again then",
                        delay.as_secs().max(1)
                    )
                }
                Err(OpenError::Refused(response)) if response.status().as_u16() == 401 => {
                    "the relay refused a fresh access token; run `cloudctl login` again".into()
                }
                Err(OpenError::Refused(response)) => {
                    format!("HTTP error: {}", response.status())
                }
                Err(OpenError::TimedOut) => "timed out".into(),
                Err(OpenError::Failed(reason)) => reason,
            };
            return Err(TransferError::Connect {
                url: format!("{}{BLOBS_PATH}", endpoint.base.trim_end_matches('/')),
                reason,
            });
        }
    }

    async fn send(&mut self, request: BlobRequest) -> Result<u64, TransferError> {
        let id = self.next_id;
        self.next_id += 1;
        let bytes = blobs::encode(&BlobMessage { id, request })
            .map_err(|e| TransferError::Socket(e.to_string()))?;
        self.send_bytes(bytes.into()).await?;
        Ok(id)
    }

    /// Sends a put its reader encoded already (no copy here: the id goes in the room the
    /// writer left for it).
    async fn send_put(&mut self, put: PutWriter) -> Result<u64, TransferError> {
        let id = self.next_id;
        self.next_id += 1;
        let (bytes, start) = put
            .finish(id)
            .map_err(|e| TransferError::Socket(e.to_string()))?;
        self.send_bytes(tokio_tungstenite::tungstenite::Bytes::from(bytes).slice(start..))
            .await?;
        Ok(id)
    }

    async fn send_bytes(
        &mut self,
        bytes: tokio_tungstenite::tungstenite::Bytes,
    ) -> Result<(), TransferError> {
        tokio::time::timeout(STEP_TIMEOUT, self.socket.send(Message::Binary(bytes)))
            .await
            .map_err(|_| TransferError::Socket("sending timed out".into()))?
            .map_err(|e| TransferError::Socket(e.to_string()))
    }

    async fn receive(&mut self, id: u64) -> Result<BlobAnswer, TransferError> {
        loop {
            let message = tokio::time::timeout(STEP_TIMEOUT, self.socket.next())
                .await
                .map_err(|_| TransferError::Socket("no reply in time".into()))?;
            let bytes = match message {
                None => return Err(TransferError::Socket("closed by the relay".into())),
                Some(Err(e)) => return Err(TransferError::Socket(e.to_string())),
                Some(Ok(Message::Binary(bytes))) => bytes,
                Some(Ok(Message::Close(frame))) => {
                    return Err(TransferError::Socket(format!(
                        "closed by the relay: {}",
                        frame.map(|f| f.reason.to_string()).unwrap_or_default()
                    )))
                }
                Some(Ok(_)) => continue,
            };
            // A reply of blobs (a pull) is megabytes: decoded on the bulk pool.
            let reply: BlobReply =
                cloud_tree::bulk::sized(bytes.len(), move || blobs::decode(&bytes))
                    .await
                    .map_err(|e| TransferError::Socket(e.to_string()))?
                    .map_err(|e| TransferError::Socket(e.to_string()))?;
            if reply.id != id {
                return Err(TransferError::Socket(format!(
                    "reply {} while waiting for {id}",
                    reply.id
                )));
            }
            return reply.result.map_err(TransferError::Refused);
        }
    }

    /// Uploads every batch `batches` yields (each at most [`blobs::BATCH_BYTES`] or so),
    /// keeping up to [`IN_FLIGHT`] unanswered; `uploaded` is told each batch's blob count
    /// and bytes once the relay stored it. A blob whose bytes do not match its id (read
    /// from a file that changed after the scan; the relay checks, the caller does not) is
    /// [`TransferError::Mismatched`].
    pub async fn put_all(
        &mut self,
        mut batches: tokio::sync::mpsc::Receiver<Batch>,
        mut uploaded: impl FnMut(u64, u64),
    ) -> Result<(), TransferError> {
        let mut waiting: VecDeque<(u64, u64, u64)> = VecDeque::new();
        loop {
            while waiting.len() >= IN_FLIGHT {
                let (id, n, bytes) = waiting.pop_front().expect("waiting is not empty");
                stored(self.receive(id).await?)?;
                uploaded(n, bytes);
            }
            let Some(Batch {
                put,
                blobs: n,
                bytes,
            }) = batches.recv().await
            else {
                break;
            };
            if n == 0 {
                continue;
            }
            let id = self.send_put(put).await?;
            waiting.push_back((id, n, bytes));
        }
        while let Some((id, n, bytes)) = waiting.pop_front() {
            stored(self.receive(id).await?)?;
            uploaded(n, bytes);
        }
        Ok(())
    }

    /// Downloads `ids` (every one must exist), in any order.
    pub async fn get_all(
        &mut self,
        session: &str,
        ids: &[ContentId],
    ) -> Result<Vec<Blob>, TransferError> {
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(GET_IDS) {
            let mut left: Vec<ContentId> = chunk.to_vec();
            while !left.is_empty() {
                let id = self
                    .send(BlobRequest::Get {
                        session: session.to_owned(),
                        ids: left.clone(),
                    })
                    .await?;
                let BlobAnswer::Blobs { blobs, missing } = self.receive(id).await? else {
                    return Err(TransferError::Socket("an answer that is not blobs".into()));
                };
                if let Some(missing) = missing.first() {
                    return Err(TransferError::Missing(*missing));
                }
                if blobs.is_empty() {
                    return Err(TransferError::Socket("an empty answer".into()));
                }
                for blob in blobs {
                    let Some(at) = left.iter().position(|id| *id == blob.id) else {
                        return Err(TransferError::Socket(format!(
                            "blob {} was not asked for",
                            blob.id
                        )));
                    };
                    if !blob.verify() {
                        return Err(TransferError::Socket(format!(
                            "blob {} does not match its id",
                            blob.id
                        )));
                    }
                    left.swap_remove(at);
                    out.push(blob);
                }
            }
        }
        Ok(out)
    }

    /// Closes the socket politely.
    pub async fn close(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), self.socket.close(None)).await;
    }
}

/// The relay's answer to a put: stored, or why not.
fn stored(answer: BlobAnswer) -> Result<(), TransferError> {
    match answer {
        BlobAnswer::Stored { .. } => Ok(()),
        BlobAnswer::Mismatched { id } => Err(TransferError::Mismatched(id)),
        BlobAnswer::Blobs { .. } => Err(TransferError::Socket(
            "an answer to a put that is not one".into(),
        )),
    }
}
