//! The forwarder inside a `limited` sandbox (`cloud-relay sandbox-forward --socket S
//! --port P -- PROGRAM ARGS...`): listens on `127.0.0.1:P` of the sandbox's own network
//! namespace, starts the program (stdio inherited, `http_proxy`/`https_proxy` already
//! pointing at that port), and relays every connection to the session's proxy socket `S`
//! bound into the sandbox. It exits with the program's status.
//!
//! It is the sandbox's only way out, and it only reaches the proxy, which decides. This
//! module never looks at the bytes it relays.

use std::path::PathBuf;
use std::process::ExitCode;

use tokio::net::{TcpListener, UnixStream};

/// The forwarder failed before its program could run.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// Its runtime could not be built.
    #[error("cannot start the forwarder's runtime: {0}")]
    Runtime(std::io::Error),
    /// The port could not be bound.
    #[error("cannot listen on 127.0.0.1:{port}: {source}")]
    Listen {
        /// The port.
        port: u16,
        /// Why.
        source: std::io::Error,
    },
    /// No program was given.
    #[error("no program to run: give it after `--`")]
    NoProgram,
    /// The program could not be started.
    #[error("cannot start `{program}`: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        source: std::io::Error,
    },
}

/// Runs the forwarder and the program until the program exits; returns its exit code
/// (128 + the signal that ended it). Builds its own runtime: call it from a plain `main`.
pub fn run(socket: PathBuf, port: u16, program: Vec<String>) -> Result<ExitCode, ForwardError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ForwardError::Runtime)?;
    runtime.block_on(async move {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .await
            .map_err(|source| ForwardError::Listen { port, source })?;
        let (name, args) = program.split_first().ok_or(ForwardError::NoProgram)?;
        let mut child = tokio::process::Command::new(name)
            .args(args)
            .spawn()
            .map_err(|source| ForwardError::Spawn {
                program: name.clone(),
                source,
            })?;
        let status = loop {
            tokio::select! {
                status = child.wait() => break status,
                accepted = listener.accept() => {
                    let Ok((mut client, _)) = accepted else {
                        // Out of descriptors, most likely: let some close.
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    };
                    let socket = socket.clone();
                    tokio::spawn(async move {
                        if let Ok(mut proxy) = UnixStream::connect(&socket).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut proxy).await;
                        }
                    });
                }
            }
        };
        let code = match status {
            Ok(status) => status.code().unwrap_or_else(|| {
                #[cfg(unix)]
                {
                    std::os::unix::process::ExitStatusExt::signal(&status).map_or(1, |s| 128 + s)
                }
                #[cfg(not(unix))]
                1
            }),
            Err(_) => 1,
        };
        Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
    })
}
