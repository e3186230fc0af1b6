//! Sending to the daemon: every message is queued on the socket (`feed`), stamped with
//! the connection's cumulative ack, and nothing reaches the daemon before the next
//! [`Connection::flush`], which the loop makes before it waits for anything. A page of
//! log entries is encoded back to back into one buffer, each entry borrowed (it encodes
//! exactly as a [`FromRelay::Log`], without copying it into a message first), and sent as
//! slices of it.
//!
//! A message that cannot be encoded is logged and skipped; nothing else is affected.

use axum::extract::ws::{Message, WebSocket};
use cloud_protocol::bridge::{self, BridgeError, Channel, Envelope, FromRelay, MAX_BRIDGE_MESSAGE};
use cloud_protocol::session::LogEntry;
use futures_util::SinkExt as _;
use serde::Serialize;

use super::{Connection, End, LogPage};

/// The body of a [`FromRelay::Log`], borrowed: it encodes exactly as one, without copying
/// the session id and the entry into a message first.
struct LogBody<'a> {
    session: &'a str,
    entry: &'a LogEntry,
}

/// [`FromRelay::Log`]'s variant index (checked against the protocol by a test).
const LOG_VARIANT: u32 = 7;

impl Serialize for LogBody<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStructVariant as _;
        let mut log = serializer.serialize_struct_variant("FromRelay", LOG_VARIANT, "Log", 2)?;
        log.serialize_field("session", self.session)?;
        log.serialize_field("entry", self.entry)?;
        log.end()
    }
}

/// About how many bytes a [`FromRelay::Log`] envelope of `entry` takes: its strings, and
/// room for the varints and lengths.
fn log_len(session: &str, entry: &LogEntry) -> usize {
    session.len() + entry.approx_len() + 16
}

/// Appends a [`FromRelay::Log`] envelope carrying `ack` to `bytes`; on an error `bytes` is
/// left as it was.
fn encode_log(
    ack: u64,
    session: &str,
    entry: &LogEntry,
    bytes: &mut Vec<u8>,
) -> Result<(), BridgeError> {
    let start = bytes.len();
    let envelope = Envelope {
        channel: Channel::Task,
        seq: 0,
        ack,
        body: LogBody { session, entry },
    };
    bytes.reserve(log_len(session, entry));
    let encoded = postcard::to_extend(&envelope, Appender(bytes)).map(drop);
    let len = bytes.len() - start;
    let error = match encoded {
        Ok(()) if len <= MAX_BRIDGE_MESSAGE => return Ok(()),
        Ok(()) => BridgeError::TooLarge { len },
        Err(e) => BridgeError::Malformed(e.to_string()),
    };
    bytes.truncate(start);
    Err(error)
}

/// Appends to a buffer it borrows (postcard's `to_extend` takes its writer by value).
struct Appender<'a>(&'a mut Vec<u8>);

impl Extend<u8> for Appender<'_> {
    fn extend<I: IntoIterator<Item = u8>>(&mut self, bytes: I) {
        self.0.extend(bytes);
    }
}

impl Connection {
    /// Queues one message stamped with the current ack. Nothing reaches the daemon before
    /// the next [`Connection::flush`] (which `serve` makes before it waits for anything).
    pub(super) async fn send(&self, socket: &mut WebSocket, body: FromRelay) -> Result<(), End> {
        self.send_acked(socket, self.ack, body).await
    }

    /// [`Connection::send`] with another ack (a registration's, held below a refusal).
    pub(super) async fn send_acked(
        &self,
        socket: &mut WebSocket,
        ack: u64,
        body: FromRelay,
    ) -> Result<(), End> {
        let channel = match &body {
            FromRelay::Ack
            | FromRelay::Log { .. }
            | FromRelay::EventRefused { .. }
            | FromRelay::JoinRefused { .. } => Channel::Task,
            _ => Channel::Extension,
        };
        let envelope = Envelope {
            channel,
            seq: 0,
            ack,
            body,
        };
        let bytes = match bridge::encode(&envelope) {
            Ok(bytes) => bytes,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode a bridge message; skipping it");
                return Ok(());
            }
        };
        socket
            .feed(Message::Binary(bytes.into()))
            .await
            .map_err(|e| End::Refused(format!("send failed: {e}")))
    }

    /// Queues a page of log entries, each as one message stamped with the current ack,
    /// encoded back to back into one buffer (each message is a slice of it).
    pub(super) async fn send_logs(&self, socket: &mut WebSocket, page: LogPage) -> Result<(), End> {
        let capacity = page
            .entries
            .iter()
            .map(|entry| log_len(&page.session, entry))
            .sum();
        let mut bytes = Vec::with_capacity(capacity);
        let mut messages = Vec::with_capacity(page.entries.len());
        for entry in page.entries.iter() {
            let start = bytes.len();
            match encode_log(self.ack, &page.session, entry, &mut bytes) {
                Ok(()) => messages.push(start..bytes.len()),
                Err(e) => {
                    tracing::error!(error = %e, "cannot encode a bridge message; skipping it");
                }
            }
        }
        let bytes = axum::body::Bytes::from(bytes);
        for message in messages {
            socket
                .feed(Message::Binary(bytes.slice(message)))
                .await
                .map_err(|e| End::Refused(format!("send failed: {e}")))?;
        }
        Ok(())
    }

    /// Writes every queued message to the socket.
    pub(super) async fn flush(&self, socket: &mut WebSocket) -> Result<(), End> {
        socket
            .flush()
            .await
            .map_err(|e| End::Refused(format!("send failed: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use cloud_protocol::session::{Author, SessionEvent, SessionStatus};

    use super::*;

    #[test]
    fn log_messages_encode_as_the_protocol_does() {
        let entries = [
            LogEntry {
                seq: 1,
                at: 1_700_000_000_000,
                author: Author::User("alice".to_owned()),
                event: SessionEvent::Message("{\"type\":\"user\"}".to_owned()),
            },
            LogEntry {
                seq: u64::MAX,
                at: 0,
                author: Author::Agent,
                event: SessionEvent::Message("x".repeat(70_000)),
            },
            LogEntry {
                seq: 300,
                at: 5,
                author: Author::Relay,
                event: SessionEvent::Status {
                    status: SessionStatus::Failed,
                    reason: Some("gone".to_owned()),
                },
            },
        ];
        for entry in entries {
            for ack in [0, 1, 127, 128, 1 << 40, u64::MAX] {
                let expected = bridge::encode(&Envelope {
                    channel: Channel::Task,
                    seq: 0,
                    ack,
                    body: FromRelay::Log {
                        session: "s-0123456789abcdef".to_owned(),
                        entry: entry.clone(),
                    },
                })
                .unwrap();
                let mut bytes = b"earlier messages".to_vec();
                let start = bytes.len();
                bytes.reserve_exact(log_len("s-0123456789abcdef", &entry));
                let capacity = bytes.capacity();
                encode_log(ack, "s-0123456789abcdef", &entry, &mut bytes).unwrap();
                assert_eq!(&bytes[start..], expected.as_slice());
                // The room reserved was enough: the buffer was never grown.
                assert_eq!(bytes.capacity(), capacity);
            }
        }
    }
}
