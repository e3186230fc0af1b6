//! Running cloudd at login: `cloudctl service install|uninstall|status|logs`.
//!
//! Each service manager (one file per OS: [`systemd`], [`launchd`]) turns the unit
//! templates in `systemd/` and `launchd/` into a [`Plan`]: the directories, files and
//! commands that installing or uninstalling takes. `--dry-run` prints the plan; otherwise it
//! is carried out step by step, stopping at the first failure with an error that names the
//! fix. Before an install changes anything, [`preflight`] checks what it can without
//! changing anything: the manager answers, its tools exist, its files can be written.
//! Uninstalling undoes what installing did, except the state and config directories,
//! which hold the user's data and are kept.

pub mod launchd;
pub mod systemd;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use cloud_protocol::ipc::Supervisor;
use cloud_protocol::paths::Paths;
use serde_json::{json, Value};

/// A service-manager operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// A file or directory could not be written or removed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A command could not be run or failed.
    #[error("`{command}` failed: {detail}; {fix}")]
    Command {
        /// The command line.
        command: String,
        /// What it said.
        detail: String,
        /// What the user can do.
        fix: String,
    },
    /// The environment lacks something the plan needs.
    #[error("{0}")]
    Environment(String),
    /// A check before installing failed, so nothing was done.
    #[error("{0}; nothing was changed")]
    Precondition(String),
}

/// Everything a plan is made from.
#[derive(Debug, Clone)]
pub struct Context {
    /// The `cloudd` binary the units start (absolute).
    pub cloudd_bin: PathBuf,
    /// The daemon's files, from the location rule.
    pub paths: Paths,
    /// The user's home directory.
    pub home: PathBuf,
    /// `$XDG_RUNTIME_DIR` (systemd's `%t`), when set.
    pub runtime_dir: Option<PathBuf>,
    /// The user's uid (launchd domains are per uid).
    pub uid: u32,
    /// `CLOUDD_HOME` / `CLOUDD_SOCKET` / `CLOUDD_LOG` as set when installing, carried into
    /// the unit so the service finds the same files as this shell.
    pub environment: Vec<(String, String)>,
    /// Whether the user is in a graphical session (else the linger hint is shown).
    pub graphical_session: bool,
}

impl Context {
    /// The context of this process.
    pub fn from_env(paths: Paths) -> Result<Context, ServiceError> {
        let home = std::env::var_os("HOME")
            .map(PathBuf::from)
            .ok_or_else(|| ServiceError::Environment("HOME is not set".into()))?;
        let cloudd_bin = crate::cloudd_binary();
        let cloudd_bin = std::fs::canonicalize(&cloudd_bin).map_err(|_| {
            ServiceError::Environment(format!(
                "cannot find the cloudd binary ({}); install it beside cloudctl or set CLOUDD_BIN",
                cloudd_bin.display()
            ))
        })?;
        let environment = ["CLOUDD_HOME", "CLOUDD_SOCKET", "CLOUDD_LOG"]
            .iter()
            .filter_map(|name| {
                std::env::var(name)
                    .ok()
                    .filter(|v| !v.is_empty())
                    .map(|v| (name.to_string(), v))
            })
            .collect();
        let graphical_session = ["DISPLAY", "WAYLAND_DISPLAY"]
            .iter()
            .any(|name| std::env::var_os(name).is_some())
            || std::env::var("XDG_SESSION_TYPE").is_ok_and(|t| t == "x11" || t == "wayland");
        Ok(Context {
            cloudd_bin,
            paths,
            home,
            runtime_dir: std::env::var_os("XDG_RUNTIME_DIR")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
            uid: current_uid(),
            environment,
            graphical_session,
        })
    }
}

/// One step of a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Create a directory (and its parents) with this mode.
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// Its mode.
        mode: u32,
    },
    /// Write a file with this mode.
    WriteFile {
        /// The file.
        path: PathBuf,
        /// Its contents.
        contents: String,
        /// Its mode.
        mode: u32,
    },
    /// Remove a file if it exists.
    RemoveFile {
        /// The file.
        path: PathBuf,
    },
    /// Run a command.
    Run {
        /// Program and arguments.
        argv: Vec<String>,
        /// Whether a failure is expected and harmless (undoing what may not be there).
        may_fail: bool,
    },
    /// Tell the user something.
    Note(String),
}

/// What an operation takes, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// The steps.
    pub steps: Vec<Step>,
}

