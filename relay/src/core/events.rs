//! User events as the core applies them: messages, permission answers and interrupts,
//! from a daemon's journal (deduplicated by journal seq per instance) or from REST.
//!
//! A journaled event at or below its instance's dedup seq is a resend: not applied again,
//! though a refusal of it is reported again. A refused event counts as applied; its reason
//! is kept (bounded, the instance's most recent [`MAX_STORED_REFUSALS`]) in the batch of
//! its dedup record, so a registration after a crash reports it again, and is logged in
//! its session as `not_delivered` ([`super::delivery`]). An event with an idempotency key
//! is looked up first ([`super::idempotency`]): a repeat is answered with the first one's
//! outcome and applied no further.
//!
//! Nothing here flushes or answers a caller: the round does both, after its flush.

use cloud_protocol::agent;
use cloud_protocol::bridge::Outbound;
use cloud_protocol::session::{Author, SessionEvent, SessionStatus};

use super::idempotency::{Keys, Lookup};
use super::{append, delivery, Core, CoreError, EventsOutcome, Registration, Round};
use crate::access::Identity;
use crate::store::{Changes, MAX_STORED_REFUSALS};

/// The most bytes of a refusal's reason kept for reporting it again. Reasons quote what
/// the daemon sent (a session id, a request id), so without a bound a daemon could make
/// the relay hold [`MAX_STORED_REFUSALS`] huge strings per instance.
const MAX_STORED_REASON: usize = 1024;

