//! How a request handler reaches the relay: through the bridge's bounded command channel,
//! never the network. A request that needs the relay waits (up to [`CONNECT_WAIT`]) for a
//! bridge that is connecting or retrying to connect, then fails with `relay_unavailable`
//! naming the relay and its last failure; a refused bridge fails it at once. The answer is
//! waited for up to [`RELAY_DEADLINE`]. Shared by the request families that ask the relay.
//!
//! Architecture invariant: every wait here is bounded, only the asking connection waits,
//! and nothing here writes to the network or changes what the daemon stores.

use std::time::Duration;

use cloud_protocol::bridge::RelayRequest;
use cloud_protocol::ipc::{BridgeState, ErrorBody, ErrorCode};
use cloud_protocol::session::Session;
use tokio::sync::oneshot;

use super::internal;
use crate::link::{BridgeCommand, Link};

/// How long a request waits for the relay's answer.
pub(super) const RELAY_DEADLINE: Duration = Duration::from_secs(15);

/// How long a request that needs the relay waits for a connecting bridge to connect.
pub const CONNECT_WAIT: Duration = Duration::from_secs(10);

/// Sends a session-management request through the bridge and waits for the answer.
pub(super) async fn relay_request(
    link: &Link,
    request: RelayRequest,
) -> Result<Option<Session>, ErrorBody> {
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
pub(super) async fn wait_connected(link: &Link) -> Result<(), ErrorBody> {
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
    // The bridge's words for a relay's slow-down of this request (see `bridge/reader.rs`).
    let code = if reason.starts_with("rate limited by the relay") {
        ErrorCode::RateLimited
    } else if reason.contains("unreachable") || reason.contains("connection was lost") {
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
