//! One client connection, from its uid check to its close.
//!
//! The first byte picks the encoding: `{` is newline-delimited JSON-RPC, `C` is JSON-RPC
//! framed by `Content-Length` headers (as LSP clients write it), anything else is binary
//! framing. Both JSON-RPC framings share one decoder and one encoder of messages; only the
//! boundaries differ. Requests are handled in order as they arrive; replies to a batch of
//! pipelined requests go out in one write. Notifications of subscribed topics are
//! interleaved between replies. The connection closes, after telling the client why with a
//! `closing` notification when it still can, on: end of input, lost framing, a protocol
//! version mismatch, a client that falls behind its notifications, a write that misses its
//! deadline, and the daemon's drain. A client cut off for being slow is named, with the
//! reason, in the daemon's log whether or not the `closing` reaches it. After a
//! `session/shell` reply the connection carries the shell's terminal frames instead
//! (`super::shell::pipe`) until the shell ends.

use std::future::Future as _;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use cloud_protocol::content_length::{self, HeaderError};
use cloud_protocol::frame::{self, FrameError};
use cloud_protocol::ipc::{
    ClientMessage, Closing, ErrorBody, ErrorCode, Notification, Request, Response, ServerMessage,
    TeleportProgress,
};
use cloud_protocol::{jsonrpc, JSON_FIRST_BYTE};
use interprocess::local_socket::tokio::Stream;
use interprocess::local_socket::traits::StreamCommon as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::broadcast::{self, error::RecvError};
use tracing::Instrument as _;

use super::client::{ClientState, Deferred, WRITE_DEADLINE};
use super::handler;
use crate::journal::{Unavailable, FLUSH_DEADLINE};
use crate::state::Shared;

/// How long a journaled event's reply waits for the journal's verdict: the journal gives
/// up on a flush after [`FLUSH_DEADLINE`] and refuses what it covers; this is only a
/// backstop.
pub const DURABLE_DEADLINE: Duration = FLUSH_DEADLINE.saturating_mul(2);

/// How long a refused client gets to send its first byte, so the refusal can be written in
/// its encoding.
const REFUSAL_READ_DEADLINE: Duration = Duration::from_secs(1);

/// The read buffer grows by this much when it is nearly full.
const READ_CHUNK: usize = 64 * 1024;

/// Notifications written in one batch at most, so replies are not starved.
const NOTIFICATION_BATCH: usize = 256;

/// The encoding a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    /// u32 length + postcard frames.
    Binary,
    /// Newline-delimited JSON-RPC 2.0.
    Json,
    /// JSON-RPC 2.0 framed by `Content-Length` headers.
    ContentLength,
}

impl Encoding {
    fn of_first_byte(byte: u8) -> Encoding {
        match byte {
            JSON_FIRST_BYTE => Encoding::Json,
            content_length::FIRST_BYTE => Encoding::ContentLength,
            _ => Encoding::Binary,
        }
    }
}

/// Serves one client until the connection closes.
pub async fn serve(stream: Stream, shared: Arc<Shared>, connection_id: u64) {
    let (peer_uid, peer_pid) = peer_credentials(&stream);
    let span = tracing::debug_span!("client", id = connection_id, pid = ?peer_pid);
    serve_peer(stream, shared, peer_uid, peer_pid)
        .instrument(span)
        .await;
}

/// Where a reply goes.
#[derive(Debug)]
enum ReplyTo {
    /// A binary request id.
    Binary(u64),
    /// A JSON-RPC id; `None` for a notification (no reply).
    Json(Option<serde_json::Value>),
}

/// One decoded message.
#[derive(Debug)]
enum Incoming {
    /// A request to handle.
    Request(ReplyTo, Request),
    /// A message that was not a valid request: reply with the error.
    Invalid(ReplyTo, ErrorBody),
}

