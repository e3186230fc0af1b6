//! The daemon family of requests: the daemon itself and its relay connection. `hello`,
//! `ping`, `status`, `metrics`, `shutdown` and `subscribe` are answered at once, without IO: they
//! read the shared state, change this client's own state (greeting, subscriptions), or
//! ask the core loop to act. `login`, `logout` and `whoami` say which relay the daemon
//! talks to and as whom: a login saves the credentials, has the bridge reconnect and waits
//! (bounded) for the first attempt's outcome, putting back the previous credentials if the
//! relay does not accept the new ones.
//!
//! Architecture invariant: nothing here changes the daemon's lifecycle itself (a shutdown
//! is a request to the core loop) or talks to the network (a reconnect is a
//! [`BridgeCommand`]); every wait is bounded, and the token never appears in a reply, a log
//! or an error.

use cloud_protocol::ipc::{
    version_mismatch, BridgeState, Closing, ErrorBody, ErrorCode, Hello, Identity, RelayStatus,
    Request, Response, Subscribe, Topic, PROTOCOL_VERSION,
};

use super::client::ClientState;
use super::internal;
use super::relay::RELAY_DEADLINE;
use crate::credentials::{self, Credentials};
use crate::link::{BridgeCommand, Link};
use crate::state::Shared;

/// Answers a request of the daemon family.
pub async fn handle(
    shared: &Shared,
    client: &mut ClientState,
    request: Request,
) -> Result<Response, ErrorBody> {
    let link = &shared.link;
    match request {
        Request::Hello(hello) => self::hello(shared, client, hello),
        Request::Ping => Ok(Response::Pong),
        Request::Status => Ok(Response::Status(shared.status())),
        Request::Shutdown => {
            let by = format!(
                "shutdown requested by {} (pid {})",
                client.client.as_deref().unwrap_or("a client"),
                client
                    .pid
                    .map(|p| p.to_string())
                    .unwrap_or_else(|| "?".into())
            );
            shared.request_shutdown(by);
            Ok(Response::ShuttingDown)
        }
        Request::Subscribe(subscribe) => Ok(Response::Subscribed(self::subscribe(
            shared, client, subscribe,
        ))),
        Request::Login { relay, token } => {
            login(link, &shared.paths.config_dir, relay, token).await
        }
        Request::Logout => {
            credentials::remove(&shared.paths.config_dir).map_err(internal)?;
            // The orgs were the remote relay's: the embedded relay has its own.
            link.account.set_current_org(None);
            link.account.set_orgs(Vec::new());
            reconnect_and_settle(link).await;
            Ok(Response::Identity(Identity {
                relay: link.status(),
            }))
        }
        Request::Whoami => Ok(Response::Identity(Identity {
            relay: link.status(),
        })),
        Request::Metrics => {
            let status = shared.status();
            Ok(Response::Metrics(link.metrics.snapshot(
                status.uptime_ms,
                status.relay.journal_depth,
                status.clients,
            )))
        }
        other => Err(ErrorBody::new(
            ErrorCode::MethodNotFound,
            format!("{} is not a daemon request", other.method()),
        )),
    }
}

/// The version exchange: greets the client, or refuses it and has the connection close.
fn hello(shared: &Shared, client: &mut ClientState, hello: Hello) -> Result<Response, ErrorBody> {
    if hello.protocol != PROTOCOL_VERSION {
        let error = version_mismatch(hello.protocol, PROTOCOL_VERSION);
        tracing::warn!(client = %hello.client, client_version = %hello.client_version, "refusing client: {}", error.message);
        client.closing = Some(Closing {
            code: error.code,
            message: error.message.clone(),
        });
        return Err(error);
    }
    client.greeted = true;
    tracing::debug!(client = %hello.client, client_version = %hello.client_version, pid = ?client.pid, "client greeted");
    client.client = Some(format!("{} {}", hello.client, hello.client_version));
    Ok(Response::Hello(shared.hello_reply()))
}

/// Replaces the client's subscriptions with `subscribe.topics`.
fn subscribe(shared: &Shared, client: &mut ClientState, subscribe: Subscribe) -> Subscribe {
    let wants = |topic| subscribe.topics.contains(&topic);
    client.state_feed = wants(Topic::State).then(|| shared.state_feed.subscribe());
    client.log_feed = wants(Topic::Log).then(|| shared.log_feed.subscribe());
    client.sessions_feed = wants(Topic::Sessions).then(|| shared.link.sessions_feed.subscribe());
    client.teleport_feed = wants(Topic::Teleport).then(|| shared.teleport.feed.subscribe());
    let mut topics = Vec::new();
    for topic in [Topic::State, Topic::Log, Topic::Sessions, Topic::Teleport] {
        if wants(topic) {
            topics.push(topic);
        }
    }
    Subscribe { topics }
}

/// Sends a reconnect and waits until the bridge's first attempt with the new credentials
/// has an outcome: connected, refused, or failed (retrying). Statuses of an attempt that
/// started before the reconnect do not count.
pub(super) async fn reconnect_and_settle(link: &Link) -> RelayStatus {
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
    login_with(link, config_dir, Credentials::login(relay, token)).await
}

/// Saves `new`, has the bridge reconnect with it and waits for the outcome; puts back the
/// previous credentials when the relay does not accept the new ones.
pub(super) async fn login_with(
    link: &Link,
    config_dir: &std::path::Path,
    new: Credentials,
) -> Result<Response, ErrorBody> {
    let previous = credentials::load(config_dir).ok().flatten();
    // A new login starts in its key's default org; the orgs of the last one are kept to be
    // put back if this one fails.
    let (previous_org, previous_orgs) = (link.account.current_org(), link.account.orgs());
    link.account.set_current_org(None);
    link.account.set_orgs(Vec::new());
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
    link.account.set_current_org(previous_org);
    link.account.set_orgs(previous_orgs);
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
