//! What the relay sends on a registered connection, dispatched: acks (trim the journal,
//! release waiters), refusals of journaled events, session logs (stored, then published to
//! attached clients), replica updates, the settings copy, refusals to follow a session,
//! replies to requests in flight, instance commands (answered at once), and slow-downs
//! (the journal pauses; a refused request is answered "rate limited"). A burst of
//! messages already
//! arrived is handled in one go, then its session log entries are written together.
//!
//! A message over 64 KiB (a pull's tree) is decoded on the bulk pool
//! (`cloud_tree::bulk::sized`) while the bridge waits for it, so the order holds.
//!
//! Architecture invariant: a refusal reaches its waiters before the ack that covers it,
//! and an ack never moves the journal's ack backwards. A malformed or oversized message
//! ends the connection; nothing the relay sends is trusted to be well formed.

use std::sync::Arc;
use std::time::Duration;

use cloud_protocol::bridge::{self, Channel, Envelope, FromRelay, ToRelay};
use cloud_protocol::ipc::Notification;
use futures_util::FutureExt as _;
use futures_util::StreamExt as _;
use tokio_tungstenite::tungstenite::{self, Message};

use super::writer::send;
use super::{Bridge, Ended, InFlight, Socket};

/// At most this many messages from the relay are handled in one go before the bridge
/// writes their session log entries and looks at its other work.
const READ_BURST: usize = 256;

impl Bridge {
    /// Handles `message` and whatever else has already arrived (up to [`READ_BURST`]), then
    /// writes the burst's session log entries in one go. Returns how the connection ends,
    /// if it does.
    pub(super) async fn read_burst(
        &mut self,
        socket: &mut Socket,
        message: Option<Result<Message, tungstenite::Error>>,
        in_flight: &mut InFlight,
    ) -> Option<Ended> {
        let mut message = message;
        let mut burst = 1;
        let ended = loop {
            if let Some(ended) = self.incoming(socket, message, in_flight).await {
                break Some(ended);
            }
            if burst == READ_BURST {
                break None;
            }
            match socket.next().now_or_never() {
                Some(next) => message = next,
                None => break None,
            }
            burst += 1;
        };
        if let Err(e) = self.link.inbound.commit() {
            tracing::error!("cannot store session log entries: {e}");
        }
        ended
    }

    /// Handles one read from the relay's socket. Returns how the connection ends, if it does.
    async fn incoming(
        &mut self,
        socket: &mut Socket,
        message: Option<Result<Message, tungstenite::Error>>,
        in_flight: &mut InFlight,
    ) -> Option<Ended> {
        match message {
            None => Some(Ended::Failed {
                reason: "the relay closed the connection".into(),
                registered: true,
            }),
            Some(Err(e)) => Some(Ended::Failed {
                reason: format!("reading from the relay failed: {e}"),
                registered: true,
            }),
            // A pull's tree is megabytes: decoded on the bulk pool, while the bridge waits
            // (its messages stay in order) and the runtime serves the daemon's clients.
            Some(Ok(Message::Binary(bytes))) => {
                let decoded = cloud_tree::bulk::sized(bytes.len(), move || {
                    bridge::decode::<FromRelay>(&bytes)
                })
                .await;
                match decoded {
                    Ok(Ok(envelope)) => self.receive(socket, envelope, in_flight).await,
                    Ok(Err(e)) => {
                        tracing::warn!("closing the bridge: the relay sent a {e}");
                        Some(Ended::Failed {
                            reason: format!("the relay sent a {e}"),
                            registered: true,
                        })
                    }
                    Err(e) => Some(Ended::Failed {
                        reason: format!("decoding a message from the relay failed: {e}"),
                        registered: true,
                    }),
                }
            }
            Some(Ok(Message::Close(_))) => Some(Ended::Failed {
                reason: "the relay closed the connection".into(),
                registered: true,
            }),
            Some(Ok(_)) => None,
        }
    }