impl Core {
    /// What the relay holds of a registering instance's journal: its ack and its stored
    /// refusals, in journal order.
    pub(super) fn registration(&self, instance: &str) -> Registration {
        Registration {
            ack: self.dedup.get(instance).copied().unwrap_or(0),
            refusals: self
                .refusals
                .get(instance)
                .map(|stored| {
                    stored
                        .iter()
                        .map(|(&seq, reason)| (seq, reason.clone()))
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    /// Applies a batch of user events in order, skipping an instance's resends.
    pub(super) fn events(
        &mut self,
        identity: &Identity,
        instance: Option<&str>,
        mut events: Vec<(u64, Outbound)>,
        round: &mut Round,
    ) -> EventsOutcome {
        let mut results = Vec::with_capacity(events.len());
        let mut refusals = Vec::new();
        for (seq, event) in events.drain(..) {
            let journaled = instance.filter(|_| seq > 0);
            if let Some(instance) = journaled {
                if seq <= self.dedup.get(instance).copied().unwrap_or(0) {
                    // A resend: not applied again, but a refusal is reported again.
                    if let Some(reason) = self.refusals.get(instance).and_then(|r| r.get(&seq)) {
                        refusals.push((seq, reason.clone()));
                    }
                    continue;
                }
            }
            let mut changes = Changes::default();
            let result =
                self.keyed_event(identity, instance, journaled, &event, &mut changes, round);
            if let Some(instance) = journaled {
                // A refused event counts as applied too: resending it must not retry it.
                // Its record joins the batch that holds the event ([`Core::apply_pending`]).
                match self.dedup.get_mut(instance) {
                    Some(last) => *last = seq,
                    None => {
                        self.dedup.insert(instance.to_owned(), seq);
                    }
                }
                if !round.dedup.iter().any(|i| i == instance) {
                    round.dedup.push(instance.to_owned());
                }
            }
            if let (Some(_), Err(e)) = (instance, &result) {
                let reason = e.to_string();
                if let Some(instance) = journaled {
                    // In the event's writes, so in the batch of its dedup record: a
                    // registration after a crash reports it again.
                    self.store_refusal(instance, seq, &reason, &mut changes);
                }
                refusals.push((seq, reason));
            }
            if !changes.is_empty() {
                self.commit(changes, round);
            }
            results.push((seq, result));
        }
        let ack = instance
            .and_then(|instance| self.dedup.get(instance).copied())
            .unwrap_or(0);
        EventsOutcome {
            ack,
            results,
            refusals,
            spare: events,
        }
    }

    /// Applies an event unless its idempotency key says it is a repeat, in which case the
    /// first one's outcome is answered again and nothing is applied. A refused journaled
    /// event (not a repeat) is logged in its session as `not_delivered`.
    fn keyed_event(
        &mut self,
        identity: &Identity,
        instance: Option<&str>,
        journaled: Option<&str>,
        event: &Outbound,
        changes: &mut Changes,
        round: &mut Round,
    ) -> Result<u64, CoreError> {
        let scope = instance.unwrap_or(&identity.user);
        let result = match event.key().map(|key| (key, Keys::check_length(key))) {
            None => self.event(identity, event, changes, round),
            Some((_, Err(e))) => Err(e),
            Some((key, Ok(()))) => match self.keys.lookup(&self.store, scope, key, round.now()) {
                Ok(Lookup::Repeat(result)) => return result,
                Ok(Lookup::New { expired }) => {
                    let result = self.event(identity, event, changes, round);
                    let at = round.now();
                    self.keys.record(changes, scope, key, at, expired, &result);
                    result
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot read an idempotency key; refusing further changes");
                    self.broken = true;
                    return Err(CoreError::Store);
                }
            },
        };
        if let (Some(_), Err(e)) = (journaled, &result) {
            // Where every client of the session sees it; not for a session this user
            // cannot see, nor for one that does not exist.
            let session = event.session();
            if !matches!(e, CoreError::NotFound(_)) && self.sessions.contains_key(session) {
                let line = delivery::not_delivered(event, &e.to_string());
                self.append(session, Author::Relay, SessionEvent::Message(line), round);
            }
        }
        result
    }

    /// Remembers a refusal of a daemon instance's event, in memory and in `changes`,
    /// forgetting the oldest beyond [`MAX_STORED_REFUSALS`] in both.
    fn store_refusal(&mut self, instance: &str, seq: u64, reason: &str, changes: &mut Changes) {
        let stored = match self.refusals.get_mut(instance) {
            Some(stored) => stored,
            None => self.refusals.entry(instance.to_owned()).or_default(),
        };
        let reason = bounded_reason(reason);
        changes.put_refusal(instance, seq, &reason);
        stored.insert(seq, reason);
        while stored.len() > MAX_STORED_REFUSALS {
            let Some((oldest, _)) = stored.pop_first() else {
                break;
            };
            changes.remove_refusal(instance, oldest);
        }
    }

    /// Applies one user event; returns its log seq.
    fn event(
        &mut self,
        identity: &Identity,
        event: &Outbound,
        changes: &mut Changes,
        round: &mut Round,
    ) -> Result<u64, CoreError> {
        let author = Author::User(identity.user.clone());
        match event {
            Outbound::UserMessage { session, text, .. } => {
                let runtime = self.writable_mut(identity, session, "viewers cannot send")?;
                if runtime.session.status == SessionStatus::Completed {
                    return Err(CoreError::Conflict(format!(
                        "session {session} is completed; create a new session"
                    )));
                }
                let line = user_message(text);
                // Without an agent, the session's next agent gets it (it is unfinished).
                if let Some(agent) = &runtime.agent {
                    round.write(agent, &line);
                }
                let seq = append(runtime, author, SessionEvent::Message(line), round);
                runtime.unfinished.push(seq);
                Ok(seq)
            }
            Outbound::PermissionAnswer {
                session,
                request_id,
                decision,
                ..
            } => self.answer_prompt(identity, session, request_id, decision, changes, round),
            Outbound::Interrupt { session, .. } => {
                let runtime = self.writable_mut(identity, session, "viewers cannot interrupt")?;
                // A paused agent (stopped, see `providers`) runs no turn to interrupt.
                let running = runtime.session.status != SessionStatus::Paused;
                let Some(agent) = runtime.agent.as_ref().filter(|_| running) else {
                    return Err(CoreError::Conflict(format!(
                        "session {session} is {}: there is nothing to interrupt",
                        runtime.session.status.as_str()
                    )));
                };
                let request_id = format!("interrupt-{}", runtime.session.last_seq + 1);
                let line = agent::interrupt_request(&request_id);
                round.write(agent, &line);
                Ok(append(runtime, author, SessionEvent::Message(line), round))
            }
        }
    }
}

/// The stream-json line of a user message: what [`agent::user_message`] writes, without
/// building a JSON tree first (the field order is serde_json's, which sorts keys).
fn user_message(text: &str) -> String {
    #[derive(serde::Serialize)]
    struct Line<'a> {
        message: Message<'a>,
        #[serde(rename = "type")]
        kind: &'static str,
    }
    #[derive(serde::Serialize)]
    struct Message<'a> {
        content: &'a str,
        role: &'static str,
    }
    serde_json::to_string(&Line {
        message: Message {
            content: text,
            role: "user",
        },
        kind: "user",
    })
    .expect("a user message always serialises")
}

/// `reason` if it fits [`MAX_STORED_REASON`], else its beginning and its end (where the
/// kind of refusal is said: `... was already answered`) around an ellipsis.
fn bounded_reason(reason: &str) -> String {
    if reason.len() <= MAX_STORED_REASON {
        return reason.to_owned();
    }
    let half = (MAX_STORED_REASON - " … ".len()) / 2;
    let mut head = half;
    while !reason.is_char_boundary(head) {
        head -= 1;
    }
    let mut tail = reason.len() - half;
    while !reason.is_char_boundary(tail) {
        tail += 1;
    }
    format!("{} … {}", &reason[..head], &reason[tail..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_reasons_are_bounded_and_keep_both_ends() {
        let short = "permission request r-1 was already answered";
        assert_eq!(bounded_reason(short), short);
        let exact = "x".repeat(MAX_STORED_REASON);
        assert_eq!(bounded_reason(&exact), exact);
        for filler in ["y", "é", "🦀"] {
            let long = format!(
                "permission request {} was already answered",
                filler.repeat(5000)
            );
            let bounded = bounded_reason(&long);
            assert!(bounded.len() <= MAX_STORED_REASON, "{}", bounded.len());
            assert!(bounded.len() > MAX_STORED_REASON - 8, "{}", bounded.len());
            assert!(bounded.starts_with("permission request "), "{bounded}");
            assert!(bounded.ends_with(" was already answered"), "{bounded}");
            assert!(bounded.contains(" … "), "{bounded}");
        }
    }

    #[test]
    fn user_message_lines_match_the_protocol() {
        for text in [
            "",
            "ls -la",
            "quotes \" and \\ backslashes",
            "new\nlines\r\tand controls \u{0} \u{1f}",
            "unicode é ✓ 🦀 \u{2028}",
        ] {
            assert_eq!(user_message(text), agent::user_message(text), "{text:?}");
        }
    }
}
