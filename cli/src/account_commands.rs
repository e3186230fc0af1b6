//! The account commands of the `cloudctl` binary: `org list|switch` (the org sessions are
//! created in and listed from) and `settings get|set` (the shared settings, with where each
//! value in effect comes from). Each is one request to the daemon, printed for people or,
//! with `--json`, for programs.

use anyhow::bail;
use clap::Subcommand;
use cloud_protocol::ipc::{Request, Response};
use cloudctl::client::Client;
use serde_json::json;

/// `cloudctl org ...`
#[derive(Debug, Subcommand)]
pub enum OrgCommand {
    /// List your orgs; the current one is marked with `*`.
    List,
    /// Make ORG the current org: new sessions are created in it, and the session list and
    /// team visibility follow it (the daemon reconnects in its scope).
    Switch {
        /// The org.
        org: String,
    },
}

/// `cloudctl settings ...`
#[derive(Debug, Subcommand)]
pub enum SettingsCommand {
    /// Show the settings in effect and where each comes from (flag, config, user, org,
    /// org (locked), default); works offline from the daemon's copy.
    Get {
        /// One setting (default: all): visibility, network, allowed_domains,
        /// auto_stop_minutes, or feature.NAME.
        key: Option<String>,
        /// Show the current org's stored settings instead.
        #[arg(long)]
        org: bool,
    },
    /// Set one of your settings, or (org admins, with --org) one of your current org's.
    Set {
        /// The setting.
        key: String,
        /// Its value.
        value: String,
        /// Set the current org's setting (org admins only).
        #[arg(long)]
        org: bool,
        /// Lock the org setting: nothing below (user settings, config.toml, flags)
        /// overrides it. Needs --org.
        #[arg(long, requires = "org")]
        lock: bool,
        /// Replace only this version (default: the version this machine last saw); a
        /// write of a stale version is refused with the current value.
        #[arg(long, value_name = "VERSION")]
        if_version: Option<u64>,
    },
}

/// Runs `org ...`.
pub async fn org(
    client: &mut Client,
    command: OrgCommand,
    json_output: bool,
) -> anyhow::Result<()> {
    let request = match command {
        OrgCommand::List => Request::OrgList,
        OrgCommand::Switch { org } => Request::OrgSwitch { org },
    };
    let switching = matches!(request, Request::OrgSwitch { .. });
    let Response::Orgs(orgs) = client.request(request).await? else {
        bail!("unexpected reply");
    };
    if json_output {
        println!("{}", serde_json::to_string(&orgs)?);
        return Ok(());
    }
    if switching {
        println!("switched to org {}", orgs.current.as_deref().unwrap_or("?"));
        return Ok(());
    }
    if orgs.orgs.is_empty() {
        match &orgs.current {
            Some(current) => println!("* {current}"),
            None => println!("no orgs known yet (they are learnt when the daemon connects; see `cloudctl status`)"),
        }
        return Ok(());
    }
    for org in &orgs.orgs {
        let mark = if orgs.current.as_ref() == Some(org) {
            "*"
        } else {
            " "
        };
        println!("{mark} {org}");
    }
    Ok(())
}

/// Runs `settings ...`.
pub async fn settings(
    client: &mut Client,
    command: SettingsCommand,
    json_output: bool,
) -> anyhow::Result<()> {
    let request = match command {
        SettingsCommand::Get { key, org } => Request::SettingsGet { key, org },
        SettingsCommand::Set {
            key,
            value,
            org,
            lock,
            if_version,
        } => Request::SettingsSet {
            key,
            value,
            org,
            lock,
            version: if_version,
        },
    };
    let Response::Settings(views) = client.request(request).await? else {
        bail!("unexpected reply");
    };
    if json_output {
        println!("{}", json!(views));
        return Ok(());
    }
    if views.is_empty() {
        println!("no settings");
        return Ok(());
    }
    let header = ["KEY", "VALUE", "SOURCE", "VERSION"].map(String::from);
    let rows = views.into_iter().map(|view| {
        [
            view.key,
            if view.value.is_empty() {
                "(none)".to_owned()
            } else {
                view.value
            },
            view.source.name().to_owned(),
            if view.version == 0 {
                "-".to_owned()
            } else {
                view.version.to_string()
            },
        ]
    });
    crate::table::print(std::iter::once(header).chain(rows));
    Ok(())
}
