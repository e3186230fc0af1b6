//! The sessions family of requests: login, the replica, journaled events (send,
//! interrupt, permission answers), attaching to a session's log, and session management
//! relayed to the relay.
//!
//! Journaled requests write the journal and leave the reply to the connection, which holds
//! it until the flush covering the event is done (so pipelined sends share flushes).
//! Requests that need the relay go through the bridge; while the bridge is connecting or
//! retrying they wait for it (up to [`CONNECT_WAIT`]), then fail with `relay_unavailable`
//! naming the relay and its last failure. A refused bridge fails them at once.

use std::time::Duration;

use cloud_protocol::agent::Control;
use cloud_protocol::bridge::{Outbound, PermissionDecision, RelayRequest};
use cloud_protocol::ipc::{
    BridgeState, ErrorBody, ErrorCode, Identity, Prompt, RelayStatus, Request, Response,
    MAX_IDEMPOTENCY_KEY,
};
use cloud_protocol::session::{Author, LogEntry, Session, SessionAction, SessionEvent};
use tokio::sync::oneshot;

use super::client::ClientState;
use crate::credentials::{self, Credentials};
use crate::link::{BridgeCommand, Link};
use crate::state::Shared;

/// How long a request waits for the relay's answer.
const RELAY_DEADLINE: Duration = Duration::from_secs(15);

/// How long a request that needs the relay waits for a connecting bridge to connect.
pub const CONNECT_WAIT: Duration = Duration::from_secs(10);

/// How many recent entries `attach` without `--since` replays.
const RECENT_ENTRIES: u64 = 50;

fn internal(e: impl std::fmt::Display) -> ErrorBody {
    ErrorBody::new(ErrorCode::Internal, format!("internal error: {e}"))
}

/// Answers a request of the sessions family.
pub async fn handle(
    shared: &Shared,
    client: &mut ClientState,
    request: Request,
) -> Result<Response, ErrorBody> {
    let link = &shared.link;
    match request {
        Request::Login { relay, token } => login(link, &shared.paths.config_dir, relay, token).await,
        Request::Logout => {
            credentials::remove(&shared.paths.config_dir).map_err(internal)?;
            reconnect_and_settle(link).await;
            Ok(Response::Identity(Identity { relay: link.status() }))
        }
        Request::Whoami => Ok(Response::Identity(Identity { relay: link.status() })),
        Request::SessionCreate(create) => {
            let session = relay_request(link, RelayRequest::Create(create))
                .await?
                .ok_or_else(|| internal("the relay answered a create without a session"))?;
            link.replica.upsert(&session).map_err(internal)?;
            follow(link, &session.id)?;
            Ok(Response::Session {
                session,
                stale: false,
            })
        }
        Request::SessionList => Ok(Response::Sessions {
            sessions: link.replica.list().map_err(internal)?,
            stale: !link.connected(),
        }),
        Request::SessionShow { session } => Ok(Response::Session {
            session: known_session(link, &session)?,
            stale: !link.connected(),
        }),
        Request::SessionAction { session, action } => {
            match relay_request(link, RelayRequest::Action { session: session.clone(), action }).await? {
                Some(updated) => {
                    link.replica.upsert(&updated).map_err(internal)?;
                    Ok(Response::Session {
                        session: updated,
                        stale: false,
                    })
                }
                None => {
                    debug_assert_eq!(action, SessionAction::Delete);
                    link.replica.remove(&session).map_err(internal)?;
                    link.inbound.forget(&session).map_err(internal)?;
                    Ok(Response::SessionDeleted)
                }
            }
        }
        Request::SessionShare { session, visibility } => {
            let updated = relay_request(link, RelayRequest::Share { session, visibility })
                .await?
                .ok_or_else(|| internal("the relay answered a share without a session"))?;
            link.replica.upsert(&updated).map_err(internal)?;
            Ok(Response::Session {
                session: updated,
                stale: false,
            })
        }
        Request::Send {
            session,
            text,
            key,
            wait,
        } => {
            check_accepting(link)?;
            check_sendable(link, &session)?;
            follow(link, &session)?;
            journaled(link, client, key.clone(), wait, Outbound::UserMessage { session, text, key: key.clone() }).await
        }
        Request::Interrupt { session, key, wait } => {
            check_accepting(link)?;
            check_sendable(link, &session)?;
            journaled(link, client, key.clone(), wait, Outbound::Interrupt { session, key }).await
        }
        Request::Delivery { seq } if seq == 0 || seq > link.journal.last_written() => {
            Err(ErrorBody::new(
                ErrorCode::InvalidParams,
                format!("no event {seq} was ever queued"),
            ))
        }
        Request::Delivery { seq } => match link.delivery(seq, RELAY_DEADLINE).await {
            Some(Ok(())) => Ok(Response::Delivered { seq }),
            Some(Err(reason)) => Err(refusal(reason)),
            None => Err(ErrorBody::new(
                ErrorCode::Timeout,
                format!(
                    "event {seq} is not acknowledged yet (relay {}); it stays queued and will be delivered",
                    state_name(link.status().state)
                ),
            )),
        },
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
            client.replay.extend(replay.into_iter().map(|entry| (session.clone(), entry)));
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
        Request::Answer {
            session,
            request_id,
            decision,
            key,
        } => {
            check_accepting(link)?;
            answer(link, client, session, request_id, decision, key).await
        }
        other => Err(ErrorBody::new(
            ErrorCode::MethodNotFound,
            format!("{} is not a sessions request", other.method()),
        )),
    }
}

