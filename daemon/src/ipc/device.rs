//! The device family of requests: logging this machine in by approval from another one
//! (`login/device`, `login/device/poll`), approving or denying another machine's login
//! (`device/approve`, `device/deny`), the user's logins (`device/list`, `device/revoke`),
//! and where this daemon keeps its own login (`credentials`).
//!
//! A device login belongs to the connection that started it: the device code stays in
//! that connection's state, in the daemon, and goes only to the relay. Polling is the
//! client's: each `login/device/poll` asks the relay once, so the client keeps the
//! interval (and its `slow_down` steps) and gives up when it likes.
//!
//! Architecture invariant: no reply, log line or error here carries a device code, an
//! access token or a refresh token; every call to the relay is bounded
//! ([`crate::auth::Keeper`]'s timeout).

use cloud_protocol::ipc::{
    CredentialStore, Device, DeviceDecision, DeviceLogin, DeviceLoginState, ErrorBody, ErrorCode,
    Request, Response,
};
use serde_json::json;

use super::client::ClientState;
use super::daemon::login_with;
use super::internal;
use crate::auth::{AuthError, DevicePoll, Keeper};
use crate::credentials::{self, Credentials};
use crate::state::Shared;

/// Answers a request of the device family.
pub async fn handle(
    shared: &Shared,
    client: &mut ClientState,
    request: Request,
) -> Result<Response, ErrorBody> {
    match request {
        Request::LoginDevice { relay } => start(shared, client, relay).await,
        Request::LoginDevicePoll => poll(shared, client).await,
        Request::DeviceApprove { code } => decide(shared, code, true).await,
        Request::DeviceDeny { code } => decide(shared, code, false).await,
        Request::DeviceList => list(shared).await,
        Request::DeviceRevoke { id } => revoke(shared, id).await,
        Request::Credentials => {
            let (store, location) = credentials::store_in_use(&shared.paths.config_dir);
            Ok(Response::CredentialStore(CredentialStore {
                store: store.name().into(),
                location,
            }))
        }
        other => Err(ErrorBody::new(
            ErrorCode::MethodNotFound,
            format!("{} is not a device request", other.method()),
        )),
    }
}

fn keeper(shared: &Shared) -> Result<&Keeper, ErrorBody> {
    shared
        .link
        .keeper
        .get()
        .map(|k| k.as_ref())
        .ok_or_else(|| internal("the bridge is not started yet; try again"))
}

/// An [`AuthError`] as the client sees it.
fn auth_error(error: AuthError) -> ErrorBody {
    match error {
        AuthError::LoggedOut(message) => ErrorBody::new(ErrorCode::Refused, message),
        AuthError::NothingListening(message) | AuthError::Failed(message) => {
            ErrorBody::new(ErrorCode::RelayUnavailable, message)
        }
        AuthError::Changed => ErrorBody::new(
            ErrorCode::RelayUnavailable,
            "the login changed meanwhile; try again",
        ),
    }
}

async fn start(
    shared: &Shared,
    client: &mut ClientState,
    relay: String,
) -> Result<Response, ErrorBody> {
    crate::bridge::bridge_url(&relay).map_err(|e| ErrorBody::new(ErrorCode::InvalidParams, e))?;
    let started = keeper(shared)?
        .start_device(&relay)
        .await
        .map_err(auth_error)?;
    let answer = DeviceLogin {
        user_code: started.user_code.clone(),
        state: DeviceLoginState::Pending,
        interval_ms: started.interval_ms,
        expires_in_ms: started.expires_in_ms,
    };
    tracing::info!(relay = %relay, "device login started");
    client.device_login = Some((relay, started));
    Ok(Response::DeviceLogin(answer))
}

async fn poll(shared: &Shared, client: &mut ClientState) -> Result<Response, ErrorBody> {
    let Some((relay, started)) = client.device_login.as_ref() else {
        return Err(ErrorBody::new(
            ErrorCode::InvalidRequest,
            "no device login on this connection: send login/device first",
        ));
    };
    let relay = relay.clone();
    let waiting = |state| {
        Ok(Response::DeviceLogin(DeviceLogin {
            user_code: started.user_code.clone(),
            state,
            interval_ms: started.interval_ms,
            expires_in_ms: started.expires_in_ms,
        }))
    };
    match keeper(shared)?
        .poll_device(&relay, &started.device_code)
        .await
        .map_err(auth_error)?
    {
        DevicePoll::Pending => waiting(DeviceLoginState::Pending),
        DevicePoll::SlowDown => waiting(DeviceLoginState::SlowDown),
        DevicePoll::Refused(reason) => {
            client.device_login = None;
            Err(ErrorBody::new(
                ErrorCode::Refused,
                format!("device login failed: {reason}"),
            ))
        }
        DevicePoll::Approved(refresh_token) => {
            client.device_login = None;
            tracing::info!(relay = %relay, "device login approved");
            let new = Credentials {
                relay,
                api_key: None,
                refresh_token: Some(refresh_token),
            };
            login_with(&shared.link, &shared.paths.config_dir, new).await
        }
    }
}

async fn decide(shared: &Shared, code: String, approve: bool) -> Result<Response, ErrorBody> {
    let path = if approve {
        "/v1/auth/device/approve"
    } else {
        "/v1/auth/device/deny"
    };
    let (status, answer) = keeper(shared)?
        .api("POST", path, Some(json!({"user_code": code})))
        .await
        .map_err(auth_error)?;
    if status != 200 {
        return Err(refusal(status, &answer));
    }
    Ok(Response::DeviceDecided(DeviceDecision {
        code,
        name: answer["name"].as_str().unwrap_or_default().to_owned(),
        approved: approve,
    }))
}

async fn list(shared: &Shared) -> Result<Response, ErrorBody> {
    let (status, answer) = keeper(shared)?
        .api("GET", "/v1/devices", None)
        .await
        .map_err(auth_error)?;
    if status != 200 {
        return Err(refusal(status, &answer));
    }
    let devices = answer["devices"]
        .as_array()
        .map(|devices| devices.iter().map(device).collect())
        .unwrap_or_default();
    Ok(Response::Devices(devices))
}

async fn revoke(shared: &Shared, id: String) -> Result<Response, ErrorBody> {
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(ErrorBody::new(
            ErrorCode::InvalidParams,
            format!("invalid login id {id:?}: copy one from `cloudctl device list`"),
        ));
    }
    let (status, answer) = keeper(shared)?
        .api("DELETE", &format!("/v1/devices/{id}"), None)
        .await
        .map_err(auth_error)?;
    if status != 200 {
        return Err(refusal(status, &answer));
    }
    Ok(Response::Devices(vec![device(&answer)]))
}

fn device(value: &serde_json::Value) -> Device {
    let text = |key: &str| value[key].as_str().unwrap_or_default().to_owned();
    Device {
        id: text("id"),
        name: text("name"),
        org: text("org"),
        created_at_ms: value["created_at"].as_u64().unwrap_or_default(),
        last_used_at_ms: value["last_used_at"].as_u64().unwrap_or_default(),
        current: value["current"].as_bool().unwrap_or_default(),
    }
}

/// A relay's refusal, with its reason (a relay never puts a secret in one).
fn refusal(status: u16, answer: &serde_json::Value) -> ErrorBody {
    let reason: String = answer["error"]
        .as_str()
        .unwrap_or("no explanation")
        .chars()
        .take(300)
        .collect();
    let code = match status {
        404 => ErrorCode::NotFound,
        _ => ErrorCode::Refused,
    };
    ErrorBody::new(code, reason)
}
