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
//!
//! The events limit ([`crate::limits`]) is applied here, before the core sees an event:
//! an event over it is dropped (neither persisted nor acknowledged) and the daemon gets a
//! `SlowDown` with the time until its key's bucket is full again. Every later event is
//! dropped too until the daemon's resend reaches the first dropped one, so the core never
//! sees a gap (its dedup would take the gap's events for resends); resends of events
//! already handed over cost nothing. Nothing is lost: the daemon's journal holds every
//! event until it is acknowledged.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::ws::WebSocket;
use cloud_protocol::bridge::{Envelope, FromRelay, Outbound, ToRelay};
use futures_util::FutureExt as _;
use tokio::sync::oneshot;

use super::{Connection, End};
use crate::core::{Command, CoreError, EventsOutcome};

/// What becomes of a journaled event under the events limit.
enum Admit {
    /// To the core.
    Pass,
    /// Dropped: an earlier event was dropped and not resent yet.
    Drop,
    /// Dropped as the first over the limit: the daemon is asked to wait this long.
    SlowDown(Duration),
}

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
        let mut slow_down = None;
        loop {
            match next.take() {
                Some(Envelope {
                    seq,
                    body: ToRelay::Event(event),
                    ..
                }) => match self.admit(seq) {
                    Admit::Pass => events.push((seq, event)),
                    Admit::Drop => {}
                    Admit::SlowDown(delay) => slow_down = Some(delay),
                },
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
        self.apply_events(socket, events).await?;
        if let Some(delay) = slow_down {
            let retry_after_ms = super::millis_up(delay);
            tracing::debug!(user = %self.identity.user, retry_after_ms, "events over the limit: asking the daemon to slow down");
            self.send(
                socket,
                FromRelay::SlowDown {
                    retry_after_ms,
                    request: None,
                },
            )
            .await?;
        }
        Ok(())
    }

    /// Whether journaled event `seq` goes to the core (see the module docs).
    fn admit(&mut self, seq: u64) -> Admit {
        // A resend of what this connection handed over, or of what the core holds already
        // (its ack): deduplicated by the core, free here.
        if seq <= self.handed.max(self.ack) {
            return Admit::Pass;
        }
        let metrics = &self.shared.metrics;
        if self.dropping_from.is_some_and(|from| seq > from) {
            metrics.events_rate_limited.fetch_add(1, Ordering::Relaxed);
            return Admit::Drop;
        }
        match self.shared.limits.events.take(&self.identity.key_hash) {
            Ok(()) => {
                self.handed = seq;
                self.dropping_from = None;
                metrics.events_accepted.fetch_add(1, Ordering::Relaxed);
                Admit::Pass
            }
            Err(limited) => {
                self.dropping_from = Some(seq);
                metrics.events_rate_limited.fetch_add(1, Ordering::Relaxed);
                Admit::SlowDown(limited.full)
            }
        }
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
        self.shared
            .metrics
            .events_refused
            .fetch_add(outcome.refusals.len() as u64, Ordering::Relaxed);
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
