//! The `local` provider: a session's workspace is a directory on the relay host and its
//! agent a plain process. With `network_access = none` the process gets a new, empty
//! network namespace (Linux, with CAP_SYS_ADMIN or unprivileged user namespaces); where
//! that is impossible the agent runs anyway and the session's log says it is not
//! enforced. `limited` is not filtered here (that is the sandbox provider's job).
//!
//! This module only builds commands and probes the platform; it never spawns an agent.

use tokio::process::Command;

/// A command running `program` with `args` on the host, in an empty network namespace
/// when `isolate_network`.
pub fn command(program: &str, args: &[String], isolate_network: bool) -> Command {
    let mut command = Command::new(program);
    command.args(args);
    #[cfg(target_os = "linux")]
    if isolate_network {
        // SAFETY: unshare is async-signal-safe and only affects the child being set up.
        unsafe {
            command.pre_exec(unshare_network);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = isolate_network;
    command
}

/// Moves the calling process into a new network namespace (a new user namespace too when
/// that is the only way this process may).
#[cfg(target_os = "linux")]
fn unshare_network() -> std::io::Result<()> {
    // SAFETY: unshare only changes the calling process's namespaces.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } == 0
        || unsafe { libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET) } == 0
    {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Whether an agent can be given an empty network namespace here: runs `true` in one
/// (blocking, once at start).
pub fn probe_network_namespace() -> Result<(), String> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt as _;
        let mut probe = std::process::Command::new("true");
        // SAFETY: as in `command`.
        unsafe {
            probe.pre_exec(unshare_network);
        }
        match probe.status() {
            Ok(status) if status.success() => Ok(()),
            Ok(status) => Err(format!(
                "a probe in a new network namespace failed ({status})"
            )),
            Err(e) => Err(format!("cannot create a network namespace: {e}")),
        }
    }
    #[cfg(not(target_os = "linux"))]
    Err("network namespaces exist only on Linux".into())
}
