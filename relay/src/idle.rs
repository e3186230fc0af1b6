//! Idle auto-stop: a running session with no live client ([`crate::presence`]) and no log
//! activity (an agent's output, a user's message, a status change) for its
//! `auto_stop_minutes` is paused by the relay, with the reason in its log; a session the
//! relay paused so is resumed as soon as a client is live again, with that reason too.
//!
//! [`IdleRule`] is the rule itself, on an injected clock: it is told what each session
//! looks like at an instant and answers what to do. [`spawn`] runs it: every heartbeat
//! interval (or auto-stop unit, if shorter) and at every join, it reads the published
//! sessions and the presence registry and sends the core a [`Command::Relay`] for each
//! decision, so a session is paused at most one check late. Activity is observed as a
//! change of the session's last log seq between checks, on tokio's clock.
//!
//! Only sessions this relay paused for idleness are resumed by a client: a session a user
//! paused stays paused. Which ones those are is kept in memory, so a restarted relay
//! resumes them only when asked (`session resume`). This module never touches an agent:
//! pausing and resuming are the core's.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use cloud_protocol::session::{SessionAction, SessionStatus};
use tokio::time::{Instant, MissedTickBehavior};

use crate::core::{Command, Shared};

/// What the rule needs to know of one session at one instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionView {
    /// Its id.
    pub id: String,
    /// Its status.
    pub status: SessionStatus,
    /// Its last log seq: a change since the last look is activity.
    pub last_seq: u64,
    /// Its idle limit in units (minutes), 0 never.
    pub auto_stop_minutes: u32,
    /// A live client, in words (`viewer of bob`), when it has any.
    pub client: Option<String>,
    /// When a client of it was last heard from or left.
    pub last_client: Option<Instant>,
}

/// What the relay should do to a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Pause it, logging `reason`.
    Pause {
        /// The session.
        session: String,
        /// Why, for its log.
        reason: String,
    },
    /// Resume it (the relay paused it for idleness), logging `reason`.
    Resume {
        /// The session.
        session: String,
        /// Why, for its log.
        reason: String,
    },
}

/// What the rule remembers of a session.
#[derive(Debug)]
struct Track {
    /// The last log seq seen.
    last_seq: u64,
    /// The last activity: a log change seen, a live client, or the first look.
    active_at: Instant,
}

/// The idle rule over every session, on an injected clock.
#[derive(Debug)]
pub struct IdleRule {
    /// How long one of `auto_stop_minutes` lasts.
    unit: Duration,
    tracks: HashMap<String, Track>,
    /// Sessions paused for idleness (and not resumed or changed since).
    paused: HashSet<String>,
}

impl IdleRule {
    /// A rule with no history, counting `auto_stop_minutes` in `unit`s.
    pub fn new(unit: Duration) -> IdleRule {
        IdleRule {
            unit,
            tracks: HashMap::new(),
            paused: HashSet::new(),
        }
    }

    /// Looks at every session as of `now` and says what to do. A pause decided here counts
    /// as done (see [`IdleRule::pause_failed`]).
    pub fn decide(&mut self, now: Instant, sessions: &[SessionView]) -> Vec<Decision> {
        let mut decisions = Vec::new();
        let present: HashSet<&str> = sessions.iter().map(|s| s.id.as_str()).collect();
        self.tracks.retain(|id, _| present.contains(id.as_str()));
        self.paused.retain(|id| present.contains(id.as_str()));
        for view in sessions {
            let track = self.tracks.entry(view.id.clone()).or_insert(Track {
                last_seq: view.last_seq,
                active_at: now,
            });
            if view.last_seq != track.last_seq {
                track.last_seq = view.last_seq;
                track.active_at = now;
            }
            if let Some(at) = view.last_client {
                track.active_at = track.active_at.max(at);
            }
            if view.client.is_some() {
                track.active_at = now;
            }
            match view.status {
                SessionStatus::Running => {
                    // Resumed by someone (or never paused here): a client no longer
                    // resumes it after a later pause of a user's.
                    self.paused.remove(&view.id);
                    let limit = self.unit * view.auto_stop_minutes;
                    if view.auto_stop_minutes > 0
                        && view.client.is_none()
                        && now.saturating_duration_since(track.active_at) >= limit
                    {
                        self.paused.insert(view.id.clone());
                        decisions.push(Decision::Pause {
                            session: view.id.clone(),
                            reason: pause_reason(view.auto_stop_minutes),
                        });
                    }
                }
                SessionStatus::Paused => {
                    if let Some(client) = &view.client {
                        if self.paused.remove(&view.id) {
                            decisions.push(Decision::Resume {
                                session: view.id.clone(),
                                reason: format!("a client attached ({client})"),
                            });
                        }
                    }
                }
                SessionStatus::Starting | SessionStatus::Completed | SessionStatus::Failed => {
                    self.paused.remove(&view.id);
                }
            }
        }
        decisions
    }