async fn serve_peer(
    mut stream: Stream,
    shared: Arc<Shared>,
    peer_uid: Option<u32>,
    peer_pid: Option<u32>,
) {
    if peer_uid != Some(shared.uid) {
        let reason = match peer_uid {
            Some(uid) => format!("peer uid {uid} is not the daemon's uid {}", shared.uid),
            None => "the peer's uid cannot be determined".to_owned(),
        };
        tracing::warn!(peer_pid = ?peer_pid, "refused connection: {reason}");
        refuse(
            &mut stream,
            ErrorCode::PermissionDenied,
            format!("permission denied: {reason}"),
        )
        .await;
        return;
    }
    let Some(_slot) = shared.take_client_slot() else {
        tracing::warn!("refused connection: client limit reached");
        refuse(
            &mut stream,
            ErrorCode::Busy,
            "cloudd is serving as many clients as it allows (max_clients); try again".into(),
        )
        .await;
        return;
    };

    let mut buf = Vec::with_capacity(4096);
    let mut client = ClientState {
        pid: peer_pid,
        ..ClientState::default()
    };
    let mut encoding = None;
    let mut out = Vec::new();
    let mut batch = Vec::new();
    let mut answered = Vec::new();
    // Requests answered later (teleport push and pull), with their progress.
    let mut pending: Vec<(ReplyTo, Deferred)> = Vec::new();
    // Built once: a fresh `cancelled()` future per loop would register a waiter each time.
    let shutdown = shared.shutdown.clone().cancelled_owned();
    tokio::pin!(shutdown);
    loop {
        if let Some(encoding) = encoding {
            let used = decode(encoding, &buf, &mut client, &mut batch);
            buf.drain(..used);
            for incoming in batch.drain(..) {
                let (reply_to, result) = match incoming {
                    Incoming::Request(reply_to, request) => (
                        reply_to,
                        handler::handle(&shared, &mut client, request).await,
                    ),
                    Incoming::Invalid(reply_to, error) => (reply_to, Err(error)),
                };
                if let Some(deferred) = client.deferring.take() {
                    pending.push((reply_to, deferred));
                    client.deferred = pending.len();
                    continue;
                }
                answered.push((reply_to, result, std::mem::take(&mut client.replay)));
                // A shell takes the connection over: nothing after its request is one.
                if client.closing.is_some() || client.shell.is_some() {
                    break;
                }
            }
            // Replies to journaled requests are "queued": only true once on disk, so they
            // wait for the flush, and an event the journal could not write is refused.
            let journal_answered = client.needs_durable == 0
                || tokio::time::timeout(
                    DURABLE_DEADLINE,
                    shared.link.journal.wait_durable(client.needs_durable),
                )
                .await
                .is_ok();
            client.needs_durable = 0;
            let journal = &shared.link.journal;
            for (reply_to, result, replay) in answered.drain(..) {
                let result = match result {
                    Ok(Response::Queued { seq }) => match journal.refusal(seq) {
                        Some(why) => Err(journal_refusal(&why)),
                        None if journal_answered || *journal.durable().borrow() >= seq => {
                            Ok(Response::Queued { seq })
                        }
                        None => {
                            tracing::error!(
                                seq,
                                "the journal did not confirm an event within {DURABLE_DEADLINE:?}"
                            );
                            Err(not_confirmed(seq))
                        }
                    },
                    other => other,
                };
                push_reply(encoding, reply_to, result, &mut out, &mut client);
                for (session, entry) in replay {
                    push_notification(
                        encoding,
                        &Notification::SessionLog { session, entry },
                        &mut out,
                    );
                }
            }
            if client.closing.is_some() {
                push_closing(encoding, &client, &mut out);
            }
            if !out.is_empty() && !flush(&mut stream, &mut out, encoding, &mut client).await {
                return;
            }
            if let Some(shell) = client.shell.take() {
                super::shell::pipe(
                    stream,
                    std::mem::take(&mut buf),
                    shell,
                    shared.shutdown.clone(),
                )
                .await;
                return;
            }
            if let Some(closing) = &client.closing {
                tracing::debug!(reason = %closing.message, "closing connection");
                return;
            }
        }
        if buf.capacity() - buf.len() < READ_CHUNK / 4 {
            buf.reserve(READ_CHUNK);
        }
        tokio::select! {
            biased;
            received = recv(&mut client.state_feed) => {
                queue_notifications(encoding, received, &mut client, Feed::State, &mut out);
            }
            _ = &mut shutdown => {
                client.closing = Some(Closing { code: ErrorCode::ShuttingDown, message: "cloudd is shutting down".into() });
                push_closing(encoding.unwrap_or(Encoding::Binary), &client, &mut out);
            }
            read = stream.read_buf(&mut buf) => match read {
                Ok(0) => {
                    if !buf.is_empty() {
                        tracing::debug!(bytes = buf.len(), "client left in the middle of a message");
                    }
                    return;
                }
                Ok(_) => {
                    if encoding.is_none() {
                        encoding = Some(Encoding::of_first_byte(buf[0]));
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "read failed");
                    return;
                }
            },
            received = recv(&mut client.session_feed) => {
                queue_notifications(encoding, received, &mut client, Feed::Session, &mut out);
            }
            received = recv(&mut client.sessions_feed) => {
                queue_notifications(encoding, received, &mut client, Feed::Sessions, &mut out);
            }
            received = recv(&mut client.log_feed) => {
                queue_notifications(encoding, received, &mut client, Feed::Log, &mut out);
            }
            received = recv(&mut client.teleport_feed) => {
                queue_notifications(encoding, received, &mut client, Feed::Teleport, &mut out);
            }
            event = next_deferred(&mut pending), if !pending.is_empty() => {
                let encoding = encoding.unwrap_or(Encoding::Binary);
                match event {
                    DeferredEvent::Progress(progress) => push_notification(
                        encoding,
                        &Notification::TeleportProgress(progress),
                        &mut out,
                    ),
                    DeferredEvent::Answer(at, result) => {
                        let (reply_to, mut deferred) = pending.swap_remove(at);
                        client.deferred = pending.len();
                        while let Ok(progress) = deferred.progress.try_recv() {
                            push_notification(
                                encoding,
                                &Notification::TeleportProgress(progress),
                                &mut out,
                            );
                        }
                        push_reply(encoding, reply_to, *result, &mut out, &mut client);
                    }
                }
            }
        }
        if encoding.is_none() && !out.is_empty() {
            // A notification or the closing before the client's first byte: nothing to
            // say it in yet except binary, which is what a silent client will get.
            encoding = Some(Encoding::Binary);
        }
        if let (Some(encoding), false, true) = (encoding, out.is_empty(), client.closing.is_some())
        {
            // The closing is queued: write it and stop.
            flush(&mut stream, &mut out, encoding, &mut client).await;
            return;
        }
    }
}

