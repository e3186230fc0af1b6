//! The sessions family of requests: the sessions themselves and the events sent to them.
//! `session list` reads the replica (marked stale while the bridge is not connected; the
//! list shows the current org's sessions), and so does `session show` offline (online it
//! asks the relay, whose answer lists the session's connected clients); `session create` (its
//! fields left out filled from the settings in effect, see [`crate::account`]), `session pause|resume|complete|delete` and `session
//! share` are relayed to the relay and its answer stored in the replica; `send`,
//! `interrupt` and `answer` are journaled once per idempotency key; `delivery` waits for
//! the relay's verdict on a journaled event.
//!
//! Journaled requests write the journal and leave the reply to the connection, which holds
//! it until the flush covering the event is done (so pipelined sends share flushes).
//! Requests that need the relay go through [`super::relay`]; while the relay refuses this
//! daemon for good, events are refused at once rather than queued.
//!
//! Architecture invariant: nobody is told `queued` before the flush that covers the event
//! (the connection sees to it, or the handler waits for it with `wait`), every wait is
//! bounded, and nothing here writes to the network: the bridge sends what the journal
//! holds.

use cloud_protocol::bridge::{Outbound, PermissionDecision, RelayRequest};
use cloud_protocol::ipc::{
    BridgeState, ErrorBody, ErrorCode, Request, Response, MAX_IDEMPOTENCY_KEY,
};
use cloud_protocol::session::{Session, SessionAction};

use super::attach::follow;
use super::client::ClientState;
use super::relay::{relay_request, RELAY_DEADLINE};
use super::{internal, not_found};
use crate::link::Link;
use crate::sessions::prompts::{pending_prompts, settled};
use crate::state::Shared;

/// Answers a request of the sessions family.
pub async fn handle(
    shared: &Shared,
    client: &mut ClientState,
    request: Request,
) -> Result<Response, ErrorBody> {
    let link = &shared.link;
    match request {
        Request::SessionCreate(new) => {
            let create = with_defaults(shared, new)?;
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
        Request::SessionList => {
            // The current org's only: the replica may still hold another org's until the
            // bridge reconnects in the new one.
            let org = link.account.current_org().or_else(|| link.status().org);
            let mut sessions = link.replica.list().map_err(internal)?;
            if let Some(org) = org {
                sessions.retain(|s| s.org == org);
            }
            Ok(Response::Sessions {
                sessions,
                stale: !link.connected(),
            })
        }
        Request::SessionShow { session } => show(link, session).await,
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
/// refused (see `claim_journal` in [`crate::bridge`]'s `connect.rs`).
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

/// `session show`: the relay's answer while connected (with the session's connected
/// clients, which the replica never holds), else the replica's copy, marked stale.
async fn show(link: &Link, session: String) -> Result<Response, ErrorBody> {
    if link.connected() {
        let request = RelayRequest::Get {
            session: session.clone(),
        };
        match relay_request(link, request).await {
            Ok(Some(found)) => {
                return Ok(Response::Session {
                    session: found,
                    stale: false,
                })
            }
            Err(e) if e.code == ErrorCode::NotFound => return Err(not_found(&session)),
            Ok(None) | Err(_) => {}
        }
    }
    Ok(Response::Session {
        session: known_session(link, &session)?,
        stale: true,
    })
}

fn known_session(link: &Link, session: &str) -> Result<Session, ErrorBody> {
    link.replica
        .get(session)
        .map_err(internal)?
        .ok_or_else(|| not_found(session))
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
        if let Some(settled) = settled(&entries, &request_id) {
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

/// The request to the relay for `new`: each default the client left out (and each locked by
/// the org, given or not) from the settings in effect.
fn with_defaults(
    shared: &Shared,
    new: cloud_protocol::session::NewSession,
) -> Result<cloud_protocol::session::CreateSession, ErrorBody> {
    use cloud_protocol::session::{CreateSession, NetworkAccess, RepoAccess, Visibility};
    let config = super::account::local_settings(shared)?;
    let settings = shared.link.account.settings();
    let domains = new.allowed_domains.as_ref().map(|d| d.join(","));
    let auto_stop = new.auto_stop_minutes.map(|m| m.to_string());
    let value = |key: &str, flag: Option<&str>| -> Result<String, ErrorBody> {
        let flag = match flag {
            Some(flag) => Some(
                cloud_protocol::settings::validate(key, flag)
                    .map_err(|e| ErrorBody::new(ErrorCode::InvalidParams, e))?,
            ),
            None => None,
        };
        Ok(
            crate::account::effective(key, flag.as_deref(), &config, &settings)
                .map(|view| view.value)
                .unwrap_or_default(),
        )
    };
    let invalid = |key: &str, value: &str| {
        internal(format!(
            "the setting {key} holds {value:?}, which is not valid"
        ))
    };
    let visibility = value("visibility", new.visibility.map(Visibility::as_str))?;
    let network = value("network", new.network_access.map(NetworkAccess::as_str))?;
    let allowed_domains = value("allowed_domains", domains.as_deref())?;
    let auto_stop_minutes = value("auto_stop_minutes", auto_stop.as_deref())?;
    Ok(CreateSession {
        task: new.task,
        visibility: Visibility::parse(&visibility)
            .ok_or_else(|| invalid("visibility", &visibility))?,
        network_access: NetworkAccess::parse(&network)
            .ok_or_else(|| invalid("network", &network))?,
        repo_access: new.repo_access.unwrap_or(RepoAccess::Write),
        vm_image: new.vm_image.unwrap_or_else(|| "default".to_owned()),
        allowed_domains: allowed_domains
            .split(',')
            .filter(|d| !d.is_empty())
            .map(str::to_owned)
            .collect(),
        auto_stop_minutes: auto_stop_minutes
            .parse()
            .map_err(|_| invalid("auto_stop_minutes", &auto_stop_minutes))?,
    })
}