impl Plan {
    /// The plan as text, for `--dry-run`.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for step in &self.steps {
            match step {
                Step::CreateDir { path, mode } => {
                    let _ = writeln!(out, "create directory {} ({mode:04o})", path.display());
                }
                Step::WriteFile {
                    path,
                    contents,
                    mode,
                } => {
                    let _ = writeln!(out, "write {} ({mode:04o}):", path.display());
                    for line in contents.lines() {
                        let _ = writeln!(out, "    {line}");
                    }
                }
                Step::RemoveFile { path } => {
                    let _ = writeln!(out, "remove {}", path.display());
                }
                Step::Run { argv, may_fail } => {
                    let _ = writeln!(
                        out,
                        "run {}{}",
                        argv.join(" "),
                        if *may_fail { " (failure ignored)" } else { "" }
                    );
                }
                Step::Note(note) => {
                    let _ = writeln!(out, "note: {note}");
                }
            }
        }
        out
    }

    /// The plan as JSON, for `--dry-run --json`.
    pub fn to_json(&self) -> Value {
        let steps: Vec<Value> = self
            .steps
            .iter()
            .map(|step| match step {
                Step::CreateDir { path, mode } => {
                    json!({"create_dir": path, "mode": format!("{mode:04o}")})
                }
                Step::WriteFile {
                    path,
                    contents,
                    mode,
                } => {
                    json!({"write": path, "mode": format!("{mode:04o}"), "contents": contents})
                }
                Step::RemoveFile { path } => json!({"remove": path}),
                Step::Run { argv, may_fail } => json!({"run": argv, "may_fail": may_fail}),
                Step::Note(note) => json!({"note": note}),
            })
            .collect();
        json!({ "steps": steps })
    }

    /// Carries the plan out, printing notes. Stops at the first failing step.
    pub fn execute(&self, manager: &dyn ServiceManager) -> Result<(), ServiceError> {
        for step in &self.steps {
            match step {
                Step::CreateDir { path, mode } => create_dir(path, *mode)?,
                Step::WriteFile {
                    path,
                    contents,
                    mode,
                } => write_file(path, contents, *mode)?,
                Step::RemoveFile { path } => match std::fs::remove_file(path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(source) => {
                        return Err(ServiceError::Io {
                            action: "remove",
                            path: path.clone(),
                            source,
                        })
                    }
                },
                Step::Run { argv, may_fail } => {
                    if let Err(e) = run(argv, manager) {
                        if !*may_fail {
                            return Err(e);
                        }
                    }
                }
                Step::Note(note) => eprintln!("note: {note}"),
            }
        }
        Ok(())
    }
}

/// Checks, changing nothing, what installing with `plan` needs: the manager answers from
/// this shell, every program the plan runs exists, and every directory and file it creates
/// can be. An install runs this before it stops anything, so a failure leaves everything
/// as it was.
pub fn preflight(
    manager: &dyn ServiceManager,
    context: &Context,
    plan: &Plan,
) -> Result<(), ServiceError> {
    for step in &plan.steps {
        match step {
            Step::Run { argv, .. } => {
                if find_program(&argv[0]).is_none() {
                    return Err(ServiceError::Precondition(format!(
                        "`{}` cannot be found; {}",
                        argv[0],
                        manager.missing_tool_fix(&argv[0])
                    )));
                }
            }
            Step::CreateDir { path, .. } => can_create(path, true)?,
            Step::WriteFile { path, .. } => can_create(path, false)?,
            Step::RemoveFile { .. } | Step::Note(_) => {}
        }
    }
    run(&manager.probe_command(context), manager)
        .map(drop)
        .map_err(|e| ServiceError::Precondition(e.to_string()))
}

/// Where `program` is found: itself when it names a path, else the first executable of
/// that name on `PATH`.
fn find_program(program: &str) -> Option<PathBuf> {
    let executable = |path: &Path| {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            path.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        }
        #[cfg(not(unix))]
        {
            path.is_file()
        }
    };
    if program.contains(std::path::MAIN_SEPARATOR) {
        let path = PathBuf::from(program);
        return executable(&path).then_some(path);
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|path| executable(path))
}

/// Whether `path` (a directory when `dir`, else a file) can be created or replaced: when
/// it exists it is of that kind (and a file is writable), else its nearest existing
/// ancestor is a directory this user can write into.
fn can_create(path: &Path, dir: bool) -> Result<(), ServiceError> {
    let refuse = |why: String| Err(ServiceError::Precondition(why));
    match std::fs::metadata(path) {
        Ok(metadata) if metadata.is_dir() != dir => refuse(format!(
            "{} exists and is not a {}; move it out of the way",
            path.display(),
            if dir { "directory" } else { "file" }
        )),
        Ok(_) if dir => Ok(()),
        Ok(_) => writable(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let Some(ancestor) = path.ancestors().skip(1).find(|a| a.exists()) else {
                return refuse(format!("no ancestor of {} exists", path.display()));
            };
            if !ancestor.is_dir() {
                return refuse(format!(
                    "cannot create {}: {} is not a directory",
                    path.display(),
                    ancestor.display()
                ));
            }
            writable(ancestor)
        }
        Err(e) => refuse(format!("cannot use {}: {e}", path.display())),
    }
}

