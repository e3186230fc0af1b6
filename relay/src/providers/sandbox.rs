//! The `sandbox` provider: every program of a session runs under bubblewrap (`bwrap`,
//! Debian package `bubblewrap`) and sees
//!
//! - its workspace, read-write, at its real path (`DATA/workspaces/<session>`, so paths
//!   mean the same inside and outside), which is also its working directory;
//! - its own empty /tmp (also its `HOME`), its own /proc (a new pid namespace) and a
//!   minimal /dev;
//! - a read-only system: /usr, the /bin, /sbin and /lib* links or directories, and the
//!   few files of /etc that programs need (users, name resolution, certificates, the
//!   linker cache, alternatives), and the program itself when it lives elsewhere;
//! - nothing else: the relay's data (tokens, other workspaces) and every home directory
//!   are absent, and the sandbox's root is read-only.
//!
//! Its network follows the session's `network_access`: `none` is a new network namespace
//! with only a loopback; `limited` is the same, plus the session's proxy socket (bound at
//! `/run/cloudd/proxy/proxy.sock`) and the relay's own program (at
//! `/run/cloudd/cloud-relay`), run as the forwarder ([`super::forward`]) that listens on
//! `127.0.0.1:3128` inside and starts the program with `http_proxy`/`https_proxy` set
//! to it: the only way out is the relay's filtering proxy ([`super::proxy`]); `full` is
//! the host's network.
//!
//! This module builds commands and probes the platform; it never spawns an agent.

use std::path::{Path, PathBuf};

use cloud_protocol::session::NetworkAccess;
use tokio::process::Command;

use super::ProviderError;

/// Where the relay's program is bound inside a `limited` sandbox.
pub const HELPER_INSIDE: &str = "/run/cloudd/cloud-relay";
/// Where the session's proxy directory is bound inside a `limited` sandbox.
pub const PROXY_DIR_INSIDE: &str = "/run/cloudd/proxy";
/// The port the forwarder listens on inside a `limited` sandbox (its own loopback).
pub const PROXY_PORT_INSIDE: u16 = 3128;

/// The system directories bound read-only (or recreated as the links they are).
const SYSTEM_DIRS: &[&str] = &[
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
];

/// The files and directories of /etc bound read-only where they exist.
const ETC: &[&str] = &[
    "/etc/passwd",
    "/etc/group",
    "/etc/hosts",
    "/etc/host.conf",
    "/etc/resolv.conf",
    "/etc/nsswitch.conf",
    "/etc/gai.conf",
    "/etc/services",
    "/etc/protocols",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/alternatives",
    "/etc/ssl",
    "/etc/ca-certificates",
    "/etc/localtime",
    "/etc/timezone",
    "/etc/profile",
    "/etc/bash.bashrc",
    "/etc/inputrc",
    "/etc/terminfo",
    "/etc/gitconfig",
    "/etc/mime.types",
];

/// A `limited` sandbox's way to its proxy.
#[derive(Debug, Clone)]
pub struct ProxyAccess {
    /// The directory holding the session's proxy socket (bound inside).
    pub dir: PathBuf,
    /// The socket.
    pub socket: PathBuf,
    /// The relay's program, run inside as the forwarder.
    pub helper: PathBuf,
}

/// The read-only system every sandbox sees.
fn system_args(args: &mut Vec<String>) {
    for dir in SYSTEM_DIRS {
        match std::fs::symlink_metadata(dir) {
            Ok(meta) if meta.file_type().is_symlink() => {
                if let Ok(target) = std::fs::read_link(dir) {
                    push(args, ["--symlink", &target.to_string_lossy(), dir]);
                }
            }
            Ok(meta) if meta.is_dir() => push(args, ["--ro-bind", dir, dir]),
            _ => {}
        }
    }
    for path in ETC {
        push(args, ["--ro-bind-try", path, path]);
    }
    push(
        args,
        ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"],
    );
    push(
        args,
        [
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-cgroup-try",
        ],
    );
}

fn push<const N: usize>(args: &mut Vec<String>, items: [&str; N]) {
    args.extend(items.iter().map(|s| (*s).to_owned()));
}

