//! Starting and stopping the daemon from the command line.
//!
//! `cloudctl up` and every command that needs the daemon start it detached: a new process
//! group (so the terminal's Ctrl-C does not reach it), no terminal on its standard streams,
//! and its early errors (those before its log file is open) in `cloudd.stderr` in the
//! state directory. Readiness is the daemon answering a hello on its socket.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cloud_protocol::ipc::{ErrorCode, Request, Response};
use cloud_protocol::paths::Paths;

use crate::client::{Client, ClientError};

/// The longest `up` waits for a new daemon to answer.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest `down` waits for the daemon to exit (its drain is bounded by 5 s).
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// The daemon could not be started or stopped.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// Talking to the daemon failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The binary could not be run.
    #[error("cannot run {binary}: {source}; set CLOUDD_BIN to the cloudd binary")]
    Spawn {
        /// The binary.
        binary: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The daemon exited while starting.
    #[error("cloudd exited while starting ({status}): {stderr}")]
    Exited {
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed.
        stderr: String,
    },
    /// The daemon did not answer in time.
    #[error("cloudd did not answer within {0:?}; see its log in the state directory")]
    Timeout(Duration),
    /// A daemon of another version could not be restarted.
    #[error("cannot restart cloudd: {0}")]
    Restart(String),
    /// A file the launcher needs could not be prepared.
    #[error("cannot prepare {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// What [`ensure_running`] found or did.
#[derive(Debug)]
pub struct Running {
    /// A greeted connection to the daemon.
    pub client: Client,
    /// Whether this call started it.
    pub started: bool,
    /// Why this call restarted it (another version was running), if it did.
    pub restarted: Option<String>,
}

/// Connects to the daemon, starting it first when it is absent, and restarting it when it
/// is of another version than this client (an upgrade was installed meanwhile): through
/// its service manager when it runs under one, directly otherwise. The restart drains the
/// old daemon, so nothing it has accepted is lost.
pub async fn ensure_running(paths: &Paths, client_name: &str) -> Result<Running, LaunchError> {
    let reason = match Client::connect(paths, client_name).await {
        Ok(client) => match outdated(client.daemon()) {
            None => {
                return Ok(Running {
                    client,
                    started: false,
                    restarted: None,
                })
            }
            Some(reason) => {
                let old_pid = client.daemon().pid;
                match crate::service::manager_of(client.daemon().supervisor) {
                    Some(manager) => {
                        drop(client);
                        let context = crate::service::Context::from_env(paths.clone())
                            .map_err(|e| LaunchError::Restart(e.to_string()))?;
                        crate::service::run(&manager.restart_command(&context), manager.as_ref())
                            .map_err(|e| LaunchError::Restart(e.to_string()))?;
                    }
                    None => {
                        drop(client);
                        stop(paths, client_name).await?;
                    }
                }
                wait_for_exit(old_pid).await?;
                reason
            }
        },
        Err(e) if e.is_not_running() => {
            let mut spawned = spawn_detached(paths)?;
            let client = wait_until_answering(paths, client_name, &mut spawned).await?;
            return Ok(Running {
                client,
                started: true,
                restarted: None,
            });
        }
        Err(ClientError::VersionMismatch(message)) => {
            // It cannot be asked to stop over the socket: signal the lock holder instead.
            let pid = lock_holder_pid(paths).ok_or_else(|| {
                LaunchError::Restart(format!("{message}; and its pid is unknown"))
            })?;
            terminate(pid);
            wait_for_exit(pid).await?;
            message
        }
        Err(e) => return Err(e.into()),
    };
    // Under a service manager the new daemon is (socket-)activated; otherwise start it.
    let client = match Client::connect(paths, client_name).await {
        Ok(client) => client,
        Err(e) if e.is_not_running() => {
            let mut spawned = spawn_detached(paths)?;
            wait_until_answering(paths, client_name, &mut spawned).await?
        }
        Err(e) => return Err(e.into()),
    };
    Ok(Running {
        client,
        started: false,
        restarted: Some(reason),
    })
}

/// A version as comparable numbers (`0.1.10` > `0.1.9`); pre-release tags are ignored.
fn version_key(version: &str) -> Vec<u64> {
    version
        .split(['-', '+'])
        .next()
        .unwrap_or("")
        .split('.')
        .map(|part| part.parse().unwrap_or(0))
        .collect()
}

/// Why a daemon must be restarted for this client, if it must: it is older than this
/// client, or its binary was replaced on disk. A newer daemon is left alone (an old
/// client must not downgrade it on every command).
pub fn outdated(hello: &cloud_protocol::ipc::HelloReply) -> Option<String> {
    if version_key(&hello.daemon_version) < version_key(crate::VERSION) {
        Some(format!(
            "cloudd {} (pid {}) is older than this cloudctl {}",
            hello.daemon_version,
            hello.pid,
            crate::VERSION
        ))
    } else if hello.binary_replaced {
        Some(format!(
            "cloudd (pid {}) was upgraded on disk since it started",
            hello.pid
        ))
    } else {
        None
    }
}

/// The pid written in the daemon's lock file.
fn lock_holder_pid(paths: &Paths) -> Option<u32> {
    std::fs::read_to_string(paths.lock_file())
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Asks a process to drain and exit.
fn terminate(pid: u32) {
    #[cfg(unix)]
    // SAFETY: sending SIGTERM to the daemon's pid.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGTERM);
    }
    #[cfg(not(unix))]
    let _ = pid;
}

/// Starts `cloudd --detached` in its own process group.
fn spawn_detached(paths: &Paths) -> Result<Spawned, LaunchError> {
    let stderr_path = stderr_file(paths);
    create_private_dir(&paths.state_dir)?;
    // Appended, not truncated: two launchers racing must not erase each other's message;
    // each reads only what was written after its own start.
    let mut options = std::fs::OpenOptions::new();
    options.append(true).create(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let stderr = options
        .open(&stderr_path)
        .map_err(|source| LaunchError::Io {
            path: stderr_path.clone(),
            source,
        })?;
    let stderr_from = stderr.metadata().map(|m| m.len()).unwrap_or(0);
    let binary = crate::cloudd_binary();
    let mut command = Command::new(&binary);
    command
        .arg("--detached")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr);
    #[cfg(unix)]
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    let child = command
        .spawn()
        .map_err(|source| LaunchError::Spawn { binary, source })?;
    Ok(Spawned { child, stderr_from })
}

/// A daemon being started, and where its messages begin in the shared stderr file.
#[derive(Debug)]
struct Spawned {
    child: Child,
    stderr_from: u64,
}

/// Where a detached daemon's early errors go.
fn stderr_file(paths: &Paths) -> PathBuf {
    paths.state_dir.join("cloudd.stderr")
}

fn create_private_dir(path: &Path) -> Result<(), LaunchError> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(path).map_err(|source| LaunchError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Polls the socket until the new daemon answers. If the child exits first because
/// another daemon won the race to start, that daemon is waited for instead.
async fn wait_until_answering(
    paths: &Paths,
    client_name: &str,
    spawned: &mut Spawned,
) -> Result<Client, LaunchError> {
    let deadline = Instant::now() + START_TIMEOUT;
    let mut delay = Duration::from_millis(2);
    let mut lost_race = false;
    loop {
        match Client::connect(paths, client_name).await {
            Ok(client) => return Ok(client),
            Err(e) if e.is_not_running() => {}
            Err(e) => return Err(e.into()),
        }
        if !lost_race {
            if let Ok(Some(status)) = spawned.child.try_wait() {
                let stderr = std::fs::read(stderr_file(paths))
                    .map(|bytes| {
                        let from = (spawned.stderr_from as usize).min(bytes.len());
                        String::from_utf8_lossy(&bytes[from..]).into_owned()
                    })
                    .unwrap_or_default();
                if stderr.contains("already running") {
                    lost_race = true;
                } else {
                    return Err(LaunchError::Exited {
                        status,
                        stderr: stderr.trim().to_owned(),
                    });
                }
            }
        }
        if Instant::now() >= deadline {
            return Err(LaunchError::Timeout(START_TIMEOUT));
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(100));
    }
}

/// Asks the daemon to shut down and waits until its process has exited. Returns the pid
/// of the stopped daemon, or `None` if none was running.
pub async fn stop(paths: &Paths, client_name: &str) -> Result<Option<u32>, LaunchError> {
    let mut client = match Client::connect(paths, client_name).await {
        Ok(client) => client,
        Err(e) if e.is_not_running() => return Ok(None),
        Err(ClientError::VersionMismatch(_)) => {
            // A daemon of another protocol cannot be asked over the socket: signal it.
            let Some(pid) = lock_holder_pid(paths) else {
                return Ok(None);
            };
            terminate(pid);
            wait_for_exit(pid).await?;
            return Ok(Some(pid));
        }
        Err(e) => return Err(e.into()),
    };
    let pid = client.daemon().pid;
    match client.request(Request::Shutdown).await {
        Ok(Response::ShuttingDown) => {}
        Ok(other) => {
            return Err(
                ClientError::Protocol(format!("unexpected reply to shutdown: {other:?}")).into(),
            )
        }
        // Already draining: wait for it all the same.
        Err(ClientError::Closed(closing)) if closing.code == ErrorCode::ShuttingDown => {}
        Err(e) => return Err(e.into()),
    }
    // The daemon closes every connection when its drain starts; then its process exits.
    while let Ok(Some(_)) = client.next_notification().await {}
    wait_for_exit(pid).await?;
    Ok(Some(pid))
}

/// Waits until process `pid` has exited.
async fn wait_for_exit(pid: u32) -> Result<(), LaunchError> {
    let deadline = Instant::now() + STOP_TIMEOUT;
    let mut delay = Duration::from_millis(2);
    while process_exists(pid) {
        if Instant::now() >= deadline {
            return Err(LaunchError::Timeout(STOP_TIMEOUT));
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(50));
    }
    Ok(())
}

/// Whether a process with this pid exists and has not exited (a zombie waiting for its
/// parent to reap it has exited). On Linux every thread counts: the main thread is a
/// zombie as soon as it exits, while the others (a watcher's, say) may still be ending,
/// and until the last one has, the process's files and their locks (the store's) are
/// still held.
pub fn process_exists(pid: u32) -> bool {
    #[cfg(target_os = "linux")]
    if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        let running = |stat: &str| {
            // The state follows the parenthesised command name, which may itself hold
            // spaces.
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next());
            !matches!(state, Some("Z") | Some("X"))
        };
        if running(&stat) {
            return true;
        }
        let Ok(threads) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return false;
        };
        return threads.flatten().any(|thread| {
            std::fs::read_to_string(thread.path().join("stat")).is_ok_and(|stat| running(&stat))
        });
    }
    #[cfg(unix)]
    {
        // SAFETY: kill with signal 0 only checks that the process exists.
        let result = unsafe { libc::kill(pid as libc::pid_t, 0) };
        result == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        false
    }
}