/// Which feed a notification came from.
#[derive(Debug, Clone, Copy)]
enum Feed {
    State,
    Log,
    Sessions,
    Session,
    Teleport,
}

impl Feed {
    fn receiver(
        self,
        client: &mut ClientState,
    ) -> &mut Option<broadcast::Receiver<Arc<Notification>>> {
        match self {
            Feed::State => &mut client.state_feed,
            Feed::Log => &mut client.log_feed,
            Feed::Sessions => &mut client.sessions_feed,
            Feed::Session => &mut client.session_feed,
            Feed::Teleport => &mut client.teleport_feed,
        }
    }
}

/// What a request answered later has for its client.
enum DeferredEvent {
    /// A progress step.
    Progress(TeleportProgress),
    /// The answer of `pending[at]`.
    Answer(usize, Box<Result<Response, ErrorBody>>),
}

/// The next progress step or answer of the requests answered later.
async fn next_deferred(pending: &mut [(ReplyTo, Deferred)]) -> DeferredEvent {
    std::future::poll_fn(|cx| {
        for (at, (_, deferred)) in pending.iter_mut().enumerate() {
            if let Poll::Ready(Some(progress)) = deferred.progress.poll_recv(cx) {
                return Poll::Ready(DeferredEvent::Progress(progress));
            }
            if let Poll::Ready(answer) = Pin::new(&mut deferred.answer).poll(cx) {
                let answer = answer.unwrap_or_else(|_| {
                    Err(ErrorBody::new(
                        ErrorCode::Internal,
                        "the operation ended without an answer",
                    ))
                });
                return Poll::Ready(DeferredEvent::Answer(at, Box::new(answer)));
            }
        }
        Poll::Pending
    })
    .await
}