/// Whether bubblewrap can make a sandbox here: runs `true` in one with a network namespace
/// of its own (blocking). The error says what to install or enable.
pub fn probe(bwrap: &Path) -> Result<(), String> {
    let mut args = Vec::new();
    system_args(&mut args);
    push(&mut args, ["--unshare-net", "--", "true"]);
    let output = std::process::Command::new(bwrap)
        .args(&args)
        .stdin(std::process::Stdio::null())
        .output();
    match output {
        Ok(output) if output.status.success() => Ok(()),
        Ok(output) => {
            let stderr = String::from_utf8_lossy(&output.stderr);
            Err(format!(
                "the sandbox provider cannot create a sandbox on this host ({}: {}): enable user namespaces for the relay's user (e.g. `sysctl -w kernel.unprivileged_userns_clone=1`, or `kernel.apparmor_restrict_unprivileged_userns=0` on Ubuntu), or run the relay with --provider local",
                output.status,
                stderr.trim()
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(format!(
            "the sandbox provider needs bubblewrap, and `{}` was not found: install it on the relay host (Debian/Ubuntu: `apt-get install bubblewrap`), or run the relay with --provider local",
            bwrap.display()
        )),
        Err(e) => Err(format!(
            "the sandbox provider cannot run `{}`: {e}; install bubblewrap on the relay host, or run the relay with --provider local",
            bwrap.display()
        )),
    }
}

/// `bwrap ... -- [forwarder --] program args`: `program` confined to `workspace` with the
/// network `access` says (`proxy` must be given for `limited`).
pub fn command(
    bwrap: &Path,
    workspace: &Path,
    access: NetworkAccess,
    proxy: Option<&ProxyAccess>,
    program: &str,
    args: &[String],
) -> Result<Command, ProviderError> {
    let workspace_text = workspace.to_str().ok_or_else(|| {
        ProviderError::Workspace(format!(
            "the workspace path {} is not UTF-8",
            workspace.display()
        ))
    })?;
    let mut bwrap_args = Vec::new();
    system_args(&mut bwrap_args);
    // A program outside the system (the relay's own shell agent, a script) is bound
    // read-only where it is.
    let program_path = Path::new(program);
    if program_path.is_absolute()
        && !program_path.starts_with("/usr")
        && !program_path.starts_with(workspace)
        && program_path.exists()
    {
        push(&mut bwrap_args, ["--ro-bind", program, program]);
    }
    push(
        &mut bwrap_args,
        [
            "--bind",
            workspace_text,
            workspace_text,
            "--chdir",
            workspace_text,
            "--setenv",
            "HOME",
            "/tmp",
        ],
    );
    let mut inner: Vec<String> = Vec::new();
    match access {
        NetworkAccess::Full => {}
        NetworkAccess::None => push(&mut bwrap_args, ["--unshare-net"]),
        NetworkAccess::Limited => {
            let proxy = proxy.ok_or_else(|| {
                ProviderError::Unavailable("a limited sandbox needs its proxy".into())
            })?;
            let text = |p: &Path| {
                p.to_str().map(str::to_owned).ok_or_else(|| {
                    ProviderError::Workspace(format!("the path {} is not UTF-8", p.display()))
                })
            };
            let url = format!("http://127.0.0.1:{PROXY_PORT_INSIDE}");
            push(
                &mut bwrap_args,
                [
                    "--unshare-net",
                    "--ro-bind",
                    &text(&proxy.helper)?,
                    HELPER_INSIDE,
                    "--ro-bind",
                    &text(&proxy.dir)?,
                    PROXY_DIR_INSIDE,
                    "--unsetenv",
                    "NO_PROXY",
                    "--unsetenv",
                    "no_proxy",
                ],
            );
            for name in ["http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"] {
                push(&mut bwrap_args, ["--setenv", name, &url]);
            }
            let socket_name = proxy
                .socket
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let port = PROXY_PORT_INSIDE.to_string();
            let socket = format!("{PROXY_DIR_INSIDE}/{socket_name}");
            push(
                &mut inner,
                [
                    HELPER_INSIDE,
                    "sandbox-forward",
                    "--socket",
                    &socket,
                    "--port",
                    &port,
                    "--",
                ],
            );
        }
    }
    push(&mut bwrap_args, ["--remount-ro", "/", "--"]);
    let mut command = Command::new(bwrap);
    command.args(bwrap_args).args(inner).arg(program).args(args);
    Ok(command)
}
