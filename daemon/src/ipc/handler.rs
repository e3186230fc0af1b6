//! Turns one request into one response against the shared state.
//!
//! The daemon family (hello, ping, status, shutdown, subscribe) is answered here without
//! blocking or IO: it reads the shared state, changes this
//! client's own state (greeting, subscriptions), or asks the core loop to act.

use cloud_protocol::ipc::{
    version_mismatch, Closing, ErrorBody, ErrorCode, Request, Response, Subscribe, Topic,
    PROTOCOL_VERSION,
};

use super::client::ClientState;
use crate::state::Shared;

/// Answers `request` from the client whose state is `client`.
pub async fn handle(
    shared: &Shared,
    client: &mut ClientState,
    request: Request,
) -> Result<Response, ErrorBody> {
    tracing::debug!(
        method = request.method(),
        client = client.client.as_deref().unwrap_or("?"),
        "request"
    );
    let hello = match request {
        Request::Hello(hello) => hello,
        _ if !client.greeted => {
            return Err(ErrorBody::new(
                ErrorCode::HelloRequired,
                format!(
                    "send hello first: method \"hello\" with params {{\"protocol\": {PROTOCOL_VERSION}, \"client\": NAME, \"client_version\": VERSION}}"
                ),
            ))
        }
        Request::Ping => return Ok(Response::Pong),
        Request::Status => return Ok(Response::Status(shared.status())),
        Request::Shutdown => {
            let by = format!(
                "shutdown requested by {} (pid {})",
                client.client.as_deref().unwrap_or("a client"),
                client.pid.map(|p| p.to_string()).unwrap_or_else(|| "?".into())
            );
            shared.request_shutdown(by);
            return Ok(Response::ShuttingDown);
        }
        Request::Subscribe(subscribe) => {
            return Ok(Response::Subscribed(self::subscribe(
                shared, client, subscribe,
            )))
        }
        other => return super::sessions::handle(shared, client, other).await,
    };
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
    let mut topics = Vec::new();
    for topic in [Topic::State, Topic::Log, Topic::Sessions] {
        if wants(topic) {
            topics.push(topic);
        }
    }
    Subscribe { topics }
}
