//! Turns one request into one response: refuses everything but `hello` until the client
//! is greeted, then hands the request to its family's module ([`super::daemon`],
//! [`super::sessions`], [`super::attach`], [`super::teleport`], [`super::account`],
//! [`super::device`], [`super::shell`]). The match is exhaustive,
//! so a new request does not compile until it is given a family. Every request it routes
//! is declared with its method name by `requests!` in `protocol/src/ipc.rs`
//! (`method::ALL`), and `protocol/tests/protocol_doc.rs` fails until docs/PROTOCOL.md
//! documents it.
//!
//! Architecture invariant: this module only routes. It answers nothing itself but the
//! greeting check, holds no state, and does no IO.

use cloud_protocol::ipc::{ErrorBody, ErrorCode, Request, Response, PROTOCOL_VERSION};
use cloud_protocol::terminal::WindowSize;

use super::client::ClientState;
use super::{account, attach, daemon, device, sessions, shell, teleport};
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
    if !client.greeted && !matches!(request, Request::Hello(_)) {
        return Err(ErrorBody::new(
            ErrorCode::HelloRequired,
            format!(
                "send hello first: method \"hello\" with params {{\"protocol\": {PROTOCOL_VERSION}, \"client\": NAME, \"client_version\": VERSION}}"
            ),
        ));
    }
    match request {
        Request::Hello(_)
        | Request::Ping
        | Request::Status
        | Request::Shutdown
        | Request::Subscribe(_)
        | Request::Login { .. }
        | Request::Logout
        | Request::Whoami
        | Request::Metrics => daemon::handle(shared, client, request).await,
        Request::SessionCreate(_)
        | Request::SessionList
        | Request::SessionShow { .. }
        | Request::SessionAction { .. }
        | Request::SessionShare { .. }
        | Request::Send { .. }
        | Request::Interrupt { .. }
        | Request::Delivery { .. }
        | Request::Answer { .. } => sessions::handle(shared, client, request).await,
        Request::Attach { .. }
        | Request::Detach { .. }
        | Request::Unfollow { .. }
        | Request::Permissions { .. } => attach::handle(shared, client, request).await,
        Request::TeleportPush { .. }
        | Request::TeleportPull { .. }
        | Request::TeleportWatch { .. }
        | Request::TeleportStop { .. }
        | Request::TeleportStatus => teleport::handle(shared, client, request).await,
        Request::OrgList
        | Request::OrgSwitch { .. }
        | Request::SettingsGet { .. }
        | Request::SettingsSet { .. } => account::handle(shared, request).await,
        Request::LoginDevice { .. }
        | Request::LoginDevicePoll
        | Request::DeviceApprove { .. }
        | Request::DeviceDeny { .. }
        | Request::DeviceList
        | Request::DeviceRevoke { .. }
        | Request::Credentials => device::handle(shared, client, request).await,
        Request::SessionShell {
            session,
            cols,
            rows,
            term,
        } => shell::handle(shared, client, session, WindowSize { cols, rows }, term).await,
    }
}
