//! Terminals into sessions: an interactive shell in a session's workspace, on a
//! pseudo-terminal ([`pty`]) the relay drives for one client (`http::terminal`, the shell
//! socket).
//!
//! [`shell_command`] decides what runs: a shell, in the confinement the relay's provider
//! gives the session's agent ([`Provider::command`]: its workspace as working directory,
//! a bubblewrap sandbox under `--provider sandbox`, its own network namespace when the
//! session has no network). [`Shell`] runs it on a terminal and ends it: the shell leads
//! a session and process group of its own, so hanging up reaches every process it
//! started there.
//!
//! This module never touches the store or a session's status, and never decides who may
//! open a shell (the HTTP handler checks access before anything is started here).

pub mod pty;

use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cloud_protocol::session::Session;
use cloud_protocol::terminal::WindowSize;
use tokio::process::{Child, Command};

use crate::providers::Provider;

/// How many shells a relay runs at once, at most; the next one is refused until one ends.
pub const MAX_SHELLS: usize = 64;

/// How long a hung-up shell gets to exit before its process group is killed.
pub const HANG_UP_GRACE: Duration = Duration::from_secs(2);

/// The `TERM` of a shell whose client named none.
pub const DEFAULT_TERM: &str = "xterm-256color";

/// A shell could not be started.
#[derive(Debug, thiserror::Error)]
pub enum TerminalError {
    /// The relay runs as many shells as it allows.
    #[error("the relay runs as many shells as it allows ({MAX_SHELLS}); close one and try again")]
    TooMany,
    /// The session's workspace is not on this relay.
    #[error("the session's workspace is not there; resume the session and try again")]
    NoWorkspace,
    /// The provider cannot run the session's programs here.
    #[error("{0}")]
    Provider(String),
    /// No pseudo-terminal could be opened.
    #[error("cannot open a terminal on the relay: {0}")]
    Pty(std::io::Error),
    /// The shell could not be started.
    #[error("cannot start a shell ({program}) on the relay: {source}")]
    Spawn {
        /// The shell.
        program: String,
        /// Why.
        source: std::io::Error,
    },
}

/// The relay's terminals: how many shells run.
#[derive(Debug, Default)]
pub struct Terminals {
    /// Shells running now.
    running: Arc<AtomicUsize>,
}

impl Terminals {
    /// A relay's terminals, none running.
    pub fn new() -> Terminals {
        Terminals::default()
    }

    /// Starts a shell for `session` in its workspace, through the relay's `provider`, in a
    /// terminal of `size`, with `TERM=term`. Also says why, when the session's network
    /// access is not enforced for it (`None`: it holds, or there is nothing to enforce).
    pub fn open(
        &self,
        provider: &Provider,
        session: &Session,
        size: WindowSize,
        term: &str,
    ) -> Result<(Shell, Option<String>), TerminalError> {
        if !provider.workspace(&session.id).is_dir() {
            return Err(TerminalError::NoWorkspace);
        }
        let slot = Slot::take(&self.running).ok_or(TerminalError::TooMany)?;
        let (child, master) = start_on_terminal(shell_command(provider, session, term)?, size)?;
        let unenforced = provider
            .network_note(session)
            .filter(|note| note["enforced"] != true)
            .map(|note| {
                note["reason"]
                    .as_str()
                    .unwrap_or("the provider does not enforce it")
                    .to_owned()
            });
        Ok((
            Shell {
                master,
                process: ShellProcess {
                    pid: child.id(),
                    child,
                    _slot: slot,
                },
            },
            unenforced,
        ))
    }
}