/// Waits for the next notification of a feed the client may not be subscribed to.
async fn recv(
    feed: &mut Option<broadcast::Receiver<Arc<Notification>>>,
) -> Result<Arc<Notification>, RecvError> {
    match feed {
        Some(receiver) => receiver.recv().await,
        None => std::future::pending().await,
    }
}

/// Queues a received notification and whatever else the feed already holds (up to a
/// batch), or the closing of a client that fell behind.
fn queue_notifications(
    encoding: Option<Encoding>,
    received: Result<Arc<Notification>, RecvError>,
    client: &mut ClientState,
    feed: Feed,
    out: &mut Vec<u8>,
) {
    let encoding = encoding.unwrap_or(Encoding::Binary);
    let mut next = Some(received);
    let mut n_queued = 0;
    while let Some(received) = next.take() {
        match received {
            Ok(notification) => {
                if wanted(client, &notification) {
                    push_notification(encoding, &notification, out);
                }
                n_queued += 1;
            }
            Err(RecvError::Lagged(n_missed)) => {
                let message = format!(
                    "disconnected: this client fell {n_missed} {feed:?} notifications behind; read notifications as they arrive"
                );
                tracing::warn!("slow subscriber: {message}");
                client.closing = Some(Closing {
                    code: ErrorCode::SlowConsumer,
                    message,
                });
                push_closing(encoding, client, out);
                return;
            }
            Err(RecvError::Closed) => {
                *feed.receiver(client) = None;
                return;
            }
        }
        if n_queued < NOTIFICATION_BATCH {
            next = feed
                .receiver(client)
                .as_mut()
                .and_then(|r| match r.try_recv() {
                    Ok(n) => Some(Ok(n)),
                    Err(broadcast::error::TryRecvError::Lagged(n)) => {
                        Some(Err(RecvError::Lagged(n)))
                    }
                    Err(_) => None,
                });
        }
    }
}

/// Session log entries go only to clients attached to that session, once each (a replay
/// and the live feed may overlap).
fn wanted(client: &mut ClientState, notification: &Notification) -> bool {
    let Notification::SessionLog { session, entry } = notification else {
        return true;
    };
    match client.attached.get_mut(session) {
        Some(last) if entry.seq > *last => {
            *last = entry.seq;
            true
        }
        _ => false,
    }
}

/// The error for an event the journal refused: it is not queued and never sent.
pub(super) fn journal_refusal(why: &Unavailable) -> ErrorBody {
    ErrorBody::new(ErrorCode::Internal, why.to_string())
}

/// The error for an event whose flush the journal did not confirm in time.
pub(super) fn not_confirmed(seq: u64) -> ErrorBody {
    ErrorBody::new(
        ErrorCode::Timeout,
        format!("the journal did not confirm event {seq} within {DURABLE_DEADLINE:?}; it is not known to be queued"),
    )
}