    /// Handles one message from the relay. Returns how the connection ends, if it does.
    async fn receive(
        &mut self,
        socket: &mut Socket,
        envelope: Envelope<FromRelay>,
        in_flight: &mut InFlight,
    ) -> Option<Ended> {
        let link = &self.link;
        let ack = covered_ack(&envelope.body, envelope.ack);
        match envelope.body {
            FromRelay::Ack | FromRelay::Registered { .. } => {}
            FromRelay::Refused { reason, permanent } => {
                return Some(if permanent {
                    Ended::Refused(reason)
                } else {
                    Ended::Failed {
                        reason,
                        registered: true,
                    }
                });
            }
            FromRelay::Sessions(sessions) => {
                if let Err(e) = link.replica.replace_all(&sessions) {
                    tracing::error!("cannot store the session replica: {e}");
                }
                // One notice per session, unless there are so many that subscribers would be
                // cut off for lagging: then they get the relay status and re-list.
                if sessions.len() <= crate::link::SESSIONS_FEED_CAPACITY / 2 {
                    for session in sessions {
                        let _ = link
                            .sessions_feed
                            .send(Arc::new(Notification::SessionChanged(session)));
                    }
                } else {
                    let _ = link
                        .sessions_feed
                        .send(Arc::new(Notification::Relay(link.status())));
                }
            }
            FromRelay::SessionChanged(session) => {
                if let Err(e) = link.replica.upsert(&session) {
                    tracing::error!("cannot store the session replica: {e}");
                }
                let _ = link
                    .sessions_feed
                    .send(Arc::new(Notification::SessionChanged(session)));
            }
            FromRelay::SessionRemoved { session } => {
                // Deleted or no longer visible: nothing more will come for it.
                if let Err(e) = link
                    .replica
                    .remove(&session)
                    .and_then(|()| link.inbound.forget(&session))
                {
                    tracing::error!("cannot store the session replica: {e}");
                }
                let _ = link
                    .sessions_feed
                    .send(Arc::new(Notification::SessionRemoved { session }));
            }
            FromRelay::Log { session, entry } => {
                // A copy for attached clients only when there are any: usually nobody watches.
                let notice = (link.session_feed.receiver_count() > 0).then(|| entry.clone());
                match link.inbound.store(&session, entry) {
                    Ok(true) => {
                        if let Some(entry) = notice {
                            let _ = link
                                .session_feed
                                .send(Arc::new(Notification::SessionLog { session, entry }));
                        }
                    }
                    Ok(false) => {}
                    Err(e) => tracing::error!("cannot store a session log entry: {e}"),
                }
            }
            FromRelay::EventRefused { seq, reason } => {
                // The relay re-reports its recent refusals at every registration: one already
                // known, or one for an event long acknowledged, is recorded quietly.
                let settled = seq <= link.journal.acked();
                let session = link
                    .journal
                    .read_after(seq.saturating_sub(1), 1)
                    .ok()
                    .and_then(|entries| entries.into_iter().find(|(s, _)| *s == seq))
                    .map(|(_, event)| event.session().to_owned())
                    .unwrap_or_default();
                if link.refuse(seq, reason.clone()) && !settled {
                    tracing::warn!(seq, session = %session, "the relay refused a journaled event: {reason}");
                    link.report_refusal(seq, session, reason);
                } else {
                    tracing::debug!(seq, "the relay re-reported a refusal: {reason}");
                }
            }
            FromRelay::JoinRefused { session, reason } => {
                tracing::warn!(session = %session, "cannot follow session: {reason}");
                if let Err(e) = link.inbound.forget(&session) {
                    tracing::error!("cannot forget session {session}: {e}");
                }
            }
            FromRelay::Reply { id, result } => in_flight.sessions.answer(id, result),
            FromRelay::SlowDown {
                retry_after_ms,
                request,
            } => {
                let delay = Duration::from_millis(retry_after_ms).min(super::MAX_SLOW_DOWN);
                let until = link.metrics.slowed_down(delay);
                match request {
                    // The request was not carried out: its client is told to retry.
                    Some(id) => in_flight.sessions.answer(
                        id,
                        Err(format!(
                            "rate limited by the relay for {:.1} s; retry then",
                            delay.as_secs_f64()
                        )),
                    ),
                    None => {
                        tracing::info!(
                            delay_ms = retry_after_ms,
                            "the relay asks to slow down: pausing the journal"
                        );
                        self.paused_until = Some(tokio::time::Instant::now() + delay);
                        let reason = super::rate_limited_reason(until);
                        link.set_status(|s| s.reason = Some(reason));
                    }
                }
            }
            FromRelay::TeleportReply { id, result } => in_flight.teleport.answer(id, result),
            FromRelay::Settings(settings) => link.account.set_settings(settings),
            FromRelay::SettingsReply { id, result } => in_flight.settings.answer(id, result),
            FromRelay::Command { id, name } => {
                let result = match name.as_str() {
                    "ping" => Ok("pong".to_owned()),
                    "refresh" => Ok("refreshed".to_owned()),
                    other => Err(format!("unknown instance command {other:?}")),
                };
                if let Err(ended) = send(
                    socket,
                    Channel::Extension,
                    0,
                    ToRelay::CommandResult { id, result },
                )
                .await
                {
                    return Some(ended);
                }
            }
        }
        // The verdicts above come before the ack that covers them.
        link.acknowledge(ack);
        None
    }
}

/// How much of the journal an envelope acknowledges. A refusal's envelope carries its
/// whole batch's ack, which may cover later refusals still on their way: it acknowledges
/// only below the refused seq (the batch's plain `Ack` follows with the rest).
fn covered_ack(body: &FromRelay, ack: u64) -> u64 {
    match body {
        FromRelay::EventRefused { seq, .. } => ack.min(seq.saturating_sub(1)),
        _ => ack,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_acknowledges_only_below_itself() {
        let refused = |seq| FromRelay::EventRefused {
            seq,
            reason: "viewers cannot send".into(),
        };
        // A batch 1..=10 with 5 and 7 refused arrives as: refusal 5, refusal 7, ack 10.
        assert_eq!(covered_ack(&refused(5), 10), 4);
        assert_eq!(covered_ack(&refused(7), 10), 6);
        assert_eq!(covered_ack(&FromRelay::Ack, 10), 10);
    }
}
