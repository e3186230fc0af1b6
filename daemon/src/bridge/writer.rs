//! What goes to the relay on a registered connection: first the journal's durable
//! entries the relay has not acknowledged, in seq order, one batch per turn of the serve
//! loop; then, as they come, the control messages: rejoins after registering, the
//! handlers' [`BridgeCommand`]s (joins, leaves, requests awaiting a reply) and heartbeats.
//!
//! Journal entries are encoded where the journal keeps them ([`EventBatch`]), into one
//! buffer per batch, without a copy of each first.
//!
//! Architecture invariant: a journal entry is sent only once durable and only in seq
//! order, after everything below it; nothing here waits on a handler or reads from the
//! socket, and every flush has the [`DEAD_AFTER`] deadline.

use cloud_protocol::bridge::{self, Channel, Envelope, Outbound, ToRelay, MAX_BRIDGE_MESSAGE};
use futures_util::SinkExt as _;
use tokio_tungstenite::tungstenite::{self, Message};

use super::{Bridge, Ended, InFlight, Socket, DEAD_AFTER};
use crate::link::BridgeCommand;

/// Journal entries sent per batch.
pub(super) const SEND_BATCH: usize = 512;
/// How long the bridge waits before reading the journal again after a failed read.
const JOURNAL_RETRY: std::time::Duration = std::time::Duration::from_millis(250);

impl Bridge {
    /// Queues (without flushing) one batch of the journal's durable entries after
    /// `sent_up_to`, below `durable_now`, and moves `sent_up_to` past what it queued. A
    /// failed journal read is logged and retried on the next turn, a little later.
    pub(super) async fn send_journal(
        &mut self,
        socket: &mut Socket,
        sent_up_to: &mut u64,
        durable_now: u64,
    ) -> Result<(), Ended> {
        if *sent_up_to >= durable_now {
            return Ok(());
        }
        let mut batch = EventBatch::default();
        let read = self
            .link
            .journal
            .for_each_after(*sent_up_to, SEND_BATCH, |seq, event| batch.push(seq, event));
        match read {
            Ok(()) => {
                if let Some(reason) = batch.failed {
                    return Err(Ended::Failed {
                        reason,
                        registered: false,
                    });
                }
                // Nothing left below `durable_now` (a skip ahead, or seqs the journal
                // refused and will never hold): catch up, or the serve loop would spin.
                if batch.messages.is_empty() {
                    *sent_up_to = durable_now;
                }
                let bytes = tungstenite::Bytes::from(batch.bytes);
                if let Some(&(last, _)) = batch.messages.last() {
                    // Sent before (a reconnect, a slow-down): a retry.
                    let n_retried = batch
                        .messages
                        .iter()
                        .filter(|(seq, _)| *seq <= self.highest_sent)
                        .count();
                    self.link.metrics.retried(n_retried as u64);
                    self.highest_sent = self.highest_sent.max(last);
                }
                for (seq, message) in batch.messages {
                    let message = Message::Binary(bytes.slice(message));
                    if let Err(e) = socket.feed(message).await {
                        return Err(Ended::Failed {
                            reason: format!("sending to the relay failed: {e}"),
                            registered: false,
                        });
                    }
                    *sent_up_to = seq;
                }
            }
            Err(e) => {
                // Not in a tight loop: the next attempt waits a little.
                tracing::error!("cannot read the journal: {e}");
                tokio::time::sleep(JOURNAL_RETRY).await;
            }
        }
        Ok(())
    }

    /// Carries out a handler's command on the connection. A request is remembered in
    /// `in_flight` under a fresh id until the reader sees its reply.
    pub(super) async fn command(
        &mut self,
        socket: &mut Socket,
        command: BridgeCommand,
        in_flight: &mut InFlight,
    ) -> Result<(), Ended> {
        match command {
            BridgeCommand::Reconnect => {
                self.link.begin_epoch();
                Err(Ended::Reconnect)
            }
            BridgeCommand::Join { session } => {
                let after = self.link.inbound.last_seq(&session).unwrap_or(0);
                send(socket, Channel::Task, 0, ToRelay::Join { session, after }).await
            }
            BridgeCommand::Leave { session } => {
                send(socket, Channel::Task, 0, ToRelay::Leave { session }).await
            }
            BridgeCommand::Request { request, reply } => {
                let id = in_flight.next_id();
                in_flight.sessions.insert(id, reply);
                send(
                    socket,
                    Channel::Extension,
                    0,
                    ToRelay::Request { id, request },
                )
                .await
            }
            BridgeCommand::Teleport { request, reply } => {
                let id = in_flight.next_id();
                in_flight.teleport.insert(id, reply);
                send(socket, Channel::Task, 0, ToRelay::Teleport { id, request }).await
            }
            BridgeCommand::Settings { write, reply } => {
                let id = in_flight.next_id();
                in_flight.settings.insert(id, reply);
                send(
                    socket,
                    Channel::Extension,
                    0,
                    ToRelay::Settings { id, write },
                )
                .await
            }
        }
    }
}