/// Journals an event, once per idempotency key. Without `wait` the connection replies
/// `queued` once it is durable (so pipelined sends share flushes); with `wait` the reply
/// waits for the flush and then, while the relay is connected, for its verdict (bounded),
/// so one round trip tells a client whether its event was delivered.
async fn journaled(
    link: &Link,
    client: &mut ClientState,
    key: Option<String>,
    wait: bool,
    event: Outbound,
) -> Result<Response, ErrorBody> {
    if let Some(key) = &key {
        if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY {
            return Err(ErrorBody::new(
                ErrorCode::InvalidParams,
                format!("an idempotency key must have 1 to {MAX_IDEMPOTENCY_KEY} bytes"),
            ));
        }
    }
    let (seq, _new) = link
        .queue_once(key.as_deref(), || link.journal.append_unflushed(event))
        .map_err(|why| super::connection::journal_refusal(&why))?;
    if !wait {
        client.needs_durable = client.needs_durable.max(seq);
        return Ok(Response::Queued { seq });
    }
    // Bounded like every other wait: a journal that cannot flush (a failing disk) must
    // not hang this connection. The event may still be delivered if the flush completes.
    let durable = link.journal.wait_durable(seq);
    match tokio::time::timeout(super::connection::DURABLE_DEADLINE, durable).await {
        Ok(Ok(())) => {}
        Ok(Err(why)) => return Err(super::connection::journal_refusal(&why)),
        Err(_) => return Err(super::connection::not_confirmed(seq)),
    }
    if !link.connected() {
        return Ok(Response::Queued { seq });
    }
    match link.delivery(seq, RELAY_DEADLINE).await {
        Some(Ok(())) => Ok(Response::Delivered { seq }),
        Some(Err(reason)) => Err(refusal(reason)),
        None => Ok(Response::Queued { seq }),
    }
}

/// Refuses to queue events while the relay refuses this daemon for good (a bad or revoked
/// token): they could only wait for a login, which may well be someone else's, and then be
/// refused (see `claim_journal` in [`crate::bridge`]).
fn check_accepting(link: &Link) -> Result<(), ErrorBody> {
    let status = link.status();
    if status.state != BridgeState::Refused {
        return Ok(());
    }
    Err(ErrorBody::new(
        ErrorCode::Refused,
        format!(
            "not queued: the relay at {} refuses this daemon ({}); log in again with `cloudctl login`",
            status.url,
            status.reason.as_deref().unwrap_or("no reason given")
        ),
    ))
}

/// Refuses events for sessions neither the (live) replica nor the followed set knows (a
/// public session of another org is followed without being listed).
fn check_sendable(link: &Link, session: &str) -> Result<(), ErrorBody> {
    // The followed set is in memory: check it first, so the common case reads no store.
    if link.connected()
        && !link.inbound.is_followed(session).map_err(internal)?
        && link.replica.get(session).map_err(internal)?.is_none()
    {
        return Err(not_found(session));
    }
    Ok(())
}

