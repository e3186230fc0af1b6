//! This connection's daemon as a client of sessions ([`crate::presence`]): the daemon
//! reports the whole set of sessions its local clients (editors, `cloudctl attach`) are
//! attached to (`ToRelay::Attached`), and the connection holds a `daemon` presence for each
//! one the user may see (at most [`MAX_ATTACHED`]). Every wake-up with something from the
//! daemon beats them all; while it holds any, the connection pings the daemon every
//! heartbeat interval so an idle daemon's pongs keep them live, and a daemon that stops
//! answering (stopped, or its network gone) drops out of `session show` after three
//! intervals while the connection itself waits out its own silence limit. They all leave
//! when the connection ends.

use axum::extract::ws::{Message, WebSocket};
use cloud_protocol::bridge::MAX_ATTACHED;
use cloud_protocol::session::ClientKind;
use futures_util::SinkExt as _;

use super::{Connection, End};

impl Connection {
    /// Replaces the set of sessions the daemon is a client of.
    pub(super) fn attached(&mut self, sessions: Vec<String>) {
        let mut wanted: Vec<String> = sessions
            .into_iter()
            .filter(|session| self.shared.can_see(&self.identity, session))
            .take(MAX_ATTACHED)
            .collect();
        wanted.sort();
        wanted.dedup();
        self.presence
            .retain(|session, _| wanted.binary_search(session).is_ok());
        for session in wanted {
            if !self.presence.contains_key(&session) {
                let guard = self.shared.presence.join(
                    &session,
                    ClientKind::Daemon,
                    &self.identity.user,
                    &self.hostname,
                );
                self.presence.insert(session, guard);
            }
        }
    }

    /// The daemon was heard from.
    pub(super) fn beat_presence(&self) {
        for guard in self.presence.values() {
            guard.beat();
        }
    }

    /// Pings the daemon (its pong is a beat), while it is a client of any session.
    pub(super) async fn ping_presence(&self, socket: &mut WebSocket) -> Result<(), End> {
        if self.presence.is_empty() {
            return Ok(());
        }
        socket
            .feed(Message::Ping(Default::default()))
            .await
            .map_err(|e| End::Refused(format!("send failed: {e}")))
    }
}