/// Rejoins every followed session after the last seq stored for it (right after
/// registering, before anything else is sent).
pub(super) async fn rejoin(socket: &mut Socket, followed: Vec<(String, u64)>) -> Result<(), Ended> {
    for (session, after) in followed {
        send(socket, Channel::Task, 0, ToRelay::Join { session, after }).await?;
    }
    Ok(())
}

/// Sends one message and flushes.
pub(super) async fn send(
    socket: &mut Socket,
    channel: Channel,
    seq: u64,
    body: ToRelay,
) -> Result<(), Ended> {
    send_buffered(socket, channel, seq, body).await?;
    flush(socket).await
}

/// Flushes what was queued, within [`DEAD_AFTER`].
pub(super) async fn flush(socket: &mut Socket) -> Result<(), Ended> {
    match tokio::time::timeout(DEAD_AFTER, socket.flush()).await {
        Ok(result) => result.map_err(|e| Ended::Failed {
            reason: format!("sending to the relay failed: {e}"),
            registered: false,
        }),
        Err(_) => Err(Ended::Failed {
            reason: format!("the relay took no data for {DEAD_AFTER:?}"),
            registered: false,
        }),
    }
}

/// Queues a message without flushing (the caller flushes a batch once).
async fn send_buffered(
    socket: &mut Socket,
    channel: Channel,
    seq: u64,
    body: ToRelay,
) -> Result<(), Ended> {
    let bytes = bridge::encode(&Envelope {
        channel,
        seq,
        ack: 0,
        body,
    })
    .map_err(|e| Ended::Failed {
        reason: format!("cannot encode a bridge message: {e}"),
        registered: false,
    })?;
    let failed = |e: tungstenite::Error| Ended::Failed {
        reason: format!("sending to the relay failed: {e}"),
        registered: false,
    };
    let bytes = tungstenite::Bytes::from(bytes);
    if bytes.len() <= FRAGMENT {
        return socket.feed(Message::Binary(bytes)).await.map_err(failed);
    }
    for frame in fragments(bytes) {
        socket.feed(Message::Frame(frame)).await.map_err(failed)?;
    }
    Ok(())
}

/// The largest frame the bridge sends: a longer message (a whole tree's teleport commit,
/// about 1.7 MB for 20,000 files) goes as several frames of one message. tungstenite
/// writes a frame whole into its send buffer, which keeps the largest frame's size for
/// the connection's life.
const FRAGMENT: usize = 64 * 1024;

/// `message` as a binary message's frames of at most [`FRAGMENT`] bytes (slices of it,
/// not copies); the relay's WebSocket puts them back together.
fn fragments(
    message: tungstenite::Bytes,
) -> impl Iterator<Item = tungstenite::protocol::frame::Frame> {
    use tungstenite::protocol::frame::{
        coding::{Data, OpCode},
        Frame,
    };
    let len = message.len();
    (0..len.div_ceil(FRAGMENT)).map(move |i| {
        let start = i * FRAGMENT;
        let end = (start + FRAGMENT).min(len);
        let opcode = OpCode::Data(if i == 0 { Data::Binary } else { Data::Continue });
        Frame::message(message.slice(start..end), opcode, end == len)
    })
}

/// The body of a [`ToRelay::Event`], borrowed: it encodes exactly as one, so journal
/// entries are encoded where the journal keeps them, without a copy of each first.
struct EventBody<'a>(&'a Outbound);

/// [`ToRelay::Event`]'s variant index (checked against the protocol by a test).
const EVENT_VARIANT: u32 = 5;

impl serde::Serialize for EventBody<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_newtype_variant("ToRelay", EVENT_VARIANT, "Event", self.0)
    }
}