/// Starts `command` on a new terminal of `size`, as the leader of a session whose
/// controlling terminal it is.
fn start_on_terminal(
    mut command: Command,
    size: WindowSize,
) -> Result<(Child, pty::Master), TerminalError> {
    let (master, slave) = pty::open(size).map_err(TerminalError::Pty)?;
    let program = command
        .as_std()
        .get_program()
        .to_string_lossy()
        .into_owned();
    let spawn_error = |source| TerminalError::Spawn {
        program: program.clone(),
        source,
    };
    let stdio =
        |slave: &std::os::fd::OwnedFd| slave.try_clone().map(Stdio::from).map_err(spawn_error);
    command
        .stdin(stdio(&slave)?)
        .stdout(stdio(&slave)?)
        .stderr(stdio(&slave)?);
    // SAFETY: `attach` makes only async-signal-safe calls (setsid, ioctl).
    unsafe {
        command.pre_exec(pty::attach);
    }
    let child = command.spawn().map_err(spawn_error)?;
    // The relay's copies of the slave go with `command` and `slave` here, so the terminal
    // hangs up when the shell's side closes.
    Ok((child, master))
}

/// What runs when a user opens a terminal into a session: the shell, through the
/// provider's [`Provider::command`] (the confinement the session's agent gets), with
/// `PWD`, `SHELL` and `TERM` set. The caller puts it on a terminal.
pub fn shell_command(
    provider: &Provider,
    session: &Session,
    term: &str,
) -> Result<Command, TerminalError> {
    let program = ["/bin/bash", "/bin/sh"]
        .into_iter()
        .find(|shell| Path::new(shell).exists())
        .unwrap_or("/bin/sh");
    let mut command = provider
        .command(session, program, &[])
        .map_err(|e| TerminalError::Provider(e.to_string()))?;
    command
        .env("PWD", provider.workspace(&session.id))
        .env("SHELL", program)
        .env("TERM", term)
        .kill_on_drop(false);
    Ok(command)
}

/// A running shell on its terminal.
#[derive(Debug)]
pub struct Shell {
    /// The terminal's master end.
    pub master: pty::Master,
    /// The shell's process.
    pub process: ShellProcess,
}

impl Shell {
    /// Hangs the shell up (see [`ShellProcess::hang_up`]).
    pub async fn hang_up(self) {
        self.process.hang_up().await;
    }
}

/// A shell's process: the leader of its own session and process group.
#[derive(Debug)]
pub struct ShellProcess {
    /// The process.
    child: Child,
    /// Its pid, which is also its process group's id.
    pid: Option<u32>,
    /// Counts the shell in [`Terminals`] while it lives.
    _slot: Slot,
}

impl ShellProcess {
    /// Waits for the shell to exit: its status (128 + the signal's number when a signal
    /// ended it). Cancel-safe.
    pub async fn wait(&mut self) -> i32 {
        match self.child.wait().await {
            Ok(status) => exit_code(status),
            Err(e) => {
                tracing::warn!(error = %e, "cannot wait for a shell");
                1
            }
        }
    }

    /// Hangs up: SIGHUP to the shell's process group, SIGKILL after [`HANG_UP_GRACE`] if the
    /// shell is still there. Returns once it has exited.
    pub async fn hang_up(mut self) {
        signal_group(self.pid, libc::SIGHUP);
        // A stopped job would not see the hang-up until continued.
        signal_group(self.pid, libc::SIGCONT);
        if tokio::time::timeout(HANG_UP_GRACE, self.child.wait())
            .await
            .is_err()
        {
            signal_group(self.pid, libc::SIGKILL);
            let _ = self.child.wait().await;
        }
    }
}

/// A process's exit status as a shell reports it: its code, or 128 + the signal's number.
fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt as _;
    status
        .code()
        .or_else(|| status.signal().map(|signal| 128 + signal))
        .unwrap_or(1)
}

fn signal_group(pid: Option<u32>, signal: libc::c_int) {
    let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) else {
        return;
    };
    // SAFETY: killpg only sends a signal to the shell's own group (it leads a session of
    // its own); a group that is gone yields ESRCH, which is harmless.
    unsafe {
        libc::killpg(pid, signal);
    }
}

