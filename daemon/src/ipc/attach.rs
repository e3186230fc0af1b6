//! The attach family of requests: following a session and reading its log. `attach`
//! replays the stored log after `--since` (or the latest entries) and streams new entries
//! to this connection; `detach` stops the stream; `session/unfollow` forgets the stored log
//! and leaves the session on the relay; `permissions` lists the prompts of the log still
//! waiting for an answer. While a client is attached, the relay counts this daemon as a
//! client of the session ([`crate::sessions::attachments`]). A session read for the first time (or again after `unfollow`) is
//! followed, and the read waits (bounded) for the relay to fill the local copy up to what
//! it had, so a replay is complete; offline, the local copy is all there is.
//!
//! Architecture invariant: following never waits on the bridge (a `Join` or `Leave` is a
//! `try_send`; the bridge rejoins every followed session when it connects), every wait is
//! bounded, and only this connection waits. The log is read from
//! [`crate::sessions::inbound`], never from the network.

use std::time::Duration;

use cloud_protocol::bridge::RelayRequest;
use cloud_protocol::ipc::{ErrorBody, ErrorCode, Request, Response};
use cloud_protocol::session::Session;

use super::client::ClientState;
use super::relay::relay_request;
use super::{internal, not_found};
use crate::link::{BridgeCommand, Link};
use crate::sessions::prompts::pending_prompts;
use crate::state::Shared;

/// How many recent entries `attach` without `--since` replays.
const RECENT_ENTRIES: u64 = 50;

/// How long a read waits for the relay to send the part of a log the local copy lacks.
const CATCH_UP_DEADLINE: Duration = Duration::from_secs(10);

/// Answers a request of the attach family.
pub async fn handle(
    shared: &Shared,
    client: &mut ClientState,
    request: Request,
) -> Result<Response, ErrorBody> {
    let link = &shared.link;
    match request {
        Request::Attach { session, since } => {
            let known = visible_session(link, &session).await?;
            follow(link, &session)?;
            catch_up(link, &session, known.as_ref(), since.unwrap_or(0)).await?;
            let last_seq = link.inbound.last_seq(&session).map_err(internal)?;
            let after = since.unwrap_or(last_seq.saturating_sub(RECENT_ENTRIES));
            if client.session_feed.is_none() {
                client.session_feed = Some(link.session_feed.subscribe());
            }
            let replay = link.inbound.since(&session, after).map_err(internal)?;
            let delivered = replay.last().map(|e| e.seq).unwrap_or(after);
            client
                .replay
                .extend(replay.into_iter().map(|entry| (session.clone(), entry)));
            client
                .attach_guards
                .entry(session.clone())
                .or_insert_with(|| link.attachments.hold(&session));
            client.attached.insert(session.clone(), delivered);
            Ok(Response::Attached { session, last_seq })
        }
        Request::Unfollow { session } => {
            if link.inbound.is_followed(&session).map_err(internal)? {
                link.inbound.forget(&session).map_err(internal)?;
                // Never wait on the bridge: if its queue is full, the session is simply not
                // rejoined at the next connect, and what the relay still sends is ignored.
                let _ = link.commands.try_send(BridgeCommand::Leave { session });
            }
            Ok(Response::Pong)
        }
        Request::Detach { session } => {
            client.attached.remove(&session);
            client.attach_guards.remove(&session);
            if client.attached.is_empty() {
                client.session_feed = None;
            }
            Ok(Response::Pong)
        }
        Request::Permissions { session } => {
            let known = visible_session(link, &session).await?;
            follow(link, &session)?;
            catch_up(link, &session, known.as_ref(), 0).await?;
            let entries = link.inbound.since(&session, 0).map_err(internal)?;
            Ok(Response::Prompts(pending_prompts(&entries)))
        }
        other => Err(ErrorBody::new(
            ErrorCode::MethodNotFound,
            format!("{} is not an attach request", other.method()),
        )),
    }
}

/// Follows a session: its log is stored and streamed from now on.
pub(super) fn follow(link: &Link, session: &str) -> Result<(), ErrorBody> {
    if !link.inbound.is_followed(session).map_err(internal)? {
        link.inbound.follow(session).map_err(internal)?;
        // Never wait on the bridge: if its queue is full (it is busy connecting), the
        // session is rejoined with every other followed one when it connects.
        let _ = link.commands.try_send(BridgeCommand::Join {
            session: session.to_owned(),
        });
    }
    Ok(())
}

/// The session as far as this daemon can tell, for requests that read its log: the
/// replica's copy, else the relay's answer (a public session of another org is visible
/// without being listed). `None` when it is followed but the relay cannot be asked (the
/// local copy is all there is). Unknown sessions are [`not_found`], worded as everywhere.
async fn visible_session(link: &Link, session: &str) -> Result<Option<Session>, ErrorBody> {
    if let Some(known) = link.replica.get(session).map_err(internal)? {
        return Ok(Some(known));
    }
    let followed = link.inbound.is_followed(session).map_err(internal)?;
    if followed && !link.connected() {
        return Ok(None);
    }
    let request = RelayRequest::Get {
        session: session.to_owned(),
    };
    match relay_request(link, request).await {
        Ok(found) => Ok(found),
        Err(e) if e.code == ErrorCode::NotFound => Err(not_found(session)),
        Err(_) if followed => Ok(None),
        Err(e) => Err(e),
    }
}

/// Waits until the local copy of the session's log holds everything the relay had when
/// `known` was read (a session followed just now, or again after `unfollow`, is sent from
/// the start), so a replay after `after` is complete. Offline, the local copy is all there
/// is and nothing is waited for.
async fn catch_up(
    link: &Link,
    session: &str,
    known: Option<&Session>,
    after: u64,
) -> Result<(), ErrorBody> {
    let Some(target) = known.map(|s| s.last_seq).filter(|&last| last > after) else {
        return Ok(());
    };
    // Subscribe before looking, so an entry stored in between is not missed.
    let mut feed = link.session_feed.subscribe();
    let deadline = tokio::time::Instant::now() + CATCH_UP_DEADLINE;
    while link.inbound.last_seq(session).map_err(internal)? < target {
        if !link.connected() {
            return Ok(());
        }
        match tokio::time::timeout_at(deadline, feed.recv()).await {
            Err(_) => {
                return Err(ErrorBody::new(
                    ErrorCode::Timeout,
                    format!(
                        "the relay did not send session {session}'s log up to entry {target} within {CATCH_UP_DEADLINE:?}; try again"
                    ),
                ))
            }
            Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) => return Ok(()),
            Ok(_) => {}
        }
    }
    Ok(())
}
