//! The local replica of the sessions visible to this user, kept live by the relay over the
//! extension channel, so `session list` and `session show` answer offline (marked stale).
//!
//! Architecture invariant: this module is the only one that touches the `sessions` tree.
//! It is written only from what the relay sent or answered (by the bridge's reader and the
//! session handlers), never from a guess.

use cloud_protocol::session::Session;

use crate::store::StoreError;

/// The session replica.
#[derive(Debug, Clone)]
pub struct Replica {
    /// Session id → session.
    tree: sled::Tree,
}

impl Replica {
    /// Opens the tree.
    pub fn open(db: &sled::Db) -> Result<Replica, StoreError> {
        Ok(Replica {
            tree: db
                .open_tree("sessions")
                .map_err(StoreError::sled("sessions"))?,
        })
    }

    /// Replaces everything with the relay's full list, one write at a time: not a batch
    /// (see [`crate::store`]); a replica cut short by an exit is rewritten at the next
    /// connect.
    pub fn replace_all(&self, sessions: &[Session]) -> Result<(), StoreError> {
        for item in self.tree.iter() {
            let (key, _) = item.map_err(StoreError::sled("sessions"))?;
            if !sessions.iter().any(|s| s.id.as_bytes() == key.as_ref()) {
                self.tree
                    .remove(key)
                    .map_err(StoreError::sled("sessions"))?;
            }
        }
        for session in sessions {
            self.tree
                .insert(session.id.as_bytes(), encode(session)?)
                .map_err(StoreError::sled("sessions"))?;
        }
        Ok(())
    }

    /// Stores one created or changed session.
    pub fn upsert(&self, session: &Session) -> Result<(), StoreError> {
        self.tree
            .insert(session.id.as_bytes(), encode(session)?)
            .map_err(StoreError::sled("sessions"))?;
        Ok(())
    }

    /// Removes a session.
    pub fn remove(&self, id: &str) -> Result<(), StoreError> {
        self.tree.remove(id).map_err(StoreError::sled("sessions"))?;
        Ok(())
    }

    /// One session.
    pub fn get(&self, id: &str) -> Result<Option<Session>, StoreError> {
        self.tree
            .get(id)
            .map_err(StoreError::sled("sessions"))?
            .map(|bytes| decode(&bytes))
            .transpose()
    }

    /// Every session, most recently active first.
    pub fn list(&self) -> Result<Vec<Session>, StoreError> {
        let mut sessions = self
            .tree
            .iter()
            .map(|item| decode(&item.map_err(StoreError::sled("sessions"))?.1))
            .collect::<Result<Vec<_>, _>>()?;
        sessions.sort_by(|a, b| b.last_activity.cmp(&a.last_activity).then(a.id.cmp(&b.id)));
        Ok(sessions)
    }
}

fn encode(session: &Session) -> Result<Vec<u8>, StoreError> {
    postcard::to_allocvec(session).map_err(|e| StoreError::Corrupt {
        what: "sessions",
        message: e.to_string(),
    })
}

fn decode(bytes: &[u8]) -> Result<Session, StoreError> {
    postcard::from_bytes(bytes).map_err(|e| StoreError::Corrupt {
        what: "sessions",
        message: e.to_string(),
    })
}