/// Whether this user may write to `path` (a read-only file system counts).
fn writable(path: &Path) -> Result<(), ServiceError> {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt as _;
        let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
            return Err(ServiceError::Precondition(format!(
                "{} is not a usable path",
                path.display()
            )));
        };
        // SAFETY: `c_path` is a valid NUL-terminated string for the duration of the call.
        if unsafe { libc::access(c_path.as_ptr(), libc::W_OK) } != 0 {
            return Err(ServiceError::Precondition(format!(
                "cannot write to {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            )));
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Runs a command, turning failures into errors that name the fix.
pub fn run(argv: &[String], manager: &dyn ServiceManager) -> Result<String, ServiceError> {
    let command_line = argv.join(" ");
    let output = Command::new(&argv[0])
        .args(&argv[1..])
        .output()
        .map_err(|e| ServiceError::Command {
            command: command_line.clone(),
            detail: e.to_string(),
            fix: manager.missing_tool_fix(&argv[0]),
        })?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
        Err(ServiceError::Command {
            command: command_line,
            fix: manager.failure_fix(&stderr),
            detail: if stderr.is_empty() {
                output.status.to_string()
            } else {
                stderr
            },
        })
    }
}

fn create_dir(path: &Path, mode: u32) -> Result<(), ServiceError> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, mode);
    #[cfg(not(unix))]
    let _ = mode;
    builder.create(path).map_err(|source| ServiceError::Io {
        action: "create",
        path: path.to_owned(),
        source,
    })
}

fn write_file(path: &Path, contents: &str, mode: u32) -> Result<(), ServiceError> {
    let io = |source| ServiceError::Io {
        action: "write",
        path: path.to_owned(),
        source,
    };
    std::fs::write(path, contents).map_err(io)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io)?;
    }
    #[cfg(not(unix))]
    let _ = mode;
    Ok(())
}

/// The daemon's state and config directories, private: every install plan creates them
/// first (a hardened unit can only write where they already exist).
pub fn data_dir_steps(context: &Context) -> [Step; 2] {
    [
        Step::CreateDir {
            path: context.paths.state_dir.clone(),
            mode: 0o700,
        },
        Step::CreateDir {
            path: context.paths.config_dir.clone(),
            mode: 0o700,
        },
    ]
}

/// One row of `service status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusRow {
    /// What is described.
    pub name: String,
    /// Its state.
    pub value: String,
}

/// A service manager: systemd (user units) or launchd (a LaunchAgent).
pub trait ServiceManager: std::fmt::Debug {
    /// Its name (`systemd`, `launchd`).
    fn name(&self) -> &'static str;
    /// What installing takes.
    fn install_plan(&self, context: &Context) -> Plan;
    /// What uninstalling takes.
    fn uninstall_plan(&self, context: &Context) -> Plan;
    /// Whether the service is installed, enabled and running.
    fn status(&self, context: &Context) -> Vec<StatusRow>;
    /// The command that shows (and follows) the daemon's log.
    fn logs_command(&self, context: &Context, follow: bool) -> Vec<String>;
    /// The command that restarts the daemon.
    fn restart_command(&self, context: &Context) -> Vec<String>;
    /// A command that changes nothing and succeeds only when this shell can reach the
    /// manager (the [`preflight`] check).
    fn probe_command(&self, context: &Context) -> Vec<String>;
    /// What to do when `tool` cannot be run.
    fn missing_tool_fix(&self, tool: &str) -> String;
    /// What to do when a command failed with `stderr`.
    fn failure_fix(&self, stderr: &str) -> String;
}

/// The service manager of this platform, or the one named (`systemd`, `launchd`).
pub fn manager(name: Option<&str>) -> Result<Box<dyn ServiceManager>, ServiceError> {
    let name = name.unwrap_or(if cfg!(target_os = "macos") {
        "launchd"
    } else {
        "systemd"
    });
    match name {
        "systemd" => Ok(Box::new(systemd::Systemd)),
        "launchd" => Ok(Box::new(launchd::Launchd)),
        other => Err(ServiceError::Environment(format!(
            "unknown service manager {other:?}: use systemd or launchd"
        ))),
    }
}

/// The manager that supervises a daemon, from what it reported in its hello.
pub fn manager_of(supervisor: Supervisor) -> Option<Box<dyn ServiceManager>> {
    match supervisor {
        Supervisor::Systemd => Some(Box::new(systemd::Systemd)),
        Supervisor::Launchd => Some(Box::new(launchd::Launchd)),
        Supervisor::None => None,
    }
}

/// Fills `@NAME@` placeholders in a template.
pub fn fill(template: &str, values: &[(&str, String)]) -> String {
    let mut out = template.to_owned();
    for (name, value) in values {
        out = out.replace(&format!("@{name}@"), value);
    }
    debug_assert!(!out.contains("@CLOUDD_BIN@"), "unfilled placeholder");
    out
}

/// This process's uid.
pub fn current_uid() -> u32 {
    #[cfg(unix)]
    {
        // SAFETY: getuid has no preconditions and cannot fail.
        unsafe { libc::getuid() }
    }
    #[cfg(not(unix))]
    {
        0
    }
}
