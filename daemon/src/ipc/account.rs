//! The account family of requests: `org/list` and `org/switch` (the org the daemon acts
//! in: remembered, and the bridge reconnected in its scope), `settings/get` (the values in
//! effect and their sources, from the local copy, so offline too) and `settings/set`
//! (written on the relay with a version check, through the bridge).
//!
//! Architecture invariant: every wait is bounded, and nothing here talks to the network:
//! the bridge carries the write, and the reconnect.

use cloud_protocol::ipc::{BridgeState, ErrorBody, ErrorCode, Orgs, Request, Response};
use cloud_protocol::settings::{validate, SettingScope, SettingView, SettingWrite, Source};
use tokio::sync::oneshot;

use super::daemon::reconnect_and_settle;
use super::internal;
use super::relay::{wait_connected, RELAY_DEADLINE};
use crate::account::{effective, keys};
use crate::link::{BridgeCommand, Link};
use crate::state::Shared;

/// Answers a request of the account family.
pub async fn handle(shared: &Shared, request: Request) -> Result<Response, ErrorBody> {
    let link = &shared.link;
    match request {
        Request::OrgList => Ok(Response::Orgs(orgs(link))),
        Request::OrgSwitch { org } => switch(link, org).await,
        Request::SettingsGet { key, org } => {
            let config = local_settings(shared)?;
            let settings = link.account.settings();
            if let Some(key) = &key {
                validate_key(key)?;
            }
            let views: Vec<SettingView> = if org {
                settings
                    .org
                    .iter()
                    .filter(|r| key.as_ref().is_none_or(|k| *k == r.key))
                    .map(|r| SettingView {
                        key: r.key.clone(),
                        value: r.value.clone(),
                        source: if r.locked {
                            Source::OrgLocked
                        } else {
                            Source::Org
                        },
                        version: r.version,
                        locked: r.locked,
                    })
                    .collect()
            } else {
                let keys = match key {
                    Some(key) => vec![key],
                    None => keys(&config, &settings),
                };
                keys.iter()
                    .filter_map(|key| effective(key, None, &config, &settings))
                    .collect()
            };
            Ok(Response::Settings(views))
        }
        Request::SettingsSet {
            key,
            value,
            org,
            lock,
            version,
        } => {
            let value =
                validate(&key, &value).map_err(|e| ErrorBody::new(ErrorCode::InvalidParams, e))?;
            let scope = if org {
                SettingScope::Org
            } else {
                SettingScope::User
            };
            if lock && !org {
                return Err(ErrorBody::new(
                    ErrorCode::InvalidParams,
                    "only org settings can be locked: add --org (org admins only)",
                ));
            }
            // Without a version: the one this daemon last saw, so a write made meanwhile
            // on another machine is not silently replaced.
            let expected_version = version.unwrap_or_else(|| {
                link.account
                    .settings()
                    .get(scope, &key)
                    .map_or(0, |r| r.version)
            });
            let write = SettingWrite {
                scope,
                key,
                value,
                lock,
                expected_version,
            };
            set(link, write).await
        }
        _ => Err(internal("not an account request")),
    }
}

fn orgs(link: &Link) -> Orgs {
    Orgs {
        current: link.account.current_org().or_else(|| link.status().org),
        orgs: link.account.orgs(),
    }
}

/// Makes `org` current and reconnects in it; on failure the previous org is put back. The
/// relay decides membership (the orgs known here may be older than a change).
async fn switch(link: &Link, org: String) -> Result<Response, ErrorBody> {
    let previous = link.account.current_org();
    link.account.set_current_org(Some(org.clone()));
    let settled = reconnect_and_settle(link).await;
    if settled.state == BridgeState::Connected && settled.org.as_deref() == Some(org.as_str()) {
        return Ok(Response::Orgs(orgs(link)));
    }
    link.account.set_current_org(previous);
    link.set_status(|s| s.state = BridgeState::Connecting);
    let _ = link.commands.try_send(BridgeCommand::Reconnect);
    let reason = settled
        .reason
        .unwrap_or_else(|| "the relay did not accept the switch in time".into());
    let known = link.account.orgs();
    let yours = if known.is_empty() {
        String::new()
    } else {
        format!(" (your orgs: {})", known.join(", "))
    };
    Err(ErrorBody::new(
        ErrorCode::Refused,
        format!("cannot switch to org {org}: {reason}{yours}"),
    ))
}

/// Sends a write through the bridge; keeps what the relay answers in the copy.
async fn set(link: &Link, write: SettingWrite) -> Result<Response, ErrorBody> {
    wait_connected(link).await?;
    let scope = write.scope;
    let (reply, answer) = oneshot::channel();
    link.commands
        .send_timeout(BridgeCommand::Settings { write, reply }, RELAY_DEADLINE)
        .await
        .map_err(|_| {
            ErrorBody::new(
                ErrorCode::RelayUnavailable,
                "the bridge is too busy to take the request; try again",
            )
        })?;
    let result = match tokio::time::timeout(RELAY_DEADLINE, answer).await {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => return Err(internal("the bridge dropped the request")),
        Err(_) => {
            return Err(ErrorBody::new(
                ErrorCode::Timeout,
                format!("the relay did not answer within {RELAY_DEADLINE:?}; run `cloudctl settings get` to see whether the write was made"),
            ))
        }
    };
    match result {
        Ok(record) => {
            link.account.put_setting(scope, record.clone());
            Ok(Response::Settings(vec![SettingView {
                key: record.key,
                value: record.value,
                source: match scope {
                    SettingScope::User => Source::User,
                    SettingScope::Org if record.locked => Source::OrgLocked,
                    SettingScope::Org => Source::Org,
                },
                version: record.version,
                locked: record.locked,
            }]))
        }
        Err(refusal) => match refusal.current {
            Some(current) => {
                // Newer than the copy: keep it.
                link.account.put_setting(scope, current);
                Err(ErrorBody::new(ErrorCode::Conflict, refusal.reason))
            }
            None => Err(ErrorBody::new(ErrorCode::Refused, refusal.reason)),
        },
    }
}

/// The local `config.toml`'s `[settings]`.
pub(super) fn local_settings(
    shared: &Shared,
) -> Result<std::collections::BTreeMap<String, String>, ErrorBody> {
    crate::config::Config::load(&shared.paths.config_file())
        .map(|config| config.settings)
        .map_err(|e| ErrorBody::new(ErrorCode::Internal, format!("{e}; fix the file")))
}

fn validate_key(key: &str) -> Result<(), ErrorBody> {
    let probe = cloud_protocol::settings::default_value(key).unwrap_or("");
    match validate(key, probe) {
        Err(e) if e.starts_with("unknown setting") => {
            Err(ErrorBody::new(ErrorCode::InvalidParams, e))
        }
        _ => Ok(()),
    }
}
