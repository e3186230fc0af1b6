//! The sessions family of requests: login, the replica, journaled events (send,
//! interrupt, permission answers), attaching to a session's log, and session management
//! relayed to the relay.
//!
//! Journaled requests write the journal and leave the reply to the connection, which holds
//! it until the flush covering the event is done (so pipelined sends share flushes).
//! Requests that need the relay go through the bridge and fail fast with
//! `relay_unavailable` when it is unreachable.

use std::time::Duration;

use cloud_protocol::bridge::{Outbound, PermissionDecision, RelayRequest};
use cloud_protocol::ipc::{
    BridgeState, ErrorBody, ErrorCode, Identity, Prompt, RelayStatus, Request, Response,
};
use cloud_protocol::session::{Author, LogEntry, Session, SessionAction, SessionEvent};
use tokio::sync::oneshot;

use super::handler::ClientState;
use crate::credentials::{self, Credentials};
use crate::link::{BridgeCommand, Link};
use crate::state::Shared;

/// How long a request waits for the relay's answer.
const RELAY_DEADLINE: Duration = Duration::from_secs(15);

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
        Request::Send { session, text } => {
            check_sendable(link, &session)?;
            follow(link, &session)?;
            journal(link, client, Outbound::UserMessage { session, text })
        }
        Request::Interrupt { session } => {
            check_sendable(link, &session)?;
            journal(link, client, Outbound::Interrupt { session })
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
            follow(link, &session)?;
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
            let entries = link.inbound.since(&session, 0).map_err(internal)?;
            Ok(Response::Prompts(pending_prompts(&entries)))
        }
        Request::Answer {
            session,
            request_id,
            decision,
        } => answer(link, client, session, request_id, decision).await,
        other => Err(ErrorBody::new(
            ErrorCode::MethodNotFound,
            format!("{} is not a sessions request", other.method()),
        )),
    }
}

/// Journals an event; the connection replies once it is durable.
fn journal(link: &Link, client: &mut ClientState, event: Outbound) -> Result<Response, ErrorBody> {
    let seq = link
        .journal
        .append_unflushed(event)
        .map_err(|why| super::connection::journal_refusal(&why))?;
    client.needs_durable = client.needs_durable.max(seq);
    Ok(Response::Queued { seq })
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
    if !link.connected() {
        let status = link.status();
        return Err(ErrorBody::new(
            ErrorCode::RelayUnavailable,
            format!(
                "the relay at {} is {} ({}); this needs it: try again when `cloudctl status` shows it connected",
                status.url,
                state_name(status.state),
                status.reason.as_deref().unwrap_or("no reason given")
            ),
        ));
    }
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
) -> Result<Response, ErrorBody> {
    let entries = link.inbound.since(&session, 0).map_err(internal)?;
    if !pending_prompts(&entries)
        .iter()
        .any(|p| p.request_id == request_id)
    {
        let settled = entries.iter().rev().find_map(|entry| match &entry.event {
            SessionEvent::Message(text) => cloud_protocol::agent::parse(text)
                .filter(|p| p.request_id.as_deref() == Some(request_id.as_str()))
                .and_then(|p| match p.kind.as_str() {
                    "control_response" => Some("already answered"),
                    "control_cancel_request" => Some("withdrawn by the agent"),
                    _ => None,
                }),
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
    };
    // Bounded like every other wait; an answer the journal could not write is refused.
    let seq = link
        .journal
        .append_unflushed(event)
        .map_err(|why| super::connection::journal_refusal(&why))?;
    let durable = link.journal.wait_durable(seq);
    match tokio::time::timeout(super::connection::DURABLE_DEADLINE, durable).await {
        Ok(Ok(())) => {}
        Ok(Err(why)) => return Err(super::connection::journal_refusal(&why)),
        Err(_) => return Err(super::connection::not_confirmed(seq)),
    }
    if !link.connected() {
        return Ok(Response::Queued { seq });
    }
    let _ = client;
    match link.delivery(seq, RELAY_DEADLINE).await {
        Some(Ok(())) => Ok(Response::Delivered { seq }),
        Some(Err(reason)) => Err(refusal(reason)),
        None => Ok(Response::Queued { seq }),
    }
}

/// The permission prompts of a log still waiting for an answer.
pub fn pending_prompts(entries: &[LogEntry]) -> Vec<Prompt> {
    let mut prompts: Vec<Prompt> = Vec::new();
    for entry in entries {
        let SessionEvent::Message(text) = &entry.event else {
            continue;
        };
        let Some(parsed) = cloud_protocol::agent::parse(text) else {
            continue;
        };
        let Some(request_id) = parsed.request_id else {
            continue;
        };
        match parsed.kind.as_str() {
            "control_request"
                if entry.author == Author::Agent
                    && parsed.subtype.as_deref() == Some(cloud_protocol::agent::CAN_USE_TOOL) =>
            {
                let value: serde_json::Value = serde_json::from_str(text).unwrap_or_default();
                prompts.push(Prompt {
                    request_id,
                    tool_name: value["request"]["tool_name"]
                        .as_str()
                        .unwrap_or("?")
                        .to_owned(),
                    input: value["request"]["input"].to_string(),
                    seq: entry.seq,
                });
            }
            "control_response" | "control_cancel_request" => {
                prompts.retain(|p| p.request_id != request_id);
            }
            _ => {}
        }
    }
    prompts
}
