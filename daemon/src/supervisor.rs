//! What the service manager hands the daemon, and what the daemon tells it.
//!
//! - Socket activation: systemd passes the listening socket as fd 3 with `LISTEN_FDS=1`
//!   and `LISTEN_PID` set to this process. The daemon then serves that socket instead of
//!   binding its own, and leaves its file alone on exit (systemd owns it).
//! - Readiness: `READY=1` once the socket is served, `STOPPING=1` when the drain starts,
//!   `WATCHDOG=1` every half `WATCHDOG_USEC` from the core loop (so a wedged core stops
//!   the pings and systemd restarts it). Messages go as datagrams to `NOTIFY_SOCKET`
//!   (a path, or an abstract name when it starts with `@`).
//! - Upgrades: the daemon remembers its executable's identity at start and reports in the
//!   hello when the file on disk has changed, so clients restart it.
//!
//! The environment variables are read once, at start, and removed so that child processes
//! never inherit them.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use cloud_protocol::ipc::Supervisor;
use cloud_protocol::paths::LAUNCHD_LABEL;

/// The first fd systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: i32 = 3;

/// What the service manager gave this process.
#[derive(Debug, Default)]
pub struct Handoff {
    /// The listening socket, when socket-activated.
    pub listen_fd: Option<OwnedFd>,
    /// Where to send readiness messages.
    notify_socket: Option<String>,
    /// How often the watchdog must be pinged, when it is enabled.
    pub watchdog_interval: Option<Duration>,
    /// Who supervises this process.
    pub supervisor: Option<Supervisor>,
}

impl Handoff {
    /// Reads (and removes) the service manager's environment variables. Call before any
    /// thread starts: it changes the process environment.
    pub fn from_env() -> Handoff {
        let take = |name: &str| {
            let value = std::env::var(name).ok().filter(|v| !v.is_empty());
            // SAFETY (edition 2021: safe fn): called at start, before other threads exist.
            std::env::remove_var(name);
            value
        };
        let pid = std::process::id().to_string();
        let listen_pid = take("LISTEN_PID");
        let listen_fds = take("LISTEN_FDS");
        let _ = take("LISTEN_FDNAMES");
        let listen_fd = match (listen_pid, listen_fds) {
            (Some(listen_pid), Some(n)) if listen_pid == pid && n.trim() == "1" => {
                // SAFETY: systemd passed fd 3 to this process (LISTEN_PID is ours) and nothing
                // else in this process has taken ownership of it.
                let fd =
                    unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(LISTEN_FDS_START) };
                set_cloexec(&fd);
                Some(fd)
            }
            (Some(listen_pid), Some(n)) if listen_pid == pid => {
                tracing::warn!("ignoring socket activation: expected 1 socket, got LISTEN_FDS={n}");
                None
            }
            _ => None,
        };
        let notify_socket = take("NOTIFY_SOCKET");
        let watchdog_pid = take("WATCHDOG_PID");
        let watchdog_usec = take("WATCHDOG_USEC");
        let watchdog_interval = watchdog_usec
            .and_then(|usec| usec.parse::<u64>().ok())
            .filter(|_| watchdog_pid.as_deref().is_none_or(|p| p == pid))
            .filter(|usec| *usec > 0)
            .map(|usec| Duration::from_micros(usec / 2));
        // Only what systemd hands to a service it supervises counts: INVOCATION_ID alone is
        // also set for anything started from inside some other service.
        let supervisor = if listen_fd.is_some() || notify_socket.is_some() {
            Some(Supervisor::Systemd)
        } else if std::env::var("XPC_SERVICE_NAME").is_ok_and(|name| name == LAUNCHD_LABEL) {
            Some(Supervisor::Launchd)
        } else {
            None
        };
        Handoff {
            listen_fd,
            notify_socket,
            watchdog_interval,
            supervisor,
        }
    }

    /// Tells the service manager `state` (`READY=1`, `STOPPING=1`, `WATCHDOG=1`, ...).
    /// Does nothing when no manager listens; a failure is logged, never fatal.
    pub fn notify(&self, state: &str) {
        let Some(target) = &self.notify_socket else {
            return;
        };
        if let Err(e) = send_notification(target, state) {
            tracing::warn!(error = %e, "cannot notify the service manager of {state:?}");
        }
    }
}

fn send_notification(target: &str, state: &str) -> std::io::Result<()> {
    use std::os::unix::net::UnixDatagram;
    let socket = UnixDatagram::unbound()?;
    if let Some(name) = target.strip_prefix('@') {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        {
            use std::os::linux::net::SocketAddrExt as _;
            let address = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
            socket.send_to_addr(state.as_bytes(), &address)?;
            return Ok(());
        }
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        {
            let _ = name;
            return Err(std::io::ErrorKind::Unsupported.into());
        }
    }
    socket.send_to(state.as_bytes(), target)?;
    Ok(())
}

fn set_cloexec(fd: &OwnedFd) {
    use std::os::fd::AsRawFd as _;
    // SAFETY: fcntl on an fd we own, with valid flags.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFD);
        if flags >= 0 {
            libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, flags | libc::FD_CLOEXEC);
        }
    }
}

/// How the daemon is supervised, as clients need to know to restart it.
#[derive(Debug)]
pub struct Supervision {
    /// What started it and restarts it.
    pub supervisor: Supervisor,
    /// Its executable at start, to notice an upgrade.
    pub binary: BinaryIdentity,
}

/// The identity of the daemon's executable at start, to notice an upgrade.
#[derive(Debug)]
pub struct BinaryIdentity {
    /// The executable's path.
    path: Option<PathBuf>,
    /// (inode, size, modification time) at start.
    fingerprint: Option<(u64, u64, Option<SystemTime>)>,
}

impl BinaryIdentity {
    /// Records this process's executable.
    pub fn current() -> BinaryIdentity {
        let path = std::env::current_exe().ok();
        let fingerprint = path.as_deref().and_then(fingerprint);
        BinaryIdentity { path, fingerprint }
    }

    /// Whether the file at the executable's path is no longer the one that started.
    pub fn replaced(&self) -> bool {
        match (&self.path, &self.fingerprint) {
            (Some(path), Some(at_start)) => fingerprint(path).as_ref() != Some(at_start),
            _ => false,
        }
    }
}

fn fingerprint(path: &std::path::Path) -> Option<(u64, u64, Option<SystemTime>)> {
    use std::os::unix::fs::MetadataExt as _;
    let metadata = std::fs::metadata(path).ok()?;
    Some((metadata.ino(), metadata.len(), metadata.modified().ok()))
}
