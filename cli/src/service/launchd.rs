//! launchd: a LaunchAgent (`~/Library/LaunchAgents/dev.cloudd.agent.plist`) started at
//! login and restarted when it crashes, loaded with `launchctl bootstrap gui/$UID`.

use std::path::PathBuf;

use super::{data_dir_steps, fill, Context, Plan, ServiceManager, StatusRow, Step};

/// The plist template.
pub const PLIST_TEMPLATE: &str = include_str!("../../../launchd/dev.cloudd.agent.plist");

/// The agent's label (also its file name).
pub use cloud_protocol::paths::LAUNCHD_LABEL as LABEL;

/// launchd, for the user's agents.
#[derive(Debug, Clone, Copy)]
pub struct Launchd;

impl Launchd {
    /// `~/Library/LaunchAgents/dev.cloudd.agent.plist`.
    pub fn plist_path(context: &Context) -> PathBuf {
        context
            .home
            .join("Library/LaunchAgents")
            .join(format!("{LABEL}.plist"))
    }

    /// `~/Library/Logs/cloudd/cloudd.log`: where launchd sends the daemon's output.
    pub fn log_file(context: &Context) -> PathBuf {
        context.home.join("Library/Logs/cloudd/cloudd.log")
    }

    /// The plist, filled in.
    pub fn plist(context: &Context) -> String {
        let environment: String = context
            .environment
            .iter()
            .filter(|(name, _)| name != "CLOUDD_SOCKET")
            .map(|(name, value)| {
                format!(
                    "        <key>{}</key>\n        <string>{}</string>\n",
                    xml_escape(name),
                    xml_escape(value)
                )
            })
            .collect();
        fill(
            PLIST_TEMPLATE,
            &[
                (
                    "CLOUDD_BIN",
                    xml_escape(&context.cloudd_bin.display().to_string()),
                ),
                (
                    "SOCKET",
                    xml_escape(&context.paths.socket.display().to_string()),
                ),
                ("ENVIRONMENT", environment),
                (
                    "LOG_FILE",
                    xml_escape(&Self::log_file(context).display().to_string()),
                ),
            ],
        )
    }

    fn domain(context: &Context) -> String {
        format!("gui/{}", context.uid)
    }
}

fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn argv(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|s| s.to_string()).collect()
}

impl ServiceManager for Launchd {
    fn name(&self) -> &'static str {
        "launchd"
    }

    fn install_plan(&self, context: &Context) -> Plan {
        let plist_path = Self::plist_path(context);
        let domain = Self::domain(context);
        let plist = plist_path.display().to_string();
        let mut steps = data_dir_steps(context).to_vec();
        steps.extend([
            Step::CreateDir {
                path: Self::log_file(context)
                    .parent()
                    .expect("log file has a directory")
                    .to_owned(),
                mode: 0o700,
            },
            Step::CreateDir {
                path: plist_path
                    .parent()
                    .expect("plist has a directory")
                    .to_owned(),
                mode: 0o755,
            },
            Step::WriteFile {
                path: plist_path.clone(),
                contents: Self::plist(context),
                mode: 0o644,
            },
            // A previous version may be loaded: unload it first.
            Step::Run {
                argv: argv(&["launchctl", "bootout", &format!("{domain}/{LABEL}")]),
                may_fail: true,
            },
            Step::Run {
                argv: argv(&["launchctl", "bootstrap", &domain, &plist]),
                may_fail: false,
            },
        ]);
        Plan { steps }
    }

    fn uninstall_plan(&self, context: &Context) -> Plan {
        let domain = Self::domain(context);
        Plan {
            steps: vec![
                Step::Run {
                    argv: argv(&["launchctl", "bootout", &format!("{domain}/{LABEL}")]),
                    may_fail: true,
                },
                Step::RemoveFile {
                    path: Self::plist_path(context),
                },
                Step::Note(format!(
                    "kept cloudd's state in {}, its config in {} and its log in {}",
                    context.paths.state_dir.display(),
                    context.paths.config_dir.display(),
                    Self::log_file(context).display()
                )),
            ],
        }
    }

    fn status(&self, context: &Context) -> Vec<StatusRow> {
        let plist_path = Self::plist_path(context);
        let loaded = std::process::Command::new("launchctl")
            .args(["print", &format!("{}/{LABEL}", Self::domain(context))])
            .output()
            .map(|o| {
                if o.status.success() {
                    "loaded".to_owned()
                } else {
                    "not loaded".to_owned()
                }
            })
            .unwrap_or_else(|e| format!("unknown (launchctl: {e})"));
        vec![
            StatusRow {
                name: "manager".into(),
                value: "launchd (gui agent)".into(),
            },
            StatusRow {
                name: "agent".into(),
                value: if plist_path.is_file() {
                    format!("installed at {}", plist_path.display())
                } else {
                    "not installed (run `cloudctl service install`)".into()
                },
            },
            StatusRow {
                name: "loaded".into(),
                value: loaded,
            },
        ]
    }

    fn logs_command(&self, context: &Context, follow: bool) -> Vec<String> {
        let mut parts = vec!["tail".to_owned(), "-n".into(), "100".into()];
        if follow {
            parts.push("-F".into());
        }
        parts.push(Self::log_file(context).display().to_string());
        parts
    }

    fn restart_command(&self, context: &Context) -> Vec<String> {
        argv(&[
            "launchctl",
            "kickstart",
            "-k",
            &format!("{}/{LABEL}", Self::domain(context)),
        ])
    }

    fn probe_command(&self, context: &Context) -> Vec<String> {
        // The domain the agent is bootstrapped into exists only for a user logged in at the
        // console.
        argv(&["launchctl", "print", &Self::domain(context)])
    }

    fn missing_tool_fix(&self, tool: &str) -> String {
        format!("{tool} is not available: launchd agents exist only on macOS; use `--manager systemd` or `cloudctl up`")
    }

    fn failure_fix(&self, stderr: &str) -> String {
        if stderr.contains("Could not find domain") {
            "no launchd GUI session is reachable for this user; log in at the Mac's screen (not only over ssh), or use `cloudctl up`".into()
        } else if stderr.contains("Bootstrap failed: 5") {
            "the agent may already be loaded: run `cloudctl service uninstall` then install again"
                .into()
        } else {
            "see `launchctl print gui/$UID/dev.cloudd.agent` and the log in ~/Library/Logs/cloudd"
                .into()
        }
    }
}
