//! `cloudctl` as a library: the local-socket client and the daemon launcher.
//!
//! - [`client`]: connects to the daemon, exchanges hellos, sends requests and reads replies
//!   and notifications over the binary framing.
//! - [`launcher`]: finds the `cloudd` binary, starts it detached, waits until it answers,
//!   stops it, and restarts one of another version.
//! - [`service`]: running cloudd at login under systemd or launchd.
//!
//! Architecture invariant: the CLI talks to the daemon only through the socket. It never
//! opens the daemon's stores.

pub mod client;
pub mod launcher;
pub mod service;

/// This build's version, sent in the hello.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
