//! `cloudctl login --relay URL` without a token (a device login: show a code, wait for
//! its approval elsewhere), `cloudctl device approve|deny|list|revoke`, and the credential
//! store line of `whoami`. Each is a request to the daemon, which talks to the relay; no
//! output here ever holds a token or a device code (the daemon never sends them).

use std::time::Duration;

use anyhow::bail;
use clap::Subcommand;
use cloud_protocol::ipc::{CredentialStore, DeviceLoginState, Identity, Request, Response};
use cloudctl::client::Client;
use cloudctl::device::{wait_for_approval, Poll};
use serde_json::json;

use crate::session_commands::relay_line;
use crate::table;

/// `cloudctl device ...`.
#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// Let the machine showing CODE log in as you (it gets its own login, for your user,
    /// org and scopes).
    Approve {
        /// The code the new machine shows, like BCDF-GHJK.
        code: String,
    },
    /// Refuse the machine showing CODE.
    Deny {
        /// The code the new machine shows.
        code: String,
    },
    /// Your machines: one login each, with when it started and was last used.
    List,
    /// Log a machine out: its next refresh or connect fails and it must log in again.
    Revoke {
        /// The login's id (or its first characters), from `cloudctl device list`.
        id: String,
    },
}

/// `cloudctl device ...`.
pub async fn device(
    client: &mut Client,
    command: DeviceCommand,
    json_output: bool,
) -> anyhow::Result<()> {
    match command {
        DeviceCommand::Approve { code } | DeviceCommand::Deny { code }
            if code.trim().is_empty() =>
        {
            bail!("give the code the new machine shows, like `cloudctl device approve BCDF-GHJK`")
        }
        DeviceCommand::Approve { code } => {
            decide(client, Request::DeviceApprove { code }, json_output).await
        }
        DeviceCommand::Deny { code } => {
            decide(client, Request::DeviceDeny { code }, json_output).await
        }
        DeviceCommand::List => {
            let Response::Devices(devices) = client.request(Request::DeviceList).await? else {
                bail!("unexpected reply to device/list");
            };
            if json_output {
                println!("{}", serde_json::to_string_pretty(&devices)?);
                return Ok(());
            }
            if devices.is_empty() {
                println!("no logins");
                return Ok(());
            }
            table::print(
                [[
                    "ID".to_owned(),
                    "NAME".to_owned(),
                    "ORG".to_owned(),
                    "LOGGED IN".to_owned(),
                    "LAST USED".to_owned(),
                ]]
                .into_iter()
                .chain(devices.iter().map(|d| {
                    [
                        d.id.clone(),
                        format!(
                            "{}{}",
                            if d.name.is_empty() { "?" } else { &d.name },
                            if d.current { " (this machine)" } else { "" }
                        ),
                        d.org.clone(),
                        ago(d.created_at_ms),
                        ago(d.last_used_at_ms),
                    ]
                })),
            );
            Ok(())
        }
        DeviceCommand::Revoke { id } => {
            let Response::Devices(revoked) = client.request(Request::DeviceRevoke { id }).await?
            else {
                bail!("unexpected reply to device/revoke");
            };
            let Some(device) = revoked.first() else {
                bail!("the daemon revoked nothing");
            };
            if json_output {
                println!("{}", serde_json::to_string(device)?);
            } else {
                println!(
                    "revoked {} ({}): it must log in again",
                    device.id,
                    if device.name.is_empty() {
                        "?"
                    } else {
                        &device.name
                    }
                );
            }
            Ok(())
        }
    }
}

async fn decide(client: &mut Client, request: Request, json_output: bool) -> anyhow::Result<()> {
    let Response::DeviceDecided(decision) = client.request(request).await? else {
        bail!("unexpected reply");
    };
    if json_output {
        println!("{}", serde_json::to_string(&decision)?);
    } else {
        let machine = if decision.name.is_empty() {
            "the machine".to_owned()
        } else {
            format!("the machine {:?}", decision.name)
        };
        if decision.approved {
            println!("approved: {machine} is logging in as you");
        } else {
            println!("denied: {machine} will not log in");
        }
    }
    Ok(())
}

/// `cloudctl login --relay URL` without a token: starts a device login, shows the code,
/// and waits for its approval.
pub async fn device_login(
    client: &mut Client,
    relay: String,
    json_output: bool,
) -> anyhow::Result<()> {
    let Response::DeviceLogin(login) = client
        .request(Request::LoginDevice {
            relay: relay.clone(),
        })
        .await?
    else {
        bail!("unexpected reply to login/device");
    };
    let minutes = (login.expires_in_ms / 60_000).max(1);
    if json_output {
        println!(
            "{}",
            json!({"user_code": login.user_code, "expires_in_ms": login.expires_in_ms})
        );
    } else {
        println!("To log this machine in, run on a machine already logged in to {relay}:");
        println!();
        println!("    cloudctl device approve {}", login.user_code);
        println!();
        println!(
            "(or have the relay's operator run `cloud-relay device approve {} --user USER --org ORG --data DIR`)",
            login.user_code
        );
        println!("The code expires in {minutes} minute(s). Waiting for approval...");
    }
    // Each poll borrows the client in turn (one at a time: the wait is sequential).
    let client = tokio::sync::Mutex::new(client);
    let identity: Identity = wait_for_approval(
        Duration::from_millis(login.interval_ms),
        Duration::from_millis(login.expires_in_ms),
        || async {
            let mut client = client.lock().await;
            match client.request(Request::LoginDevicePoll).await? {
                Response::DeviceLogin(waiting) => Ok(match waiting.state {
                    DeviceLoginState::Pending => Poll::Pending,
                    DeviceLoginState::SlowDown => Poll::SlowDown,
                }),
                Response::Identity(identity) => Ok(Poll::Done(identity)),
                other => Err(anyhow::anyhow!(
                    "unexpected reply to login/device/poll: {other:?}"
                )),
            }
        },
    )
    .await
    .map_err(|e| match e {
        cloudctl::device::WaitError::Poll(e) => e,
        expired => anyhow::anyhow!("{expired}"),
    })?;
    if json_output {
        println!("{}", serde_json::to_string(&identity)?);
    } else {
        println!("logged in: {}", relay_line(&identity.relay));
    }
    Ok(())
}

/// The `credential store` line of `whoami`.
pub async fn credential_store(client: &mut Client) -> anyhow::Result<CredentialStore> {
    let Response::CredentialStore(store) = client.request(Request::Credentials).await? else {
        bail!("unexpected reply to credentials");
    };
    Ok(store)
}

/// How long ago `unix_ms` was, roughly.
fn ago(unix_ms: u64) -> String {
    if unix_ms == 0 {
        return "?".into();
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let seconds = now.saturating_sub(unix_ms) / 1000;
    match seconds {
        0..60 => format!("{seconds}s ago"),
        60..3600 => format!("{}m ago", seconds / 60),
        3600..86400 => format!("{}h ago", seconds / 3600),
        _ => format!("{}d ago", seconds / 86400),
    }
}
