//! `cloudctl` as a library: the local-socket client and the daemon launcher.
//!
//! - [`client`]: connects to the daemon, exchanges hellos, sends requests and reads replies
//!   and notifications over the binary framing.
//! - [`cloudd_binary`]: where the `cloudd` binary is (the launcher and the service
//!   installer both need it).
//! - [`launcher`]: starts the daemon detached, waits until it answers,
//!   stops it, and restarts one of another version.
//! - [`service`]: running cloudd at login under systemd or launchd.
//! - [`device`]: waiting for a device login's approval (the polling of RFC 8628).
//!
//! Architecture invariant: the CLI talks to the daemon only through the socket. It never
//! opens the daemon's stores.

pub mod client;
pub mod device;
pub mod launcher;
pub mod service;

/// This build's version, sent in the hello.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The `cloudd` binary: `$CLOUDD_BIN`, else the one beside this executable, else the
/// first `cloudd` on the `PATH`.
pub fn cloudd_binary() -> std::path::PathBuf {
    if let Some(binary) = std::env::var_os("CLOUDD_BIN").filter(|v| !v.is_empty()) {
        return std::path::PathBuf::from(binary);
    }
    let name = format!("cloudd{}", std::env::consts::EXE_SUFFIX);
    let beside_this = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(&name)));
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .map(|dir| dir.join(&name));
    beside_this
        .into_iter()
        .chain(on_path)
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| std::path::PathBuf::from(name))
}