    /// The core refused a pause decided here: the session is not paused for idleness.
    pub fn pause_failed(&mut self, session: &str) {
        self.paused.remove(session);
    }
}

/// The log's reason for an idle pause.
fn pause_reason(minutes: u32) -> String {
    let unit = if minutes == 1 { "minute" } else { "minutes" };
    format!("idle for {minutes} {unit} with no client")
}

/// Runs the rule until the relay shuts down.
pub fn spawn(shared: Arc<Shared>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let config = shared.presence.config();
        let mut rule = IdleRule::new(config.auto_stop_unit);
        let mut check = tokio::time::interval(config.heartbeat.min(config.auto_stop_unit));
        check.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shared.cancel.cancelled() => return,
                _ = check.tick() => {}
                _ = shared.presence.joined() => {}
            }
            let views = views(&shared);
            for decision in rule.decide(Instant::now(), &views) {
                let (session, action, reason) = match decision {
                    Decision::Pause { session, reason } => (session, SessionAction::Pause, reason),
                    Decision::Resume { session, reason } => {
                        (session, SessionAction::Resume, reason)
                    }
                };
                tracing::info!(session = %session, ?action, %reason, "idle auto-stop");
                let result = shared
                    .call(|reply| Command::Relay {
                        session: session.clone(),
                        action,
                        reason,
                        reply,
                    })
                    .await;
                match result {
                    Ok(Ok(_)) => {}
                    Err(_) => return,
                    Ok(Err(e)) => {
                        tracing::info!(session = %session, error = %e, "idle auto-stop not applied");
                        if action == SessionAction::Pause {
                            rule.pause_failed(&session);
                        }
                    }
                }
            }
        }
    })
}