/// One of the [`MAX_SHELLS`], held while a shell runs.
#[derive(Debug)]
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(running: &Arc<AtomicUsize>) -> Option<Slot> {
        running
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_SHELLS).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(Arc::clone(running)))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloud_protocol::session::NetworkAccess;

    /// The local provider of a relay whose data is in `data`.
    fn provider(data: &Path) -> Provider {
        Provider::new(Default::default(), data, data.join("workspaces"))
    }

    /// A session `id` with network.
    fn session(id: &str) -> Session {
        Session {
            id: id.to_owned(),
            status: cloud_protocol::session::SessionStatus::Running,
            created_at: 0,
            last_activity: 0,
            task: String::new(),
            visibility: cloud_protocol::session::Visibility::Private,
            repo_access: cloud_protocol::session::RepoAccess::Write,
            network_access: NetworkAccess::Full,
            vm_image: String::new(),
            owner: "u".to_owned(),
            org: "o".to_owned(),
            failure: None,
            last_seq: 0,
            snapshot: None,
            auto_stop_minutes: 0,
            clients: Vec::new(),
            provider: Default::default(),
            allowed_domains: Vec::new(),
        }
    }

    #[test]
    fn the_exit_status_is_the_code_or_128_plus_the_signal() {
        use std::os::unix::process::ExitStatusExt as _;
        assert_eq!(exit_code(std::process::ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(
            exit_code(std::process::ExitStatus::from_raw(libc::SIGKILL)),
            137
        );
    }

    #[test]
    fn shells_beyond_the_limit_are_refused_until_one_ends() {
        let running = Arc::new(AtomicUsize::new(0));
        let slots: Vec<Slot> = (0..MAX_SHELLS)
            .map(|_| Slot::take(&running).unwrap())
            .collect();
        assert!(Slot::take(&running).is_none());
        drop(slots);
        assert!(Slot::take(&running).is_some());
    }

    /// A real shell on a real terminal: runs in the workspace, sees the size it was given
    /// and a resize, and reports its exit status. (In a `HOME` of its own: the startup
    /// files of the user running the tests are not its to read.)
    #[tokio::test]
    async fn a_shell_runs_in_its_workspace_on_a_terminal() {
        let data = tempfile::tempdir().unwrap();
        let provider = provider(data.path());
        let workspace = provider.workspace("s-1");
        std::fs::create_dir_all(&workspace).unwrap();
        let mut command = shell_command(&provider, &session("s-1"), "dumb").unwrap();
        command.env("HOME", data.path());
        let (mut child, master) =
            start_on_terminal(command, WindowSize { cols: 90, rows: 30 }).unwrap();
        master
            .resize(WindowSize {
                cols: 101,
                rows: 41,
            })
            .unwrap();
        let script = b"echo \"at=[$PWD] id=[$CLOUD_SESSION_ID]\"; stty size; exit 7\n";
        let mut written = 0;
        while written < script.len() {
            written += master.write(&script[written..]).await.unwrap();
        }
        let mut output = Vec::new();
        let mut buf = [0u8; 4096];
        let expected = format!("at=[{}] id=[s-1]", workspace.display());
        while !String::from_utf8_lossy(&output).contains("41 101") {
            let n = tokio::time::timeout(Duration::from_secs(10), master.read(&mut buf))
                .await
                .expect("the shell answers")
                .unwrap();
            assert!(n > 0, "{}", String::from_utf8_lossy(&output));
            output.extend_from_slice(&buf[..n]);
        }
        assert!(
            String::from_utf8_lossy(&output).contains(&expected),
            "{}",
            String::from_utf8_lossy(&output)
        );
        let status = child.wait().await.unwrap();
        assert_eq!(exit_code(status), 7);
    }

    #[test]
    fn a_session_without_its_workspace_gets_no_shell() {
        let data = tempfile::tempdir().unwrap();
        let terminals = Terminals::new();
        let opened = terminals.open(
            &provider(data.path()),
            &session("s-gone"),
            WindowSize::DEFAULT,
            "dumb",
        );
        assert!(
            matches!(opened, Err(TerminalError::NoWorkspace)),
            "{opened:?}"
        );
    }
}
