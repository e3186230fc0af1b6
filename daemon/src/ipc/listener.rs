//! Binding the socket and accepting clients.
//!
//! Only the holder of the instance lock calls [`bind`], so any socket file found at the path
//! belongs to a dead daemon and is removed. The directory is made 0700 and the socket 0600
//! so only this user can reach it; [`super::connection`] still checks every peer's uid.

use std::path::Path;
use std::sync::Arc;

use interprocess::local_socket::tokio::Listener;
use interprocess::local_socket::traits::tokio::Listener as _;
use interprocess::local_socket::ListenerOptions;
use tokio_util::task::TaskTracker;

use super::{connection, IpcError};
use crate::state::Shared;

/// The socket as an `interprocess` name: [`Paths::socket`] on Unix, [`Paths::pipe_name`]
/// on Windows (the location rule itself is in `cloud_protocol::paths`).
fn socket_name(
    paths: &cloud_protocol::paths::Paths,
) -> std::io::Result<interprocess::local_socket::Name<'_>> {
    #[cfg(unix)]
    {
        use interprocess::local_socket::{GenericFilePath, ToFsName as _};
        paths.socket.as_path().to_fs_name::<GenericFilePath>()
    }
    #[cfg(windows)]
    {
        use interprocess::local_socket::{GenericNamespaced, ToNsName as _};
        paths.pipe_name().to_ns_name::<GenericNamespaced>()
    }
}

/// Prepares the socket's directory and binds the socket.
pub fn bind(shared: &Shared) -> Result<Listener, IpcError> {
    let paths = &shared.paths;
    prepare_dir(paths.socket_dir(), !paths.socket_overridden, shared.uid)?;
    remove_stale_socket(&paths.socket)?;
    let name = socket_name(paths).map_err(|source| IpcError::Bind {
        path: paths.socket.clone(),
        source,
    })?;
    let options = ListenerOptions::new().name(name).reclaim_name(true);
    #[cfg(unix)]
    let options = {
        use interprocess::os::unix::local_socket::ListenerOptionsExt as _;
        options.mode(0o600)
    };
    let listener = options.create_tokio().map_err(|source| IpcError::Bind {
        path: paths.socket.clone(),
        source,
    })?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&paths.socket, std::fs::Permissions::from_mode(0o600)).map_err(
            |source| IpcError::Bind {
                path: paths.socket.clone(),
                source,
            },
        )?;
    }
    Ok(listener)
}

/// Serves a listening socket handed over by the service manager (socket activation).
/// Its file and modes are the manager's: the daemon neither creates nor removes them.
/// Returns the listener and the socket's path, when it has one.
#[cfg(unix)]
pub fn adopt(fd: std::os::fd::OwnedFd) -> Result<(Listener, Option<std::path::PathBuf>), IpcError> {
    use interprocess::os::unix::uds_local_socket::tokio::Listener as UdsListener;
    let std_listener = std::os::unix::net::UnixListener::from(fd);
    let path = std_listener
        .local_addr()
        .ok()
        .and_then(|address| address.as_pathname().map(Path::to_owned));
    let io = |source| IpcError::Bind {
        path: path.clone().unwrap_or_default(),
        source,
    };
    let listener = UdsListener::try_from(std::os::fd::OwnedFd::from(std_listener)).map_err(io)?;
    Ok((Listener::from(listener), path))
}

/// Creates the socket directory and, when it is ours to manage, makes it 0700 and checks
/// that this user owns it.
fn prepare_dir(dir: &Path, manage: bool, uid: u32) -> Result<(), IpcError> {
    let io = |source| IpcError::SocketDir {
        path: dir.to_owned(),
        source,
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _};
        let existed = dir.is_dir();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io)?;
        if manage || !existed {
            let metadata = std::fs::metadata(dir).map_err(io)?;
            if metadata.uid() != uid {
                return Err(IpcError::ForeignSocketDir {
                    path: dir.to_owned(),
                    owner: metadata.uid(),
                    uid,
                });
            }
            if metadata.permissions().mode() & 0o777 != 0o700 {
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                    .map_err(io)?;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (manage, uid);
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    Ok(())
}

/// Removes a socket left by a daemon that died without cleaning up. Refuses to remove
/// anything that is not a socket, or a socket something still listens on (another
/// daemon, of another state directory, sharing this socket path through `CLOUDD_SOCKET`).
fn remove_stale_socket(path: &Path) -> Result<(), IpcError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt as _;
        match std::fs::symlink_metadata(path) {
            Ok(metadata) if metadata.file_type().is_socket() => {
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(IpcError::SocketInUse {
                        path: path.to_owned(),
                    });
                }
                tracing::info!(socket = %path.display(), "removing stale socket left by a previous daemon");
                std::fs::remove_file(path).map_err(|source| IpcError::Bind {
                    path: path.to_owned(),
                    source,
                })?;
            }
            Ok(_) => {
                return Err(IpcError::NotASocket {
                    path: path.to_owned(),
                })
            }
            Err(_) => {}
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Accepts clients until the drain starts, serving each on its own task.
pub async fn accept_loop(listener: Listener, shared: Arc<Shared>, tracker: TaskTracker) {
    let mut next_connection_id: u64 = 0;
    loop {
        let stream = tokio::select! {
            biased;
            _ = shared.shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(stream) => stream,
                Err(e) => {
                    // Typically EMFILE: back off briefly rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        next_connection_id += 1;
        tracker.spawn(connection::serve(
            stream,
            Arc::clone(&shared),
            next_connection_id,
        ));
    }
    // Dropping the listener removes the socket file: new clients are refused from now on.
    drop(listener);
    tracing::debug!("stopped accepting clients");
}