fn not_found(session: &str) -> ErrorBody {
    ErrorBody::new(
        ErrorCode::NotFound,
        format!("no session {session} (see `cloudctl session list`)"),
    )
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

/// How long a read waits for the relay to send the part of a log the local copy lacks.
const CATCH_UP_DEADLINE: Duration = Duration::from_secs(10);

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

fn known_session(link: &Link, session: &str) -> Result<Session, ErrorBody> {
    link.replica
        .get(session)
        .map_err(internal)?
        .ok_or_else(|| not_found(session))
}

/// Follows a session: its log is stored and streamed from now on.
fn follow(link: &Link, session: &str) -> Result<(), ErrorBody> {
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

fn refusal(reason: String) -> ErrorBody {
    let code = if reason.contains("already answered") || reason.contains("withdrawn") {
        ErrorCode::AlreadyAnswered
    } else {
        ErrorCode::Refused
    };
    ErrorBody::new(code, format!("the relay refused it: {reason}"))
}

fn state_name(state: BridgeState) -> &'static str {
    match state {
        BridgeState::Connecting => "connecting",
        BridgeState::Connected => "connected",
        BridgeState::Retrying => "retrying",
        BridgeState::Refused => "refused",
    }
}

/// Sends a session-management request through the bridge and waits for the answer.
async fn relay_request(link: &Link, request: RelayRequest) -> Result<Option<Session>, ErrorBody> {
    wait_connected(link).await?;
    let (reply, answer) = oneshot::channel();
    link.commands
        .send_timeout(BridgeCommand::Request { request, reply }, RELAY_DEADLINE)
        .await
        .map_err(|_| {
            ErrorBody::new(
                ErrorCode::RelayUnavailable,
                "the bridge is too busy to take the request; try again",
            )
        })?;
    match tokio::time::timeout(RELAY_DEADLINE, answer).await {
        Ok(Ok(Ok(session))) => Ok(session),
        Ok(Ok(Err(reason))) => Err(relay_error(reason)),
        Ok(Err(_)) => Err(internal("the bridge dropped the request")),
        Err(_) => Err(ErrorBody::new(
            ErrorCode::Timeout,
            format!("the relay did not answer within {RELAY_DEADLINE:?}"),
        )),
    }
}

/// Waits, up to [`CONNECT_WAIT`], for a bridge that is connecting or retrying to connect:
/// right after the daemon starts (its embedded relay is still starting) or while a relay
/// restarts, a request that needs the relay is served a moment later instead of refused.
/// A bridge refused for good fails at once: it will not connect until new credentials.
async fn wait_connected(link: &Link) -> Result<(), ErrorBody> {
    let mut watch = link.watch_status();
    let settled = async {
        // The watch's lock is held only to read the state: the message is built after.
        let _ = watch
            .wait_for(|s| matches!(s.state, BridgeState::Connected | BridgeState::Refused))
            .await;
    };
    let _ = tokio::time::timeout(CONNECT_WAIT, settled).await;
    let status = link.status();
    let message = match status.state {
        BridgeState::Connected => return Ok(()),
        BridgeState::Refused => format!(
            "{} refused this daemon: {}",
            status.describe(),
            status.reason.as_deref().unwrap_or("no reason given")
        ),
        BridgeState::Connecting | BridgeState::Retrying => format!(
            "{} did not connect within {CONNECT_WAIT:?} ({}); this needs it: try again when `cloudctl status` shows it connected",
            status.describe(),
            match &status.reason {
                Some(reason) => format!("last failure: {reason}"),
                None => "still connecting, no attempt has failed yet".into(),
            }
        ),
    };
    Err(ErrorBody::new(ErrorCode::RelayUnavailable, message))
}

fn relay_error(reason: String) -> ErrorBody {
    let code = if reason.contains("unreachable") || reason.contains("connection was lost") {
        ErrorCode::RelayUnavailable
    } else if reason.starts_with("no session")
        || reason.starts_with("no such session")
        || reason.contains("not found")
    {
        ErrorCode::NotFound
    } else {
        ErrorCode::Refused
    };
    ErrorBody::new(code, reason)
}

/// Sends a reconnect and waits until the bridge's first attempt with the new credentials
/// has an outcome: connected, refused, or failed (retrying). Statuses of an attempt that
/// started before the reconnect do not count.
async fn reconnect_and_settle(link: &Link) -> RelayStatus {
    let epoch = link.epoch();
    link.set_status(|s| s.state = BridgeState::Connecting);
    if link
        .commands
        .send_timeout(BridgeCommand::Reconnect, RELAY_DEADLINE)
        .await
        .is_err()
    {
        return link.status();
    }
    let mut status = link.watch_status();
    let settled = tokio::time::timeout(
        RELAY_DEADLINE,
        status.wait_for(|s| {
            link.epoch() > epoch
                && matches!(
                    s.state,
                    BridgeState::Connected | BridgeState::Refused | BridgeState::Retrying
                )
        }),
    )
    .await;
    match settled {
        Ok(Ok(status)) => status.clone(),
        _ => link.status(),
    }
}

async fn login(
    link: &Link,
    config_dir: &std::path::Path,
    relay: String,
    token: String,
) -> Result<Response, ErrorBody> {
    crate::bridge::bridge_url(&relay).map_err(|e| ErrorBody::new(ErrorCode::InvalidParams, e))?;
    let previous = credentials::load(config_dir).ok().flatten();
    let new = Credentials {
        relay: relay.clone(),
        token,
    };
    credentials::save(config_dir, &new).map_err(internal)?;
    // The bridge may be waiting out a refusal or a backoff: reconnect now.
    let settled = reconnect_and_settle(link).await;
    if settled.state == BridgeState::Connected {
        return Ok(Response::Identity(Identity { relay: settled }));
    }
    let reason = settled
        .reason
        .unwrap_or_else(|| "the relay did not accept the login in time".into());
    // Put back what worked before.
    match previous {
        Some(previous) => credentials::save(config_dir, &previous).map_err(internal)?,
        None => credentials::remove(config_dir).map_err(internal)?,
    }
    link.set_status(|s| s.state = BridgeState::Connecting);
    let _ = link.commands.try_send(BridgeCommand::Reconnect);
    Err(ErrorBody::new(
        ErrorCode::Refused,
        format!("login failed: {reason}"),
    ))
}

async fn answer(
    link: &Link,
    client: &mut ClientState,
    session: String,
    request_id: String,
    decision: PermissionDecision,
    key: Option<String>,
) -> Result<Response, ErrorBody> {
    let entries = link.inbound.since(&session, 0).map_err(internal)?;
    if !pending_prompts(&entries)
        .iter()
        .any(|p| p.request_id == request_id)
    {
        let settled = entries.iter().rev().find_map(|entry| match &entry.event {
            SessionEvent::Message(text) => match cloud_protocol::agent::control(text)? {
                Control::Answered { request_id: id } if id == request_id => {
                    Some("already answered")
                }
                Control::Withdrawn { request_id: id } if id == request_id => {
                    Some("withdrawn by the agent")
                }
                _ => None,
            },
            _ => None,
        });
        if let Some(settled) = settled {
            return Err(ErrorBody::new(
                ErrorCode::AlreadyAnswered,
                format!("prompt {request_id} was {settled}"),
            ));
        }
        if link.connected() {
            return Err(ErrorBody::new(
                ErrorCode::NotFound,
                format!("no pending prompt {request_id} in session {session} (see `cloudctl permissions {session}`)"),
            ));
        }
    }
    let event = Outbound::PermissionAnswer {
        session,
        request_id,
        decision,
        key: key.clone(),
    };
    journaled(link, client, key, true, event).await
}

/// The permission prompts of a log still waiting for an answer.
pub fn pending_prompts(entries: &[LogEntry]) -> Vec<Prompt> {
    let mut prompts: Vec<Prompt> = Vec::new();
    for entry in entries {
        let SessionEvent::Message(text) = &entry.event else {
            continue;
        };
        match cloud_protocol::agent::control(text) {
            Some(Control::Prompt {
                request_id,
                tool_name,
                input,
            }) if entry.author == Author::Agent => prompts.push(Prompt {
                request_id,
                tool_name,
                input,
                seq: entry.seq,
            }),
            Some(Control::Answered { request_id } | Control::Withdrawn { request_id }) => {
                prompts.retain(|p| p.request_id != request_id);
            }
            _ => {}
        }
    }
    prompts
}
