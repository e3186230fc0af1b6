//! Turns SIGTERM, SIGINT and SIGHUP into [`CoreEvent`]s (signal-hook-tokio).
//!
//! Signal handlers only set flags; this task reads them and talks to the core loop over its
//! channel, so nothing runs in signal context.

use futures_util::StreamExt as _;
use tokio::sync::mpsc;

use crate::event::{CoreEvent, Signal};

/// Installs the handlers and forwards signals to `core` until the core is gone.
#[cfg(unix)]
pub fn spawn(core: mpsc::Sender<CoreEvent>) -> std::io::Result<tokio::task::JoinHandle<()>> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook_tokio::Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    Ok(tokio::spawn(async move {
        while let Some(number) = signals.next().await {
            let signal = match number {
                SIGTERM => Signal::Terminate,
                SIGINT => Signal::Interrupt,
                _ => Signal::Hangup,
            };
            if core.send(CoreEvent::Signal(signal)).await.is_err() {
                break;
            }
        }
    }))
}

/// Forwards Ctrl-C where Unix signals do not exist.
#[cfg(not(unix))]
pub fn spawn(core: mpsc::Sender<CoreEvent>) -> std::io::Result<tokio::task::JoinHandle<()>> {
    Ok(tokio::spawn(async move {
        while tokio::signal::ctrl_c().await.is_ok() {
            if core
                .send(CoreEvent::Signal(Signal::Interrupt))
                .await
                .is_err()
            {
                break;
            }
        }
    }))
}
