//! Which sessions local clients (editors, `cloudctl attach`) are attached to right now,
//! counted over every IPC connection: each attach holds an [`AttachGuard`] in its client's
//! state, so a detach or a closed connection releases it. The bridge reports the set to the
//! relay (`ToRelay::Attached`) when it changes and at every connect, and the relay counts
//! this daemon as a `daemon` client of each of those sessions (idle auto-stop spares them).
//!
//! Architecture invariant: holding and releasing never wait (a watch channel, notified only
//! when a session enters or leaves the set); nothing here talks to the network.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::watch;

/// Session → how many attachments hold it (never zero).
type Counts = BTreeMap<String, usize>;

/// The attached sessions and how many local attachments hold each.
#[derive(Debug)]
pub struct Attachments {
    counts: Arc<watch::Sender<Counts>>,
}

impl Default for Attachments {
    fn default() -> Attachments {
        Attachments {
            counts: Arc::new(watch::channel(Counts::new()).0),
        }
    }
}

impl Attachments {
    /// Counts one more attachment to `session` until the guard is dropped.
    pub fn hold(&self, session: &str) -> AttachGuard {
        self.counts.send_if_modified(|counts| {
            let count = counts.entry(session.to_owned()).or_insert(0);
            *count += 1;
            *count == 1
        });
        AttachGuard {
            counts: Arc::clone(&self.counts),
            session: session.to_owned(),
        }
    }

    /// Notified whenever a session enters or leaves the set.
    pub fn subscribe(&self) -> watch::Receiver<Counts> {
        self.counts.subscribe()
    }
}

/// The attached sessions, as the relay is told them.
pub fn sessions(counts: &watch::Receiver<Counts>) -> Vec<String> {
    counts.borrow().keys().cloned().collect()
}

/// One attachment of one client to one session.
#[derive(Debug)]
pub struct AttachGuard {
    counts: Arc<watch::Sender<Counts>>,
    session: String,
}

impl Drop for AttachGuard {
    fn drop(&mut self) {
        self.counts
            .send_if_modified(|counts| match counts.get_mut(&self.session) {
                Some(1) => {
                    counts.remove(&self.session);
                    true
                }
                Some(count) => {
                    *count -= 1;
                    false
                }
                None => false,
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_is_attached_while_any_guard_holds_it() {
        let attachments = Attachments::default();
        let mut changes = attachments.subscribe();
        let first = attachments.hold("s-1");
        assert!(changes.has_changed().unwrap());
        assert_eq!(sessions(&changes), ["s-1"]);
        changes.mark_unchanged();
        let second = attachments.hold("s-1");
        assert!(!changes.has_changed().unwrap(), "no change to the set");
        drop(first);
        assert!(!changes.has_changed().unwrap());
        assert_eq!(sessions(&changes), ["s-1"]);
        drop(second);
        assert!(changes.has_changed().unwrap());
        assert!(sessions(&changes).is_empty());
    }
}
