//! Journaled events: consecutive events are handed to the core as one batch (at most
//! [`MAX_EVENT_BATCH`]), so they share one flush; the reply's cumulative ack is stamped on
//! every envelope sent afterwards.
//!
//! The connection does not wait for a batch's reply before reading on: while the core
//! flushes a round, the next batches (at most [`MAX_BATCHES_IN_FLIGHT`] in all) wait for
//! its next round, which takes them together. Outcomes are reported in the order of their
//! batches, each as its refusals (`EventRefused`) and then a plain `Ack`, and before the
//! log entries and session notices of the round that answered them (the core answers and
//! publishes a round in one step), as when the connection waited for each reply.
//!
//! A refusal is reported before any envelope whose ack covers it is read: after its
//! batch, and again for a resend of it while the core stores it.

use std::collections::VecDeque;

use axum::extract::ws::WebSocket;
use cloud_protocol::bridge::{Envelope, FromRelay, Outbound, ToRelay};
use futures_util::FutureExt as _;
use tokio::sync::oneshot;

use super::{Connection, End};
use crate::core::{Command, CoreError, EventsOutcome};

/// The most journaled events handed to the core at once.
const MAX_EVENT_BATCH: usize = 1024;

/// The most batches of events handed to the core and not yet answered. While the core
/// flushes one round, the next batches are read and queued for its next round, which then
/// takes them all with one flush.
pub(super) const MAX_BATCHES_IN_FLIGHT: usize = 4;

/// The outcome of the oldest batch of events in flight (which stays in `in_flight`: the
/// caller removes it). The core dropping the reply means it is shutting down, or that its
/// store failed: nothing more is acknowledged either way.
pub(super) async fn next_outcome(
    in_flight: &mut VecDeque<oneshot::Receiver<EventsOutcome>>,
) -> Result<EventsOutcome, End> {
    match in_flight.front_mut() {
        Some(outcome) => outcome
            .await
            .map_err(|_| End::Refused(CoreError::ShuttingDown.to_string())),
        None => std::future::pending().await,
    }
}

impl Connection {
    /// Handles `first` and every further message already received, grouping consecutive
    /// journaled events into one core batch.
    pub(super) async fn handle_ready(
        &mut self,
        socket: &mut WebSocket,
        first: Option<Envelope<ToRelay>>,
    ) -> Result<(), End> {
        let mut events = std::mem::take(&mut self.spare_events);
        let mut next = first;
        loop {
            match next.take() {
                Some(Envelope {
                    seq,
                    body: ToRelay::Event(event),
                    ..
                }) => events.push((seq, event)),
                Some(envelope) => {
                    self.apply_events(socket, std::mem::take(&mut events))
                        .await?;
                    self.handle(socket, envelope).await?;
                }
                None => {}
            }
            if events.len() >= MAX_EVENT_BATCH {
                break;
            }
            // Only what has already arrived: never wait here.
            match socket.recv().now_or_never() {
                Some(message) => next = self.decode(socket, message).await?,
                None => break,
            }
        }
        self.apply_events(socket, events).await
    }

    /// Hands a batch of events to the core without waiting for its outcome, which
    /// [`Connection::report`] reports once the core has flushed it (outcomes in the order
    /// of their batches). With [`MAX_BATCHES_IN_FLIGHT`] waiting, the oldest is reported
    /// first.
    async fn apply_events(
        &mut self,
        socket: &mut WebSocket,
        events: Vec<(u64, Outbound)>,
    ) -> Result<(), End> {
        if events.is_empty() {
            self.spare_events = events;
            return Ok(());
        }
        while self.in_flight.len() >= MAX_BATCHES_IN_FLIGHT {
            let outcome = next_outcome(&mut self.in_flight).await;
            self.in_flight.pop_front();
            self.report(socket, outcome?).await?;
        }
        let (reply, outcome) = oneshot::channel();
        let command = Command::Events {
            identity: self.identity.clone(),
            instance: self.instance.clone(),
            events,
            reply,
        };
        self.shared
            .core
            .send(command)
            .await
            .map_err(|_| End::Refused(CoreError::ShuttingDown.to_string()))?;
        self.in_flight.push_back(outcome);
        Ok(())
    }

    /// Reports the outcome of the oldest batch in flight: its refusals, then the ack that
    /// covers it.
    pub(super) async fn report(
        &mut self,
        socket: &mut WebSocket,
        outcome: EventsOutcome,
    ) -> Result<(), End> {
        self.spare_events = outcome.spare;
        self.ack = self.ack.max(outcome.ack);
        for (seq, reason) in outcome.refusals {
            self.send(socket, FromRelay::EventRefused { seq, reason })
                .await?;
        }
        // Always end with a plain ack: the daemon acknowledges only below a refused seq
        // when it reads a refusal, so the batch's full ack must come on its own.
        self.send(socket, FromRelay::Ack).await?;
        Ok(())
    }

    /// Reports, in order, the outcomes of the batches in flight that the core has given
    /// already. Called before anything a round published (log entries, session notices)
    /// is sent: the core answers a round's batches in the same step as it publishes the
    /// round, so their refusals and ack still go out first, as when the connection waited
    /// for each outcome.
    pub(super) async fn report_ready(&mut self, socket: &mut WebSocket) -> Result<(), End> {
        while let Some(outcome) = self.in_flight.front_mut() {
            let outcome = match outcome.try_recv() {
                Ok(outcome) => outcome,
                Err(oneshot::error::TryRecvError::Empty) => return Ok(()),
                Err(oneshot::error::TryRecvError::Closed) => {
                    return Err(End::Refused(CoreError::ShuttingDown.to_string()))
                }
            };
            self.in_flight.pop_front();
            self.report(socket, outcome).await?;
        }
        Ok(())
    }
}