/// Appends the reply to a request.
fn push_reply(
    encoding: Encoding,
    reply_to: ReplyTo,
    result: Result<Response, ErrorBody>,
    out: &mut Vec<u8>,
    client: &mut ClientState,
) {
    match reply_to {
        ReplyTo::Binary(id) => {
            if let Err(e) = frame::encode(&ServerMessage::Reply { id, result }, out) {
                tracing::error!(error = %e, "cannot encode reply");
                client.closing = Some(Closing {
                    code: ErrorCode::Internal,
                    message: format!("internal error: {e}"),
                });
            }
        }
        ReplyTo::Json(Some(id)) => push_json(encoding, out, |out| {
            jsonrpc::encode_reply(&id, &result, out);
        }),
        ReplyTo::Json(None) => {}
    }
}

/// Decodes every complete message at the start of `buf` into `batch`. Returns how many
/// bytes were consumed. Stops early when the framing is lost (`client.closing` is then
/// set).
fn decode(
    encoding: Encoding,
    buf: &[u8],
    client: &mut ClientState,
    batch: &mut Vec<Incoming>,
) -> usize {
    let mut position = 0;
    while client.closing.is_none() {
        let rest = &buf[position..];
        match encoding {
            Encoding::Binary => match frame::decode::<ClientMessage>(rest) {
                Ok(None) => break,
                Ok(Some((message, used))) => {
                    position += used;
                    batch.push(Incoming::Request(
                        ReplyTo::Binary(message.id),
                        message.request,
                    ));
                }
                Err(e) => {
                    let code = match e {
                        FrameError::TooLarge { .. } => ErrorCode::MessageTooLarge,
                        FrameError::Malformed { .. } => ErrorCode::ParseError,
                    };
                    tracing::warn!("closing client: {e}");
                    client.closing = Some(Closing {
                        code,
                        message: e.to_string(),
                    });
                }
            },
            Encoding::Json => match jsonrpc::find_line(rest) {
                Ok(None) => break,
                Ok(Some(end)) => {
                    position += end + 1;
                    let line = rest[..end].trim_ascii();
                    if !line.is_empty() {
                        decode_json(line, batch);
                    }
                }
                Err(e) => {
                    tracing::warn!("closing client: {e}");
                    client.closing = Some(Closing {
                        code: ErrorCode::MessageTooLarge,
                        message: e.to_string(),
                    });
                }
            },
            Encoding::ContentLength => match content_length::find_message(rest) {
                Ok(None) => break,
                Ok(Some(body)) => {
                    position += body.end;
                    decode_json(&rest[body], batch);
                }
                Err(e) => {
                    let code = match e {
                        HeaderError::Malformed { .. } => ErrorCode::ParseError,
                        HeaderError::HeaderTooLong { .. } | HeaderError::TooLarge { .. } => {
                            ErrorCode::MessageTooLarge
                        }
                    };
                    tracing::warn!("closing client: {e}");
                    client.closing = Some(Closing {
                        code,
                        message: e.to_string(),
                    });
                }
            },
        }
    }
    position
}

/// Decodes one JSON-RPC message, whichever framing carried it, into `batch`.
fn decode_json(message: &[u8], batch: &mut Vec<Incoming>) {
    match jsonrpc::decode_request(message) {
        Ok(request) => batch.push(Incoming::Request(
            ReplyTo::Json(request.id),
            request.request,
        )),
        Err(error) => {
            tracing::debug!(error = %error.error.message, "bad JSON-RPC message");
            batch.push(Incoming::Invalid(ReplyTo::Json(error.id), error.error));
        }
    }
}

/// Appends one JSON-RPC message, written by `write` as a line, in the connection's
/// JSON-RPC framing.
fn push_json(encoding: Encoding, out: &mut Vec<u8>, write: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    write(out);
    if encoding == Encoding::ContentLength {
        content_length::frame_line(out, start);
    }
}

fn push_notification(encoding: Encoding, notification: &Notification, out: &mut Vec<u8>) {
    match encoding {
        Encoding::Binary => {
            if let Err(e) = frame::encode(&ServerMessage::Notify(notification.clone()), out) {
                tracing::error!(error = %e, "cannot encode notification");
            }
        }
        Encoding::Json | Encoding::ContentLength => push_json(encoding, out, |out| {
            jsonrpc::encode_notification(notification, out);
        }),
    }
}

