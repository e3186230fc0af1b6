//! systemd user units: `cloudd.socket` (systemd listens on the daemon's socket) and
//! `cloudd.service` (Type=notify, restarted on failure, hardened), written to
//! `~/.config/systemd/user/` and enabled with `systemctl --user enable --now`.

use std::path::PathBuf;

use super::{data_dir_steps, fill, Context, Plan, ServiceManager, StatusRow, Step};

/// The service unit template.
pub const SERVICE_TEMPLATE: &str = include_str!("../../../systemd/cloudd.service");
/// The socket unit template.
pub const SOCKET_TEMPLATE: &str = include_str!("../../../systemd/cloudd.socket");

/// The service unit's name.
pub const SERVICE: &str = "cloudd.service";
/// The socket unit's name.
pub const SOCKET: &str = "cloudd.socket";

/// systemd, for the user's units.
#[derive(Debug, Clone, Copy)]
pub struct Systemd;

impl Systemd {
    /// Where user units go: `$XDG_CONFIG_HOME/systemd/user`, else `~/.config/systemd/user`.
    pub fn unit_dir(context: &Context) -> PathBuf {
        std::env::var_os("XDG_CONFIG_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| context.home.join(".config"))
            .join("systemd/user")
    }

    /// The unit files, filled in: (file name, contents).
    pub fn units(context: &Context) -> [(&'static str, String); 2] {
        let environment: String = context
            .environment
            .iter()
            .map(|(name, value)| format!("Environment=\"{name}={value}\"\n"))
            .collect();
        // Where the location rule lands on systemd's own directories, say so with its
        // specifiers (%t = $XDG_RUNTIME_DIR, %h = home), so the units read as intended and
        // follow the user; an override (CLOUDD_HOME, CLOUDD_SOCKET, XDG_*) is spelled out.
        let runtime = context.runtime_dir.as_deref();
        let spelled = |path: &std::path::Path| -> String {
            if let Some(rest) = runtime.and_then(|r| path.strip_prefix(r).ok()) {
                return format!("%t/{}", rest.display());
            }
            if let Ok(rest) = path.strip_prefix(&context.home) {
                return format!("%h/{}", rest.display());
            }
            path.display().to_string()
        };
        let values = [
            ("CLOUDD_BIN", context.cloudd_bin.display().to_string()),
            ("ENVIRONMENT", environment),
            ("STATE_DIR", spelled(&context.paths.state_dir)),
            ("CONFIG_DIR", spelled(&context.paths.config_dir)),
            ("SOCKET_DIR", spelled(context.paths.socket_dir())),
            ("SOCKET", spelled(&context.paths.socket)),
        ];
        [
            (SERVICE, fill(SERVICE_TEMPLATE, &values)),
            (SOCKET, fill(SOCKET_TEMPLATE, &values)),
        ]
    }
}

fn systemctl(args: &[&str]) -> Vec<String> {
    ["systemctl", "--user"]
        .iter()
        .chain(args)
        .map(|s| s.to_string())
        .collect()
}

impl ServiceManager for Systemd {
    fn name(&self) -> &'static str {
        "systemd"
    }

    fn install_plan(&self, context: &Context) -> Plan {
        let unit_dir = Self::unit_dir(context);
        let mut steps = data_dir_steps(context).to_vec();
        steps.push(Step::CreateDir {
            path: unit_dir.clone(),
            mode: 0o755,
        });
        for (name, contents) in Self::units(context) {
            steps.push(Step::WriteFile {
                path: unit_dir.join(name),
                contents,
                mode: 0o644,
            });
        }
        steps.push(Step::Run {
            argv: systemctl(&["daemon-reload"]),
            may_fail: false,
        });
        steps.push(Step::Run {
            argv: systemctl(&["enable", "--now", SOCKET, SERVICE]),
            may_fail: false,
        });
        if !context.graphical_session {
            steps.push(Step::Note(
                "without a graphical session, systemd stops your user services when you log out; \
                 to keep cloudd running, run `loginctl enable-linger $USER`"
                    .into(),
            ));
        }
        Plan { steps }
    }

    fn uninstall_plan(&self, context: &Context) -> Plan {
        let unit_dir = Self::unit_dir(context);
        Plan {
            steps: vec![
                Step::Run {
                    argv: systemctl(&["disable", "--now", SERVICE, SOCKET]),
                    may_fail: true,
                },
                Step::RemoveFile {
                    path: unit_dir.join(SERVICE),
                },
                Step::RemoveFile {
                    path: unit_dir.join(SOCKET),
                },
                Step::Run {
                    argv: systemctl(&["daemon-reload"]),
                    may_fail: true,
                },
                Step::Note(format!(
                    "kept cloudd's state in {} and its config in {}",
                    context.paths.state_dir.display(),
                    context.paths.config_dir.display()
                )),
            ],
        }
    }

    fn status(&self, context: &Context) -> Vec<StatusRow> {
        let unit_dir = Self::unit_dir(context);
        let query = |args: &[&str]| -> String {
            match std::process::Command::new("systemctl")
                .args(["--user"])
                .args(args)
                .output()
            {
                Ok(output) => {
                    let text = String::from_utf8_lossy(&output.stdout).trim().to_owned();
                    if text.is_empty() {
                        String::from_utf8_lossy(&output.stderr).trim().to_owned()
                    } else {
                        text
                    }
                }
                Err(e) => format!("unknown (systemctl: {e})"),
            }
        };
        let installed = unit_dir.join(SERVICE).is_file() && unit_dir.join(SOCKET).is_file();
        vec![
            StatusRow {
                name: "manager".into(),
                value: "systemd (user)".into(),
            },
            StatusRow {
                name: "units".into(),
                value: if installed {
                    format!("installed in {}", unit_dir.display())
                } else {
                    "not installed (run `cloudctl service install`)".into()
                },
            },
            StatusRow {
                name: "enabled".into(),
                value: query(&["is-enabled", SERVICE]),
            },
            StatusRow {
                name: "service".into(),
                value: query(&["is-active", SERVICE]),
            },
            StatusRow {
                name: "socket".into(),
                value: query(&["is-active", SOCKET]),
            },
        ]
    }

    fn logs_command(&self, _context: &Context, follow: bool) -> Vec<String> {
        let mut argv: Vec<String> = ["journalctl", "--user", "-u", "cloudd", "-n", "100"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        if follow {
            argv.push("-f".into());
        }
        argv
    }

    fn restart_command(&self, _context: &Context) -> Vec<String> {
        systemctl(&["restart", SERVICE])
    }

    fn probe_command(&self, _context: &Context) -> Vec<String> {
        // Answered by the user manager itself: it fails when none is reachable.
        systemctl(&["show-environment"])
    }

    fn missing_tool_fix(&self, tool: &str) -> String {
        format!(
            "{tool} is not available: this system does not run systemd; start cloudd with `cloudctl up` from your session's autostart instead"
        )
    }

    fn failure_fix(&self, stderr: &str) -> String {
        if stderr.contains("Failed to connect to bus") || stderr.contains("XDG_RUNTIME_DIR") {
            "no systemd user manager is reachable from this shell; log in through a session that starts one (or run `loginctl enable-linger $USER` and log in again), or use `cloudctl up`".into()
        } else {
            "see `systemctl --user status cloudd` and `journalctl --user -u cloudd`".into()
        }
    }
}
