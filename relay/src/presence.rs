//! Client presence: who is connected to each session right now, of what kind, and when
//! each was last heard from.
//!
//! A client joins with [`Presence::join`] and is counted until its [`PresenceGuard`] is
//! dropped; it stays *live* while it is heard from at least once every
//! [`Presence::silent_after`] (three heartbeat intervals). A client that goes silent is no
//! longer listed nor counted, even while its connection is still open, and counts again at
//! its next beat. Kinds and who beats them:
//!
//! - `daemon`: a bridge connection, for each session its daemon reports local clients
//!   (editors, `cloudctl attach`) attached to (`ToRelay::Attached`); the connection beats
//!   its guards whenever anything arrives, and pings the daemon every heartbeat interval
//!   while it holds any, so an idle daemon's pongs keep it live.
//! - `viewer`: a viewer's WebSocket (`GET /v1/sessions/{id}/subscribe`), pinged every
//!   heartbeat interval, beaten by anything it sends (pongs included), and closed once it
//!   has been silent for three intervals.
//! - `terminal`: a terminal into the workspace. The terminal's API is the same:
//!
//! ```text
//! let guard = shared.presence.join(&session, ClientKind::Terminal, &identity.user, label);
//! let mut ping = tokio::time::interval(shared.presence.heartbeat());
//! loop {
//!     tokio::select! {
//!         _ = ping.tick() => { /* send a WebSocket ping; end when silent too long */ }
//!         message = socket.recv() => { guard.beat(); /* ... */ }
//!     }
//! }
//! // dropping `guard` leaves
//! ```
//!
//! A join wakes the idle watcher (`idle`), which resumes a session it paused for
//! idleness as soon as a client is live again; every beat and leave moves the session's
//! last client time ([`Presence::last_seen`]), which the idle rule counts as activity.
//!
//! Times are tokio's, so tests run on a paused clock; wall-clock times (for
//! `session show`) are derived from them when a listing is made. This module owns the
//! registry only: it never talks to a client, a socket or the core.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cloud_protocol::session::{ClientKind, SessionClient};
use tokio::sync::Notify;
use tokio::time::Instant;

/// How often clients are expected to be heard from, normally.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(10);

/// How many heartbeat intervals a client may miss before it no longer counts.
pub const MISSED_HEARTBEATS: u32 = 3;

/// The unit of `auto_stop_minutes`, normally a minute.
pub const DEFAULT_AUTO_STOP_UNIT: Duration = Duration::from_secs(60);

/// The most characters of a client's label that are kept.
const MAX_LABEL: usize = 100;

/// The relay's presence and idle timing (`cloud-relay serve --heartbeat ... --auto-stop-unit
/// ...`; only tests shorten them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PresenceConfig {
    /// How often clients are pinged, and are expected to be heard from.
    pub heartbeat: Duration,
    /// How long one of a session's `auto_stop_minutes` lasts.
    pub auto_stop_unit: Duration,
}

impl Default for PresenceConfig {
    fn default() -> PresenceConfig {
        PresenceConfig {
            heartbeat: DEFAULT_HEARTBEAT,
            auto_stop_unit: DEFAULT_AUTO_STOP_UNIT,
        }
    }
}

/// One connected client.
#[derive(Debug)]
struct Entry {
    kind: ClientKind,
    user: String,
    label: String,
    joined: Instant,
    last_beat: Instant,
}

#[derive(Debug, Default)]
struct Registry {
    /// The next client id.
    next_id: u64,
    /// Session → its clients by id.
    clients: HashMap<String, HashMap<u64, Entry>>,
    /// Session → when a client of it was last heard from or left.
    last_seen: HashMap<String, Instant>,
}

/// Every session's connected clients.
#[derive(Debug)]
pub struct Presence {
    config: PresenceConfig,
    registry: Mutex<Registry>,
    /// Woken by every join, for the idle watcher.
    joined: Notify,
}

impl Presence {
    /// An empty registry with this timing.
    pub fn new(config: PresenceConfig) -> Presence {
        Presence {
            config,
            registry: Mutex::default(),
            joined: Notify::new(),
        }
    }

    /// The timing.
    pub fn config(&self) -> PresenceConfig {
        self.config
    }

    /// How often a client is pinged and expected to be heard from.
    pub fn heartbeat(&self) -> Duration {
        self.config.heartbeat
    }

    /// How long a client may be silent and still count: [`MISSED_HEARTBEATS`] intervals.
    pub fn silent_after(&self) -> Duration {
        self.config.heartbeat * MISSED_HEARTBEATS
    }

    /// Counts a client of `session` until the guard is dropped; it is live now.
    pub fn join(
        self: &Arc<Self>,
        session: &str,
        kind: ClientKind,
        user: &str,
        label: &str,
    ) -> PresenceGuard {
        let now = Instant::now();
        let id = {
            let mut registry = self.registry.lock().unwrap();
            registry.next_id += 1;
            let id = registry.next_id;
            registry
                .clients
                .entry(session.to_owned())
                .or_default()
                .insert(
                    id,
                    Entry {
                        kind,
                        user: user.to_owned(),
                        label: label.chars().take(MAX_LABEL).collect(),
                        joined: now,
                        last_beat: now,
                    },
                );
            registry.last_seen.insert(session.to_owned(), now);
            id
        };
        tracing::debug!(session, kind = kind.as_str(), user, "client joined");
        self.joined.notify_one();
        PresenceGuard {
            presence: Arc::clone(self),
            session: session.to_owned(),
            id,
        }
    }

    /// Waits for the next join (one wake-up may stand for several).
    pub async fn joined(&self) {
        self.joined.notified().await;
    }

