//! The embedded relay: with no relay configured, the daemon runs `cloud-relay` in-process
//! on 127.0.0.1 (an ephemeral port), with its data under the state directory and a token
//! minted locally, so one command on a fresh machine runs the whole product.
//!
//! The relay gets its own thread and runtime, so its work (agents, its store's flushes)
//! never delays the daemon's socket loop.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::credentials::Credentials;

/// The org of the local user on the embedded relay.
pub const LOCAL_ORG: &str = "local";

/// How long the relay may take to start.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// A running embedded relay.
#[derive(Debug)]
pub struct EmbeddedRelay {
    /// How the bridge reaches it.
    pub credentials: Credentials,
    /// Tells the relay thread to shut down.
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    /// The relay thread.
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The embedded relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    /// Its files could not be prepared.
    #[error("cannot prepare the embedded relay's {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The relay failed.
    #[error("the embedded relay failed to start: {0}")]
    Relay(String),
}

impl EmbeddedRelay {
    /// Starts the relay with its data in `state_dir/relay`.
    pub fn start(state_dir: &Path) -> Result<EmbeddedRelay, EmbeddedError> {
        let data_dir = state_dir.join("relay");
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| EmbeddedError::Io { path, source }
        };
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(&data_dir).map_err(io(&data_dir))?;
        let token = local_token(&data_dir)?;
        let exe = std::env::current_exe().map_err(io(Path::new("current executable")))?;
        let config = cloud_relay::RelayConfig {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            data_dir,
            agent_command: vec![exe.display().to_string(), "shell-agent".into()],
            access_token_ttl: cloud_relay::auth::DEFAULT_ACCESS_TOKEN_TTL,
            // One user on loopback: nobody to protect the relay from.
            limits: cloud_relay::limits::Limits::OFF,
            device: Default::default(),
            presence: Default::default(),
            provider: Default::default(),
        };
        let (address_tx, address_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("embedded-relay".into())
            .spawn(move || {
                // This thread runs the relay's runtime (see memory.rs).
                crate::memory::cache_this_thread();
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = address_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let relay = match cloud_relay::start(config).await {
                        Ok(relay) => relay,
                        Err(e) => {
                            let _ = address_tx.send(Err(e.to_string()));
                            return;
                        }
                    };
                    let _ = address_tx.send(Ok(relay.local_addr()));
                    let _ = stop_rx.await;
                    relay.shutdown().await;
                });
            })
            .map_err(io(Path::new("relay thread")))?;
        let address = address_rx
            .recv_timeout(START_TIMEOUT)
            .map_err(|_| EmbeddedError::Relay("it did not start in time".into()))?
            .map_err(EmbeddedError::Relay)?;
        tracing::info!(%address, "embedded relay listening");
        Ok(EmbeddedRelay {
            credentials: Credentials::login(format!("http://{address}"), token),
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// Shuts the relay down and waits for its thread (which flushes its store).
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

/// The daemon's token on its embedded relay: minted once, kept 0600 beside the relay's
/// data, reused across restarts.
fn local_token(data_dir: &Path) -> Result<String, EmbeddedError> {
    let path = data_dir.join("daemon.token");
    if let Ok(token) = std::fs::read_to_string(&path) {
        let token = token.trim().to_owned();
        if !token.is_empty() {
            return Ok(token);
        }
    }
    let user = std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "me".into());
    let token = cloud_relay::tokens::create(
        data_dir,
        &cloud_relay::tokens::NewKey::new(&user, LOCAL_ORG),
    )
    .map_err(|e| EmbeddedError::Relay(e.to_string()))?;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&path).map_err(|source| EmbeddedError::Io {
        path: path.clone(),
        source,
    })?;
    std::io::Write::write_all(&mut file, token.as_bytes()).map_err(|source| EmbeddedError::Io {
        path: path.clone(),
        source,
    })?;
    Ok(token)
}