/// Journal entries encoded as bridge messages back to back in one buffer (one allocation
/// for the batch; each message is a slice of it).
#[derive(Debug, Default)]
struct EventBatch {
    /// The encoded messages.
    bytes: Vec<u8>,
    /// Each message's seq and place in `bytes`, in order.
    messages: Vec<(u64, std::ops::Range<usize>)>,
    /// Why an entry could not be encoded (the batch is then not sent).
    failed: Option<String>,
}

impl EventBatch {
    /// Appends entry `seq` as a [`ToRelay::Event`] envelope.
    fn push(&mut self, seq: u64, event: &Outbound) {
        if self.failed.is_some() {
            return;
        }
        let start = self.bytes.len();
        let envelope = Envelope {
            channel: Channel::Task,
            seq,
            ack: 0,
            body: EventBody(event),
        };
        match postcard::to_extend(&envelope, std::mem::take(&mut self.bytes)) {
            Ok(bytes) if bytes.len() - start <= MAX_BRIDGE_MESSAGE => {
                self.bytes = bytes;
                self.messages.push((seq, start..self.bytes.len()));
            }
            Ok(bytes) => {
                self.failed = Some(format!(
                    "cannot encode a bridge message: {}",
                    bridge::BridgeError::TooLarge {
                        len: bytes.len() - start
                    }
                ));
            }
            Err(e) => self.failed = Some(format!("cannot encode a bridge message: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_entries_encode_as_the_protocol_does() {
        let events = [
            Outbound::UserMessage {
                session: "s-0123456789abcdef".into(),
                text: "x".repeat(70_000),
                key: Some("k-1".into()),
            },
            Outbound::Interrupt {
                session: "s-1".into(),
                key: None,
            },
            Outbound::PermissionAnswer {
                session: "s-2".into(),
                request_id: "r-1".into(),
                decision: cloud_protocol::bridge::PermissionDecision::Deny {
                    message: "no".into(),
                },
                key: Some("k".repeat(128)),
            },
        ];
        let mut batch = EventBatch::default();
        let seqs = [1, 127, u64::MAX];
        for (seq, event) in seqs.iter().zip(&events) {
            batch.push(*seq, event);
        }
        assert!(batch.failed.is_none());
        assert_eq!(batch.messages.len(), 3);
        for ((seq, range), event) in batch.messages.iter().zip(&events) {
            let expected = bridge::encode(&Envelope {
                channel: Channel::Task,
                seq: *seq,
                ack: 0,
                body: ToRelay::Event(event.clone()),
            })
            .unwrap();
            assert_eq!(&batch.bytes[range.clone()], expected.as_slice());
        }
    }

    #[tokio::test]
    async fn a_long_message_goes_as_frames_the_other_end_puts_back_together() {
        use futures_util::StreamExt as _;
        use tokio_tungstenite::tungstenite::protocol::Role;
        use tokio_tungstenite::WebSocketStream;

        let (a, b) = tokio::io::duplex(16 * 1024);
        let mut client = WebSocketStream::from_raw_socket(a, Role::Client, None).await;
        let mut server = WebSocketStream::from_raw_socket(b, Role::Server, None).await;
        let message: Vec<u8> = (0..3 * FRAGMENT + 17)
            .map(|i| (i * 7 % 251) as u8)
            .collect();

        let frames: Vec<_> = fragments(message.clone().into()).collect();
        assert_eq!(frames.len(), 4);
        assert!(frames.iter().all(|f| f.payload().len() <= FRAGMENT));
        assert_eq!(
            frames
                .iter()
                .map(|f| f.header().is_final)
                .collect::<Vec<_>>(),
            [false, false, false, true]
        );
        let send = async {
            for frame in frames {
                client.feed(Message::Frame(frame)).await.unwrap();
            }
            client
                .feed(Message::Binary(vec![1, 2, 3].into()))
                .await
                .unwrap();
            client.flush().await.unwrap();
        };
        let receive = async {
            let first = server.next().await.unwrap().unwrap();
            let second = server.next().await.unwrap().unwrap();
            (first, second)
        };
        let ((), (first, second)) = tokio::join!(send, receive);
        assert_eq!(first, Message::Binary(message.into()));
        assert_eq!(second, Message::Binary(vec![1, 2, 3].into()));
    }

    #[test]
    fn a_message_of_exactly_one_fragment_is_one_final_frame() {
        let frames: Vec<_> = fragments(vec![0u8; FRAGMENT].into()).collect();
        assert_eq!(frames.len(), 1);
        assert!(frames[0].header().is_final);
    }
}
