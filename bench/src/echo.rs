//! The raw Unix-socket baselines: servers that answer a fixed-size message with a
//! fixed-size reply and do nothing else.
//!
//! A client opens a connection by sending a 12-byte header: request length, reply length,
//! and the CPU the server side of this connection should be pinned to (`u32::MAX`: any),
//! each u32 little-endian. From then on the server reads exactly one request's
//! bytes and writes one reply's bytes, until the client hangs up. With the request and
//! reply lengths of a real cloudd exchange, this is the least any server could do for the
//! same traffic: no decoding, no handling, no encoding.
//!
//! Two servers, so the comparison can be read both ways:
//!
//! - [`spawn_threaded`], the stated baseline: a blocking std thread per connection, as the
//!   simplest server would be written. With several clients its connections run on both
//!   cores.
//! - [`spawn_tokio`]: one current-thread tokio runtime serving every connection, the same
//!   architecture as the daemon (one thread, epoll). It shows how much of the daemon's
//!   figures is the runtime rather than the daemon's own work.

use std::io::{Read as _, Write as _};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// The size of the connection header: request length, reply length, server CPU.
pub const HEADER_LEN: usize = 12;

/// The header a client sends first.
pub fn header(
    request_len: usize,
    response_len: usize,
    server_cpu: Option<usize>,
) -> [u8; HEADER_LEN] {
    let cpu = server_cpu.map_or(u32::MAX, |cpu| cpu as u32);
    let mut header = [0u8; HEADER_LEN];
    header[..4].copy_from_slice(&(request_len as u32).to_le_bytes());
    header[4..8].copy_from_slice(&(response_len as u32).to_le_bytes());
    header[8..].copy_from_slice(&cpu.to_le_bytes());
    header
}

/// Reads the header and pins the calling thread (the connection's thread, or the tokio
/// server's only thread) as it asks. Returns the request and reply lengths.
fn apply_header(header: [u8; HEADER_LEN]) -> (usize, usize) {
    let field = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().expect("4 bytes"));
    let cpu = field(8);
    let cpu = (cpu != u32::MAX).then_some(cpu as usize);
    if let Err(e) = crate::affinity::pin(0, cpu) {
        eprintln!("echo server: cannot pin to {cpu:?}: {e}");
    }
    (field(0) as usize, field(4) as usize)
}

/// Binds `path` and serves it with a blocking thread per connection, until the process
/// exits.
pub fn spawn_threaded(path: &Path) -> std::io::Result<()> {
    let listener = UnixListener::bind(path)?;
    std::thread::Builder::new()
        .name("echo-accept".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let spawned = std::thread::Builder::new()
                    .name("echo-conn".into())
                    .spawn(move || serve_blocking(stream));
                if let Err(e) = spawned {
                    eprintln!("echo server: cannot spawn a connection thread: {e}");
                }
            }
        })?;
    Ok(())
}

fn serve_blocking(mut stream: UnixStream) {
    let mut header = [0u8; HEADER_LEN];
    if stream.read_exact(&mut header).is_err() {
        return;
    }
    let (request_len, response_len) = apply_header(header);
    let mut request = vec![0u8; request_len];
    let response = vec![b'x'; response_len];
    while stream.read_exact(&mut request).is_ok() {
        if stream.write_all(&response).is_err() {
            return;
        }
    }
}

/// Binds `path` and serves every connection on one current-thread tokio runtime (its own
/// thread), until the process exits.
pub fn spawn_tokio(path: &Path) -> std::io::Result<()> {
    let listener = UnixListener::bind(path)?;
    listener.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("echo-tokio".into())
        .spawn(move || {
            runtime.block_on(async move {
                let listener = match tokio::net::UnixListener::from_std(listener) {
                    Ok(listener) => listener,
                    Err(e) => {
                        eprintln!("tokio echo server: {e}");
                        return;
                    }
                };
                while let Ok((stream, _)) = listener.accept().await {
                    tokio::spawn(serve_tokio(stream));
                }
            })
        })?;
    Ok(())
}

async fn serve_tokio(mut stream: tokio::net::UnixStream) {
    let mut header = [0u8; HEADER_LEN];
    if stream.read_exact(&mut header).await.is_err() {
        return;
    }
    let (request_len, response_len) = apply_header(header);
    let mut request = vec![0u8; request_len];
    let response = vec![b'x'; response_len];
    while stream.read_exact(&mut request).await.is_ok() {
        if stream.write_all(&response).await.is_err() {
            return;
        }
    }
}