/// Every published session as the rule sees it now.
fn views(shared: &Shared) -> Vec<SessionView> {
    let now = Instant::now();
    let sessions = shared.sessions.read().unwrap();
    let views: Vec<SessionView> = sessions
        .values()
        .map(|published| {
            let session = &published.session;
            let client = shared
                .presence
                .is_connected(&session.id, now)
                .then(|| shared.presence.clients(&session.id))
                .and_then(|clients| clients.into_iter().next())
                .map(|c| format!("{} of {}", c.kind.as_str(), c.user));
            SessionView {
                id: session.id.clone(),
                status: session.status,
                last_seq: session.last_seq,
                auto_stop_minutes: session.auto_stop_minutes,
                client,
                last_client: shared.presence.last_seen(&session.id),
            }
        })
        .collect();
    drop(sessions);
    shared
        .presence
        .retain_sessions(|id| views.iter().any(|v| v.id == id));
    views
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    fn view(status: SessionStatus, last_seq: u64, minutes: u32) -> SessionView {
        SessionView {
            id: "s-1".into(),
            status,
            last_seq,
            auto_stop_minutes: minutes,
            client: None,
            last_client: None,
        }
    }

    fn pause() -> Vec<Decision> {
        vec![Decision::Pause {
            session: "s-1".into(),
            reason: "idle for 30 minutes with no client".into(),
        }]
    }

    #[test]
    fn a_session_with_no_client_and_no_activity_is_paused_after_its_limit() {
        let start = Instant::now();
        let mut rule = IdleRule::new(MINUTE);
        let running = view(SessionStatus::Running, 5, 30);
        assert!(rule
            .decide(start, std::slice::from_ref(&running))
            .is_empty());
        let almost = start + 30 * MINUTE - Duration::from_millis(1);
        assert!(rule
            .decide(almost, std::slice::from_ref(&running))
            .is_empty());
        assert_eq!(rule.decide(start + 30 * MINUTE, &[running]), pause());
    }

    #[test]
    fn log_activity_restarts_the_count() {
        let start = Instant::now();
        let mut rule = IdleRule::new(MINUTE);
        rule.decide(start, &[view(SessionStatus::Running, 5, 30)]);
        let later = start + 20 * MINUTE;
        assert!(rule
            .decide(later, &[view(SessionStatus::Running, 6, 30)])
            .is_empty());
        let running = view(SessionStatus::Running, 6, 30);
        assert!(rule
            .decide(start + 30 * MINUTE, std::slice::from_ref(&running))
            .is_empty());
        assert_eq!(rule.decide(later + 30 * MINUTE, &[running]), pause());
    }

    #[test]
    fn a_live_client_keeps_it_running_and_the_count_starts_when_it_left() {
        let start = Instant::now();
        let mut rule = IdleRule::new(MINUTE);
        let mut watched = view(SessionStatus::Running, 5, 30);
        watched.client = Some("viewer of bob".into());
        assert!(rule
            .decide(start, std::slice::from_ref(&watched))
            .is_empty());
        assert!(rule
            .decide(start + 60 * MINUTE, std::slice::from_ref(&watched))
            .is_empty());
        // The viewer left ten minutes later and nobody looked since.
        let left = start + 70 * MINUTE;
        let mut alone = view(SessionStatus::Running, 5, 30);
        alone.last_client = Some(left);
        assert!(rule
            .decide(left + 29 * MINUTE, std::slice::from_ref(&alone))
            .is_empty());
        assert_eq!(rule.decide(left + 30 * MINUTE, &[alone]), pause());
    }

    #[test]
    fn zero_minutes_is_never() {
        let start = Instant::now();
        let mut rule = IdleRule::new(MINUTE);
        rule.decide(start, &[view(SessionStatus::Running, 5, 0)]);
        let year = start + 365 * 24 * 60 * MINUTE;
        assert!(rule
            .decide(year, &[view(SessionStatus::Running, 5, 0)])
            .is_empty());
    }

    #[test]
    fn a_client_resumes_only_what_idleness_paused() {
        let start = Instant::now();
        let mut rule = IdleRule::new(MINUTE);
        rule.decide(start, &[view(SessionStatus::Running, 5, 1)]);
        assert_eq!(
            rule.decide(start + MINUTE, &[view(SessionStatus::Running, 5, 1)])
                .len(),
            1
        );
        // Paused (its status entry is activity); still nobody: stays paused.
        let paused = view(SessionStatus::Paused, 6, 1);
        assert!(rule
            .decide(start + 9 * MINUTE, std::slice::from_ref(&paused))
            .is_empty());
        let mut attached = paused;
        attached.client = Some("daemon of alice".into());
        assert_eq!(
            rule.decide(start + 10 * MINUTE, std::slice::from_ref(&attached)),
            vec![Decision::Resume {
                session: "s-1".into(),
                reason: "a client attached (daemon of alice)".into(),
            }]
        );
        // Once only: the core resumes it.
        assert!(rule
            .decide(start + 10 * MINUTE, std::slice::from_ref(&attached))
            .is_empty());
        // A user's pause is left alone: the resume above (seen as running) cleared the
        // mark, and a user paused it again.
        rule.decide(start + 11 * MINUTE, &[view(SessionStatus::Running, 7, 1)]);
        let mut user_paused = view(SessionStatus::Paused, 8, 1);
        user_paused.client = Some("viewer of bob".into());
        assert!(rule.decide(start + 11 * MINUTE, &[user_paused]).is_empty());
    }

    #[test]
    fn a_refused_pause_is_not_remembered() {
        let start = Instant::now();
        let mut rule = IdleRule::new(MINUTE);
        rule.decide(start, &[view(SessionStatus::Running, 5, 1)]);
        assert_eq!(
            rule.decide(start + MINUTE, &[view(SessionStatus::Running, 5, 1)])
                .len(),
            1
        );
        rule.pause_failed("s-1");
        let mut paused = view(SessionStatus::Paused, 6, 1);
        paused.client = Some("viewer of bob".into());
        assert!(rule.decide(start + 2 * MINUTE, &[paused]).is_empty());
    }
}
