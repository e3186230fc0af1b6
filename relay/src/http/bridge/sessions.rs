//! Sessions as a daemon sees them through its connection: its replica (every session
//! visible to the token's user, then each change: `SessionChanged`, or `SessionRemoved`
//! when one is deleted or stops being visible), joins and leaves (a follower task per
//! joined session, handing its log over a page at a time, see [`crate::follow`]), and
//! session requests (create, status actions, share, get), which become core commands (a
//! get answers with the session's connected clients too).

use std::sync::Arc;

use axum::extract::ws::WebSocket;
use cloud_protocol::bridge::{FromRelay, RelayRequest};

use super::{Connection, End, LogPage};
use crate::core::{Command, CoreError, Notice};
use crate::follow::Follower;

impl Connection {
    pub(super) async fn request(
        &self,
        request: RelayRequest,
    ) -> Result<Option<cloud_protocol::session::Session>, CoreError> {
        let identity = self.identity.clone();
        match request {
            RelayRequest::Create(request) => self
                .shared
                .call(|reply| Command::Create {
                    identity,
                    request,
                    reply,
                })
                .await?
                .map(Some),
            RelayRequest::Action { session, action } => {
                self.shared
                    .call(|reply| Command::Action {
                        identity,
                        session,
                        action,
                        reply,
                    })
                    .await?
            }
            RelayRequest::Share {
                session,
                visibility,
            } => self
                .shared
                .call(|reply| Command::Share {
                    identity,
                    session,
                    visibility,
                    reply,
                })
                .await?
                .map(Some),
            RelayRequest::Get { session } => {
                let (mut found, _) = self.shared.session_for(&identity, &session)?;
                found.clients = self.shared.presence.clients(&session);
                Ok(Some(found))
            }
        }
    }

    pub(super) async fn join(
        &mut self,
        socket: &mut WebSocket,
        session: String,
        after: u64,
    ) -> Result<(), End> {
        if let Some(previous) = self.follows.remove(&session) {
            previous.cancel();
        }
        let mut follower = match Follower::new(
            self.shared.clone(),
            self.identity.clone(),
            session.clone(),
            after,
        ) {
            Ok(follower) => follower,
            Err(e) => {
                return self
                    .send(
                        socket,
                        FromRelay::JoinRefused {
                            session,
                            reason: e.to_string(),
                        },
                    )
                    .await
            }
        };
        let stop = self.cancel.child_token();
        self.follows.insert(session, stop.clone());
        let outgoing = self.outgoing_sender.clone();
        let session: Arc<str> = follower.session().into();
        self.shared.connections.spawn(async move {
            loop {
                let entries = tokio::select! {
                    _ = stop.cancelled() => return,
                    entries = follower.next() => match entries {
                        Some(entries) => entries,
                        None => return,
                    },
                };
                let page = LogPage {
                    session: session.clone(),
                    entries,
                };
                tokio::select! {
                    _ = stop.cancelled() => return,
                    sent = outgoing.send(page) => if sent.is_err() { return },
                }
            }
        });
        Ok(())
    }

    /// Stops following a session.
    pub(super) fn leave(&mut self, session: &str) {
        if let Some(follow) = self.follows.remove(session) {
            follow.cancel();
        }
    }

    pub(super) async fn send_sessions(&mut self, socket: &mut WebSocket) -> Result<(), End> {
        let sessions = self.shared.list_for(&self.identity);
        self.known = sessions.iter().map(|s| s.id.clone()).collect();
        self.send(socket, FromRelay::Sessions(sessions)).await
    }

    pub(super) async fn notice(
        &mut self,
        socket: &mut WebSocket,
        notice: Notice,
    ) -> Result<(), End> {
        match notice {
            Notice::Changed(session) => {
                if self.identity.lists(&session) {
                    self.known.insert(session.id.clone());
                    self.send(socket, FromRelay::SessionChanged(*session)).await
                } else if self.known.remove(&session.id) {
                    self.send(
                        socket,
                        FromRelay::SessionRemoved {
                            session: session.id,
                        },
                    )
                    .await
                } else {
                    Ok(())
                }
            }
            Notice::Removed(id) => {
                if self.known.remove(&id) {
                    self.send(socket, FromRelay::SessionRemoved { session: id })
                        .await
                } else {
                    Ok(())
                }
            }
        }
    }
}