    /// The session's live clients, oldest first, with wall-clock times.
    pub fn clients(&self, session: &str) -> Vec<SessionClient> {
        let now = Instant::now();
        let wall_now = crate::now_millis();
        let wall = |at: Instant| wall_now.saturating_sub(now.duration_since(at).as_millis() as u64);
        let registry = self.registry.lock().unwrap();
        let mut clients: Vec<(Instant, SessionClient)> = registry
            .clients
            .get(session)
            .into_iter()
            .flat_map(|clients| clients.values())
            .filter(|entry| self.is_live(entry.last_beat, now))
            .map(|entry| {
                (
                    entry.joined,
                    SessionClient {
                        kind: entry.kind,
                        user: entry.user.clone(),
                        label: entry.label.clone(),
                        connected_at: wall(entry.joined),
                        last_heartbeat: wall(entry.last_beat),
                    },
                )
            })
            .collect();
        clients.sort_by_key(|(joined, _)| *joined);
        clients.into_iter().map(|(_, client)| client).collect()
    }

    /// Whether the session has a live client at `now`.
    pub fn is_connected(&self, session: &str, now: Instant) -> bool {
        self.registry
            .lock()
            .unwrap()
            .clients
            .get(session)
            .is_some_and(|clients| clients.values().any(|e| self.is_live(e.last_beat, now)))
    }

    /// When a client of the session was last heard from or left, if one ever was.
    pub fn last_seen(&self, session: &str) -> Option<Instant> {
        self.registry
            .lock()
            .unwrap()
            .last_seen
            .get(session)
            .copied()
    }

    /// Forgets what is known of sessions that no longer exist.
    pub fn retain_sessions(&self, exists: impl Fn(&str) -> bool) {
        let mut registry = self.registry.lock().unwrap();
        registry.last_seen.retain(|session, _| exists(session));
    }

    fn is_live(&self, last_beat: Instant, now: Instant) -> bool {
        now.saturating_duration_since(last_beat) <= self.silent_after()
    }

    fn beat(&self, session: &str, id: u64) {
        let now = Instant::now();
        let mut registry = self.registry.lock().unwrap();
        let mut rejoined = false;
        if let Some(entry) = registry
            .clients
            .get_mut(session)
            .and_then(|c| c.get_mut(&id))
        {
            rejoined = !self.is_live(entry.last_beat, now);
            entry.last_beat = now;
        }
        registry.last_seen.insert(session.to_owned(), now);
        drop(registry);
        if rejoined {
            // A silent client heard from again is attaching anew.
            self.joined.notify_one();
        }
    }

    fn leave(&self, session: &str, id: u64) {
        let mut registry = self.registry.lock().unwrap();
        if let Some(clients) = registry.clients.get_mut(session) {
            clients.remove(&id);
            if clients.is_empty() {
                registry.clients.remove(session);
            }
        }
        registry
            .last_seen
            .insert(session.to_owned(), Instant::now());
    }
}

/// A counted client: [`PresenceGuard::beat`] whenever it is heard from; dropping the guard
/// leaves.
#[derive(Debug)]
pub struct PresenceGuard {
    presence: Arc<Presence>,
    session: String,
    id: u64,
}

impl PresenceGuard {
    /// The client was heard from just now.
    pub fn beat(&self) {
        self.presence.beat(&self.session, self.id);
    }

    /// The session it is a client of.
    pub fn session(&self) -> &str {
        &self.session
    }
}

impl Drop for PresenceGuard {
    fn drop(&mut self) {
        self.presence.leave(&self.session, self.id);
        tracing::debug!(session = %self.session, "client left");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn presence() -> Arc<Presence> {
        Arc::new(Presence::new(PresenceConfig {
            heartbeat: Duration::from_secs(10),
            auto_stop_unit: Duration::from_secs(60),
        }))
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_counts_until_it_misses_three_heartbeats_or_leaves() {
        let presence = presence();
        let viewer = presence.join("s-1", ClientKind::Viewer, "bob", "curl");
        assert!(presence.is_connected("s-1", Instant::now()));
        assert_eq!(presence.clients("s-1")[0].kind, ClientKind::Viewer);
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(
            presence.is_connected("s-1", Instant::now()),
            "3 intervals: still live"
        );
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(!presence.is_connected("s-1", Instant::now()));
        assert!(
            presence.clients("s-1").is_empty(),
            "a silent client is not listed"
        );
        viewer.beat();
        assert_eq!(
            presence.clients("s-1").len(),
            1,
            "heard from again: listed again"
        );
        let seen = presence.last_seen("s-1").unwrap();
        tokio::time::advance(Duration::from_secs(5)).await;
        drop(viewer);
        assert!(!presence.is_connected("s-1", Instant::now()));
        assert!(
            presence.last_seen("s-1").unwrap() > seen,
            "leaving moves last_seen"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn clients_are_listed_oldest_first_with_wall_clock_times() {
        let presence = presence();
        let _daemon = presence.join("s-1", ClientKind::Daemon, "alice", "laptop");
        tokio::time::advance(Duration::from_secs(1)).await;
        let _terminal = presence.join("s-1", ClientKind::Terminal, "alice", "tty");
        let _other = presence.join("s-2", ClientKind::Viewer, "bob", "");
        let clients = presence.clients("s-1");
        let kinds: Vec<_> = clients.iter().map(|c| c.kind).collect();
        assert_eq!(kinds, [ClientKind::Daemon, ClientKind::Terminal]);
        assert!(clients[0].connected_at <= clients[1].connected_at);
        let now = crate::now_millis();
        assert!(clients[1].last_heartbeat <= now && now - clients[1].last_heartbeat < 5_000);
    }
}