fn push_closing(encoding: Encoding, client: &ClientState, out: &mut Vec<u8>) {
    if let Some(closing) = &client.closing {
        push_notification(encoding, &Notification::Closing(closing.clone()), out);
    }
}

/// Writes and clears `out`. Returns false when the connection is unusable: a write error,
/// or a client that read nothing for [`WRITE_DEADLINE`], which is then cut off with a
/// `closing` that says so (see [`cut_stalled`]).
async fn flush(
    stream: &mut Stream,
    out: &mut Vec<u8>,
    encoding: Encoding,
    client: &mut ClientState,
) -> bool {
    let mut written = 0;
    let result = write_within(stream, out, &mut written).await;
    match result {
        Ok(Ok(())) => {
            out.clear();
            true
        }
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "write failed");
            false
        }
        Err(_) => {
            cut_stalled(stream, out, written, encoding, client).await;
            false
        }
    }
}

/// Writes `bytes[*written..]`, counting what went out in `written`, within
/// [`WRITE_DEADLINE`] (the outer error is the deadline).
async fn write_within(
    stream: &mut Stream,
    bytes: &[u8],
    written: &mut usize,
) -> Result<std::io::Result<()>, tokio::time::error::Elapsed> {
    let mut writing = std::pin::pin!(async {
        while *written < bytes.len() {
            match stream.write(&bytes[*written..]).await {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => *written += n,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    });
    // Most writes complete at once; only a write that has to wait gets a deadline timer.
    match futures_util::poll!(&mut writing) {
        std::task::Poll::Ready(result) => Ok(result),
        std::task::Poll::Pending => tokio::time::timeout(WRITE_DEADLINE, writing).await,
    }
}

/// Cuts off a client that read nothing for [`WRITE_DEADLINE`] while `out` waited for it,
/// `written` bytes of it sent. The reason goes to the log at once; the client gets the
/// message it is in the middle of, then a `closing` with the same reason, if it reads
/// within another [`WRITE_DEADLINE`]. What it has not started on is dropped.
async fn cut_stalled(
    stream: &mut Stream,
    out: &mut Vec<u8>,
    written: usize,
    encoding: Encoding,
    client: &mut ClientState,
) {
    let end = message_end(encoding, out, written);
    let reason = format!(
        "disconnected: this client read nothing for {}s while cloudd had {} bytes for it; read replies and notifications as they arrive",
        WRITE_DEADLINE.as_secs(),
        out.len() - written
    );
    tracing::warn!("disconnecting stalled client: {reason}");
    // A closing already queued (a client that also fell behind its feeds) is the last
    // message: it stays if the client is already in it, else it is queued again.
    let closing_in_flight = client.closing.is_some() && end == out.len();
    out.truncate(end);
    if !closing_in_flight {
        client.closing.get_or_insert(Closing {
            code: ErrorCode::SlowConsumer,
            message: reason,
        });
        push_closing(encoding, client, out);
    }
    let mut rest = 0;
    match write_within(stream, &out[written..], &mut rest).await {
        Ok(Ok(())) => tracing::debug!("the stalled client read its closing"),
        _ => tracing::debug!("the stalled client did not read its closing either"),
    }
    out.clear();
}

/// Where the message that byte `written` of `out` falls in ends (`written` itself when it
/// is a boundary): `out` holds whole messages, one after the other.
fn message_end(encoding: Encoding, out: &[u8], written: usize) -> usize {
    match encoding {
        Encoding::Json => {
            if written == 0 || out[written - 1] == b'\n' {
                return written;
            }
            out[written..]
                .iter()
                .position(|&b| b == b'\n')
                .map_or(out.len(), |i| written + i + 1)
        }
        Encoding::Binary => {
            let mut end = 0;
            while end < written {
                match frame::frame_len(&out[end..]) {
                    Ok(Some(len)) => end += len,
                    // Only whole frames are ever queued.
                    _ => return out.len(),
                }
            }
            end
        }
        Encoding::ContentLength => {
            let mut end = 0;
            while end < written {
                match content_length::find_message(&out[end..]) {
                    Ok(Some(body)) => end += body.end,
                    // Only whole messages are ever queued (one over the size limit cannot
                    // be walked: all of it goes).
                    _ => return out.len(),
                }
            }
            end
        }
    }
}

/// Tells a refused client why, in its encoding if it speaks within a second, then closes.
async fn refuse(stream: &mut Stream, code: ErrorCode, message: String) {
    let mut first = [0u8; 1];
    let encoding = match tokio::time::timeout(REFUSAL_READ_DEADLINE, stream.read(&mut first)).await
    {
        Ok(Ok(1)) => Encoding::of_first_byte(first[0]),
        _ => Encoding::Binary,
    };
    let mut out = Vec::new();
    push_notification(
        encoding,
        &Notification::Closing(Closing { code, message }),
        &mut out,
    );
    let _ = tokio::time::timeout(REFUSAL_READ_DEADLINE, stream.write_all(&out)).await;
}

/// The peer's effective uid and pid, as far as the platform reports them.
fn peer_credentials(stream: &Stream) -> (Option<u32>, Option<u32>) {
    match stream.peer_creds() {
        Ok(creds) => {
            #[cfg(unix)]
            let uid = creds.euid();
            #[cfg(not(unix))]
            let uid = Some(crate::state::current_uid());
            (uid, creds.pid().map(|p| p as u32))
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read peer credentials");
            (None, None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_message_is_completed_and_nothing_after_it() {
        let mut json = Vec::new();
        for n in 0..3 {
            jsonrpc::encode_notification(
                &Notification::Closing(Closing {
                    code: ErrorCode::SlowConsumer,
                    message: format!("message {n}"),
                }),
                &mut json,
            );
        }
        let first = json.iter().position(|&b| b == b'\n').unwrap() + 1;
        assert_eq!(message_end(Encoding::Json, &json, 0), 0);
        assert_eq!(message_end(Encoding::Json, &json, 1), first);
        assert_eq!(message_end(Encoding::Json, &json, first), first);
        assert_eq!(
            message_end(Encoding::Json, &json, json.len() - 1),
            json.len()
        );

        let mut framed = Vec::new();
        for n in 0..3 {
            push_notification(
                Encoding::ContentLength,
                &Notification::Closing(Closing {
                    code: ErrorCode::SlowConsumer,
                    message: format!("message {n}"),
                }),
                &mut framed,
            );
        }
        let first = content_length::find_message(&framed).unwrap().unwrap().end;
        assert!(framed.starts_with(b"Content-Length: "));
        assert_eq!(message_end(Encoding::ContentLength, &framed, 0), 0);
        assert_eq!(message_end(Encoding::ContentLength, &framed, 3), first);
        assert_eq!(message_end(Encoding::ContentLength, &framed, first), first);
        assert_eq!(
            message_end(Encoding::ContentLength, &framed, first + 1),
            2 * first
        );

        let mut binary = Vec::new();
        for n in 0..3u64 {
            frame::encode(
                &ServerMessage::Reply {
                    id: n,
                    result: Ok(Response::Pong),
                },
                &mut binary,
            )
            .unwrap();
        }
        let first = frame::frame_len(&binary).unwrap().unwrap();
        assert_eq!(message_end(Encoding::Binary, &binary, 0), 0);
        assert_eq!(message_end(Encoding::Binary, &binary, 2), first);
        assert_eq!(message_end(Encoding::Binary, &binary, first), first);
        assert_eq!(message_end(Encoding::Binary, &binary, first + 1), 2 * first);
    }
}
